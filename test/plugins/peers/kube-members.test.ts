/**
 * Peer membership from the Kubernetes API (plugins/peers/kube-members.ts) against the fake API
 * server: the Running and Ready proxy pods of the namespace, followed as pods are added, go
 * unready, terminate and are deleted, and after the watch connection drops.
 */
import type { V1Pod } from '@kubernetes/client-node'
import { pino } from 'pino'
import t from 'tap'
import { loadKubeConfig } from '../../../plugins/credentials/kube-config.js'
import { Metrics } from '../../../plugins/metrics/metrics.js'
import { KubeMembers, memberAddress, readyMembers } from '../../../plugins/peers/kube-members.js'
import { Membership } from '../../../plugins/peers/membership.js'
import { FakeKubeApi, proxyPod } from '../../fixtures/fake-kube-api.js'
import { eventually } from '../../fixtures/eventually.js'

const NS = 'd8-cloud-instance-manager'
const FAST = { initialBackoffMs: 20, maxBackoffMs: 100, minWatchMs: 0 }

void t.test('readyMembers: Running, Ready, with an IP and not terminating; IPv6 in brackets', (t) => {
  const pods = [
    proxyPod('a', '10.0.0.2'),
    proxyPod('b', '10.0.0.1'),
    proxyPod('c', 'fd00::3'),
    proxyPod('pending', '10.0.0.4', { phase: 'Pending' }),
    proxyPod('unready', '10.0.0.5', { ready: false }),
    proxyPod('terminating', '10.0.0.6', { deleting: true }),
    proxyPod('no-ip', ''),
  ] as unknown as V1Pod[]
  t.same(readyMembers(pods), ['10.0.0.1:4219', '10.0.0.2:4219', '[fd00::3]:4219'], 'sorted, port 4219')
  t.same(readyMembers(pods.slice(0, 1), 8443), ['10.0.0.2:8443'])
  t.equal(memberAddress('::1', 1), '[::1]:1')
  t.end()
})

void t.test('members follow the pods of the namespace with the label, through a dropped watch', async (t) => {
  const api = await FakeKubeApi.start()
  t.teardown(() => api.close())
  api.put('pods', proxyPod('self', '10.0.0.1'))
  api.put('pods', proxyPod('two', '10.0.0.2'))
  api.put('pods', proxyPod('three', '10.0.0.3', { ready: false }))
  api.put('pods', proxyPod('elsewhere', '10.0.9.1', { namespace: 'other' }))
  api.put('pods', proxyPod('not-a-proxy', '10.0.0.9', { labels: { app: 'something-else' } }))
  const kubeConfig = await loadKubeConfig({ kubeconfig: api.writeKubeconfig(t.testdir(), 'token'), env: {} })
  if (!kubeConfig) throw new Error('no kubeconfig')
  const membership = new Membership({ self: '10.0.0.1:4219', members: [] })
  const metrics = new Metrics({ collectDefaults: false })
  const members = new KubeMembers({ kubeConfig, namespace: NS, membership, log: pino({ level: 'silent' }), metrics, timing: FAST })
  t.teardown(() => members.stop())
  t.same(membership.all(), ['10.0.0.1:4219'], 'before the first LIST: only this replica, so no peer is asked')
  members.start()
  const is = (expected: string[]) => () => JSON.stringify([...membership.all()].sort()) === JSON.stringify(expected)
  await eventually(is(['10.0.0.1:4219', '10.0.0.2:4219']), 'the ready pods are members')
  t.ok(members.synced)
  const list = api.requests.find((r) => r.resource === 'pods' && !r.watch)
  t.equal(list?.path, `/api/v1/namespaces/${NS}/pods`, 'lists in its own namespace')
  t.equal(list?.query.labelSelector, 'app=registry-packages-proxy', 'selects the proxy pods by label')
  await eventually(() => api.openWatches('pods') === 1, 'the pods are watched')

  api.put('pods', proxyPod('three', '10.0.0.3'))
  await eventually(is(['10.0.0.1:4219', '10.0.0.2:4219', '10.0.0.3:4219']), 'a pod that became ready joins')
  api.put('pods', proxyPod('two', '10.0.0.2', { ready: false }))
  await eventually(is(['10.0.0.1:4219', '10.0.0.3:4219']), 'a pod that went unready leaves')
  api.put('pods', proxyPod('three', '10.0.0.3', { deleting: true }))
  await eventually(is(['10.0.0.1:4219']), 'a terminating pod leaves')
  api.delete('pods', 'three', NS)
  api.put('pods', proxyPod('four', '10.0.0.4'))
  await eventually(is(['10.0.0.1:4219', '10.0.0.4:4219']), 'a new pod joins')

  // client-node's informer would stop for good here; the restarting one resumes the watch.
  const watches = api.counts.watch.pods
  api.dropWatches('destroy')
  api.delete('pods', 'four', NS)
  api.put('pods', proxyPod('five', '10.0.0.5'))
  await eventually(is(['10.0.0.1:4219', '10.0.0.5:4219']), 'changes made while the watch was down arrive after the restart')
  t.ok(api.counts.watch.pods > watches, 'watched again')
  t.ok(
    Number((await metrics.registry.getSingleMetricAsString('registry_packages_proxy_source_watch_restarts_total')).match(/provider="pods"} (\d+)/)?.[1]) >= 1,
    'the restart is counted',
  )

  // A peer marked down that leaves and comes back (a new pod on the same node) starts clean.
  membership.markDown('10.0.0.5:4219')
  t.same(membership.live(), ['10.0.0.1:4219'])
  api.put('pods', proxyPod('five', '10.0.0.5', { ready: false }))
  await eventually(is(['10.0.0.1:4219']), 'five went unready')
  api.put('pods', proxyPod('five', '10.0.0.5'))
  await eventually(is(['10.0.0.1:4219', '10.0.0.5:4219']), 'five is back')
  t.same(membership.live(), ['10.0.0.1:4219', '10.0.0.5:4219'], 'and live at once')
})
