import { gzipSync } from 'node:zlib'

/** Options for {@link makePackageTarGz}. */
export interface TarGzOptions {
  /** Per-file permission bits; by default `install` is 0o755 and everything else 0o644. */
  mode?: Record<string, number>
  /** Modification time (Unix seconds) of every entry; fixed so equal input gives equal bytes. */
  mtime?: number
}

const BLOCK = 512
const DEFAULT_MTIME = 1_700_000_000

/**
 * Builds a gzip-compressed POSIX ustar archive in memory, shaped like a registry package
 * (the last image layer the node bootstrap runs `tar -xf` on, then `./install`).
 *
 * Written by hand rather than with a tar library so the tests depend on nothing but node:zlib,
 * and so the output is byte-for-byte deterministic: the same files give the same digest, which
 * lets tests name packages by digest across runs. Entries keep the key order of `files`;
 * parent directories are not emitted (tar creates them on extraction).
 */
export function makePackageTarGz(files: Record<string, string | Buffer>, opts: TarGzOptions = {}): Buffer {
  const mtime = opts.mtime ?? DEFAULT_MTIME
  const blocks: Buffer[] = []
  for (const [name, content] of Object.entries(files)) {
    const data = typeof content === 'string' ? Buffer.from(content, 'utf8') : content
    const mode = opts.mode?.[name] ?? (baseName(name) === 'install' ? 0o755 : 0o644)
    blocks.push(ustarHeader(name, data.length, mode, mtime), data)
    const padding = (BLOCK - (data.length % BLOCK)) % BLOCK
    if (padding > 0) blocks.push(Buffer.alloc(padding))
  }
  // Two zero blocks mark the end of the archive.
  blocks.push(Buffer.alloc(2 * BLOCK))
  return gzipSync(Buffer.concat(blocks))
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1)
}

function ustarHeader(path: string, size: number, mode: number, mtime: number): Buffer {
  const { name, prefix } = splitPath(path)
  const header = Buffer.alloc(BLOCK)
  writeString(header, name, 0, 100)
  writeOctal(header, mode, 100, 8)
  writeOctal(header, 0, 108, 8) // uid
  writeOctal(header, 0, 116, 8) // gid
  writeOctal(header, size, 124, 12)
  writeOctal(header, mtime, 136, 12)
  header.fill(0x20, 148, 156) // the checksum is computed with its own field as spaces
  header.write('0', 156, 'latin1') // typeflag: regular file
  header.write('ustar\0', 257, 'latin1')
  header.write('00', 263, 'latin1')
  writeString(header, 'root', 265, 32) // uname
  writeString(header, 'root', 297, 32) // gname
  writeOctal(header, 0, 329, 8) // devmajor
  writeOctal(header, 0, 337, 8) // devminor
  writeString(header, prefix, 345, 155)
  let sum = 0
  for (const byte of header) sum += byte
  // Six octal digits, NUL, space: the form GNU tar and BSD tar both write.
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1')
  return header
}

/** ustar stores paths longer than 100 bytes as prefix (up to 155) + '/' + name (up to 100). */
function splitPath(path: string): { name: string; prefix: string } {
  if (path.length === 0 || path.startsWith('/') || path.split('/').includes('..')) {
    throw new Error(`tar entry name must be a relative path without "..": ${JSON.stringify(path)}`)
  }
  if (Buffer.byteLength(path) <= 100) return { name: path, prefix: '' }
  for (let i = path.indexOf('/'); i !== -1; i = path.indexOf('/', i + 1)) {
    const prefix = path.slice(0, i)
    const name = path.slice(i + 1)
    if (Buffer.byteLength(prefix) <= 155 && Buffer.byteLength(name) <= 100 && name.length > 0) {
      return { name, prefix }
    }
  }
  throw new Error(`tar entry name too long for ustar: ${path}`)
}

function writeString(header: Buffer, value: string, offset: number, length: number): void {
  if (Buffer.byteLength(value) > length) throw new Error(`tar header field too long: ${value}`)
  header.write(value, offset, length, 'utf8')
}

/** Numeric fields are zero-padded octal followed by a NUL terminator. */
function writeOctal(header: Buffer, value: number, offset: number, length: number): void {
  const digits = value.toString(8)
  if (!Number.isInteger(value) || value < 0 || digits.length > length - 1) {
    throw new Error(`tar header value out of range: ${value}`)
  }
  header.write(`${digits.padStart(length - 1, '0')}\0`, offset, length, 'latin1')
}
