import t from 'tap'
import { parseChallenge } from '../../../../plugins/packages/registry/auth-challenge.js'

void t.test('Bearer challenges', (t) => {
  t.same(parseChallenge('Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull"'), {
    scheme: 'bearer',
    realm: 'https://auth.example.com/token',
    service: 'registry.example.com',
    scope: 'repository:a/b:pull',
  })
  t.same(
    parseChallenge('bearer realm="http://127.0.0.1:1/token"'),
    { scheme: 'bearer', realm: 'http://127.0.0.1:1/token' },
    'scheme is case-insensitive; service and scope optional',
  )
  t.same(
    parseChallenge('Bearer realm="https://a/token", service="svc", scope="repository:a/b:pull,push"'),
    { scheme: 'bearer', realm: 'https://a/token', service: 'svc', scope: 'repository:a/b:pull,push' },
    'a quoted comma stays in the value; spaces after commas',
  )
  t.same(
    parseChallenge('Bearer realm="https://a/token",service="svc",scope="repository:a:pull",error="invalid_token"'),
    { scheme: 'bearer', realm: 'https://a/token', service: 'svc', scope: 'repository:a:pull' },
    'error= is accepted and ignored',
  )
  t.same(
    parseChallenge('Bearer error="insufficient_scope",realm="https://a/token",scope="repository:x:pull"'),
    { scheme: 'bearer', realm: 'https://a/token', scope: 'repository:x:pull' },
    'parameters in any order',
  )
  t.same(parseChallenge('Bearer realm=https://a/token,service=svc'), { scheme: 'bearer', realm: 'https://a/token', service: 'svc' }, 'unquoted values')
  t.same(
    parseChallenge('Bearer REALM="https://a/token",Service="s"'),
    { scheme: 'bearer', realm: 'https://a/token', service: 's' },
    'parameter names are case-insensitive',
  )
  t.same(
    parseChallenge('Bearer realm="https://a/t\\"x",service="a\\\\b"'),
    { scheme: 'bearer', realm: 'https://a/t"x', service: 'a\\b' },
    'escaped quotes and backslashes',
  )
  t.end()
})

void t.test('Basic and unusable challenges', (t) => {
  t.same(parseChallenge('Basic realm="registry"'), { scheme: 'basic' })
  t.same(parseChallenge('BASIC'), { scheme: 'basic' })
  for (const header of [
    undefined,
    '',
    'garbage',
    'Negotiate abc',
    'Bearer',
    'Bearer service="x"',
    'Bearer realm=""',
    'Bearer realm="ftp://a/token"',
    'Bearer realm="/relative/token"',
    '!!!',
  ]) {
    t.same(parseChallenge(header), { scheme: 'unknown' }, JSON.stringify(header))
  }
  t.end()
})
