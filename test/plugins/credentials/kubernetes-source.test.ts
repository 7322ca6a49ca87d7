import t, { type Test } from 'tap'
import { providerMetric, startCredentialsPlugin, type CredentialsPlugin } from '../../fixtures/credentials-plugin.js'
import { FakeKubeApi, b64, moduleSource, registrySecret } from '../../fixtures/fake-kube-api.js'
import { eventually } from '../../fixtures/eventually.js'
import { freePort } from '../../fixtures/net.js'
import { DEFAULT_INFORMER_TIMING, type InformerTiming } from '../../../plugins/credentials/restarting-informer.js'

const TOKEN = 'kube-token-4f9c2e'
const PASSWORD = 'registry-pass-7d1a'
const FAST = { initialBackoffMs: 20, maxBackoffMs: 200, requestTimeoutMs: 3000, stableWatchMs: 1000 }

const dockerCfg = (host: string, password = PASSWORD): string => JSON.stringify({ auths: { [host]: { auth: b64(`user:${password}`) } } })

interface Started extends CredentialsPlugin {
  api: FakeKubeApi
  repositories: () => string[]
}

/** The credentials plugin alone on a hapi server, pointed at `api` through a kubeconfig. */
async function startPlugin(t: Test, api: FakeKubeApi, timing: Partial<InformerTiming> = FAST): Promise<Started> {
  const kubeconfig = api.writeKubeconfig(t.testdir(), TOKEN)
  const s = await startCredentialsPlugin(t, { kubeconfig, env: {}, kubernetesTiming: timing })
  return {
    api,
    ...s,
    repositories: () =>
      s.sources
        .all()
        .map((source) => `${source.kind}:${source.repository}`)
        .sort(),
  }
}

async function startApi(t: Test): Promise<FakeKubeApi> {
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  return api
}

void t.test('lists, then watches from the list resourceVersion, with the kubeconfig bearer token', async (t) => {
  const api = await startApi(t)
  api.putSecret(
    registrySecret({ address: 'registry.example.com', path: '/deckhouse/ee', scheme: 'https', dockerconfigjson: dockerCfg('registry.example.com') }),
  )
  api.putModuleSource(moduleSource('one', { repo: 'modules.example.com/one', dockerCfg: b64(dockerCfg('modules.example.com')) }))
  const listRv = api.resourceVersion
  const s = await startPlugin(t, api)
  await eventually(() => s.sources.unsynced().length === 0, 'both providers synced')
  t.same(s.repositories(), ['default:registry.example.com/deckhouse/ee', 'module-source:modules.example.com/one'])
  const def = s.sources.match(undefined)
  t.equal(def.scheme, 'https')
  t.equal(def.credentials?.basicHeader(), `Basic ${b64(`user:${PASSWORD}`)}`, 'credentials from auths[address]')
  t.equal(s.sources.match('modules.example.com/one').credentials?.username, 'user')

  await eventually(() => api.openWatches() === 2, 'both watches open')
  const lists = api.requests.filter((r) => !r.watch)
  const watches = api.requests.filter((r) => r.watch)
  t.same(lists.map((r) => r.path).sort(), ['/api/v1/namespaces/d8-system/secrets', '/apis/deckhouse.io/v1alpha1/modulesources'])
  t.same(
    watches.map((r) => r.query.resourceVersion),
    [listRv, listRv],
    'each watch starts at its list resourceVersion',
  )
  const secretRequests = api.requests.filter((r) => r.resource === 'secrets')
  t.ok(
    secretRequests.length >= 2 && secretRequests.every((r) => r.query.fieldSelector === 'metadata.name=deckhouse-registry'),
    'Secret list and watch select the one Secret by name',
  )
  t.ok(api.requests.length >= 4)
  t.same(new Set(api.authorizationHeaders()), new Set([`Bearer ${TOKEN}`]), 'every request carries the kubeconfig token')

  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_synced', 'secret'), 1)
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_synced', 'modulesources'), 1)
  const lastSync = await providerMetric(s.metrics, 'registry_packages_proxy_source_last_sync_timestamp_seconds', 'secret')
  t.ok(lastSync !== undefined && Math.abs(lastSync - Date.now() / 1000) < 5, 'last sync is now while the watch is open')
  t.notOk(s.logs.text.includes(PASSWORD) || s.logs.text.includes(TOKEN) || s.logs.text.includes(b64(`user:${PASSWORD}`)), 'no secret in the logs')
  t.match(s.logs.text, /registry\.example\.com\/deckhouse\/ee/, 'logs name the repositories')
})

