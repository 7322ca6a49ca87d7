import { createHash } from 'node:crypto'

/** The weight of `member` for `key`: the first 64 bits of sha256(member, key). */
function weight(member: string, key: string): bigint {
  return createHash('sha256').update(member).update('\n').update(key).digest().readBigUInt64BE(0)
}

/**
 * The owner of `key` among `members` by rendezvous (highest random weight) hashing: every
 * replica that sees the same members picks the same owner, and a member joining or leaving
 * moves only the keys it wins or held, not the others (as groupcache's consistent hashing).
 * Undefined for no members.
 *
 * Each replica also owns whatever it asks about when it wins among the members it sees, so
 * following "ask the owner" from replica to replica only ever climbs to a higher weight: even
 * replicas that disagree about who is live cannot send one request round in a circle.
 */
export function ownerOf(members: readonly string[], key: string): string | undefined {
  let best: string | undefined
  let bestWeight = -1n
  for (const member of members) {
    const w = weight(member, key)
    if (w > bestWeight || (w === bestWeight && best !== undefined && member < best)) {
      best = member
      bestWeight = w
    }
  }
  return best
}
