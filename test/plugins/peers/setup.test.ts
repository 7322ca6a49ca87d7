/**
 * How a replica finds itself among `--peers` (plugins/peers/setup.ts): by its listen address,
 * or, listening on every interface (0.0.0.0, ::), by any of its interfaces' addresses with its
 * port, so that it never counts itself twice or asks itself as a peer.
 */
import type { NetworkInterfaceInfo } from 'node:os'
import t from 'tap'
import { selfAmong } from '../../../plugins/peers/setup.js'

const interfaces: Record<string, NetworkInterfaceInfo[]> = {
  lo: [
    { address: '127.0.0.1', family: 'IPv4', internal: true, netmask: '255.0.0.0', mac: '00:00:00:00:00:00', cidr: '127.0.0.1/8' },
    {
      address: '::1',
      family: 'IPv6',
      internal: true,
      netmask: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff',
      mac: '00:00:00:00:00:00',
      cidr: '::1/128',
      scopeid: 0,
    },
  ],
  eth0: [{ address: '10.0.0.5', family: 'IPv4', internal: false, netmask: '255.255.255.0', mac: '02:00:00:00:00:05', cidr: '10.0.0.5/24' }],
}

void t.test('a named listen address is itself, as before', (t) => {
  t.same(selfAmong(['10.0.0.5:5080', '10.0.0.6:5080'], '10.0.0.5', 5080, interfaces), { self: '10.0.0.5:5080', members: ['10.0.0.5:5080', '10.0.0.6:5080'] })
  t.end()
})

void t.test('listening on 0.0.0.0: the member with a local address and this port is itself; its aliases are dropped', (t) => {
  t.same(selfAmong(['10.0.0.6:5080', '10.0.0.5:5080', '10.0.0.7:5080'], '0.0.0.0', 5080, interfaces), {
    self: '10.0.0.5:5080',
    members: ['10.0.0.6:5080', '10.0.0.5:5080', '10.0.0.7:5080'],
  })
  t.same(
    selfAmong(['127.0.0.1:5080', '127.0.0.1:5081', '10.0.0.5:5080', '[::1]:5080'], '::', 5080, interfaces),
    { self: '127.0.0.1:5080', members: ['127.0.0.1:5080', '127.0.0.1:5081'] },
    'the first alias named; the others are the same replica',
  )
  t.same(
    selfAmong(['10.0.0.5:5081', '10.0.0.6:5080'], '0.0.0.0', 5080, interfaces),
    { self: '0.0.0.0:5080', members: ['10.0.0.5:5081', '10.0.0.6:5080'] },
    'another port on this host is another replica; none found: the listen address',
  )
  t.end()
})