void t.test('add, modify and delete of the Secret and of ModuleSources take effect', async (t) => {
  const api = await startApi(t)
  const s = await startPlugin(t, api)
  await eventually(() => s.sources.unsynced().length === 0, 'synced with nothing')
  t.same(s.repositories(), [], 'no Secret, no ModuleSource: synced and empty')
  await eventually(() => api.openWatches() === 2, 'watches open')

  api.putSecret(registrySecret({ address: 'r1.example.com', path: 'a' }))
  await eventually(() => s.repositories().includes('default:r1.example.com/a'), 'Secret added')
  api.putSecret(registrySecret({ address: 'r2.example.com', path: 'b', scheme: 'http' }))
  await eventually(() => s.repositories().includes('default:r2.example.com/b'), 'Secret modified')
  t.equal(s.sources.match(undefined).scheme, 'http')
  t.throws(() => s.sources.match('r1.example.com/a'), { code: 'ENOSOURCE' }, 'the old default repository is gone')

  api.putModuleSource(moduleSource('m1', { repo: 'm.example.com/one' }))
  api.putModuleSource(moduleSource('m2', { repo: 'm.example.com/two', scheme: 'HTTP' }))
  await eventually(() => s.repositories().length === 3, 'two ModuleSources added')
  t.equal(s.sources.match('m.example.com/two').scheme, 'http')
  api.putModuleSource(moduleSource('m2', { repo: 'm.example.com/two', dockerCfg: b64(dockerCfg('m.example.com')) }))
  await eventually(() => s.sources.match('m.example.com/two').credentials !== undefined, 'ModuleSource modified')

  // A changed repo retires the old repository.
  api.putModuleSource(moduleSource('m1', { repo: 'm.example.com/moved' }))
  await eventually(() => s.repositories().includes('module-source:m.example.com/moved'), 'repo changed')
  t.throws(() => s.sources.match('m.example.com/one'), { code: 'ENOSOURCE' }, 'the old repo is retired')
  t.match(s.logs.find(/retired/), [{ moduleSource: 'm1', retired: 'm.example.com/one' }])

  api.deleteModuleSource('m2')
  await eventually(() => !s.repositories().includes('module-source:m.example.com/two'), 'ModuleSource deleted')
  api.deleteSecret()
  await eventually(() => !s.repositories().some((r) => r.startsWith('default:')), 'Secret deleted')
  t.same(s.repositories(), ['module-source:m.example.com/moved'])
  t.equal(api.counts.list.secrets, 1, 'no re-list: every change came through the watch')
  t.equal(api.counts.list.modulesources, 1)
})

