import t from 'tap'
import { ManifestMemo } from '../../../plugins/peers/manifest-memo.js'

const m = (n: number): { body: Buffer; mediaType: string } => ({ body: Buffer.alloc(n), mediaType: 'application/vnd.oci.image.manifest.v1+json' })

void t.test('bounded by bytes, least recently used out first', (t) => {
  const memo = new ManifestMemo(300)
  memo.put('a', m(100))
  memo.put('b', m(100))
  memo.put('c', m(100))
  t.ok(memo.get('a'), 'a is used again')
  memo.put('d', m(100))
  t.notOk(memo.get('b'), 'b, least recently used, went')
  t.ok(memo.get('a') && memo.get('c') && memo.get('d'))
  memo.put('big', m(301))
  t.notOk(memo.get('big'), 'one larger than the bound is not kept')
  t.ok(memo.get('d'), '... and evicts nothing')
  memo.put('d', m(300))
  t.notOk(memo.get('a'), 'replacing an entry with a bigger one makes room')
  t.equal(memo.get('d')?.body.length, 300)
  t.end()
})
