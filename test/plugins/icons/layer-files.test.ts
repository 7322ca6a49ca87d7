import { Readable } from 'node:stream'
import t from 'tap'
import { flattenedBest, normalizeName } from '../../../plugins/icons/layer-files.js'
import type { LayerRef } from '../../../plugins/packages/manifest.js'
import { digestOf, layerTarGz, type LayerEntry } from '../../fixtures/layers.js'

const ICON = 'docs/icon.svg'

async function image(...layers: LayerEntry[][]): Promise<{ refs: LayerRef[]; open: (l: LayerRef) => Promise<Readable>; opened: string[] }> {
  const blobs = new Map<string, Buffer>()
  const refs: LayerRef[] = []
  for (const entries of layers) {
    const data = await layerTarGz(entries)
    blobs.set(digestOf(data), data)
    refs.push({ digest: digestOf(data), size: data.length, mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip' })
  }
  const opened: string[] = []
  return {
    refs,
    opened,
    open: (l) => {
      opened.push(l.digest)
      // Small chunks: a file's bytes arrive across many reads, as from a socket.
      const data = blobs.get(l.digest) ?? Buffer.alloc(0)
      return Promise.resolve(Readable.from(Array.from({ length: Math.ceil(data.length / 100) }, (_, i) => data.subarray(i * 100, i * 100 + 100))))
    },
  }
}

/** The chosen file as `{ path: text }`, or `{ path: size }` when over the limit; `{}` for none. */
async function find(img: Awaited<ReturnType<typeof image>>, paths = [ICON], max = 1024): Promise<Record<string, string | number>> {
  const f = await flattenedBest(img.refs, img.open, paths, { maxFileBytes: max, maxInflatedBytes: 2 ** 30 })
  return f ? { [f.path]: f.data ? f.data.toString() : f.size } : {}
}

void t.test('names are normalised relative to the image root', (t) => {
  t.equal(normalizeName('./docs/icon.svg'), ICON)
  t.equal(normalizeName('/docs/icon.svg'), ICON)
  t.equal(normalizeName('docs//icon.svg/'), ICON)
  t.equal(normalizeName('./'), undefined)
  t.equal(normalizeName('../etc/passwd'), 'etc/passwd', 'cannot climb above the root')
  t.end()
})

void t.test('later layers win, whatever the name prefix', async (t) => {
  t.same(await find(await image([{ name: './docs/icon.svg', data: 'one' }], [{ name: '/docs/icon.svg', data: 'two' }])), { [ICON]: 'two' })
  t.same(
    await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: 'other', data: 'x' }])),
    { [ICON]: 'one' },
    'kept when a later layer leaves it alone',
  )
})

void t.test('whiteouts and opaque directories remove what lower layers had', async (t) => {
  t.same(await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: 'docs/.wh.icon.svg' }])), {}, 'file whiteout')
  t.same(await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: '.wh.docs' }])), {}, 'directory whiteout')
  t.same(await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: './docs/.wh..wh..opq' }])), {}, 'opaque directory')
  t.same(
    await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: 'docs/icon.svg', data: 'two' }, { name: 'docs/.wh..wh..opq' }])),
    { [ICON]: 'two' },
    'an opaque marker hides lower layers only, not its own layer',
  )
  t.same(
    await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: '.wh.docs' }], [{ name: 'docs/icon.svg', data: 'three' }])),
    { [ICON]: 'three' },
    'put back later',
  )
})

void t.test('only regular files count; a non-directory where a directory was hides it', async (t) => {
  t.same(
    await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: 'docs/icon.svg', type: 'symlink', linkname: '/etc/passwd' }])),
    {},
    'a symlink',
  )
  t.same(await find(await image([{ name: 'docs/icon.svg', type: 'directory' }])), {}, 'a directory')
  t.same(
    await find(
      await image([
        { name: 'x', data: 'x' },
        { name: 'docs/icon.svg', type: 'link', linkname: 'x' },
      ]),
    ),
    {},
    'a hard link',
  )
  t.same(
    await find(await image([{ name: 'docs/icon.svg', data: 'one' }], [{ name: 'docs', type: 'symlink', linkname: 'elsewhere' }])),
    {},
    'a symlinked parent',
  )
})

void t.test('a file over the limit is reported by size, without its bytes', async (t) => {
  t.same(await find(await image([{ name: ICON, data: Buffer.alloc(5000, 1) }]), [ICON], 4096), { [ICON]: 5000 })
  t.same(await find(await image([{ name: ICON, data: Buffer.alloc(4096, 0x41) }]), [ICON], 4096), { [ICON]: 'A'.repeat(4096) }, 'exactly the limit is fine')
})

void t.test('a layer whose bytes do not match its digest rejects, and nothing is returned', async (t) => {
  const img = await image([{ name: ICON, data: 'one' }])
  const ref = img.refs[0]
  if (!ref) throw new Error('no layer')
  const wrong = { ...ref, digest: `sha256:${'0'.repeat(64)}` }
  const limits = { maxFileBytes: 1024, maxInflatedBytes: 2 ** 30 }
  await t.rejects(
    flattenedBest([wrong], () => img.open(ref), [ICON], limits),
    { code: 'EDIGEST' },
  )
  await t.rejects(
    flattenedBest([{ ...ref, size: ref.size - 1 }], () => img.open(ref), [ICON], limits),
    { code: 'EMANIFEST' },
  )
  await t.rejects(
    flattenedBest([{ ...ref, size: ref.size + 1 }], () => img.open(ref), [ICON], limits),
    { code: 'EDIGEST' },
  )
})

void t.test('the best present path wins; a better one whited out later gives way to the next, read again', async (t) => {
  const paths = ['a.svg', 'a.png', 'a.jpg']
  t.same(
    await find(
      await image([
        { name: 'a.jpg', data: 'jpg' },
        { name: 'a.png', data: 'png' },
        { name: 'a.svg', data: 'svg' },
      ]),
      paths,
    ),
    { 'a.svg': 'svg' },
  )
  const img = await image(
    [
      { name: 'a.png', data: 'png' },
      { name: 'a.svg', data: 'svg' },
    ],
    [{ name: '.wh.a.svg' }],
  )
  t.same(await find(img, paths), { 'a.png': 'png' }, 'the png from below, though the svg was the one held')
  t.equal(img.opened.length, 3, 'two layers, then the png layer once more for its bytes')
})