void t.test('starts before the API server is reachable: unsynced, then synced', async (t) => {
  const port = await freePort()
  const api = FakeKubeApi.create(port)
  t.teardown(() => api.close())
  api.putSecret(registrySecret({ address: 'late.example.com', path: 'x' }))
  const s = await startPlugin(t, api)
  await eventually(() => s.logs.find(/list failed/).length >= 2, 'two failed lists')
  t.same(s.sources.unsynced().sort(), ['modulesources', 'secret'], 'not synced while the API server is down')
  t.ok((await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret'))! >= 1)
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_last_sync_timestamp_seconds', 'secret'), undefined, 'never synced: no timestamp')
  await api.listen()
  await eventually(() => s.sources.unsynced().length === 0, 'synced once the server is up')
  t.same(s.repositories(), ['default:late.example.com/x'])
})

void t.test('a slow LIST keeps the provider unsynced until it answers', async (t) => {
  const api = await startApi(t)
  api.listDelayMs = 400
  api.putModuleSource(moduleSource('m', { repo: 'm.example.com/slow' }))
  const s = await startPlugin(t, api)
  await eventually(() => api.counts.list.modulesources === 1, 'list requested')
  t.ok(s.sources.unsynced().includes('modulesources'), 'unsynced while the list is pending')
  await eventually(() => s.sources.unsynced().length === 0, 'synced after the slow list')
  t.same(s.repositories(), ['module-source:m.example.com/slow'])
})

void t.test('a LIST that never answers in time is aborted and retried', async (t) => {
  const api = await startApi(t)
  api.listDelayMs = 60_000
  const s = await startPlugin(t, api, { ...FAST, requestTimeoutMs: 200 })
  await eventually(() => api.counts.list.secrets >= 2, 'the list was retried after its timeout')
  t.ok(s.sources.unsynced().includes('secret'))
  t.match(s.logs.find(/list failed/)[0], { err: { message: /aborted/ } })
  api.listDelayMs = 0
  await eventually(() => s.sources.unsynced().length === 0, 'synced once lists answer')
})

void t.test('a WATCH that never sends its headers is aborted and retried; a quiet open watch is not', async (t) => {
  const api = await startApi(t)
  const s = await startPlugin(t, api, { ...FAST, requestTimeoutMs: 300 })
  await eventually(() => api.openWatches() === 2, 'watches open')
  // Quiet for three timeouts: an open stream is not subject to the headers timeout.
  const quietFrom = Date.now()
  await eventually(() => Date.now() - quietFrom > 900, 'three timeouts of silence')
  t.equal(api.counts.watch.secrets, 1, 'the quiet watch was left alone')
  api.watchDelayMs = 60_000
  api.dropWatches('destroy')
  await eventually(() => api.counts.watch.secrets >= 3, 'hanging watches retried')
  t.ok(
    s.logs.find(/watch failed/).some((l) => /request-timeout/.test(JSON.stringify(l.err))),
    'logged as a timeout',
  )
  api.watchDelayMs = 0
  api.putSecret(registrySecret({ address: 'after-hang.example.com' }))
  await eventually(() => s.repositories().includes('default:after-hang.example.com'), 'watching again')
})

void t.test('dropped watches are restarted from the last resourceVersion; changes meanwhile are not lost', async (t) => {
  const api = await startApi(t)
  api.putModuleSource(moduleSource('a', { repo: 'm.example.com/a' }))
  const s = await startPlugin(t, api)
  await eventually(() => api.openWatches() === 2, 'watches open')
  for (let round = 1; round <= 3; round++) {
    t.equal(api.dropWatches('destroy'), 2, `round ${round}: both watches cut`)
    // A change while no watch is open: the restarted watch replays it from its resourceVersion.
    api.putModuleSource(moduleSource(`r${round}`, { repo: `m.example.com/r${round}` }))
    await eventually(() => s.repositories().includes(`module-source:m.example.com/r${round}`), `round ${round}: change seen after restart`)
    await eventually(() => api.openWatches() === 2, `round ${round}: watches open again`)
  }
  t.equal(api.counts.list.modulesources, 1, 'restarts re-watch without re-listing')
  t.ok(api.counts.watch.modulesources >= 4)
  t.same(s.sources.unsynced(), [])
  t.ok((await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'modulesources'))! >= 3)
  t.ok(s.logs.find(/watch failed/).length >= 3)

  // A clean end of the stream after the watch was open a while (the API server's watch timeout)
  // is re-watched, not an error.
  const restarts = await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')
  await new Promise((resolve) => setTimeout(resolve, FAST.stableWatchMs + 50))
  api.dropWatches('end')
  api.putSecret(registrySecret({ address: 'after-end.example.com' }))
  await eventually(() => s.repositories().includes('default:after-end.example.com'), 'change after a clean end')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret'), restarts, 'a clean end is no failure')
})

void t.test('every watch asks for a timeout, and one that outlives it silently is presumed dead and resumed', async (t) => {
  const api = await startApi(t)
  api.putSecret(registrySecret({ address: 'before.example.com' }))
  // The API server here ignores timeoutSeconds, as one behind a dead connection would.
  const s = await startPlugin(t, api, { ...FAST, watchTimeoutMs: 1000, watchTimeoutGraceMs: 300 })
  await eventually(() => api.openWatches() === 2, 'both watches open')
  const asked = api.requests.filter((r) => r.watch).map((r) => Number(r.query.timeoutSeconds))
  t.ok(asked.length === 2 && asked.every((n) => n >= 1 && n <= 2), `each watch asks for timeoutSeconds between 1x and 2x the setting (${asked.join(', ')})`)

  // The defaults: 5 to 10 minutes, as client-go does.
  t.same([DEFAULT_INFORMER_TIMING.watchTimeoutMs, DEFAULT_INFORMER_TIMING.watchTimeoutGraceMs], [300_000, 30_000])

  const restarts = await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')
  const lists = api.counts.list.secrets
  t.equal(api.freezeWatches(), 2, 'both watches frozen')
  api.putSecret(registrySecret({ address: 'after.example.com' }))
  await new Promise((resolve) => setTimeout(resolve, 200))
  t.ok(s.repositories().includes('default:before.example.com'), 'the frozen watch delivers nothing')
  // Within 2 s + grace the watch is given up and resumed from its resourceVersion: the change
  // arrives from the event history, with no re-list and no failure counted.
  await eventually(() => s.repositories().includes('default:after.example.com'), 'the change arrives after the dead watch is replaced', { timeoutMs: 5000 })
  t.equal(api.counts.list.secrets, lists, 'resumed from the resourceVersion, not re-listed')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret'), restarts, 'no failure counted')
  t.ok(s.logs.find(/presumed dead/).length >= 1, 'and it is logged')
})

void t.test('a server that ends every watch at once gets backoff, not a tight loop', async (t) => {
  const api = await startApi(t)
  const s = await startPlugin(t, api, { ...FAST, initialBackoffMs: 100, maxBackoffMs: 400 })
  await eventually(() => s.sources.unsynced().length === 0, 'synced')
  for (const [what, before] of [
    ['nothing', () => undefined],
    // Found from outside: one event (a change, a bookmark) before the end made the end look
    // healthy, and client-node re-watched at once: hundreds of watches a second.
    ['an event', (i: number) => api.putSecret(registrySecret({ address: `e${i}.example.com` }))],
  ] as const) {
    const started = Date.now()
    const watchesBefore = api.counts.watch.secrets
    const restarts = (await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')) ?? 0
    for (let i = 0; Date.now() - started < 1500; i++) {
      before(i)
      api.dropWatches('end')
      await new Promise((resolve) => setTimeout(resolve, 10))
    }
    const watches = api.counts.watch.secrets - watchesBefore
    t.ok(watches >= 2 && watches <= 12, `${what} before each end: bounded re-watches in 1.5 s: ${watches}`)
    t.ok(((await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')) ?? 0) > restarts, `${what}: counted as restarts`)
    await eventually(() => api.openWatches() === 2, `${what}: watching again`, { timeoutMs: 5000 })
  }
  t.ok(s.logs.find(/watch failed/).filter((l) => /closed the watch after/.test(JSON.stringify(l))).length >= 2, 'logged, with how long the watch lasted')
})

void t.test('an ERROR storm that forces a re-list each time still backs off more and more (a LIST is no proof of health)', async (t) => {
  const api = await startApi(t)
  api.putModuleSource(moduleSource('keep', { repo: 'm.example.com/keep' }))
  const s = await startPlugin(t, api, { ...FAST, initialBackoffMs: 100, maxBackoffMs: 1600 })
  await eventually(() => api.openWatches() === 2, 'watches open')
  const lists = api.counts.list.modulesources
  api.watchErrorEvent = { kind: 'Status', code: 410, reason: 'Expired', message: 'too old resource version' }
  api.dropWatches('destroy')
  const started = Date.now()
  await new Promise((resolve) => setTimeout(resolve, 3000))
  const relists = api.counts.list.modulesources - lists
  // Growing: 100, 200, 400, 800, 1600 ms (+-20 %) fit about 5 re-lists in 3 s; a delay reset by
  // each successful LIST would allow about 25.
  t.ok(relists >= 2 && relists <= 7, `${relists} re-lists in ${Date.now() - started} ms`)
  api.watchErrorEvent = undefined
  await eventually(() => api.openWatches() === 2, 'watching again once the errors stop', { timeoutMs: 5000 })
  t.same(s.repositories(), ['module-source:m.example.com/keep'])
})

/** Watch requests of `resource` since request number `from`, in order. */
function watchesSince(api: FakeKubeApi, from: number, resource: 'secrets' | 'modulesources'): Array<{ resourceVersion: string | undefined }> {
  return api.requests
    .slice(from)
    .filter((r) => r.watch && r.resource === resource)
    .map((r) => ({ resourceVersion: r.query.resourceVersion }))
}

void t.test('watch ERROR events that are not 410: backoff, a log line, restarts counted, resumed without a re-list', async (t) => {
  const api = await startApi(t)
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'ee' }))
  const timing = { ...FAST, initialBackoffMs: 100, maxBackoffMs: 400 }
  const s = await startPlugin(t, api, timing)
  await eventually(() => api.openWatches() === 2, 'watches open')
  const lists = api.counts.list.secrets
  const restarts = (await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')) ?? 0
  const mark = api.requests.length
  const rv = api.resourceVersion

  // An API server in trouble ends every watch with an ERROR event (500).
  api.watchErrorEvent = { kind: 'Status', apiVersion: 'v1', status: 'Failure', code: 500, reason: 'InternalError', message: 'etcd leader changed' }
  const started = Date.now()
  api.dropWatches('destroy')
  await eventually(() => watchesSince(api, mark, 'secrets').length >= 5, 'five watches of the Secret after the cut')
  const elapsed = Date.now() - started
  // Backoff 100, 200, 400, 400 ms (+-20 %) between the five: no tight loop (without it,
  // thousands of watches a second).
  t.ok(elapsed >= 0.8 * (100 + 200 + 400 + 400) - 50, `five watches took ${elapsed} ms`)
  t.same(
    watchesSince(api, mark, 'secrets').map((w) => w.resourceVersion),
    Array(watchesSince(api, mark, 'secrets').length).fill(rv),
    'each resumed from the same resourceVersion',
  )
  t.equal(api.counts.list.secrets, lists, 'a 500 says nothing about the resourceVersion: no re-list')
  const logged = s.logs.find(/watch failed/).filter((l) => /ERROR event: HTTP 500: InternalError: etcd leader changed/.test(JSON.stringify(l.err)))
  t.ok(logged.length >= 3, `a log line per failure (${logged.length})`)
  t.notOk(
    logged.some((l) => l.relist),
    'not marked as a re-list',
  )
  t.ok(
    ((await providerMetric(s.metrics, 'registry_packages_proxy_source_watch_restarts_total', 'secret')) ?? 0) - restarts >= 4,
    'source_watch_restarts_total moves',
  )
  t.same(s.sources.unsynced(), [], 'still synced: the last known sources serve')

  // One that sends the ERROR event and leaves the stream open is ended by the client.
  api.watchErrorKeepsOpen = true
  const open = api.requests.length
  await eventually(() => watchesSince(api, open, 'secrets').length >= 2, 'an ERROR event on an open stream still restarts the watch')

  api.watchErrorEvent = undefined
  api.watchErrorKeepsOpen = false
  await eventually(() => api.openWatches() === 2, 'watching again once the errors stop', { timeoutMs: 5000 })
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'be' }))
  await eventually(() => s.repositories().includes('default:r.example.com/be'), 'changes arrive again')
})

