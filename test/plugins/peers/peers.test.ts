/**
 * Peers (plugins/peers/peers.ts) with a fake client: whatever a peer or the client does, the
 * package core gets a plain answer (a verified result, or "no"), never an exception; and a
 * manifest that verified against its digest but does not parse as the peer labelled it is
 * that peer failing: the next one is asked, and only what parsed is remembered for others.
 */
import { createHash } from 'node:crypto'
import t from 'tap'
import type { TempFile } from '../../../plugins/packages/cache/blob-store.js'
import type { ManifestBytes } from '../../../plugins/packages/peer-port.js'
import { Membership } from '../../../plugins/peers/membership.js'
import type { PeerClient, PeerResult } from '../../../plugins/peers/peer-client.js'
import { Peers } from '../../../plugins/peers/peers.js'

const SELF = '127.0.0.1:1'
const A = '127.0.0.1:2'
const B = '127.0.0.1:3'
const silent = { info: () => undefined, warn: () => undefined, error: () => undefined }
const LAYER = { digest: `sha256:${'a'.repeat(64)}`, size: 10, mediaType: '' }
const temp = {} as TempFile

type FakeClient = Partial<Record<'layer' | 'manifest', (member: string) => Promise<unknown>>>

function peers(client: FakeClient, results: PeerResult[] = []): Peers {
  return new Peers({
    membership: new Membership({ self: SELF, members: [SELF, A, B] }),
    client: client as unknown as PeerClient,
    log: silent,
    onResult: (r) => results.push(r),
  })
}

void t.test('a client that throws is a peer that failed: false, never a rejection', async (t) => {
  const p = peers({
    layer: () => Promise.reject(new TypeError('Invalid URL')),
    manifest: () => Promise.reject(new TypeError('Invalid URL')),
  })
  const request = { digest: LAYER.digest, from: 'client' as const }
  t.equal(await p.fromAny(request, LAYER, temp, new AbortController().signal), false)
  // Owner choice depends on the digest; the result must be false whoever owns it.
  t.equal(await p.fromOwner(request, LAYER, temp, new AbortController().signal), false)
  t.equal(await p.manifest(`sha256:${'c'.repeat(64)}`), undefined)
})

void t.test('a verified manifest under a lying label is that peer failing: the next peer is asked, only the parsed one is held', async (t) => {
  // An OCI image manifest may omit its mediaType: then the label decides how it is read.
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, layers: [{ digest: LAYER.digest, size: 10 }] }))
  const digest = `sha256:${createHash('sha256').update(body).digest('hex')}`
  const asked: string[] = []
  const answers: Record<string, ManifestBytes> = {
    [A]: { body, mediaType: 'application/vnd.oci.image.index.v1+json' },
    [B]: { body, mediaType: 'application/vnd.oci.image.manifest.v1+json' },
  }
  const results: PeerResult[] = []
  const p = peers(
    {
      manifest: (member) => {
        asked.push(member)
        return Promise.resolve({ result: 'ok', manifest: answers[member] })
      },
    },
    results,
  )
  const got = await p.manifest(digest)
  t.same(asked, [A, B], 'the honest peer was asked after the liar')
  t.equal(got?.mediaType, 'application/vnd.oci.image.manifest.v1+json')
  t.equal(p.memo.get(digest)?.mediaType, 'application/vnd.oci.image.manifest.v1+json', 'what is held for others is what parsed')
  t.same(results, ['mismatch', 'ok'], 'the liar counted as a mismatch')
  t.same(p.membership.live(), [SELF, B], 'and left out of owner choice')
})
