import { createServer, request, type IncomingMessage, type ServerResponse } from 'node:http'
import t from 'tap'
import { parseRegistryConfig } from '../../../../plugins/credentials/file-source.js'
import { RegistryClient } from '../../../../plugins/packages/registry/registry-client.js'
import { Transport, proxyForUrl, DEFAULT_TIMEOUTS } from '../../../../plugins/packages/registry/transport.js'
import { FakeRegistry } from '../../../fixtures/fake-registry.js'
import { DEFAULT_PREFIX, bytes } from '../../../fixtures/proxy-harness.js'

void t.test('proxyForUrl: which variable applies', (t) => {
  const env = { HTTPS_PROXY: 'http://secure-proxy:3128', HTTP_PROXY: 'http://plain-proxy:3128' }
  t.equal(proxyForUrl('https://registry.example.com/v2/', env), 'http://secure-proxy:3128')
  t.equal(proxyForUrl('http://registry.example.com/v2/', env), 'http://plain-proxy:3128')
  t.equal(proxyForUrl('https://registry.example.com/v2/', { https_proxy: 'http://lower:1' }), 'http://lower:1', 'lowercase works')
  t.equal(
    proxyForUrl('https://registry.example.com/v2/', { HTTPS_PROXY: 'upper:1', https_proxy: 'http://lower:1' }),
    'http://upper:1',
    'uppercase wins; a scheme is added',
  )
  t.equal(proxyForUrl('https://registry.example.com/v2/', { HTTP_PROXY: 'http://plain:1' }), undefined, 'HTTP_PROXY does not apply to https')
  t.equal(proxyForUrl('http://registry.example.com/v2/', { HTTPS_PROXY: 'http://secure:1' }), undefined, 'HTTPS_PROXY does not apply to http')
  t.equal(proxyForUrl('https://registry.example.com/v2/', {}), undefined)
  t.equal(proxyForUrl('https://registry.example.com/v2/', { HTTPS_PROXY: '' }), undefined, 'empty means none')
  t.end()
})

void t.test('proxyForUrl: NO_PROXY rules', (t) => {
  const base = { HTTPS_PROXY: 'http://proxy:3128' }
  const via = (url: string, noProxy: string): string | undefined => proxyForUrl(url, { ...base, NO_PROXY: noProxy })
  t.equal(via('https://registry.example.com/', '*'), undefined, '* disables proxying')
  t.equal(via('https://registry.example.com/', 'other.com, *'), undefined, '* anywhere in the list')
  t.equal(via('https://registry.example.com/', '.example.com'), undefined, '.suffix matches a subdomain')
  t.equal(via('https://example.com/', '.example.com'), undefined, '.suffix matches the domain itself (curl)')
  t.equal(via('https://registry.example.com/', 'example.com'), undefined, 'a bare domain matches subdomains')
  t.equal(via('https://registry.example.com/', '*.example.com'), undefined, '*.suffix')
  t.equal(via('https://notexample.com/', 'example.com'), 'http://proxy:3128', 'not a mere string suffix')
  t.equal(via('https://registry.example.com.evil.io/', 'example.com'), 'http://proxy:3128')
  t.equal(via('https://REGISTRY.Example.COM/', 'registry.example.com'), undefined, 'case-insensitive')
  t.equal(via('https://registry.example.com/', 'REGISTRY.EXAMPLE.COM'), undefined)
  t.equal(via('https://registry.example.com:5000/', 'registry.example.com:5000'), undefined, 'host:port matches that port')
  t.equal(via('https://registry.example.com:5001/', 'registry.example.com:5000'), 'http://proxy:3128', 'but not another port')
  t.equal(via('https://registry.example.com/', 'registry.example.com:443'), undefined, 'the default port counts')
  t.equal(via('https://10.0.0.1:5000/', '10.0.0.1'), undefined, 'an IP without a port matches any port')
  t.equal(via('https://[::1]:5000/', '[::1]'), undefined, '[v6]')
  t.equal(via('https://[::1]:5000/', '[::1]:5000'), undefined, '[v6]:port')
  t.equal(via('https://a.io/', ' b.io ,, a.io '), undefined, 'spaces and empty entries are skipped')
  t.equal(via('https://a.io/', 'b.io c.io'), 'http://proxy:3128', 'space-separated entries')
  t.equal(proxyForUrl('https://a.io/', { ...base, no_proxy: 'a.io' }), undefined, 'lowercase no_proxy')
  t.end()
})