void t.test('an ERROR event that says the resourceVersion is unusable re-lists, after backoff: 410, Expired, "too old resource version"', async (t) => {
  const api = await startApi(t)
  api.putModuleSource(moduleSource('keep', { repo: 'm.example.com/keep' }))
  const s = await startPlugin(t, api, { ...FAST, initialBackoffMs: 100, maxBackoffMs: 400 })
  await eventually(() => api.openWatches() === 2, 'watches open')
  const variants: Array<[string, Record<string, unknown>]> = [
    ['410 Gone', { kind: 'Status', code: 410, reason: 'Gone', message: 'gone' }],
    ['reason Expired', { kind: 'Status', code: 500, reason: 'Expired', message: 'expired' }],
    ['"too old resource version"', { kind: 'Status', code: 500, reason: 'InternalError', message: 'too old resource version: 5 (280)' }],
  ]
  for (const [name, event] of variants) {
    // A deletion that only a LIST can reveal: the history is compacted.
    api.putModuleSource(moduleSource(`lost-${name.length}`, { repo: `m.example.com/lost${name.length}` }))
    await eventually(() => s.repositories().includes(`module-source:m.example.com/lost${name.length}`), `${name}: seen`)
    const lists = api.counts.list.modulesources
    api.watchErrorEvent = event
    const started = Date.now()
    api.dropWatches('destroy')
    api.deleteModuleSource(`lost-${name.length}`)
    api.compact()
    await eventually(() => api.counts.list.modulesources >= lists + 3, `${name}: re-listed three times while the errors last`)
    const elapsed = Date.now() - started
    t.ok(elapsed >= 0.8 * (100 + 200) - 50, `${name}: re-lists back off (${elapsed} ms for three)`)
    t.ok(
      s.logs.find(/watch failed/).some((l) => l.relist === true && JSON.stringify(l.err).includes('ERROR event')),
      `${name}: logged as a re-list`,
    )
    api.watchErrorEvent = undefined
    await eventually(() => !s.repositories().includes(`module-source:m.example.com/lost${name.length}`), `${name}: the re-list shows the deletion`)
    await eventually(() => api.openWatches() === 2, `${name}: watching again`, { timeoutMs: 5000 })
  }
  t.same(s.repositories(), ['module-source:m.example.com/keep'])
})

