/**
 * A Map read as a least-recently-used list: Map order is insertion order, so re-inserting a key
 * on every read leaves the least recently used first, for the caller to evict. Shared by the
 * memory cache of small layers and the peers' manifest memo.
 */
export function getRecent<K, V>(entries: Map<K, V>, key: K): V | undefined {
  const value = entries.get(key)
  if (value !== undefined) {
    entries.delete(key)
    entries.set(key, value)
  }
  return value
}
