/**
 * Layers the registry may send that the icon and rpp-get extractions must refuse with a clear
 * 502 (LayerContentError) rather than a bare 500 or unbounded work: not gzip, truncated gzip,
 * tar headers tar-stream refuses, zstd, gzip bombs; and uncompressed tar layers, which are read.
 */
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import t from 'tap'
import { flattenedBest } from '../../../plugins/icons/layer-files.js'
import type { LayerRef } from '../../../plugins/packages/manifest.js'
import { digestOf, layerTarGz } from '../../fixtures/layers.js'

const ICON = 'docs/icon.svg'
const GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip'

/** Reads `blob` as the one layer of an image of type `mediaType`. */
function read(blob: Buffer, mediaType = GZIP, maxInflatedBytes = 2 ** 30): ReturnType<typeof flattenedBest> {
  const ref: LayerRef = { digest: digestOf(blob), size: blob.length, mediaType }
  return flattenedBest([ref], () => Promise.resolve(Readable.from([blob])), [ICON], { maxFileBytes: 1024, maxInflatedBytes })
}

/** A 512-byte tar header: `size` as octal text, or raw bytes for the size field (base-256). */
function tarHeader(name: string, type: string, size: number | Buffer): Buffer {
  const h = Buffer.alloc(512)
  h.write(name, 0, 100, 'utf8')
  h.write('0000644\0', 100, 'latin1')
  h.write('0000000\0', 108, 'latin1')
  h.write('0000000\0', 116, 'latin1')
  if (typeof size === 'number') h.write(`${size.toString(8).padStart(11, '0')}\0`, 124, 'latin1')
  else size.copy(h, 124)
  h.write('14537145400\0', 136, 'latin1')
  h.fill(0x20, 148, 156)
  h.write(type, 156, 'latin1')
  h.write('ustar\0', 257, 'latin1')
  h.write('00', 263, 'latin1')
  let sum = 0
  for (const b of h) sum += b
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
  return h
}

function padded(data: Buffer): Buffer {
  return Buffer.concat([data, Buffer.alloc((512 - (data.length % 512)) % 512)])
}

void t.test('not gzip, or truncated gzip: a LayerContentError that says so', async (t) => {
  await t.rejects(read(Buffer.from('this is not gzip at all')), { code: 'ELAYERCONTENT', message: /not valid gzip/ })
  const whole = await layerTarGz([{ name: ICON, data: 'x'.repeat(5000) }])
  await t.rejects(read(whole.subarray(0, whole.length - 20)), { code: 'ELAYERCONTENT', message: /gzip/ })
})

void t.test('tar headers tar-stream refuses: negative or huge pax size, base-256 size, a 64 MiB pax header or long name', async (t) => {
  const pax = (record: string): Buffer => {
    const line = (text: string): string => {
      let n = text.length + 3
      while (`${n} ${text}\n`.length !== n) n++
      return `${n} ${text}\n`
    }
    const body = Buffer.from(line(record))
    return Buffer.concat([tarHeader('PaxHeader', 'x', body.length), padded(body), tarHeader(ICON, '0', 3), padded(Buffer.from('svg')), Buffer.alloc(1024)])
  }
  await t.rejects(read(gzipSync(pax('size=-5'))), { code: 'ELAYERCONTENT' }, 'a negative pax size')
  await t.rejects(read(gzipSync(pax('size=99999999999999999999'))), { code: 'ELAYERCONTENT' }, 'a huge pax size')
  const negative = Buffer.concat([Buffer.alloc(11, 0xff), Buffer.from([0xfe])])
  await t.rejects(read(gzipSync(Buffer.concat([tarHeader(ICON, '0', negative), Buffer.alloc(1024)]))), { code: 'ELAYERCONTENT' }, 'a negative base-256 size')
  const huge = Buffer.concat([Buffer.from([0x80]), Buffer.alloc(11, 0xff)])
  await t.rejects(
    read(gzipSync(Buffer.concat([tarHeader(ICON, '0', huge), Buffer.from('svg'), Buffer.alloc(1024)]))),
    { code: 'ELAYERCONTENT' },
    'a huge base-256 size',
  )
  await t.rejects(
    read(gzipSync(Buffer.concat([tarHeader('PaxHeader', 'x', 64 * 1024 * 1024), Buffer.alloc(1024)]))),
    { code: 'ELAYERCONTENT' },
    'a 64 MiB pax header',
  )
  await t.rejects(
    read(gzipSync(Buffer.concat([tarHeader('././@LongLink', 'L', 64 * 1024 * 1024), Buffer.alloc(1024)]))),
    { code: 'ELAYERCONTENT' },
    'a 64 MiB GNU long name',
  )
})

void t.test('uncompressed tar layers are read by media type; zstd is refused clearly', async (t) => {
  const tar = Buffer.concat([tarHeader(ICON, '0', 3), padded(Buffer.from('svg')), Buffer.alloc(1024)])
  t.match(await read(tar, 'application/vnd.oci.image.layer.v1.tar'), { path: ICON, size: 3 })
  t.equal((await read(tar, 'application/vnd.docker.image.rootfs.diff.tar'))?.data?.toString(), 'svg')
  await t.rejects(read(tar, 'application/vnd.oci.image.layer.v1.tar+zstd'), { code: 'ELAYERCONTENT', message: /zstd/ })
})

void t.test('a gzip bomb stops at the inflate bound of the request, across its layers', async (t) => {
  const bomb = await layerTarGz([{ name: 'zeros', data: Buffer.alloc(8 * 1024 * 1024) }])
  t.ok(bomb.length < 64 * 1024, 'eight MiB of tar from a small layer')
  await t.rejects(read(bomb, GZIP, 4 * 1024 * 1024), { code: 'ELAYERCONTENT', message: /inflates past 4194304 bytes/ })
  t.equal(await read(bomb, GZIP, 16 * 1024 * 1024), undefined, 'under the bound it is read (and has no icon)')
})