void t.test('410 Gone re-lists: as an ERROR event, as HTTP 410, and after compaction', async (t) => {
  const api = await startApi(t)
  api.putModuleSource(moduleSource('keep', { repo: 'm.example.com/keep' }))
  api.putModuleSource(moduleSource('lost', { repo: 'm.example.com/lost' }))
  const s = await startPlugin(t, api)
  await eventually(() => api.openWatches() === 2, 'watches open')
  t.equal(s.repositories().length, 2)

  // ERROR event: the next watch (after a cut) gets 410; meanwhile `lost` is deleted and the
  // history compacted, so only a fresh LIST can reveal the deletion.
  api.goneOnNextWatch = 'event'
  api.dropWatches('destroy')
  await eventually(() => api.counts.gone === 1, '410 event sent')
  await eventually(() => api.counts.list.modulesources + api.counts.list.secrets === 3, 're-listed after 410')
  await eventually(() => api.openWatches() === 2, 'watches open again')

  api.goneOnNextWatch = 'http'
  api.dropWatches('destroy')
  await eventually(() => api.counts.gone === 2, 'HTTP 410 sent')
  await eventually(() => api.counts.list.modulesources + api.counts.list.secrets === 4, 're-listed after HTTP 410')
  await eventually(() => api.openWatches() === 2, 'watches open again')

  // Compaction: the watch's resourceVersion is too old; the deletion is only visible by LIST.
  const lists = api.counts.list.modulesources
  api.dropWatches('destroy')
  api.deleteModuleSource('lost')
  api.putModuleSource(moduleSource('new', { repo: 'm.example.com/new' }))
  api.compact()
  await eventually(() => api.counts.list.modulesources > lists, 're-listed after compaction')
  await eventually(() => s.repositories().join() === 'module-source:m.example.com/keep,module-source:m.example.com/new', 'state after re-list')
  t.same(s.sources.unsynced(), [])
})