void t.test('proxyForUrl: a bare IPv6 address in NO_PROXY matches, as in curl', (t) => {
  // curl (and Go's httpproxy) accept `::1` and `fd00::5` unbracketed. The host:port split reads
  // the last `:group` of the address as a port, so the entry never matches.
  t.equal(proxyForUrl('https://[::1]:5000/', { HTTPS_PROXY: 'http://proxy:3128', NO_PROXY: '::1' }), undefined, '::1')
  t.equal(proxyForUrl('https://[fd00::5]/', { HTTPS_PROXY: 'http://proxy:3128', NO_PROXY: 'fd00::5' }), undefined, 'fd00::5')
  t.end()
})

void t.test('Transport: options per URL and CA', (t) => {
  const transport = new Transport(DEFAULT_TIMEOUTS, { HTTPS_PROXY: 'http://127.0.0.1:9', HTTP_PROXY: 'http://127.0.0.1:8', NO_PROXY: 'direct.io' })
  t.teardown(() => transport.close())
  const direct = transport.optionsFor('https://direct.io/v2/', undefined)
  t.equal(direct.proxy, false)
  t.ok(direct.httpsAgent && direct.httpAgent)
  t.equal(transport.optionsFor('https://direct.io/v2/x', undefined).httpsAgent, direct.httpsAgent, 'agents are reused')
  t.not(transport.optionsFor('https://direct.io/v2/', 'PEM').httpsAgent, direct.httpsAgent, 'another CA, another agent')

  const tunnelled = transport.optionsFor('https://far.io/v2/', undefined)
  t.equal(tunnelled.proxy, false, 'https goes through CONNECT by the agent, not axios proxying')
  t.not(tunnelled.httpsAgent, direct.httpsAgent)
  t.equal(transport.optionsFor('https://far.io/v2/', undefined).httpsAgent, tunnelled.httpsAgent)

  const plain = transport.optionsFor('http://far.io/v2/', undefined)
  t.same(plain.proxy, { protocol: 'http', host: '127.0.0.1', port: 8 })
  const defaultPort = new Transport(DEFAULT_TIMEOUTS, { HTTP_PROXY: 'http://proxy.local' }).optionsFor('http://far.io/', undefined)
  t.same(defaultPort.proxy, { protocol: 'http', host: 'proxy.local', port: 80 })
  t.end()
})

void t.test('the registry client really goes through HTTP_PROXY, and around it for NO_PROXY', async (t) => {
  const registry = await FakeRegistry.start()
  t.teardown(() => registry.close())
  const image = registry.addImage(DEFAULT_PREFIX, [bytes(100, 1)])
  const seen: string[] = []
  // A minimal forward proxy on 127.0.0.1 that only relays to the fake registry.
  const proxy = createServer((req: IncomingMessage, res: ServerResponse) => {
    seen.push(req.url ?? '')
    const target = new URL(req.url ?? '/')
    const upstream = request(
      { host: target.hostname, port: target.port, path: target.pathname + target.search, method: req.method, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers)
        r.pipe(res)
      },
    )
    upstream.on('error', () => res.destroy())
    req.pipe(upstream)
  })
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => proxy.close(() => resolve())))
  proxy.on('connection', (s) => t.teardown(() => s.destroy()))
  const address = proxy.address()
  if (address === null || typeof address === 'string') throw new Error('no address')
  const [source] = parseRegistryConfig({ default: { address: registry.host, path: DEFAULT_PREFIX, scheme: 'http' } }, 'test')
  if (!source) throw new Error('no source')

  const proxied = new RegistryClient({ env: { HTTP_PROXY: `http://127.0.0.1:${address.port}` } })
  t.teardown(() => proxied.close())
  const m = await proxied.fetchManifest(source, DEFAULT_PREFIX, image.manifestDigest)
  t.ok(m.body.equals(image.manifest))
  t.same(seen, [`${registry.url}/v2/${DEFAULT_PREFIX}/manifests/${image.manifestDigest}`], 'the request went through the proxy')

  const bypass = new RegistryClient({ env: { HTTP_PROXY: `http://127.0.0.1:${address.port}`, NO_PROXY: '127.0.0.1' } })
  t.teardown(() => bypass.close())
  await bypass.fetchManifest(source, DEFAULT_PREFIX, image.manifestDigest)
  t.equal(seen.length, 1, 'NO_PROXY: straight to the registry')
  t.equal(registry.counts.manifest, 2)
})
