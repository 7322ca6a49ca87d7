/**
 * Reads the Dockerfile well enough to rebuild its runtime stage's file set without a Docker
 * engine: stages, and per stage its WORKDIR, COPY, RUN, ENV, USER, VOLUME and ENTRYPOINT.
 */
import { posix } from 'node:path'

export interface Instruction {
  keyword: string
  args: string
  line: number
}

export interface Stage {
  base: string
  name: string | undefined
  instructions: Instruction[]
}

export interface Copy {
  from: string | undefined
  sources: string[]
  /** Absolute, resolved against the stage's WORKDIR at that point. */
  dest: string
  line: number
}

/** Splits into stages of instructions, joining `\` continuations and dropping comments. */
export function parseDockerfile(text: string): Stage[] {
  const logical: Array<{ text: string; line: number }> = []
  let current: { text: string; line: number } | undefined
  text.split('\n').forEach((raw, i) => {
    const trimmed = raw.trim()
    if (current === undefined && (trimmed === '' || trimmed.startsWith('#'))) return
    if (current !== undefined && trimmed.startsWith('#')) return
    const continued = trimmed.endsWith('\\')
    const part = continued ? trimmed.slice(0, -1) : trimmed
    current = current ? { text: `${current.text} ${part}`, line: current.line } : { text: part, line: i + 1 }
    if (!continued) {
      logical.push(current)
      current = undefined
    }
  })
  if (current) logical.push(current)
  const stages: Stage[] = []
  for (const l of logical) {
    const m = /^(\S+)\s*(.*)$/.exec(l.text)
    const keyword = (m?.[1] ?? '').toUpperCase()
    const args = (m?.[2] ?? '').trim()
    if (keyword === 'FROM') {
      const from = /^(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$/i.exec(args)
      stages.push({ base: from?.[1] ?? args, name: from?.[2], instructions: [] })
      continue
    }
    const stage = stages.at(-1)
    if (!stage) throw new Error(`Dockerfile line ${l.line}: ${keyword} before FROM`)
    stage.instructions.push({ keyword, args, line: l.line })
  }
  return stages
}

/** A JSON (exec-form) array, or undefined for shell form. */
export function execForm(args: string): string[] | undefined {
  if (!args.startsWith('[')) return undefined
  const parsed = JSON.parse(args) as unknown
  if (!Array.isArray(parsed) || !parsed.every((x) => typeof x === 'string')) throw new Error(`not a JSON string array: ${args}`)
  return parsed
}

/** The stage's COPY instructions, with destinations made absolute. */
export function copies(stage: Stage): Copy[] {
  let workdir = '/'
  const out: Copy[] = []
  for (const ins of stage.instructions) {
    if (ins.keyword === 'WORKDIR') workdir = posix.resolve(workdir, ins.args)
    if (ins.keyword !== 'COPY' && ins.keyword !== 'ADD') continue
    if (ins.keyword === 'ADD') throw new Error(`Dockerfile line ${ins.line}: ADD (use COPY)`)
    const words = execForm(ins.args) ?? ins.args.split(/\s+/)
    let from: string | undefined
    const paths: string[] = []
    for (const w of words) {
      const flag = /^--([a-z-]+)=(.*)$/.exec(w)
      if (flag) {
        if (flag[1] === 'from') from = flag[2]
        continue
      }
      paths.push(w)
    }
    const dest = paths.pop()
    if (dest === undefined || paths.length === 0) throw new Error(`Dockerfile line ${ins.line}: COPY needs a source and a destination`)
    out.push({ from, sources: paths, dest: posix.resolve(workdir, dest), line: ins.line })
  }
  return out
}

/** The stage's final WORKDIR. */
export function workdir(stage: Stage): string {
  return stage.instructions.filter((i) => i.keyword === 'WORKDIR').reduce((dir, i) => posix.resolve(dir, i.args), '/')
}

/** ENV as set by the stage (`ENV a=b c="d"` and the legacy `ENV a b`). */
export function env(stage: Stage): Record<string, string> {
  const out: Record<string, string> = {}
  for (const ins of stage.instructions.filter((i) => i.keyword === 'ENV')) {
    if (!ins.args.includes('=') || /^\S+\s/.test(ins.args.split('=')[0] ?? '')) {
      const [k = '', ...rest] = ins.args.split(/\s+/)
      out[k] = rest.join(' ')
      continue
    }
    for (const m of ins.args.matchAll(/(\w+)=("(?:[^"\\]|\\.)*"|\S*)/g)) {
      const value = m[2] ?? ''
      out[m[1] ?? ''] = value.startsWith('"') ? (JSON.parse(value) as string) : value
    }
  }
  return out
}

export function last(stage: Stage, keyword: string): Instruction | undefined {
  return stage.instructions.filter((i) => i.keyword === keyword).at(-1)
}

export function runs(stage: Stage): string[] {
  return stage.instructions.filter((i) => i.keyword === 'RUN').map((i) => i.args)
}