void t.test('malformed objects beside good ones: each skipped with a log line and a metric', async (t) => {
  const api = await startApi(t)
  const good = (name: string): ReturnType<typeof moduleSource> => moduleSource(name, { repo: `m.example.com/${name}` })
  api.putModuleSource(good('good1'))
  api.putModuleSource(moduleSource('bad-base64', { repo: 'm.example.com/b1', dockerCfg: `!!${PASSWORD}!!` }))
  api.putModuleSource(moduleSource('bad-json', { repo: 'm.example.com/b2', dockerCfg: b64(`{"auths": ${PASSWORD}`) }))
  api.putModuleSource(moduleSource('bad-pem', { repo: 'm.example.com/b3', ca: '-----BEGIN CERTIFICATE-----\nnotacert\n-----END CERTIFICATE-----' }))
  api.putModuleSource(moduleSource('bad-repo', { repo: 'http://m.example.com/../x' }))
  api.putModuleSource({ apiVersion: 'deckhouse.io/v1alpha1', kind: 'ModuleSource', metadata: { name: 'no-spec' } })
  api.putModuleSource(good('good2'))
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'ok', dockerconfigjson: dockerCfg('r.example.com') }))
  const s = await startPlugin(t, api)
  await eventually(() => s.sources.unsynced().length === 0, 'synced')
  t.same(s.repositories(), ['default:r.example.com/ok', 'module-source:m.example.com/good1', 'module-source:m.example.com/good2'])
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_errors_total', 'modulesources'), 5)
  const errors = s.logs.find(/ModuleSource is malformed/)
  t.same(errors.map((e) => e.moduleSource).sort(), ['bad-base64', 'bad-json', 'bad-pem', 'bad-repo', 'no-spec'])
  t.match(
    errors.find((e) => e.moduleSource === 'bad-base64'),
    { err: { message: /spec\.registry\.dockerCfg is not valid base64/ } },
  )
  t.match(
    errors.find((e) => e.moduleSource === 'bad-json'),
    { err: { message: /docker config is not valid JSON/ } },
  )
  t.match(
    errors.find((e) => e.moduleSource === 'bad-pem'),
    { err: { message: /ca holds a certificate that does not parse/ } },
  )

  // A malformed Secret keeps the last good default source.
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'ok' }, { '.dockerconfigjson': b64(`{${PASSWORD}`) }))
  await eventually(() => s.logs.find(/registry Secret is malformed/).length === 1, 'bad Secret logged')
  t.same(
    s.repositories().filter((r) => r.startsWith('default:')),
    ['default:r.example.com/ok'],
  )
  t.ok(s.sources.match(undefined).credentials, 'still the last good default source, credentials included')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_errors_total', 'secret'), 1)
  api.putSecret(registrySecret({ address: 'r.example.com' }, { path: '%%%not-base64' }))
  await eventually(() => s.logs.find(/registry Secret is malformed/).length === 2, 'second bad Secret logged')
  t.match(s.logs.find(/registry Secret is malformed/)[1], { err: { message: /data\.path is not valid base64/ }, keeping: 'r.example.com/ok' })

  // Unrelated changes do not re-log (or re-count) an unchanged bad object.
  api.putModuleSource(good('good3'))
  await eventually(() => s.repositories().includes('module-source:m.example.com/good3'), 'good3 added')
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_errors_total', 'modulesources'), 5)

  // Fixing a bad one brings it in; a good one turning bad is dropped on its own.
  api.putModuleSource(moduleSource('bad-json', { repo: 'm.example.com/b2', dockerCfg: b64(dockerCfg('m.example.com')) }))
  api.putModuleSource(moduleSource('good1', { repo: 'm.example.com/good1', scheme: 'gopher' }))
  await eventually(
    () => s.repositories().includes('module-source:m.example.com/b2') && !s.repositories().includes('module-source:m.example.com/good1'),
    'fixed and broken',
  )
  t.ok(s.repositories().includes('module-source:m.example.com/good2'), 'the others keep working')

  // Garbage on the watch stream is skipped; the watch goes on.
  api.sendGarbage()
  api.putModuleSource(good('good4'))
  await eventually(() => s.repositories().includes('module-source:m.example.com/good4'), 'watch survives a garbage line')

  t.notOk(s.logs.text.includes(PASSWORD), 'no secret in the logs')
  t.notOk((await s.metrics.registry.metrics()).includes(PASSWORD), 'no secret in the metrics')
})

