import { readFileSync, writeFileSync } from 'node:fs'

/** VmRSS and VmHWM (the peak since start, or since {@link resetPeakRss}) of `pid`, in KiB, from /proc. */
export function memoryOf(pid: number): { rssKiB: number; hwmKiB: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1] ?? NaN)
  return { rssKiB: field('VmRSS'), hwmKiB: field('VmHWM') }
}

/** Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`); false where the kernel does not allow it. */
export function resetPeakRss(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5')
    return true
  } catch {
    return false
  }
}
