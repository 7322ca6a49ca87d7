import t from 'tap'
import { ownerOf } from '../../../plugins/peers/rendezvous.js'
import { sha256 } from '../../fixtures/proxy-harness.js'

const members = ['10.0.0.1:4219', '10.0.0.2:4219', '10.0.0.3:4219']
const keys = Array.from({ length: 3000 }, (_, i) => sha256(Buffer.from(`layer ${i}`)))

void t.test('every replica picks the same owner, whatever the order it lists the members in', (t) => {
  for (const key of keys.slice(0, 200)) t.equal(ownerOf([...members].reverse(), key), ownerOf(members, key))
  t.equal(ownerOf([], keys[0] ?? ''), undefined, 'no members, no owner')
  t.end()
})

void t.test('owners spread over the members, and a member leaving moves only the keys it owned', (t) => {
  const counts = new Map<string, number>()
  for (const key of keys) counts.set(ownerOf(members, key) ?? '', (counts.get(ownerOf(members, key) ?? '') ?? 0) + 1)
  for (const m of members) t.ok((counts.get(m) ?? 0) > 800, `${m} owns about a third (${counts.get(m)})`)
  const gone = members[1] as string
  const rest = members.filter((m) => m !== gone)
  const moved = keys.filter((k) => ownerOf(members, k) !== gone && ownerOf(rest, k) !== ownerOf(members, k))
  t.same(moved, [], 'keys of the members that stayed keep their owner')
  t.end()
})

void t.test('asking the owner only climbs: in any subset, the owner of a key outranks the asker', (t) => {
  // The property that keeps requests from looping when replicas disagree about who is live:
  // the owner a replica picks among the members it sees (itself included) is never itself
  // unless it wins, so a chain of "ask the owner" steps never returns to where it started.
  const all = [...members, '10.0.0.4:4219', '10.0.0.5:4219']
  const failures: string[] = []
  for (const key of keys.slice(0, 300)) {
    const rank = (m: string): number => all.filter((x) => ownerOf([x, m], key) === m).length
    for (let mask = 1; mask < 1 << all.length; mask++) {
      const seen = all.filter((_, i) => mask & (1 << i))
      const owner = ownerOf(seen, key) as string
      for (const asker of seen) if (owner !== asker && rank(owner) <= rank(asker)) failures.push(`${key} ${asker} -> ${owner}`)
    }
  }
  t.same(failures, [], 'in every subset, every asker is outranked by the owner it asks')
  t.end()
})