void t.test('an API server outage keeps the last known sources; last sync time stops moving', async (t) => {
  const api = await startApi(t)
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'ee' }))
  const s = await startPlugin(t, api)
  await eventually(() => api.openWatches() === 2, 'watches open')
  const port = api.port
  await api.close()
  await eventually(() => s.logs.find(/watch failed|list failed/).length >= 4, 'failures while down')
  t.same(s.sources.unsynced(), [], 'still synced')
  t.same(s.repositories(), ['default:r.example.com/ee'], 'last known sources still served')
  const frozen = await providerMetric(s.metrics, 'registry_packages_proxy_source_last_sync_timestamp_seconds', 'secret')
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(await providerMetric(s.metrics, 'registry_packages_proxy_source_last_sync_timestamp_seconds', 'secret'), frozen, 'not moving while down')
  t.ok(frozen! < Date.now() / 1000)

  // The same server comes back (its store is intact): watches resume.
  await api.listen(port)
  api.putSecret(registrySecret({ address: 'r.example.com', path: 'be' }))
  await eventually(() => s.repositories().includes('default:r.example.com/be'), 'change after the outage')
  await eventually(
    async () => (await providerMetric(s.metrics, 'registry_packages_proxy_source_last_sync_timestamp_seconds', 'secret'))! > frozen!,
    'last sync moves again',
  )
})

