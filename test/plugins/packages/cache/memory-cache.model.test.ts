import fc from 'fast-check'
import t from 'tap'
import { HotCache, type HotUse } from '../../../../plugins/packages/cache/memory-cache.js'

/**
 * Model-based test of the memory cache's books: arbitrary sequences of puts (small and large
 * entries), holds by responses, releases, deletes and lookups. After every step the cache must
 * agree with a plain model, and the bytes really in memory (live entries plus removed ones a
 * response still holds) must stay within the budget.
 */

const MAX = 100
const ENTRY = 20
const DIGESTS = ['a', 'b', 'c']

interface Slot {
  digest: string
  size: number
  live: boolean
  users: number
}

interface Model {
  /** Live slots, least recently used first. */
  lru: Slot[]
  /** Every slot ever made, for the held bytes. */
  slots: Slot[]
  uses: Array<{ use: HotUse; slot: Slot; released: boolean }>
}

interface Real {
  hot: HotCache
}

function check(m: Model, r: Real): void {
  const live = m.lru.reduce((n, s) => n + s.size, 0)
  const held = m.slots.filter((s) => !s.live && s.users > 0).reduce((n, s) => n + s.size, 0)
  if (r.hot.bytes !== live) throw new Error(`bytes ${r.hot.bytes}, model ${live}`)
  if (r.hot.held !== held) throw new Error(`held ${r.hot.held}, model ${held}`)
  if (live + held > MAX) throw new Error(`${live} live + ${held} held bytes over the ${MAX} budget`)
  for (const d of DIGESTS) {
    if (r.hot.has(d) !== m.lru.some((s) => s.digest === d)) throw new Error(`has(${d}) disagrees`)
  }
}

function kill(m: Model, slot: Slot): void {
  m.lru = m.lru.filter((s) => s !== slot)
  slot.live = false
}

class Put implements fc.Command<Model, Real> {
  constructor(
    readonly digest: string,
    readonly size: number,
  ) {}
  check = (): boolean => true
  run(m: Model, r: Real): void {
    const admissible = (this.size <= ENTRY && this.size <= MAX) || (this.size > ENTRY && this.size <= MAX / 2)
    const kept = r.hot.put(this.digest, Buffer.alloc(this.size))
    if (admissible) {
      const heldBytes = (): number => m.slots.filter((s) => !s.live && s.users > 0).reduce((n, s) => n + s.size, 0)
      const liveBytes = (): number => m.lru.reduce((n, s) => n + s.size, 0)
      const old = m.lru.find((s) => s.digest === this.digest)
      if (old) kill(m, old)
      // Only entries no response is sending free memory when evicted; nothing is evicted for
      // an entry that would not fit even then.
      const freeable = m.lru.filter((s) => s.users === 0).reduce((n, s) => n + s.size, 0)
      const fits = liveBytes() - freeable + heldBytes() + this.size <= MAX
      if (fits) {
        for (const s of [...m.lru]) {
          if (liveBytes() + heldBytes() + this.size <= MAX) break
          if (s.users === 0) kill(m, s)
        }
      }
      if (kept !== fits) throw new Error(`put ${this.digest}/${this.size}: kept ${kept}, model ${fits}`)
      if (fits) {
        const slot = { digest: this.digest, size: this.size, live: true, users: 0 }
        m.lru.push(slot)
        m.slots.push(slot)
      }
    } else if (kept) throw new Error(`a ${this.size}-byte entry was kept`)
    check(m, r)
  }
  toString = (): string => `put(${this.digest}, ${this.size})`
}

class Use implements fc.Command<Model, Real> {
  constructor(readonly digest: string) {}
  check = (): boolean => true
  run(m: Model, r: Real): void {
    const use = r.hot.use(this.digest)
    const slot = m.lru.find((s) => s.digest === this.digest)
    if (!slot) {
      if (use) throw new Error(`use(${this.digest}) gave bytes the model does not have`)
    } else {
      if (!use || use.buffer.length !== slot.size) throw new Error(`use(${this.digest}) gave ${use?.buffer.length}`)
      slot.users++
      m.uses.push({ use, slot, released: false })
      m.lru = [...m.lru.filter((s) => s !== slot), slot]
    }
    check(m, r)
  }
  toString = (): string => `use(${this.digest})`
}

class Release implements fc.Command<Model, Real> {
  constructor(
    readonly pick: number,
    readonly twice: boolean,
  ) {}
  check = (m: Readonly<Model>): boolean => m.uses.length > 0
  run(m: Model, r: Real): void {
    const u = m.uses[this.pick % m.uses.length]
    if (!u) return
    u.use.release()
    if (this.twice) u.use.release() // idempotent
    if (!u.released) {
      u.released = true
      u.slot.users--
    }
    check(m, r)
  }
  toString = (): string => `release(#${this.pick}${this.twice ? ', twice' : ''})`
}

class Delete implements fc.Command<Model, Real> {
  constructor(readonly digest: string) {}
  check = (): boolean => true
  run(m: Model, r: Real): void {
    r.hot.delete(this.digest)
    const slot = m.lru.find((s) => s.digest === this.digest)
    if (slot) kill(m, slot)
    check(m, r)
  }
  toString = (): string => `delete(${this.digest})`
}

void t.test('memory cache books hold under arbitrary puts, holds, releases and deletes', (t) => {
  const digest = fc.constantFrom(...DIGESTS)
  const commands = [
    fc.tuple(digest, fc.constantFrom(1, 15, 20, 30, 50, 55)).map(([d, size]) => new Put(d, size)),
    digest.map((d) => new Use(d)),
    fc.tuple(fc.nat(), fc.boolean()).map(([pick, twice]) => new Release(pick, twice)),
    digest.map((d) => new Delete(d)),
  ]
  fc.assert(
    fc.property(fc.commands(commands, { maxCommands: 60, size: 'medium' }), (cmds) => {
      const model: Model = { lru: [], slots: [], uses: [] }
      const real: Real = { hot: new HotCache(MAX, ENTRY) }
      fc.modelRun(() => ({ model, real }), cmds)
      // Once every response is done, nothing removed is counted any more.
      for (const u of model.uses) u.use.release()
      if (real.hot.held !== 0) throw new Error(`${real.hot.held} bytes still held after every release`)
    }),
    { numRuns: 1000 },
  )
  t.pass('1000 runs of up to 60 steps, books checked after every step')
  t.end()
})
