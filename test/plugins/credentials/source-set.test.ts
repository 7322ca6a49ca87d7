import t from 'tap'
import fc from 'fast-check'
import { NoSourceError, SourcesNotSyncedError } from '../../../errors.js'
import { parseRegistryConfig } from '../../../plugins/credentials/file-source.js'
import { SourceSet } from '../../../plugins/credentials/source-set.js'

const [def, mod, shadow] = parseRegistryConfig(
  {
    default: { address: 'r.io', path: 'deckhouse/ce' },
    moduleSources: [
      { name: 'mod', repo: 'r.io/modules/x' },
      { name: 'shadow', repo: 'r.io/deckhouse/ce' },
    ],
  },
  'test',
)

void t.test('match picks the source by repository', (t) => {
  const set = new SourceSet()
  set.replace('file', def && mod ? [def, mod] : [])
  t.equal(set.match(undefined), def, 'no repository: the default source')
  t.equal(set.match(''), def)
  t.equal(set.match('r.io/deckhouse/ce'), def, 'the default source by its own address/path')
  t.equal(set.match('r.io/modules/x'), mod)
  t.equal(set.match('r.io/modules/x/'), mod, 'a trailing slash is tolerated')
  t.equal(set.match('r.io'), def, 'the default source by its bare registry host (address alone)')
  t.equal(set.match('r.io/'), def, 'and with a trailing slash')
  t.equal(set.match('r.io/deckhouse/ce/'), def)
  for (const repository of ['r.io/modules', 'r.io/modules/x/y', 'r.io/deckhouse', 'R.IO/modules/x', 'other.io/modules/x', 'other.io']) {
    t.throws(() => set.match(repository), NoSourceError, repository)
  }
  t.throws(() => set.match('r.io/nope'), { code: 'ENOSOURCE', status: 404 })
  t.end()
})

void t.test('a module source wins over the default for the same repository', (t) => {
  const set = new SourceSet()
  set.replace('file', def && shadow ? [def, shadow] : [])
  t.equal(set.match('r.io/deckhouse/ce'), shadow)
  t.equal(set.match(undefined), def)
  t.equal(set.match('r.io'), def, 'the bare host still names the default source')
  // A ModuleSource whose repo is a bare host wins over the default's bare-host alias too.
  const [, bare] = parseRegistryConfig({ default: { address: 'r.io', path: 'deckhouse/ce' }, moduleSources: [{ name: 'bare', repo: 'r.io' }] }, 'test')
  set.replace('modulesources', bare ? [bare] : [])
  t.equal(set.match('r.io'), bare)
  t.equal(set.match('r.io/deckhouse/ce'), shadow)
  t.end()
})

void t.test('no default source', (t) => {
  const set = new SourceSet()
  set.replace('modulesources', mod ? [mod] : [])
  t.throws(() => set.match(undefined), { code: 'ENOSOURCE', message: /\(default\)/ })
  t.end()
})

void t.test('before every provider synced, no match is a 503 with Retry-After, not a 404', (t) => {
  const set = new SourceSet()
  set.expect('file')
  set.expect('modulesources')
  t.throws(() => set.match('r.io/modules/x'), SourcesNotSyncedError, 'nothing synced yet')
  t.throws(() => set.match(undefined), { code: 'ENOTSYNCED', status: 503, retryAfterSeconds: 5, message: /file, modulesources/ })
  set.replace('file', def ? [def] : [])
  t.equal(set.match(undefined), def, 'what is known already is served')
  t.equal(set.match('r.io/deckhouse/ce'), def)
  t.throws(() => set.match('r.io/modules/x'), { code: 'ENOTSYNCED', message: /\(modulesources\)/ }, 'a ModuleSource may still arrive')
  set.replace('modulesources', [])
  t.throws(() => set.match('r.io/modules/x'), { code: 'ENOSOURCE', status: 404 }, 'once all synced: 404')
  t.end()
})

void t.test('providers sync and replace their group atomically', (t) => {
  const set = new SourceSet()
  set.expect('file')
  set.expect('secret')
  t.same(set.unsynced(), ['file', 'secret'])
  t.same(set.all(), [])
  set.replace('file', def ? [def] : [])
  t.same(set.unsynced(), ['secret'])
  set.expect('file')
  t.same(set.unsynced(), ['secret'], 'expecting a synced provider again changes nothing')
  set.replace('secret', mod ? [mod] : [])
  t.same(set.unsynced(), [])
  t.equal(set.all().length, 2)
  set.replace('secret', [])
  t.same(set.all(), def ? [def] : [], 'a provider replaces only its own group')
  t.end()
})

void t.test('remembered matches: any interleaving of provider changes and matches answers as a fresh set would', (t) => {
  // match() keeps its answers between changes; a change (expect, replace) must forget them all,
  // a refusal is never kept, and however many spellings a client sends, at most 64 are kept.
  const [other] = parseRegistryConfig({ default: { address: 'o.io', path: 'p' }, moduleSources: [{ name: 'mod2', repo: 'r.io/modules/x' }] }, 'test2')
  const pool = [def, mod, shadow, other].filter((s) => s !== undefined)
  const provider = fc.constantFrom('file', 'secret', 'modulesources')
  const step = fc.oneof(
    fc.record({ op: fc.constant('expect' as const), provider }),
    fc.record({ op: fc.constant('replace' as const), provider, sources: fc.subarray(pool) }),
    fc.record({
      op: fc.constant('match' as const),
      repository: fc.oneof(
        fc.constant(undefined),
        fc.constantFrom('', 'r.io', 'r.io/deckhouse/ce', 'r.io/modules/x', 'o.io/p', 'o.io', 'nope'),
        fc.tuple(fc.constantFrom('r.io/modules/x', 'r.io', 'nope'), fc.nat(80)).map(([r, n]) => r + '/'.repeat(n)),
      ),
    }),
  )
  const answer = (set: SourceSet, repository: string | undefined): unknown => {
    try {
      return set.match(repository)
    } catch (err) {
      return `${(err as Error).constructor.name}: ${(err as Error).message}`
    }
  }
  let matches = 0
  fc.assert(
    fc.property(fc.array(step, { minLength: 10, maxLength: 60 }), (steps) => {
      const set = new SourceSet()
      const done: typeof steps = []
      for (const s of steps) {
        if (s.op === 'expect') set.expect(s.provider)
        else if (s.op === 'replace') set.replace(s.provider, s.sources, 0)
        else {
          // The reference: a new set that has seen the same changes and never matched before.
          const fresh = new SourceSet()
          for (const d of done) {
            if (d.op === 'expect') fresh.expect(d.provider)
            else if (d.op === 'replace') fresh.replace(d.provider, d.sources, 0)
          }
          matches++
          if (answer(set, s.repository) !== answer(fresh, s.repository)) return false
        }
        done.push(s)
      }
      return true
    }),
    { numRuns: 400 },
  )
  t.ok(matches > 1000, `matches compared (${matches})`)
  t.end()
})