void t.test('API errors (403, 500) are retried and logged without secrets', async (t) => {
  const api = await startApi(t)
  api.listStatus = 403
  const s = await startPlugin(t, api)
  await eventually(() => api.counts.list.secrets >= 2, 'retried')
  t.match(s.logs.find(/list failed/)[0], { err: { message: /HTTP 403/ }, provider: /secret|modulesources/ })
  api.listStatus = undefined
  // A 200 whose body is not JSON: V8's parse error would quote it, and it could be Secret data.
  api.listRawBody = `{"items": [{"data": {"password": "${PASSWORD}"}}] garbage`
  const failures = s.logs.find(/list failed/).length
  await eventually(() => s.logs.find(/list failed/).length >= failures + 2, 'unparsable lists logged')
  t.match(s.logs.find(/list failed/).at(-1), { err: { message: /not valid JSON/ } })
  t.notOk(s.logs.text.includes(PASSWORD), 'the body is not quoted in the log')
  api.listRawBody = undefined
  await eventually(() => s.sources.unsynced().length === 0, 'synced after the errors stop')
  api.watchStatus = 500
  api.dropWatches('destroy')
  await eventually(() => s.logs.find(/watch failed/).some((l) => /HTTP 500/.test(JSON.stringify(l.err))), 'watch 500 logged')
  api.watchStatus = undefined
  await eventually(() => api.openWatches() === 2, 'watches back')
  t.notOk(s.logs.text.includes(TOKEN))
})

void t.test('stop closes every watch and retries no more', async (t) => {
  const api = await startApi(t)
  const s = await startPlugin(t, api)
  await eventually(() => api.openWatches() === 2, 'watches open')
  await s.server.stop()
  await eventually(() => api.openWatches() === 0, 'watches closed by stop')
  const requests = api.requests.length
  await new Promise((resolve) => setTimeout(resolve, 300))
  t.equal(api.requests.length, requests, 'no request after stop')
})

void t.test('stop while a watch is still connecting: that watch is closed too', async (t) => {
  const api = await startApi(t)
  api.watchDelayMs = 400
  const s = await startPlugin(t, api)
  await eventually(() => api.counts.watch.secrets + api.counts.watch.modulesources === 2, 'both watches requested')
  await s.server.stop()
  const stoppedAt = Date.now()
  await eventually(() => Date.now() - stoppedAt > 600 && api.openWatches() === 0, 'no watch left open after the delayed answers')
  t.equal(api.counts.watch.secrets + api.counts.watch.modulesources, 2, 'and no new watch')
})
