/** Tag-list pagination in the registry client: the Link header, and Links that must not be followed. */
import { createServer } from 'node:http'
import t from 'tap'
import type { RegistrySource } from '../../../../plugins/credentials/source.js'
import { nextPageLink } from '../../../../plugins/packages/registry/http.js'
import { RegistryClient } from '../../../../plugins/packages/registry/registry-client.js'

void t.test('nextPageLink reads rel="next" the way registries send it', (t) => {
  t.equal(nextPageLink('</v2/a/tags/list?last=x&n=100>; rel="next"'), '/v2/a/tags/list?last=x&n=100')
  t.equal(nextPageLink('<https://r.example/v2/a/tags/list?last=x>; rel=next'), 'https://r.example/v2/a/tags/list?last=x')
  t.equal(nextPageLink('</prev>; rel="prev", </next>; rel="next"'), '/next')
  t.equal(nextPageLink('</x>; rel="prev"'), undefined)
  t.equal(nextPageLink(undefined), undefined)
  t.end()
})

void t.test('a Link to another host, or to the same page, is refused', async (t) => {
  let link = ''
  let calls = 0
  const server = createServer((_req, res) => {
    calls++
    res.writeHead(200, { 'Content-Type': 'application/json', Link: link })
    res.end(JSON.stringify({ name: 'a', tags: ['v1'] }))
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())))
  const address = server.address()
  if (!address || typeof address === 'string') throw new Error('no address')
  const source: RegistrySource = {
    name: 'default',
    kind: 'default',
    repository: `127.0.0.1:${address.port}/a`,
    registry: `127.0.0.1:${address.port}`,
    namePrefix: 'a',
    scheme: 'http',
  }
  const client = new RegistryClient({ env: {} })
  t.teardown(() => client.close())
  link = '<http://203.0.113.1/v2/a/tags/list?last=v1>; rel="next"'
  await t.rejects(client.listTags(source, 'a'), { code: 'EUPSTREAM', message: /another repository or host/ })
  link = '</v2/other/tags/list?last=v1>; rel="next"'
  await t.rejects(client.listTags(source, 'a'), { code: 'EUPSTREAM', message: /another repository or host/ })
  link = '</v2/a/tags/list?last=v1>; rel="next"'
  calls = 0
  await t.rejects(client.listTags(source, 'a'), { code: 'EUPSTREAM', message: /same page/ })
  t.equal(calls, 2, 'the loop ends at the first repeat')
})
