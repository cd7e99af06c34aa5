#!/usr/bin/env node
/**
 * `paceline`: run a batch of LLM requests through your API key as fast as
 * its limits allow, and get every result back, in input order.
 *
 *     paceline run requests.jsonl -o results.jsonl --rpm 50 --itpm 30000 --otpm 8000
 *     paceline demo
 *
 * Input lines use the providers' own batch formats (Anthropic Message
 * Batches, OpenAI Batch), so one file works here and in their Batch APIs;
 * results come back in the matching results format. Every result is
 * journaled the moment it finishes, so an interrupted or crashed run
 * resumes without redoing finished work. `paceline --help` lists everything.
 *
 * The batch run is six stages, laid out in this file in order:
 * read & validate → plan (endpoint, limits, what is left) → execute (send;
 * the library limits and retries) → record (journal) → emit (ordered
 * output) → report.
 *
 * @module
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import {
  accessSync,
  closeSync,
  constants as fsConstants,
  createReadStream,
  existsSync,
  fsyncSync,
  linkSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { hostname, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import process from "node:process";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import {
  assembleStream,
  AZURE_API_VERSION,
  azureProvider,
  type BatchApi,
  type BatchCall,
  type BatchOutcome,
  type BatchStatus,
  type CachePrefix,
  type Cost,
  estimateCost,
  geminiProvider,
  HttpError,
  type Limiter,
  mapConcurrentUnordered,
  openaiProvider,
  parseRetryAfter,
  type Provider,
  providerOf,
  providers,
  QuotaError,
  type RateLimitedFetch,
  rateLimitedFetch,
  type RateLimiterOptions,
  type RedisEval,
  RedisLimiterError,
  RedisRateLimiter,
  retry,
  type Stats,
  systemClock,
  windowLoads,
  type WindowSpec,
  type WindowUsage,
} from "./mod.ts";
import { startSimulator } from "./sim.ts";
import { type Lang, renderReport } from "./report.ts";

const VERSION = "0.1.0";
/** The library's default `maxRetryAfterMs`: longer server-told waits fail the line at once. */
const MAX_RETRY_AFTER_MS = 120_000;

/** The help: commands, input formats, and every flag of the tables below. */
function helpText(): string {
  return `paceline ${VERSION}: rate-limited batch runs against LLM APIs

Usage:
  paceline run <input.jsonl> [options]   run a batch; results in input order
  paceline cancel <output.jsonl>         cancel the batches a --batch-api run submitted
  paceline demo [--requests N]           a demo batch on the built-in simulator
  paceline --help | --version

Input: JSONL in the providers' batch formats (detected per file):
  Anthropic: {"custom_id": "a1", "params": {"model": ..., "max_tokens": ..., "messages": [...]}}
  OpenAI:    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
             "url" is one of /v1/chat/completions, /v1/responses, /v1/embeddings,
             /v1/completions, /v1/moderations; a file may mix them and models
             (Azure OpenAI: the same lines, with --provider azure)
  Gemini:    {"key": "a1", "request": {"contents": [...], "generationConfig": {...}}}
             with --model (or "model" in a request)

Options for run:
${flagHelp(RUN_FLAGS)}

Every flag takes --flag value or --flag=value. One run per output: a second run
on the same output exits 2 while the first is running (<output>.lock); the
output is never the input, and an existing file that is not a results file of
this input is left as it is (exit 2).

Every result is recorded the moment it finishes in <output>.journal; the output
is written in input order and is always a prefix of the input. Running the same
command again (after a crash, Ctrl-C or a fatal error) sends only the lines
that have no result; requests in flight at a crash may be sent again, nothing
that finished is. The journal is deleted when the output is complete.

With --batch-api, every submission is recorded in <output>.batches before it is
sent; running the same command again collects the batches already submitted and
submits only lines in no batch. Ctrl-C stops waiting (the batches keep running);
paceline cancel <output> cancels them. Expired, canceled and errored requests
are written as errored results.

The API key comes from ANTHROPIC_API_KEY, OPENAI_API_KEY, AZURE_OPENAI_API_KEY,
or GEMINI_API_KEY (else GOOGLE_API_KEY).
Exit codes: 0 all succeeded; 1 some lines errored (results written);
2 usage or input error (nothing sent); 3 stopped by a fatal API error (401, 403,
quota/billing 429, a spent per-day quota: nothing more sent, those not recorded;
fix it, or wait for the quota, and run again);
130 interrupted (run again to resume).
`;
}

/** A usage or input error: exit code 2, nothing sent. */
class UsageError extends Error {
  override name = "UsageError";
}

interface Item {
  line: number;
  customId: string;
  /** The endpoint's path: `/v1/messages`, or the OpenAI line's `url`. */
  path: string;
  body: Record<string, unknown>;
}

interface RunOptions {
  input: string;
  output: string;
  /** `--provider`: a provider's name; the input's format must be its. */
  provider?: string;
  baseURL?: string;
  apiKey?: string;
  limits: Record<string, number>;
  windowMs: number;
  concurrency: number;
  retries: number;
  /** How long one line may keep drawing rate-limit 429s, from its first (they use no retries). */
  maxRateLimitedMs: number;
  stream: boolean;
  /** False with `--no-find-pace`. */
  findPace: boolean;
  /** The model of lines that name none (Gemini's batch lines). */
  model?: string;
  /** Azure OpenAI: the deployment (default: each line's `model`) and `api-version`. */
  deployment?: string;
  apiVersion?: string;
  quiet: boolean;
  /** Also redo lines whose recorded result is errored. */
  retryErrored?: boolean;
  /** Validate and plan only: totals and the least duration; nothing sent. */
  dryRun?: boolean;
  /** `--batch-api`: through the provider's Batch API instead of live requests. */
  batchApi?: boolean;
  /** `--poll-ms`: how often a Batch API run asks how its batches stand. */
  pollMs?: number;
  /**
   * Whose limits the given ones are: the whole key (default; learned
   * limits are per model), each model (`"all"`), or everything per key,
   * learned ones too (`false`, for relays).
   */
  perModel?: "learned" | "all" | false;
  /** `--redis URL`: share the limits through this Redis. */
  redis?: string;
  /** `--limiter-name`: the shared limits' name (default from provider, base URL and a hash of the key). */
  limiterName?: string;
  /** `--shard K/N`: only this share of the lines. */
  shard?: Shard;
  /** `--report FILE.html`: the run's report page. */
  report?: string;
  /** The report's language. */
  lang?: Lang;
  marginMs?: number;
  /** Progress line interval when stderr is not a TTY, ms. */
  progressMs?: number;
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
  signals?: boolean;
}

function num(flag: string, v: string | undefined, min = 1): number {
  const n = Number(v);
  if (v === undefined || v.trim() === "" || !Number.isFinite(n) || n < min) {
    throw new UsageError(
      `${flag} needs a number >= ${min}: received ${
        v === undefined ? "nothing" : JSON.stringify(v)
      }`,
    );
  }
  return n;
}

// =============================================================================
// Stage 0: the user's files — every path checked before anything is read or
// sent, and one run per output
// =============================================================================

/** The files a run writes beside its output. */
function sidecars(output: string): string[] {
  return [
    `${output}.journal`,
    `${output}.lock`,
    `${output}.tmp`,
    `${output}.batches`,
  ];
}

/** Whether two paths name one file (the same inode, through links too). */
function sameFile(a: string, b: string): boolean {
  if (resolve(a) === resolve(b)) return true;
  try {
    const x = statSync(a);
    const y = statSync(b);
    return x.ino === y.ino && x.dev === y.dev;
  } catch {
    return false; // one of them does not exist yet
  }
}

/** A file this run will write: not a folder, in a folder that exists and is writable. */
function checkWritable(flag: string, path: string): void {
  if (existsSync(path) && statSync(path).isDirectory()) {
    throw new UsageError(`${flag} ${path} is a folder: give a file name`);
  }
  const folder = dirname(resolve(path));
  if (!existsSync(folder) || !statSync(folder).isDirectory()) {
    throw new UsageError(
      `${flag} ${path}: the folder ${folder} does not exist. Nothing was sent.`,
    );
  }
  try {
    accessSync(folder, fsConstants.W_OK);
  } catch {
    throw new UsageError(
      `${flag} ${path}: the folder ${folder} is not writable. Nothing was sent.`,
    );
  }
}

/** The input: a readable file, not a folder. */
function checkInput(input: string): void {
  if (!existsSync(input)) {
    throw new UsageError(`input file not found: ${input}`);
  }
  if (statSync(input).isDirectory()) {
    throw new UsageError(
      `${input} is a folder: give a JSONL file, one request per line`,
    );
  }
  try {
    accessSync(input, fsConstants.R_OK);
  } catch {
    throw new UsageError(`cannot read the input file ${input}`);
  }
}

/**
 * Every path of the run, before anything is read or sent: the input is
 * readable; the output, its journal and the report can be written; and no
 * file this run writes is the input, another shard's output, or another of
 * its own files.
 */
function checkPaths(o: RunOptions): void {
  checkInput(o.input);
  const ours = /\.(journal|lock|tmp|batches|upload-\d+)$/.exec(o.output);
  if (ours) {
    throw new UsageError(
      `-o ${o.output}: names ending in .${
        ours[1]
      } are paceline's own files beside an output; give the results file's name`,
    );
  }
  for (const path of [o.output, ...sidecars(o.output)]) {
    if (sameFile(path, o.input)) {
      throw new UsageError(
        `-o ${o.output} would write over the input ${o.input}${
          path === o.output ? "" : ` (as ${path})`
        }: results go to a file of their own (leave -o out for ${
          defaultOutput(o.input, o.shard)
        }). Nothing was changed.`,
      );
    }
  }
  const shard = /\.shard-(\d+)-of-(\d+)\.results\.jsonl$/.exec(o.output);
  if (
    shard && (!o.shard || Number(shard[1]) !== o.shard.k ||
      Number(shard[2]) !== o.shard.n)
  ) {
    throw new UsageError(
      `-o ${o.output} is the output of shard ${shard[1]}/${shard[2]}${
        o.shard ? `, not of this run's --shard ${o.shard.k}/${o.shard.n}` : ""
      }: each shard keeps its own output`,
    );
  }
  checkWritable("-o", o.output);
  if (o.report) {
    for (const path of [o.input, o.output, ...sidecars(o.output)]) {
      if (sameFile(o.report, path)) {
        throw new UsageError(
          `--report ${o.report} is ${
            path === o.input
              ? "the input"
              : path === o.output
              ? "the output"
              : path
          }: give the page a name of its own (e.g. run.html)`,
        );
      }
    }
    checkWritable("--report", o.report);
  }
}

/** `<input>.results.jsonl`, or `<input>.shard-K-of-N.results.jsonl`. */
function defaultOutput(input: string, shard: Shard | undefined): string {
  const suffix = shard ? `.shard-${shard.k}-of-${shard.n}` : "";
  return input.replace(/(\.jsonl)?$/, `${suffix}.results.jsonl`);
}

/** What a lock file says: who holds the output. */
interface LockOwner {
  pid: number;
  host: string;
  since: string;
}

/** Whether process `pid` of this host is running. */
function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as { code?: string }).code === "EPERM"; // someone else's
  }
  // A killed process whose parent has not reaped it yet (a zombie) still
  // answers signal 0 but holds nothing: Linux says so in /proc.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !==
      "Z";
  } catch {
    return true; // no /proc (macOS, Windows): trust the signal
  }
}

/**
 * One run per output: `<output>.lock`, created atomically (a hard link of
 * a complete file, so nobody ever reads half a lock), holding the process
 * id and host. A lock left by a process of this host that is no longer
 * running is taken over, with a notice; one held by a running process, or
 * by another host (whose processes we cannot see), stops this run: exit 2.
 */
class OutputLock {
  readonly path: string;
  readonly #owner: string;

  private constructor(path: string, owner: string) {
    this.path = path;
    this.#owner = owner;
  }

  static take(output: string, notice: (s: string) => void): OutputLock {
    const path = `${output}.lock`;
    const me: LockOwner = {
      pid: process.pid,
      host: hostname(),
      since: new Date().toISOString(),
    };
    const text = JSON.stringify(me) + "\n";
    const draft = `${path}.${process.pid}.draft`;
    writeFileSync(draft, text);
    try {
      for (let tries = 0; tries < 3; tries++) {
        try {
          linkSync(draft, path);
          return new OutputLock(path, text);
        } catch (e) {
          if ((e as { code?: string }).code !== "EEXIST") throw e;
        }
        const held = OutputLock.#read(path);
        if (held === undefined) continue; // just released: try again
        if (
          held.owner && held.owner.host === me.host && !isAlive(held.owner.pid)
        ) {
          notice(
            `paceline: ${path} was left by process ${held.owner.pid} (since ${held.owner.since}), which is no longer running: taking it over\n`,
          );
          rmSync(path, { force: true });
          continue;
        }
        throw new UsageError(
          `${output} is in use by another paceline run (${
            held.owner
              ? `process ${held.owner.pid} on ${held.owner.host}, since ${held.owner.since}`
              : "its lock cannot be read"
          }): one run per output. Wait for it, or give this run another -o; if no such run is going, delete ${path}.`,
        );
      }
      throw new UsageError(`${path}: could not take the lock; try again`);
    } finally {
      rmSync(draft, { force: true });
    }
  }

  static #read(path: string): { owner?: LockOwner } | undefined {
    let text: string;
    try {
      text = readFileSync(path, "utf8");
    } catch {
      return undefined;
    }
    try {
      const v = JSON.parse(text) as LockOwner;
      if (Number.isInteger(v.pid) && typeof v.host === "string") {
        return { owner: v };
      }
    } catch { /* below */ }
    return {};
  }

  /** Removes the lock, if it is still this run's. */
  release(): void {
    try {
      if (readFileSync(this.path, "utf8") === this.#owner) rmSync(this.path);
    } catch { /* already gone */ }
  }
}

// =============================================================================
// Stage 1: read & validate — the whole input, before anything is sent
// =============================================================================

/** `--shard K/N`: this process's share of the lines (1-based K). */
interface Shard {
  k: number;
  n: number;
}

/** Whether the `g`-th request line (0-based, blank lines not counted) is this shard's. */
function inShard(shard: Shard | undefined, g: number): boolean {
  return !shard || g % shard.n === shard.k - 1;
}

/**
 * Reads a JSONL file line by line, without holding it all; with a shard,
 * only that shard's request lines (and blank lines) come through.
 */
async function* lines(
  path: string,
  shard?: Shard,
): AsyncGenerator<[number, string]> {
  const rl = createInterface({
    input: createReadStream(path, "utf8"),
    crlfDelay: Infinity,
  });
  let n = 0;
  let g = 0;
  for await (let line of rl) {
    // A UTF-8 byte order mark (Excel and Windows tools write one) is not
    // part of the first request.
    if (++n === 1 && line.charCodeAt(0) === 0xfeff) line = line.slice(1);
    if (line.trim() !== "" && !inShard(shard, g++)) continue;
    yield [n, line];
  }
}

/** What the lines read so far say of the file. */
interface InputFormat {
  provider?: Provider;
  /** The first Gemini line that names no model (`--model` must). */
  modelless?: number;
}

/** Parses and checks one input line; throws a UsageError naming the line. */
function parseLine(
  n: number,
  line: string,
  format: InputFormat,
): Item {
  const jsonl =
    "paceline reads JSONL: one request per line, each a JSON object";
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    throw new UsageError(
      `line ${n}: invalid JSON (${(e as Error).message})${
        /^\s*[[{]\s*$|^\s*\[/.test(line) ? `; ${jsonl}` : ""
      }`,
    );
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new UsageError(
      `line ${n}: ${
        Array.isArray(v) ? "a JSON array" : "not a JSON object"
      }; ${jsonl}`,
    );
  }
  const o = v as Record<string, unknown>;
  const kind = providers.find((p) => p.batch.bodyField in o);
  const idField = kind?.batch.idField ?? "custom_id";
  const id = o[idField];
  if (typeof id !== "string" || id === "") {
    throw new UsageError(
      `line ${n}: "${idField}" must be a non-empty string: ${
        id === undefined ? "it is missing" : `received ${JSON.stringify(id)}`
      }`,
    );
  }
  if (!kind) {
    throw new UsageError(
      `line ${n}: neither ${
        providers.map((p) => `an ${p.batch.name} line`).join(" nor ")
      }`,
    );
  }
  if (format.provider && format.provider !== kind) {
    throw new UsageError(
      `line ${n}: an ${kind.batch.name} line in a file of ${format.provider.batch.name} lines: one format per file`,
    );
  }
  format.provider = kind;
  const where = kind.batch.bodyField;
  const body = o[where] as Record<string, unknown>;
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw new UsageError(`line ${n}: "${where}" must be a JSON object`);
  }
  let path: string;
  try {
    path = kind.batch.pathOf(o);
  } catch (e) {
    throw new UsageError(`line ${n}: ${(e as Error).message}`);
  }
  checkBody(n, kind, path, body);
  if (kind === geminiProvider && typeof body.model !== "string") {
    format.modelless ??= n;
  }
  return { line: n, customId: id, path, body };
}

/** Every output cap any endpoint knows: each must be a positive integer where given. */
const OUTPUT_CAPS = [
  ...new Set(
    providers.flatMap((p) => p.endpoints.flatMap((e) => e.outputCaps)),
  ),
];

/**
 * What a request body cannot do without: the endpoint's own field
 * (`messages`, `input`, `prompt`) and required fields, and output caps that
 * are positive integers. Throws a UsageError naming the line and the field.
 */
function checkBody(
  n: number,
  kind: Provider,
  path: string,
  body: Record<string, unknown>,
): void {
  const where = kind.batch.bodyField;
  const endpoint = kind.endpoints.find((e) => e.path === path)!;
  const field = endpoint.needs;
  const given = body[field];
  if (field === "messages" ? !Array.isArray(given) : !isInput(given)) {
    throw new UsageError(
      `line ${n}: "${where}" needs ${
        field === "messages"
          ? `a "messages" array`
          : `"${field}" (a string or a non-empty array)`
      }${kind.endpoints.length > 1 ? ` for ${path}` : ""}`,
    );
  }
  if (field === "messages" && (given as unknown[]).length === 0) {
    throw new UsageError(
      `line ${n}: "${where}.messages" is empty: it needs at least one message`,
    );
  }
  for (const required of endpoint.requires) {
    if (body[required] === undefined) {
      throw new UsageError(`line ${n}: "${where}.${required}" is required`);
    }
  }
  for (const cap of OUTPUT_CAPS) {
    const x = body[cap];
    if (
      x !== undefined && x !== null &&
      !(Number.isSafeInteger(x) && (x as number) > 0)
    ) {
      throw new UsageError(
        `line ${n}: "${where}.${cap}" must be a positive integer: received ${
          typeof x === "number" && !Number.isFinite(x)
            ? String(x)
            : JSON.stringify(x)
        }`,
      );
    }
  }
}

/** An `input` or `prompt`: a non-empty string or a non-empty array. */
function isInput(v: unknown): boolean {
  return (typeof v === "string" && v !== "") ||
    (Array.isArray(v) && v.length > 0);
}

/** Checks the whole input before anything is sent; returns the format and count. */
async function validate(
  path: string,
  shard?: Shard,
): Promise<
  {
    provider: Provider;
    count: number;
    ids: string[];
    /** Each of `ids`' line number in the file. */
    lineNos: number[];
    paths: Set<string>;
    modelless?: number;
  }
> {
  const format: InputFormat = {};
  const seen = new Map<string, number>();
  const ids: string[] = [];
  const lineNos: number[] = [];
  const paths = new Set<string>();
  let g = 0;
  for await (const [n, line] of lines(path)) {
    if (line.trim() === "") continue;
    const item = parseLine(n, line, format);
    const first = seen.get(item.customId);
    if (first !== undefined) {
      throw new UsageError(
        `line ${n}: duplicate ${format.provider!.batch.idField} ${
          JSON.stringify(item.customId)
        } (first on line ${first})`,
      );
    }
    seen.set(item.customId, n);
    // The whole file is checked; only this shard's lines are this run's.
    if (!inShard(shard, g++)) continue;
    paths.add(item.path);
    ids.push(item.customId);
    lineNos.push(n);
  }
  if (!format.provider) {
    throw new UsageError(`${path}: no requests (the file is empty)`);
  }
  if (shard && ids.length === 0) {
    throw new UsageError(
      `--shard ${shard.k}/${shard.n}: this shard has no lines (the file has ${g})`,
    );
  }
  return {
    provider: format.provider,
    count: ids.length,
    ids,
    lineNos,
    paths,
    modelless: format.modelless,
  };
}

// =============================================================================
// Stage 2: plan — where to send, under which limits, and which lines
// =============================================================================

/** Where requests go and how they are signed. Never printed: it holds the key. */
interface Endpoint {
  /** The URL for an endpoint path such as `/v1/embeddings` (and, for Azure, the body's deployment). */
  url: (path: string, body?: Record<string, unknown>) => string;
  /** The host requests go to. */
  host: string;
  /** The base URL, without a trailing slash. */
  base: string;
  headers: Record<string, string>;
  /** The key itself, only to scrub it from messages. */
  apiKey: string | undefined;
  /** The environment variable a key comes from, for messages. */
  keyVar: string;
}

function endpoint(o: RunOptions, p: Provider): Endpoint {
  const keyVar = p.keyVar;
  const apiKey = o.apiKey ?? (process.env[keyVar] || undefined) ??
    (p.altKeyVar ? process.env[p.altKeyVar] || undefined : undefined);
  const baseURL = (o.baseURL ?? (process.env[p.baseURLVar] || undefined))
    ?.replace(/\/+$/, "");
  if (!apiKey && !baseURL) {
    throw new UsageError(
      `no API key: set ${keyVar} (or give --base-url for a relay or simulator that needs none). Nothing was sent.`,
    );
  }
  if (!baseURL && !p.baseURL) {
    throw new UsageError(
      `--provider ${p.name} needs the resource's endpoint: --base-url https://<resource>.openai.azure.com, or set ${p.baseURLVar}. Nothing was sent.`,
    );
  }
  if (apiKey !== undefined && !/^[\x21-\x7e]+$/.test(apiKey)) {
    throw new UsageError(
      `${keyVar} has characters an HTTP header cannot carry`,
    );
  }
  const base = baseURL ?? p.baseURL;
  const { deployment, apiVersion } = o;
  return {
    url: (path, body) =>
      p.url(base, path, {
        model: deployment ?? (body?.model as string | undefined) ?? o.model,
        apiVersion,
      }),
    host: new URL(base).host,
    base,
    headers: p.headers(apiKey),
    apiKey,
    keyVar,
  };
}

/** A window given on the command line, with the flag that gave it. */
interface FlagWindow extends WindowSpec {
  flag: string;
}

/** The limiter's windows for the limits given on the command line. */
function windowsFor(
  limits: Record<string, number>,
  minute: number,
): FlagWindow[] {
  const windows: FlagWindow[] = [];
  const spec: [string, string, number][] = [
    ["rpm", "requests", minute],
    ["rpd", "requests", minute * 1440],
    ["itpm", "inputTokens", minute],
    ["otpm", "outputTokens", minute],
    ["tpm", "tokens", minute],
    ["tpd", "tokens", minute * 1440],
  ];
  for (const [flag, key, ms] of spec) {
    const limit = limits[flag];
    if (limit !== undefined) {
      windows.push({ key, limit, ms, flag: `--${flag}` });
    }
  }
  return windows;
}

/** A window's length in words: "minute", "day", or "2s" under `--window-ms`. */
function perWindow(ms: number): string {
  return ms === 60_000 ? "minute" : ms === 86_400_000 ? "day" : unitOf(ms);
}

/**
 * What this run has to do, from the output and journal of earlier runs:
 * which lines already have a result (and where it is), which must be sent,
 * and whether the output must be written anew (`--retry-errored`, or
 * journaled results that replace errored lines already in the output).
 */
interface Work {
  prior: PriorOutput;
  /** Journaled results not yet in the output, by input index. */
  journaled: Map<number, Stored>;
  rewrite: boolean;
  /** Whether line `i` needs a request. */
  needs: (i: number) => boolean;
  /** How many lines need one. */
  toSend: number;
}

function planWork(
  count: number,
  prior: PriorOutput,
  journaled: Map<number, Stored>,
  retryErrored: boolean,
): Work {
  const K = prior.done;
  for (const [i, s] of journaled) {
    // The output already has a good line: the journal entry is old news.
    if (i < K && !prior.errored[i]) journaled.delete(i);
    else if (retryErrored && s.errored) journaled.delete(i); // redo it
  }
  let rewrite = retryErrored && prior.erroredCount > 0;
  for (const i of journaled.keys()) if (i < K) rewrite = true;
  const needs = (i: number): boolean =>
    !journaled.has(i) &&
    (i >= K || (retryErrored && prior.errored[i] === 1));
  let toSend = 0;
  for (let i = 0; i < count; i++) if (needs(i)) toSend++;
  return { prior, journaled, rewrite, needs, toSend };
}

/** Each cost key's name: short (progress line) and long (plans, messages). */
const KEY_NAMES: Record<string, [short: string, long: string]> = {
  requests: ["req", "requests"],
  inputTokens: ["in tok", "input tokens"],
  outputTokens: ["out tok", "output tokens"],
  tokens: ["tok", "tokens"],
};

/**
 * `--dry-run`: every line's estimated cost, the totals, and the least time
 * the given limits allow — for each window, `(ceil(total / limit) - 1) ×
 * window` (the first window's worth goes at once) — naming the binding
 * window. That bound counts output tokens as 0, since an answer's length is
 * known only after it, so it is a real lower bound (with the input as
 * estimated); the time with every answer at its `max_tokens` is shown
 * beside it when output limits would make it longer. With limits per model
 * (`--per-model`), each model's own totals against its own windows; the
 * slowest model sets the run's length. Sends nothing.
 */
async function dryRun(
  input: string,
  limits: Record<string, number>,
  minute: number,
  perModel: boolean,
  shard: Shard | undefined,
): Promise<string> {
  const windows = windowsFor(limits, minute);
  const inputWindow = windows
    .filter((w) => w.key === "inputTokens" || w.key === "tokens")
    .sort((a, b) => a.limit - b.limit)[0];
  const { all, totals } = await planTotals(
    estimates(input, undefined, shard),
    inputWindow,
    perModel,
  );
  const head = describeTotals;
  if (!windows.length) {
    return `${
      head(all)
    }\nno limits given: paceline finds them as it goes, so the run's length depends on them: from the server's response headers, or, from a server that sends none (a relay), from its 429s: one request at a time at first, more every 500 ms until the first 429, then evenly paced just under what the server accepted.\n`;
  }
  // Cache writes larger than the input window each take one of their own.
  const plan = (t: Record<string, number>) => {
    const rest = { ...t, inputTokens: t.inputTokens! - t.aloneTokens! };
    const alone = (b: { ms: number; name: string }) =>
      t.alone ? { ms: b.ms + t.alone * inputWindow!.ms, name: b.name } : b;
    return {
      alone: t.alone!,
      least: alone(leastTime(rest, windows, false)),
      atMax: alone(leastTime(rest, windows, true)),
      uncached: t.cacheRead && !t.alone
        ? leastTime(
          { ...t, inputTokens: t.inputTokens! + t.cacheRead! },
          windows,
          false,
        )
        : undefined,
    };
  };
  const say = (p: ReturnType<typeof plan>): string =>
    `${
      p.least.ms
        ? `at least ${fmtDuration(p.least.ms)}: ${p.least.name} binds`
        : "everything fits in the first window of every limit given"
    }${
      p.alone
        ? `, after ${p.alone} cache write${
          p.alone === 1 ? "" : "s"
        } larger than ${inputWindow!.flag} ${
          inputWindow!.limit
        } (a whole window each)`
        : ""
    }${
      p.uncached && p.uncached.ms > p.least.ms
        ? ` (without prompt caching at least ${fmtDuration(p.uncached.ms)})`
        : ""
    }${
      p.atMax.ms > p.least.ms
        ? `; with every answer at its max_tokens, up to ${
          fmtDuration(p.atMax.ms)
        }, set by ${p.atMax.name}`
        : ""
    }`;
  const note =
    "(The bound counts output tokens as 0: an answer's length is known only after it.)";
  if (!perModel) return `${head(all)}\n→ ${say(plan(all))}.\n${note}\n`;
  const out = [`${head(all)}; the limits apply to each model:`];
  let slowest: { model: string; p: ReturnType<typeof plan> } | undefined;
  for (const [model, t] of totals) {
    const p = plan(t);
    out.push(`  ${model || "(no model)"}: ${head(t)} → ${say(p)}`);
    if (!slowest || p.least.ms > slowest.p.least.ms) slowest = { model, p };
  }
  out.push(
    `→ ${say(slowest!.p)}${
      slowest!.p.least.ms ? ` (model ${slowest!.model || "(no model)"})` : ""
    }.`,
    note,
  );
  return out.join("\n") + "\n";
}

/**
 * The dry run's totals, for all lines and per model: requests, input that
 * counts toward limits (the first line with a cached prefix writes it and
 * is charged in full; later ones read it, and reads do not count), output
 * at `max_tokens`, cache writes and reads, and the writes larger than the
 * input window (each takes a whole window of its own).
 */
async function planTotals(
  lines: ReturnType<typeof estimates>,
  inputWindow: FlagWindow | undefined,
  perModel: boolean,
): Promise<{
  all: Record<string, number>;
  totals: Map<string, Record<string, number>>;
}> {
  const totals = new Map<string, Record<string, number>>();
  const all = newTotal();
  const written = new Set<string>();
  for await (const { cost, model, prefix } of lines) {
    const role = !prefix ? "" : written.has(prefix.key) ? "read" : "write";
    if (prefix) written.add(prefix.key);
    const inTok = cost.inputTokens ?? 0;
    const alone = role === "write" && inputWindow !== undefined &&
      inTok > inputWindow.limit;
    for (const t of perModel ? [all, totalOf(totals, model)] : [all]) {
      t.requests! += 1;
      t.inputTokens! += role === "read" ? inTok - prefix!.tokens : inTok;
      t.outputTokens! += cost.outputTokens ?? 0;
      if (role === "write") t.cacheWrite! += prefix!.tokens;
      if (role === "read") t.cacheRead! += prefix!.tokens;
      if (alone) {
        t.alone! += 1;
        t.aloneTokens! += inTok;
      }
    }
  }
  return { all, totals };
}

/** One line of dry-run totals: requests, input (with the prompt cache's share), output. */
function describeTotals(t: Record<string, number>): string {
  const n = (x: number): string => x.toLocaleString("en-US");
  const cache = t.cacheWrite || t.cacheRead
    ? `: ${n(t.cacheWrite!)} written to the prompt cache, ${
      n(t.cacheRead!)
    } read from it, ${
      n(t.inputTokens! - t.cacheWrite!)
    } uncached; reads do not count toward input-token limits`
    : "";
  return `${n(t.requests!)} request${t.requests === 1 ? "" : "s"} · ~${
    n(t.inputTokens! + t.cacheRead!)
  } input tokens (estimated${cache}) · ≤ ${
    n(t.outputTokens!)
  } output tokens (max_tokens)`;
}

/**
 * The least time `t` (totals) takes under `windows`, and the window that
 * sets it; output tokens counted at `max_tokens` or as 0.
 */
function leastTime(
  t: Record<string, number>,
  windows: FlagWindow[],
  countOutput: boolean,
): { ms: number; name: string } {
  const output = countOutput ? t.outputTokens! : 0;
  const amount: Record<string, number> = {
    requests: t.requests!,
    inputTokens: t.inputTokens!,
    outputTokens: output,
    tokens: t.inputTokens! + output,
  };
  let binding = { ms: -1, name: "" };
  for (const w of windows) {
    const ms = Math.max(0, Math.ceil((amount[w.key] ?? 0) / w.limit) - 1) *
      w.ms;
    if (ms > binding.ms) {
      binding = {
        ms,
        name: `${w.flag} ${w.limit} (${KEY_NAMES[w.key]?.[1] ?? w.key} per ${
          perWindow(w.ms)
        })`,
      };
    }
  }
  return binding;
}

/** Dry-run totals: `inputTokens` is what counts toward limits (uncached input and cache writes). */
function newTotal(): Record<string, number> {
  return {
    requests: 0,
    inputTokens: 0,
    outputTokens: 0,
    cacheWrite: 0,
    cacheRead: 0,
    alone: 0,
    aloneTokens: 0,
  };
}

function totalOf(
  totals: Map<string, Record<string, number>>,
  model: string,
): Record<string, number> {
  let t = totals.get(model);
  if (!t) totals.set(model, t = newTotal());
  return t;
}

/** The body field that caps an answer's length on a request: the first one it sets, else the endpoint's own. */
function outputCap(path: string, body: Record<string, unknown>): string {
  const caps = providerOf(`https://api${path}`)?.endpoint.outputCaps ?? [];
  return caps.find((f) => body[f] !== undefined && body[f] !== null) ??
    caps[0] ?? "max_tokens";
}

/**
 * Every line that will be sent must fit the limits given: found before
 * anything is sent, and told in the flags and fields the user typed.
 */
async function checkFits(
  input: string,
  wanted: (i: number) => boolean,
  windows: FlagWindow[],
  shard: Shard | undefined,
): Promise<void> {
  if (!windows.length) return;
  for await (
    const { line, cost, body, path, prefix } of estimates(input, wanted, shard)
  ) {
    // A cached prefix is written once (taking a whole window if it is
    // larger) and read after: what must fit is the uncached rest.
    const inTok = (cost.inputTokens ?? 0) - (prefix?.tokens ?? 0);
    const input = prefix
      ? `its input outside the cached prefix (~${inTok} tokens, estimated)`
      : `its input (~${inTok} tokens, estimated)`;
    const outTok = cost.outputTokens ?? 0;
    const cap = outputCap(path, body);
    for (const w of windows) {
      const amount: Record<string, [number, string, string]> = {
        requests: [1, "one request", "raise it"],
        inputTokens: [inTok, input, `shorten it or raise ${w.flag}`],
        outputTokens: [
          outTok,
          `"${cap}": ${outTok}`,
          `lower "${cap}" on that line or raise ${w.flag}`,
        ],
        tokens: [
          inTok + outTok,
          `${input} plus "${cap}": ${outTok}`,
          `lower "${cap}", shorten the input, or raise ${w.flag}`,
        ],
      };
      const [n, what, fix] = amount[w.key] ?? [0, "", ""];
      if (n > w.limit) {
        throw new UsageError(
          `line ${line}: ${what} can never fit ${w.flag} ${w.limit} (${
            KEY_NAMES[w.key]?.[1] ?? w.key
          } per ${perWindow(w.ms)}): ${fix}. Nothing was sent.`,
        );
      }
    }
  }
}

/**
 * The estimated cost of each input line (those `wanted`, by index), with
 * its line number, model, body and cacheable prefix.
 */
async function* estimates(
  input: string,
  wanted: (i: number) => boolean = () => true,
  shard?: Shard,
): AsyncGenerator<
  {
    line: number;
    cost: Cost;
    model: string;
    body: Record<string, unknown>;
    path: string;
    prefix: CachePrefix | undefined;
  }
> {
  let i = -1;
  for await (const [line, text] of lines(input, shard)) {
    if (text.trim() === "" || !wanted(++i)) continue;
    const item = parseLine(line, text, {});
    const model = item.body.model;
    const url = `https://api${item.path}`;
    yield {
      line,
      cost: estimateCost(url, item.body),
      model: typeof model === "string" ? model : "",
      body: item.body,
      path: item.path,
      prefix: providerOf(url)?.endpoint.cachePrefix?.(item.body),
    };
  }
}

// =============================================================================
// Stage 3: execute — send one request (rate limits and retries are the
// library's), and tell a result from a reason to stop
// =============================================================================

/** What one request came to; becomes one result line. */
interface Outcome extends BatchOutcome {
  /** A quota/billing 429: the provider's code. */
  quota?: string;
  /** What we add to the server's message, e.g. that its long wait was obeyed. */
  note?: string;
  /** The shared limits' Redis failed: nothing can be admitted. */
  redis?: string;
}

/**
 * Thrown by the send hook once the run is stopping: the request was never
 * sent, so it has no result and is not retried.
 */
class StopSending extends Error {
  override name = "StopSending";
}

function isStop(e: unknown): boolean {
  for (let x = e, depth = 0; x && depth < 4; depth++) {
    if (x instanceof StopSending) return true;
    x = (x as { cause?: unknown }).cause;
  }
  return false;
}

/**
 * What goes out while the run stops. Once stopping, nothing new is sent:
 * every request that has no HTTP exchange outstanding — waiting for a slot
 * or a permit, or sleeping before a retry — is aborted at once (the
 * library counts it cancelled, not sent), and those in flight finish and
 * are not retried. The gate follows each exchange until its body has been
 * read to the end.
 */
class SendGate {
  stopping = false;
  readonly #running = new Map<AbortSignal, AbortController>();
  readonly #exchanging = new Set<AbortSignal>();

  readonly #watched = new WeakSet<AbortSignal>();
  #aborted: { reason: unknown } | undefined;

  /**
   * The signal for one line's request: aborted with `outer`, by `stop()`
   * unless mid-exchange, and by `abortAll()`. One controller per line (no
   * `AbortSignal.any`: each signal Node makes costs more than the request's
   * own bookkeeping); `outer`, shared by the lines, is watched once.
   */
  open(outer: AbortSignal): AbortSignal {
    const ctl = new AbortController();
    if (this.#aborted) ctl.abort(this.#aborted.reason);
    else if (outer.aborted) ctl.abort(outer.reason);
    else if (!this.#watched.has(outer)) {
      this.#watched.add(outer);
      outer.addEventListener("abort", () => this.abortAll(outer.reason), {
        once: true,
      });
    }
    this.#running.set(ctl.signal, ctl);
    return ctl.signal;
  }

  /** Aborts every line's request, mid-exchange too (a second Ctrl-C). */
  abortAll(reason: unknown): void {
    this.#aborted ??= { reason };
    for (const ctl of this.#running.values()) ctl.abort(reason);
  }

  close(s: AbortSignal): void {
    this.#running.delete(s);
    this.#exchanging.delete(s);
  }

  /** The `fetch` the library sends through. */
  send(base: typeof fetch): typeof fetch {
    return async (url, init) => {
      const s = init?.signal ?? undefined;
      if (this.stopping) {
        // Slipped past the stop (woke in the same tick): not sent.
        if (s) this.#running.get(s)?.abort(new StopSending("stopping"));
        throw new StopSending("the run is stopping");
      }
      if (!s) return base(url, init);
      this.#exchanging.add(s);
      let response: Response;
      try {
        response = await base(url, init);
      } catch (e) {
        this.#exchanging.delete(s);
        throw e;
      }
      const done = (): void => void this.#exchanging.delete(s);
      return response.headers.get("content-type")?.includes("event-stream")
        ? followBody(response, done)
        : afterRead(response, done);
    };
  }

  stop(): void {
    this.stopping = true;
    for (const [s, ctl] of this.#running) {
      if (!this.#exchanging.has(s)) ctl.abort(new StopSending("stopping"));
    }
  }
}

/**
 * The same response object, calling `done` once a reading method (`text`,
 * `json`, …) has settled: the library reads a whole body with one of
 * them. Cheaper than {@linkcode followBody}'s new stream and `Response`,
 * which a stream needs; used where the object takes own properties.
 */
function afterRead(response: Response, done: () => void): Response {
  const methods = [
    "text",
    "json",
    "arrayBuffer",
    "bytes",
    "blob",
    "formData",
  ] as const;
  try {
    for (const name of methods) {
      const read =
        (response as unknown as Record<string, () => Promise<unknown>>)[name];
      if (typeof read !== "function") continue;
      Object.defineProperty(response, name, {
        value: () => read.call(response).finally(done),
        configurable: true, // the library redefines them after reading
      });
    }
    return response;
  } catch {
    return followBody(response, done);
  }
}

/** The same response, calling `done` once its body has ended, failed or been cancelled. */
function followBody(response: Response, done: () => void): Response {
  if (!response.body) {
    done();
    return response;
  }
  const reader = response.body.getReader();
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { done: end, value } = await reader.read();
        if (end) {
          done();
          controller.close();
        } else controller.enqueue(value);
      } catch (e) {
        done();
        controller.error(e);
      }
    },
    cancel(reason) {
      done();
      return reader.cancel(reason);
    },
  });
  return new Response(body, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
}

/** A failure that a retry could have cured: while stopping, not a result. */
function retryable(outcome: Outcome): boolean {
  const st = outcome.status;
  return !outcome.ok && !outcome.quota &&
    (!st || st === 408 || st === 409 || st === 429 || st >= 500);
}

/** The path a line's answer streams from, if its endpoint streams at all. */
function streamPathOf(provider: Provider, path: string): string | undefined {
  const to = provider.streamPaths?.[path] ?? path;
  return provider.endpoints.some((e) => e.path === to && e.streams)
    ? to
    : undefined;
}

/**
 * Sends one request. Failures become outcomes; `undefined` means there is
 * no result (aborted, or never sent because the run is stopping).
 */
async function perform(
  f: typeof fetch,
  provider: Provider,
  ep: Endpoint,
  item: Item,
  stream: boolean,
  signal: AbortSignal,
): Promise<Outcome | undefined> {
  const path = stream ? streamPathOf(provider, item.path) : undefined;
  stream = path !== undefined;
  const body = stream
    ? provider.streamBody(item.body)
    : provider.wholeBody(item.body);
  try {
    const response = await f(ep.url(path ?? item.path, item.body), {
      method: "POST",
      headers: ep.headers,
      body: JSON.stringify(body),
      signal,
    });
    const requestId = response.headers.get("request-id") ??
      response.headers.get("x-request-id") ?? undefined;
    if (!response.ok || !stream) {
      const text = await response.text();
      let parsed: unknown = text;
      try {
        parsed = JSON.parse(text);
      } catch { /* keep the text */ }
      if (response.ok) {
        return { ok: true, status: response.status, body: parsed, requestId };
      }
      const err = HttpError.from(response, text);
      // A server that asked for a long wait was obeyed (not retried): say so.
      const asked = parseRetryAfter(response.headers, Date.now(), {
        maxMs: Infinity,
        resetHeaders: response.status === 429,
      });
      return {
        ok: false,
        status: response.status,
        body: parsed,
        requestId,
        errorType: err.type,
        message: err.message,
        note: asked !== undefined && asked > MAX_RETRY_AFTER_MS
          ? `the server asked to wait ${
            fmtDuration(asked)
          }; not retried (longer than ${fmtDuration(MAX_RETRY_AFTER_MS)})`
          : response.status === 429 && !err.quota
          // Rate-limit 429s use no retries: only the line's budget ends them.
          ? "still rate-limited when the line's time budget ran out (--max-rate-limited-ms)"
          : undefined,
        quota: err.quota,
      };
    }
    // Streaming: assemble the final object from the events.
    try {
      const assembled = await assembleStream(provider, response);
      return { ok: true, status: 200, body: assembled, requestId };
    } catch (e) {
      if (signal.aborted) return undefined;
      return {
        ok: false,
        status: 0,
        errorType: (e as HttpError).type ?? "stream_error",
        message: (e as Error).message,
      };
    }
  } catch (e) {
    if (signal.aborted || isStop(e)) return undefined;
    if (e instanceof RedisLimiterError) {
      return { ok: false, redis: e.message, message: e.message };
    }
    const cause = (e as { cause?: unknown }).cause;
    return {
      ok: false,
      errorType: e instanceof HttpError ? e.type : "network_error",
      message: `${(e as Error).message}${
        cause instanceof Error ? ` (${cause.message})` : ""
      }`,
    };
  }
}

/**
 * Why an outcome stops the whole run — the key is refused, or the account
 * may not spend more — or `undefined`. Such outcomes are not results:
 * after the user fixes the cause, a rerun sends those lines again.
 */
function fatalOf(outcome: Outcome): string | undefined {
  if (outcome.redis) {
    return "the shared limits' Redis failed, so nothing could be admitted";
  }
  if (outcome.status === 401) {
    return "the API key was refused (HTTP 401)";
  }
  if (outcome.status === 403) {
    return "the API key is not allowed to do this (HTTP 403)";
  }
  if (outcome.quota && /PerDay/i.test(outcome.quota)) {
    return `the per-day quota ${outcome.quota} is spent; it resets at midnight Pacific time, ${
      untilPacificMidnight(Date.now())
    }`;
  }
  if (outcome.quota) {
    return `the account's quota, credit or spend limit is exhausted (HTTP 429 ${outcome.quota})`;
  }
  // Gemini refuses a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
  if (
    outcome.status === 400 &&
    /API_KEY_INVALID|API key not valid/.test(JSON.stringify(outcome.body ?? ""))
  ) {
    return "the API key was refused (HTTP 400 API_KEY_INVALID)";
  }
  return undefined;
}

/**
 * When Gemini's per-day quotas reset: midnight Pacific time
 * (ai.google.dev/gemini-api/docs/rate-limits), as "in 7h 12m (08:00 UTC)".
 */
export function untilPacificMidnight(now: number): string {
  const parts = new Intl.DateTimeFormat("en-US", {
    timeZone: "America/Los_Angeles",
    hourCycle: "h23",
    hour: "numeric",
    minute: "numeric",
    second: "numeric",
  }).formatToParts(new Date(now));
  const get = (t: string): number =>
    Number(parts.find((p) => p.type === t)?.value ?? 0);
  const sinceMidnight = ((get("hour") * 60 + get("minute")) * 60 +
    get("second")) * 1000;
  const left = 86_400_000 - sinceMidnight;
  const at = new Date(now + left).toISOString().slice(11, 16);
  return `in ${Math.floor(left / 3_600_000)}h ${
    Math.floor(left / 60_000) % 60
  }m (${at} UTC)`;
}

// =============================================================================
// Stage 4: record — every result, the moment it finishes, in a journal
// =============================================================================

/**
 * Calls `onLine` for each complete (newline-terminated) line of a file, with
 * its byte offset, reading in chunks: memory does not grow with the file.
 * Returns the byte offset just past the last complete line; anything after
 * it is a torn line from a write that was cut short.
 */
function scanLines(
  path: string,
  onLine: (text: string, offset: number, n: number) => void,
): number {
  const fd = openSync(path, "r");
  try {
    const chunk = Buffer.allocUnsafe(1 << 16);
    let carry = Buffer.alloc(0);
    let carryAt = 0; // file offset of carry[0]
    let pos = 0;
    let n = 0;
    for (;;) {
      const got = readSync(fd, chunk, 0, chunk.length, pos);
      if (got === 0) break;
      pos += got;
      const buf = carry.length
        ? Buffer.concat([carry, chunk.subarray(0, got)])
        : chunk.subarray(0, got);
      let start = 0;
      for (let nl = buf.indexOf(10); nl >= 0; nl = buf.indexOf(10, start)) {
        onLine(buf.toString("utf8", start, nl), carryAt + start, ++n);
        start = nl + 1;
      }
      carry = Buffer.from(buf.subarray(start)); // a copy: chunk is reused
      carryAt += start;
    }
    return carryAt;
  } finally {
    closeSync(fd);
  }
}

/** Writes all of `data` (a regular file may take it in pieces). */
function writeAll(fd: number, data: string | Buffer): number {
  const buf = typeof data === "string" ? Buffer.from(data) : data;
  let done = 0;
  while (done < buf.length) done += writeSync(fd, buf, done);
  return buf.length;
}

/** Whether a results line records a failure (Anthropic or OpenAI shape). */
/** A result line's id: `custom_id`, or Gemini's `key`. */
function rowId(row: Record<string, unknown>): unknown {
  return "custom_id" in row ? row.custom_id : row.key;
}

function isErrored(row: Record<string, unknown>): boolean {
  if ("key" in row && !("custom_id" in row)) return row.error != null;
  if ("result" in row) {
    return (row.result as { type?: unknown } | null)?.type !== "succeeded";
  }
  const status = (row.response as { status_code?: unknown } | null)
    ?.status_code;
  return row.error != null || typeof status !== "number" || status < 200 ||
    status >= 300;
}

/** Where a finished result is: its bytes in the journal (or output), and maybe in memory. */
interface Stored {
  off: number;
  len: number;
  errored: boolean;
  /** The result line, while memory allows; else read back from `off`. */
  text?: string;
  /** Whether `text` counts against the output's memory budget. */
  held?: boolean;
}

/** The results file of earlier runs: a prefix of the input. */
interface PriorOutput {
  /** How many input lines it holds (in order, from the first). */
  done: number;
  /** Per line: 1 if that result is errored. */
  errored: Uint8Array;
  erroredCount: number;
  /** Byte offset of each line (and the end, at `done`). */
  offsets: number[];
}

/**
 * Reads an existing results file: it must be a prefix of the input (same
 * custom_ids in the same order). A torn last line — a write cut short by a
 * crash — is cut away. Throws a UsageError, changing nothing, if the file
 * is not a results file of this input.
 */
function scanOutput(output: string, ids: string[]): PriorOutput {
  const prior: PriorOutput = {
    done: 0,
    errored: new Uint8Array(ids.length),
    erroredCount: 0,
    offsets: [0],
  };
  if (!existsSync(output)) return prior;
  const notOurs = (why: string): UsageError =>
    new UsageError(
      `${output} exists and is not a results file of this input (${why}); nothing was changed. Give another -o, or move that file away.`,
    );
  const end = scanLines(output, (text, offset, n) => {
    let row: Record<string, unknown> | undefined;
    try {
      const v = JSON.parse(text);
      if (v && typeof v === "object" && !Array.isArray(v)) row = v;
    } catch { /* below */ }
    if (!row) throw notOurs(`line ${n} is not a JSON object`);
    const k = prior.done;
    if (k >= ids.length || rowId(row) !== ids[k]) {
      throw notOurs(
        `its line ${n} has id ${JSON.stringify(rowId(row))}, ${
          k < ids.length
            ? `line ${k + 1} of the input has ${JSON.stringify(ids[k])}`
            : `the input has only ${ids.length} lines`
        }`,
      );
    }
    if (isErrored(row)) {
      prior.errored[k] = 1;
      prior.erroredCount++;
    }
    prior.done++;
    prior.offsets.push(offset + Buffer.byteLength(text) + 1);
  });
  const size = statSync(output).size;
  if (size > end) {
    // A last line with no newline: a write cut short by a crash — if it
    // begins as our result lines do. Anything else is not ours to cut.
    const tail = readAt(
      openSync(output, "r"),
      end,
      Math.min(size - end, 32),
      true,
    );
    if (!/^\{"(custom_id|id|key)":/.test(tail)) {
      throw notOurs(`its last line is not a result line`);
    }
    truncateSync(output, end);
  }
  return prior;
}

/** `{"i":<input index>,"e":<1 if errored>,"r":<the results line>}` */
const JOURNAL_HEAD = /^\{"i":(\d+),"e":([01]),"r":/;

/**
 * The journal: a sidecar file (`<output>.journal`) that gets every result
 * the moment it finishes, in completion order, one whole line per write.
 * Results that must wait for an earlier line before they go into the
 * output wait here, not in memory. On open, a torn last line (a crash in
 * the middle of a write) is cut away and any line that is not a whole
 * entry is ignored; the latest entry for a line wins.
 */
class Journal {
  readonly path: string;
  #fd: number;
  #size: number;

  private constructor(path: string, fd: number, size: number) {
    this.path = path;
    this.#fd = fd;
    this.#size = size;
  }

  /** Opens the journal (checking that it belongs to this input), loading its entries. */
  static open(
    path: string,
    ids: string[],
  ): { journal: Journal; entries: Map<number, Stored>; ignored: number } {
    const entries = new Map<number, Stored>();
    let ignored = 0;
    let end = 0;
    if (existsSync(path)) {
      end = scanLines(path, (text, offset, n) => {
        const head = JOURNAL_HEAD.exec(text);
        let row: Record<string, unknown> | undefined;
        if (head && text.endsWith("}")) {
          try {
            row = JSON.parse(text).r;
          } catch { /* not a whole entry */ }
        }
        if (!head || !row || typeof row !== "object") {
          ignored++;
          return;
        }
        const i = Number(head[1]);
        if (i >= ids.length || rowId(row) !== ids[i]) {
          throw new UsageError(
            `${path}: line ${n} is for ${
              JSON.stringify(rowId(row))
            }, which is not line ${
              i + 1
            } of this input; this journal belongs to another input (delete it, or use another -o)`,
          );
        }
        entries.set(i, {
          off: offset + head[0].length,
          len: Buffer.byteLength(text) - head[0].length - 1,
          errored: head[2] === "1",
        });
      });
      if (statSync(path).size > end) truncateSync(path, end);
    }
    const journal = new Journal(path, openSync(path, "a+"), end);
    return { journal, entries, ignored };
  }

  /** Records a result: one write of one whole line. */
  append(index: number, errored: boolean, line: string): Stored {
    const head = `{"i":${index},"e":${errored ? 1 : 0},"r":`;
    const bytes = writeAll(this.#fd, `${head}${line}}\n`);
    const stored: Stored = {
      off: this.#size + head.length,
      len: bytes - head.length - 2,
      errored,
      text: line,
    };
    this.#size += bytes;
    return stored;
  }

  /** Reads a stored result back. */
  read(s: Stored): string {
    return readAt(this.#fd, s.off, s.len);
  }

  close(): void {
    closeSync(this.#fd);
  }

  /** Closes and deletes it: every result is in the output. */
  remove(): void {
    this.close();
    rmSync(this.path, { force: true });
  }
}

/** Reads `len` bytes at `off`; with `close`, closes `fd` after. */
function readAt(fd: number, off: number, len: number, close = false): string {
  try {
    const buf = Buffer.allocUnsafe(len);
    let got = 0;
    while (got < len) {
      const n = readSync(fd, buf, got, len - got, off + got);
      if (n === 0) {
        throw new Error(`unexpected end of file at byte ${off + got}`);
      }
      got += n;
    }
    return buf.toString("utf8");
  } finally {
    if (close) closeSync(fd);
  }
}

/**
 * The server's error body with our note put before its message (e.g. that a
 * long server-told wait was obeyed by not retrying); other fields kept.
 */
function noted(body: unknown, note: string | undefined): unknown {
  const err = (body as { error?: unknown } | null)?.error;
  if (!note || !err || typeof err !== "object") return body;
  const e = err as { message?: unknown };
  return {
    ...(body as object),
    error: {
      ...e,
      message: typeof e.message === "string" ? `${note}: ${e.message}` : note,
    },
  };
}

function resultLine(provider: Provider, item: Item, outcome: Outcome): string {
  const result: BatchOutcome = outcome.ok
    ? outcome
    : { ...outcome, body: noted(outcome.body, outcome.note) };
  return JSON.stringify(
    provider.batch.result(item.customId, item.line, result),
  );
}

// =============================================================================
// Stage 5: emit — the output, in input order, always a prefix of the input
// =============================================================================

/** Results held in memory while they wait for an earlier line; past it, read back from the journal. */
const MEMORY_BUDGET = 8 * 1024 * 1024;

/**
 * Writes results to the output in input order as the next-in-order ones
 * become available. Appends to the output of earlier runs; or, when lines
 * already written must change (`--retry-errored`), writes a new file
 * (`<output>.tmp`) from the first line and renames it over the output at
 * the end, so the output is never half-written.
 */
class OrderedOutput {
  /** Input index of the next line to write. */
  next: number;
  /** Errored lines in the output so far. */
  errored: number;
  readonly path: string;
  #fd: number;
  #tmp: string | undefined;
  #old: { fd: number; keep: (i: number) => boolean } | undefined;
  #prior: PriorOutput;
  #waiting: Map<number, Stored>;
  #journal: Journal;
  #inMemory = 0;

  constructor(path: string, work: Work, journal: Journal) {
    const { prior, journaled } = work;
    this.path = path;
    this.#prior = prior;
    this.#waiting = journaled;
    this.#journal = journal;
    if (work.rewrite) {
      this.#tmp = `${path}.tmp`;
      this.#fd = openSync(this.#tmp, "w");
      this.#old = {
        fd: openSync(path, "r"),
        // An earlier line stays unless a newer result replaces it or it is redone.
        keep: (i) => i < prior.done && !journaled.has(i) && !work.needs(i),
      };
      this.next = 0;
      this.errored = 0;
    } else {
      this.#fd = openSync(path, "a");
      this.next = prior.done;
      this.errored = prior.erroredCount;
    }
  }

  /** Finished results waiting for an earlier line. */
  get waiting(): number {
    return this.#waiting.size;
  }

  /** A finished result for input line `index`; written when its turn comes. */
  put(index: number, s: Stored): void {
    if (s.text !== undefined && index !== this.next) {
      if (this.#inMemory + s.len > MEMORY_BUDGET) s.text = undefined;
      else {
        this.#inMemory += s.len;
        s.held = true;
      }
    }
    this.#waiting.set(index, s);
    this.flush();
  }

  /** Writes every result that is next in order. */
  flush(): void {
    const parts: string[] = [];
    let bytes = 0;
    for (;;) {
      const i = this.next;
      const s = this.#waiting.get(i);
      let line: string;
      if (s) {
        this.#waiting.delete(i);
        if (s.held) this.#inMemory -= s.len;
        line = s.text ?? this.#journal.read(s);
        if (s.errored) this.errored++;
      } else if (this.#old?.keep(i)) {
        const off = this.#prior.offsets[i]!;
        line = readAt(this.#old.fd, off, this.#prior.offsets[i + 1]! - off - 1);
        if (this.#prior.errored[i]) this.errored++;
      } else break;
      parts.push(line, "\n");
      bytes += line.length;
      this.next++;
      if (bytes > 1 << 16) {
        writeAll(this.#fd, parts.join(""));
        parts.length = 0;
        bytes = 0;
      }
    }
    if (parts.length) writeAll(this.#fd, parts.join(""));
  }

  /**
   * Closes the output. A new file replaces the old one when it holds at
   * least as many lines (it has everything the old one had, newer).
   */
  close(): void {
    if (this.#tmp === undefined) {
      closeSync(this.#fd);
      return;
    }
    fsyncSync(this.#fd);
    closeSync(this.#fd);
    closeSync(this.#old!.fd);
    if (this.next >= this.#prior.done) renameSync(this.#tmp, this.path);
    else rmSync(this.#tmp, { force: true });
  }
}

// =============================================================================
// Stage 6: report — progress while it runs, and what happened at the end
// =============================================================================

function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms)) return "?";
  if (ms >= 2 * 31_557_600_000) {
    return `${Math.round(ms / 31_557_600_000)} years`;
  }
  if (ms >= 172_800_000) return `${Math.round(ms / 86_400_000)} days`;
  const s = Math.round(ms / 1000);
  return s >= 3600
    ? `${Math.floor(s / 3600)}h${
      String(Math.floor((s % 3600) / 60)).padStart(2, "0")
    }m`
    : s >= 60
    ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`
    : `${s}s`;
}

/** A window's length as a unit: "min", "day", "2s", "48min". */
function unitOf(ms: number): string {
  if (ms === 60_000) return "min";
  if (ms === 86_400_000) return "day";
  if (ms % 86_400_000 === 0) return `${ms / 86_400_000}d`;
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}min`;
  return `${+(ms / 1000).toFixed(3)}s`;
}

/** A rate: whole numbers from 10 up, else to 2 significant digits. */
function fmtRate(n: number): string {
  return n >= 10 ? fmtCount(n) : String(+n.toPrecision(2));
}

function fmtCount(n: number): string {
  const r = Math.round(n);
  if (r < 10_000) return String(r);
  if (r < 1_000_000) return `${+(r / 1000).toFixed(1)}k`;
  return `${+(r / 1_000_000).toFixed(2)}M`;
}

/**
 * One progress line. Rates are what each limit counts, in its own unit:
 * the limiter's use of that window now against its limit (given or
 * learned), e.g. `req 48/50 per 2s` — never a per-minute rate set against
 * a per-window limit.
 */
function progressLine(
  done: number,
  total: number,
  errors: number,
  stats: Stats,
  windows: WindowUsage[],
  startedAt: number,
  minute: number,
): string {
  const s = stats.toJSON();
  const pct = total ? (done / total) * 100 : 100;
  const elapsed = performance.now() - startedAt;
  const eta = done ? (elapsed / done) * (total - done) : Infinity;
  const use = windows.length
    ? windows.map((w) =>
      `${KEY_NAMES[w.key]?.[0] ?? w.key} ${fmtCount(w.used)}/${
        fmtCount(w.limit)
      } per ${unitOf(w.ms)}`
    )
    : s.pace?.requests !== undefined
    ? [
      `pace ${fmtRate((s.pace.requests * minute) / 1000)} req${
        s.pace.inputTokens
          ? `, ${fmtCount((s.pace.inputTokens * minute) / 1000)} in tok`
          : ""
      }/${unitOf(minute)} (found from 429s)`,
    ]
    : [
      `${fmtCount(elapsed > 0 ? (s.requests / elapsed) * minute : 0)} req/${
        unitOf(minute)
      } (no limits known yet)`,
    ];
  return [
    `${done}/${total} (${pct.toFixed(1)}%) ETA ${fmtDuration(eta)}`,
    ...use,
    ...(s.cacheReadTokens + s.cacheWriteTokens
      ? [
        `cache ${fmtCount(s.cacheReadTokens)} read/${
          fmtCount(s.cacheWriteTokens)
        } written`,
      ]
      : []),
    `429s ${s.rateLimited}`,
    `retries ${s.retries}`,
    `errors ${errors}`,
  ].join(" · ");
}

/**
 * The windows to show: the key's, then those of the (at most 3) models
 * used most recently, each labelled with its model.
 */
function windowsNow(
  f: { limiter: Limiter; models: ReadonlyMap<string, Limiter> },
): WindowUsage[] {
  const out = f.limiter.usage();
  const models = [...f.models];
  for (const [model, l] of models.slice(-3)) {
    for (const w of l.usage()) {
      out.push({ ...w, key: `${model}: ${KEY_NAMES[w.key]?.[0] ?? w.key}` });
    }
  }
  return out;
}

/** Removes the key (and anything shaped like one) from a server's message. */
function scrub(text: string, apiKey: string | undefined): string {
  // A key too short to be a real one (a test's "k") would mangle words.
  let out = apiKey && apiKey.length >= 8
    ? text.split(apiKey).join("[key]")
    : text;
  out = out.replace(/\b(sk|key)-[\w*.-]{6,}/g, "[key]");
  return out;
}

// =============================================================================
// The batch run: the stages above, in order
// =============================================================================

/** Runs a batch. Returns the exit code. */
export async function run(o: RunOptions): Promise<number> {
  checkPaths(o);
  const lock = o.dryRun ? undefined : OutputLock.take(o.output, o.err);
  let redis: SharedRedis | undefined;
  try {
    return await runBatch(o, async (name) => {
      redis = await openRedis(o.redis!, name);
      return redis.limiter;
    });
  } finally {
    await redis?.close();
    lock?.release();
  }
}

/** A connection to the Redis of `--redis`, and the shared limiter on it. */
interface SharedRedis {
  limiter: (options: RateLimiterOptions) => RedisRateLimiter;
  close: () => Promise<void>;
}

/** `redis://user:secret@host` → `redis://***@host`: never print a password. */
function redactURL(url: string): string {
  return url.replace(/\/\/[^@/]*@/, "//***@");
}

/**
 * Connects to `--redis URL`: Bun's built-in client under Bun, else the
 * `redis` package (node-redis), loaded only now. Not installed: exit 2.
 */
async function openRedis(url: string, name: string): Promise<SharedRedis> {
  const cannotConnect = (e: Error): never => {
    throw new UsageError(
      `--redis ${
        redactURL(url)
      }: cannot connect (${e.message}). Nothing was sent.`,
    );
  };
  let evalFn: RedisEval;
  let close: () => Promise<void>;
  const bun = (globalThis as {
    Bun?: {
      RedisClient: new (url: string) => {
        connect(): Promise<void>;
        send(command: string, args: string[]): Promise<unknown>;
        close(): void;
      };
    };
  }).Bun;
  if (bun) {
    const client = new bun.RedisClient(url);
    await client.connect().catch(cannotConnect);
    evalFn = (s, k, a) =>
      client.send("EVAL", [s, String(k.length), ...k, ...a]);
    close = () => Promise.resolve(client.close());
  } else {
    let mod: typeof import("redis");
    try {
      mod = await import("redis");
    } catch {
      throw new UsageError(
        "--redis needs the redis package (node-redis): npm install redis. Nothing was sent.",
      );
    }
    // Unreachable at the start: say so at once. Lost later: keep
    // reconnecting (commands wait in the client's queue meanwhile); the
    // limiter's timeout decides when a lost Redis is an outage (exit 3)
    // rather than a blip such as a restart.
    let connected = false;
    const client = mod.createClient({
      url,
      socket: {
        connectTimeout: 5000,
        reconnectStrategy: (retries: number) =>
          connected
            ? Math.min(50 * (retries + 1), 500)
            : retries > 5
            ? new Error("Redis is unreachable")
            : 200,
      },
    });
    client.on("error", () => {
      // Failures reach the limiter, which fails closed and stops the run.
    });
    await client.connect().catch(cannotConnect);
    connected = true;
    evalFn = (s, k, a) => client.eval(s, { keys: k, arguments: a });
    close = async () => {
      // A QUIT sent while reconnecting to a Redis that is gone would wait
      // forever: quit only a ready client, briefly, then drop the socket.
      if (client.isReady) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          client.quit().catch(() => {}),
          new Promise((r) => timer = setTimeout(r, 1000)),
        ]);
        clearTimeout(timer);
      }
      if (client.isOpen) client.destroy();
    };
  }
  return {
    limiter: (options) =>
      new RedisRateLimiter({ ...options, redis: evalFn, name }),
    close,
  };
}

/**
 * The shared limits' default name: provider, base URL, and a hash of the
 * key — so every process using one key shares, and the key never leaves.
 */
function limiterNameFor(provider: Provider, ep: Endpoint): string {
  const hash = ep.apiKey
    ? createHash("sha256").update(ep.apiKey).digest("hex").slice(0, 16)
    : "no-key";
  return `${provider.name}:${ep.host}:${hash}`;
}

async function runBatch(
  o: RunOptions,
  shared: SharedLimits,
): Promise<number> {
  // 1. Read & validate: the whole input, before anything is sent.
  const read = await validate(o.input, o.shard);
  const { ids, paths } = read;
  const provider = providerFor(o, read.provider);
  if (read.modelless !== undefined && !o.model) {
    throw new UsageError(
      `line ${read.modelless}: no model: Gemini batch lines name none (the model belongs to the job); give --model, e.g. --model gemini-2.5-flash`,
    );
  }
  if (o.batchApi) return await runBatchApi(o, provider, read);
  if (o.dryRun) {
    await checkFits(
      o.input,
      everyLine,
      windowsFor(o.limits, o.windowMs),
      o.shard,
    );
    o.out(
      await dryRun(
        o.input,
        o.limits,
        o.windowMs,
        o.perModel === "all",
        o.shard,
      ),
    );
    return 0;
  }
  const pending = pendingBatches(o.output);
  if (pending.length) {
    throw new UsageError(
      `${o.output}.batches: ${
        pending.reduce((n, s) => n + s.count, 0)
      } lines are in batches submitted with --batch-api and not yet collected; sending them live would pay twice. Run with --batch-api to collect them, or \`paceline cancel ${o.output}\` first and then --batch-api to collect what finished. Nothing was sent.`,
    );
  }
  // 2. Plan; 3–5. execute, record, emit; 6. report.
  const batch = await BatchRun.plan(o, provider, ids, shared);
  batch.announce(paths);
  await batch.execute();
  return batch.conclude();
}

/** `--batch-api`: the same lines through the provider's Batch API. */
async function runBatchApi(
  o: RunOptions,
  provider: Provider,
  read: { ids: string[]; lineNos: number[] },
): Promise<number> {
  if (!provider.batchApi) {
    throw new UsageError(
      `--batch-api drives the Anthropic, OpenAI and Gemini Batch APIs; ${provider.name}'s is not supported yet: run live (without --batch-api)`,
    );
  }
  const live: [string, unknown][] = [
    ["--stream", o.stream],
    ["--redis", o.redis],
    ["--report", o.report],
  ];
  for (const [flag, given] of live) {
    if (given) {
      throw new UsageError(
        `${flag} is for live runs: a Batch API run sends no requests of its own (leave out ${flag} or --batch-api)`,
      );
    }
  }
  if (o.dryRun) {
    o.out(await dryRunBatchApi(o, provider));
    return 0;
  }
  const run = BatchApiRun.plan(o, provider, read);
  run.announce();
  await run.execute();
  return run.conclude();
}

/**
 * The provider a run talks to: the input format's, or Azure OpenAI for
 * OpenAI batch lines with `--provider azure` or an Azure base URL.
 */
function providerFor(o: RunOptions, format: Provider): Provider {
  const base = o.baseURL ?? (process.env[azureProvider.baseURLVar] || "");
  const wanted = o.provider ??
    (format === openaiProvider && azureProvider.matches!(base)
      ? azureProvider.name
      : format.name);
  const batchOf = (p: Provider): Provider =>
    providers.find((q) => q.batch === p.batch) ?? p;
  const provider = providers.find((p) => p.name === wanted)!;
  if (batchOf(provider) !== format) {
    throw new UsageError(
      `--provider ${wanted} but the input is in the ${format.name} batch format`,
    );
  }
  if (provider !== azureProvider && (o.deployment || o.apiVersion)) {
    throw new UsageError(
      `${
        o.deployment ? "--deployment" : "--api-version"
      } is for --provider azure (Azure OpenAI); this run is for ${provider.name}`,
    );
  }
  return provider;
}

/** Opens the limits shared through `--redis` under a name. */
type SharedLimits = (
  name: string,
) => Promise<(options: RateLimiterOptions) => RedisRateLimiter>;

/** A line to send, with its index among the run's lines. */
type Todo = Item & { index: number };

/**
 * One batch run from its plan on: the fetch under the limits, the journal
 * and the ordered output; then sending, recording and the final word.
 */
class BatchRun {
  readonly o: RunOptions;
  readonly provider: Provider;
  readonly ep: Endpoint;
  readonly work: Work;
  readonly journal: Journal;
  readonly output: OrderedOutput;
  readonly f: RateLimitedFetch;
  readonly gate: SendGate;
  readonly count: number;
  #ignored: number;
  #stopping: "signal" | "fatal" | undefined;
  #fatal: { why: string; outcome: Outcome; line: number } | undefined;
  #interruptedBy: string | undefined;
  #signals = 0;
  #finished = 0; // results recorded in this run
  #errors = 0;
  #startedAt = performance.now();
  #lastProgress = 0;

  private constructor(
    o: RunOptions,
    provider: Provider,
    planned: {
      ep: Endpoint;
      work: Work;
      journal: Journal;
      ignored: number;
      output: OrderedOutput;
      f: RateLimitedFetch;
      gate: SendGate;
      count: number;
    },
  ) {
    this.o = o;
    this.provider = provider;
    this.ep = planned.ep;
    this.work = planned.work;
    this.journal = planned.journal;
    this.#ignored = planned.ignored;
    this.output = planned.output;
    this.f = planned.f;
    this.gate = planned.gate;
    this.count = planned.count;
  }

  /** Stage 2: the endpoint, the limits, and what earlier runs already finished. */
  static async plan(
    o: RunOptions,
    provider: Provider,
    ids: string[],
    shared: SharedLimits,
  ): Promise<BatchRun> {
    const ep = endpoint(o, provider);
    const count = ids.length;
    const prior = scanOutput(o.output, ids);
    const { journal, entries, ignored } = Journal.open(
      `${o.output}.journal`,
      ids,
    );
    const work = planWork(count, prior, entries, o.retryErrored ?? false);
    const gate = new SendGate();
    const windows = windowsFor(o.limits, o.windowMs);
    const limits: RateLimiterOptions = {
      windows: windows.map(({ key, limit, ms }) => ({ key, limit, ms })),
      ...(o.marginMs !== undefined ? { marginMs: o.marginMs } : {}),
    };
    const f = rateLimitedFetch({
      limiter: o.redis
        ? (await shared(o.limiterName ?? limiterNameFor(provider, ep)))(limits)
        : limits,
      concurrency: o.concurrency,
      retry: {
        retries: o.retries,
        maxRateLimitedMs: o.maxRateLimitedMs,
        maxRetryAfterMs: MAX_RETRY_AFTER_MS,
        // Once stopping, nothing is retried: an attempt that fails then is
        // no result, and the line runs again next time.
        shouldRetry: (e) => (gate.stopping || isStop(e) ? false : undefined),
      },
      learn: { windowMs: o.windowMs },
      findPace: o.findPace,
      perModel: o.perModel ?? "learned",
      // The send hook: once the run is stopping, nothing more goes out.
      fetch: gate.send(globalThis.fetch),
    });
    let output: OrderedOutput;
    try {
      await checkFits(o.input, work.needs, windows, o.shard);
      output = new OrderedOutput(o.output, work, journal);
      output.flush(); // results journaled by an earlier run that are next in order
    } catch (e) {
      journal.close();
      if (work.toSend === count && !existsSync(o.output)) {
        rmSync(journal.path, { force: true }); // nothing was there: leave nothing
      }
      throw e;
    }
    return new BatchRun(o, provider, {
      ep,
      work,
      journal,
      ignored,
      output,
      f,
      gate,
      count,
    });
  }

  /** Says what is to run, and what it found from earlier runs. */
  announce(paths: Set<string>): void {
    const { o, work, count } = this;
    if (o.quiet) return;
    const prior = work.prior;
    const available = count - work.toSend;
    const from = [
      available && prior.done ? `${prior.done} in the output` : "",
      work.journaled.size ? `${work.journaled.size} in the journal` : "",
    ].filter(Boolean).join(", ");
    o.err(
      `paceline: ${work.toSend} of ${count} ${this.provider.name} requests to run${
        available
          ? ` (${available} already have results${from ? `: ${from}` : ""})`
          : ""
      }${
        o.retryErrored && prior.erroredCount
          ? `; redoing ${prior.erroredCount} errored`
          : ""
      } → ${o.output}\n`,
    );
    if (paths.size > 1) {
      o.err(
        `paceline: note: this file mixes endpoints (${
          [...paths].join(", ")
        }); paceline runs it as is, OpenAI's Batch API would want one file per endpoint\n`,
      );
    }
    if (this.#ignored) {
      o.err(
        `paceline: ${this.#ignored} torn line(s) in ${this.journal.path} ignored (a crash mid-write); those requests run again\n`,
      );
    }
  }

  /** Stages 3–5: send every line that needs it, record each result, emit in order. */
  async execute(): Promise<void> {
    const o = this.o;
    const onSignal = (name?: unknown): void => this.#onSignal(name);
    if (o.signals !== false) {
      process.on("SIGINT", onSignal);
      process.on("SIGTERM", onSignal);
    }
    const ticker = setInterval(() => {
      this.#progress();
      // The report's charts: each window's use, also while nothing is sent.
      if (o.report) this.f.stats.sample({ windows: windowLoads(this.f) });
    }, Math.min(this.#interval(), 1000));
    try {
      // Unordered: a line sleeping in backoff holds nothing back; order is
      // restored by the output stage, from the journal. The pool is larger
      // than the in-flight bound (`--concurrency`, enforced by the fetch) so
      // lines waiting out a backoff do not idle the connection slots.
      const results = mapConcurrentUnordered(
        this.#todo(),
        (item, _i, signal) => this.#send(item, signal),
        { concurrency: Math.max(o.concurrency * 2, 16) },
      );
      for await (const { value: { item, outcome } } of results) {
        this.#record(item, outcome);
      }
    } finally {
      clearInterval(ticker);
      if (o.signals !== false) {
        process.off("SIGINT", onSignal);
        process.off("SIGTERM", onSignal);
      }
      this.output.close();
      if (this.output.next === this.count) this.journal.remove();
      else this.journal.close();
    }
  }

  /** The lines that need a request, read lazily; none once stopping. */
  async *#todo(): AsyncGenerator<Todo> {
    let i = -1;
    for await (const [line, text] of lines(this.o.input, this.o.shard)) {
      if (this.#stopping) return;
      if (text.trim() === "") continue;
      if (!this.work.needs(++i)) continue;
      yield { ...parseLine(line, text, {}), index: i };
    }
  }

  /** Sends one line through the gate. */
  async #send(
    item: Todo,
    signal: AbortSignal,
  ): Promise<{ item: Todo; outcome: Outcome | undefined }> {
    const s = this.gate.open(signal);
    try {
      const o = this.o;
      return {
        item,
        outcome: await perform(
          this.f,
          this.provider,
          this.ep,
          item,
          o.stream,
          s,
        ),
      };
    } finally {
      this.gate.close(s);
    }
  }

  /** Journals one line's outcome and hands it to the ordered output; a fatal one stops the run. */
  #record(item: Todo, outcome: Outcome | undefined): void {
    if (!outcome) return; // never sent, or aborted: no result
    // Stopping: a failure a retry could have cured is no result.
    if (this.#stopping && retryable(outcome)) return;
    const why = fatalOf(outcome);
    if (why) {
      // Not a result: fix the cause and run again.
      if (!this.#fatal) {
        this.f.stats.note(`stopped at line ${item.line}: ${why}`);
      }
      this.#fatal ??= { why, outcome, line: item.line };
      this.#stop("fatal");
      return;
    }
    const line = resultLine(this.provider, item, outcome);
    const stored = this.journal.append(item.index, !outcome.ok, line);
    this.#finished++;
    if (!outcome.ok) this.#errors++;
    this.output.put(item.index, stored);
    this.#progress();
  }

  #stop(why: "signal" | "fatal"): void {
    this.#stopping ??= why;
    this.gate.stop();
  }

  /** First signal: finish what is in flight. Second: abort it. */
  #onSignal(name?: unknown): void {
    if (++this.#signals > 1) {
      this.gate.abortAll(new Error("interrupted"));
      return;
    }
    this.#interruptedBy = typeof name === "string" ? name : "a signal";
    this.f.stats.note(`interrupted by ${this.#interruptedBy}`);
    this.#stop("signal");
    if (!this.o.quiet) {
      this.o.err(
        "\npaceline: stopping: finishing requests in flight (again to abort them)\n",
      );
    }
  }

  #interval(): number {
    return this.o.isTTY ? 200 : this.o.progressMs ?? 3000;
  }

  #progress(final = false): void {
    const o = this.o;
    if (o.quiet) return;
    const now = performance.now();
    if (!final && now - this.#lastProgress < this.#interval()) return;
    this.#lastProgress = now;
    const line = progressLine(
      this.#finished,
      this.work.toSend,
      this.#errors,
      this.f.stats,
      windowsNow(this.f),
      this.#startedAt,
      o.windowMs,
    );
    if (o.isTTY) o.err(`\r\x1b[2K${line}${final ? "\n" : ""}`);
    else o.err(`${line}\n`);
  }

  /** Stage 6: the stats, the report page, and the exit code with its message. */
  conclude(): number {
    const { o, output, count } = this;
    const complete = output.next === count;
    const notRun = count - output.next - output.waiting;
    this.#progress(true);
    if (!o.quiet) o.err(`\n${this.f.stats.report()}\n`);
    if (o.report) this.#writeReport(complete, notRun);
    const kept = `${output.next} of ${count} in order in ${o.output}${
      output.waiting ? `, ${output.waiting} more in ${this.journal.path}` : ""
    }`;
    if (this.#fatal) {
      o.err(this.#fatalMessage(this.#fatal, kept));
      return 3;
    }
    if (!complete) {
      if (!o.quiet) {
        o.err(
          `\npaceline: interrupted. Results kept: ${kept}; ${notRun} line${
            notRun === 1 ? "" : "s"
          } not run${
            this.#interruptedBy ? ` (stopped by ${this.#interruptedBy})` : ""
          }. Run the same command again to resume: only lines without a result are sent.\n`,
        );
      }
      return 130;
    }
    if (!o.quiet) {
      o.err(
        `\npaceline: ${count} results (${output.errored} errored) in ${o.output}${
          output.errored ? "; --retry-errored runs the errored ones again" : ""
        }\n`,
      );
    }
    return output.errored ? 1 : 0;
  }

  #writeReport(complete: boolean, notRun: number): void {
    const { o, output, count } = this;
    const fatal = this.#fatal;
    writeFileSync(
      o.report!,
      renderReport(this.f.stats, {
        title: o.input.split(/[\\/]/).pop() ?? o.input,
        concurrency: o.concurrency,
        lang: o.lang,
        stopped: fatal
          ? `stopped at line ${fatal.line}: ${fatal.why}`
          : !complete
          ? `interrupted by ${
            this.#interruptedBy ?? "a stop"
          }: ${output.next} of ${count} lines in the output, ${notRun} not run; run the same command again to resume`
          : undefined,
      }),
    );
    if (!o.quiet) o.err(`paceline: report in ${o.report}\n`);
  }

  #fatalMessage(
    fatal: { why: string; outcome: Outcome; line: number },
    kept: string,
  ): string {
    const detail = scrub(fatal.outcome.message ?? "", this.ep.apiKey);
    return `\npaceline: stopped at line ${fatal.line}: ${fatal.why}.\n${
      detail ? `  server: ${detail}\n` : ""
    }Nothing more was sent; those refusals were not recorded as results. Results kept: ${kept}.\n` +
      `${
        fatal.outcome.redis
          ? "Bring Redis back"
          : fatal.outcome.quota && /PerDay/i.test(fatal.outcome.quota)
          ? "Wait for the quota to reset"
          : fatal.outcome.quota
          ? "Raise the spend limit or add credit"
          : `Check the key in ${this.ep.keyVar}`
      }, then run the same command again: only lines without a result are sent.\n`;
  }
}

// =============================================================================
// --batch-api: the same lines through the provider's Batch API (half price,
// within 24 hours), with the same output and the same guarantees
// =============================================================================

/**
 * One submission to a Batch API, as `<output>.batches` records it: begun
 * (journaled, with its lines, before anything is sent), then its upload's
 * file id (OpenAI) and its batch id, then collected (every result
 * journaled) — or failed (the provider refused it whole) or abandoned
 * (never created: its lines are free again).
 */
interface Submission {
  n: number;
  /** When it was begun, ms since the epoch. */
  at: number;
  /** A random tag, kept in the batch's metadata where the provider keeps one. */
  tag: string;
  provider: string;
  /** The base URL it went to (never a key). */
  base: string;
  endpoint: string;
  /** Input indexes: flat `[start, end)` pairs. */
  lines: number[];
  count: number;
  bytes: number;
  /** A hash of the input's ids: a log belongs to one input. */
  input: string;
  file?: string;
  id?: string;
  state: "begun" | "submitted" | "failed" | "collected" | "abandoned";
  failure?: string;
}

/** A hash of the input's ids (and so of its lines' order). */
function idsHash(ids: string[]): string {
  const h = createHash("sha256");
  for (const id of ids) h.update(id).update("\n");
  return h.digest("hex").slice(0, 16);
}

/**
 * `<output>.batches`: every submission, journaled before it is sent and as
 * it moves on, one fsynced line per step — what makes a rerun after any
 * crash resume the batches it submitted instead of paying for them twice.
 */
class SubmissionLog {
  readonly path: string;
  readonly subs = new Map<number, Submission>();
  #fd: number | undefined;

  private constructor(path: string) {
    this.path = path;
  }

  /** Reads the log (a torn last line is cut away); it must be this input's. */
  static open(path: string, input: string | undefined): SubmissionLog {
    const log = new SubmissionLog(path);
    if (!existsSync(path)) return log;
    const end = scanLines(path, (text) => {
      let e: Record<string, unknown>;
      try {
        e = JSON.parse(text);
      } catch {
        return; // not a whole entry
      }
      log.#apply(e);
    });
    if (statSync(path).size > end) truncateSync(path, end);
    for (const s of log.subs.values()) {
      if (input !== undefined && s.input !== input) {
        throw new UsageError(
          `${path} records batches of another input; nothing was sent. Give another -o, or move that file away once its batches are collected.`,
        );
      }
    }
    return log;
  }

  #apply(e: Record<string, unknown>): void {
    if (e.begin) {
      const s = e.begin as Submission;
      this.subs.set(s.n, { ...s, state: "begun" });
      return;
    }
    const s = this.subs.get(Number(e.n));
    if (!s) return;
    if (e.file) s.file = String(e.file);
    if (e.batch) {
      s.id = String(e.batch);
      s.state = "submitted";
    }
    if (e.failed) {
      s.state = "failed";
      s.failure = String(e.failed);
    }
    if (e.collected) s.state = "collected";
    if (e.abandoned) s.state = "abandoned";
  }

  /** Records one step, durably, before anything depends on it. */
  note(e: Record<string, unknown>): void {
    this.#fd ??= openSync(this.path, "a");
    writeAll(this.#fd, JSON.stringify(e) + "\n");
    fsyncSync(this.#fd);
    this.#apply(e);
  }

  /** Submissions whose batch may still hold results for us. */
  pending(): Submission[] {
    return [...this.subs.values()].filter((s) =>
      s.state === "begun" || s.state === "submitted"
    );
  }

  close(): void {
    if (this.#fd !== undefined) closeSync(this.#fd);
    this.#fd = undefined;
  }

  /** Every batch is collected and every result is in the output: the log is done. */
  remove(): void {
    this.close();
    rmSync(this.path, { force: true });
  }
}

/**
 * Whether a batch the provider lists is this submission's: its tag where
 * the provider keeps one, else (Anthropic) its request count and a
 * creation time no earlier than a minute before the submission began.
 */
function isSubmission(b: BatchStatus, s: Submission): boolean {
  return b.tag !== undefined
    ? b.tag === s.tag
    : b.total === s.count && b.createdAt >= s.at - 60_000;
}

/**
 * The provider's batch of a submission whose creation went unanswered, if
 * it exists: the earliest recent one that is this submission's and is not
 * already another's in the log.
 */
async function findSubmitted(
  api: BatchApi,
  call: BatchCall,
  s: Submission,
  log: SubmissionLog,
): Promise<BatchStatus | undefined> {
  const known = new Set([...log.subs.values()].map((x) => x.id));
  const recent = await api.list(call, s.at - 300_000);
  return recent.filter((b) => !known.has(b.id) && isSubmission(b, s))
    .sort((a, b) => a.createdAt - b.createdAt)[0];
}

/** Marks a submission's lines in `into` (one byte per input line), or clears them. */
function markLines(s: Submission, into: Uint8Array, value = 1): void {
  for (let k = 0; k < s.lines.length; k += 2) {
    into.fill(value, s.lines[k]!, s.lines[k + 1]!);
  }
}

/**
 * The pending submissions in `<output>.batches`, for a live run: those
 * lines must not be sent live while their batch may still answer them.
 */
function pendingBatches(output: string): Submission[] {
  const path = `${output}.batches`;
  if (!existsSync(path)) return [];
  const log = SubmissionLog.open(path, undefined);
  log.close();
  return log.pending();
}

/** A Blob of a file on disk, read as it is sent where the runtime can. */
async function fileBlob(path: string): Promise<Blob> {
  const fs = await import("node:fs") as {
    openAsBlob?: (path: string) => Promise<Blob>;
  };
  return fs.openAsBlob
    ? await fs.openAsBlob(path)
    : new Blob([readFileSync(path)]);
}

/** The lines of a response body, decoded as it streams (results files can be large). */
async function* responseLines(response: Response): AsyncGenerator<string> {
  const decoder = new TextDecoder();
  let carry = "";
  for await (
    const chunk of response.body as unknown as AsyncIterable<Uint8Array>
  ) {
    carry += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = carry.indexOf("\n")) >= 0) {
      const line = carry.slice(0, nl);
      carry = carry.slice(nl + 1);
      if (line.trim()) yield line;
    }
  }
  carry += decoder.decode();
  if (carry.trim()) yield carry;
}

/** The rows of a JSONL results file, parsed; lines that are not JSON objects are skipped. */
async function* jsonlRows(
  response: Response,
): AsyncGenerator<Record<string, unknown>> {
  for await (const text of responseLines(response)) {
    try {
      const row = JSON.parse(text);
      if (row && typeof row === "object") yield row;
    } catch { /* not a result line */ }
  }
}

/**
 * The lines `want` picks (by index among the run's lines), each as its
 * batch upload entry, with the batch target it belongs to and its weight
 * toward the provider's per-batch limit.
 */
async function* batchEntries(
  o: RunOptions,
  provider: Provider,
  want: (index: number) => boolean,
): AsyncGenerator<
  { index: number; key: string; entry: string; weight: number }
> {
  const api = provider.batchApi!;
  let index = -1;
  for await (const [line, text] of lines(o.input, o.shard)) {
    if (text.trim() === "" || !want(++index)) continue;
    const item = parseLine(line, text, {});
    const body = batchBody(provider, item, o.model);
    yield {
      index,
      key: api.target(item.path, body),
      entry: api.entry(item.customId, item.path, body),
      weight: api.weight?.(item.path, body) ?? 1,
    };
  }
}

/** Every line: what dry runs plan. */
const everyLine = (): boolean => true;

/** A line's body as a batch carries it: whole, with `--model` where it names none (Gemini). */
function batchBody(
  provider: Provider,
  item: Item,
  model: string | undefined,
): Record<string, unknown> {
  const body = provider.wholeBody(item.body);
  return body.model === undefined && model ? { ...body, model } : body;
}

/** A Batch API call refused for good (4xx other than 429), with the server's words. */
class BatchRefused extends Error {
  readonly status: number;
  constructor(status: number, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BatchRefused";
    this.status = status;
  }
}

/**
 * The {@linkcode BatchCall} of a run: to the base URL only (a results URL
 * elsewhere is asked of the base URL instead, so the key goes nowhere
 * else), signed as live requests are. 429s and, where `retryAll`, 5xx and
 * network failures are retried by {@linkcode retry} (the server's wait,
 * else a backoff); other refusals throw a BatchRefused.
 */
function batchCaller(
  ep: Endpoint,
  signal: AbortSignal,
  retryAll: boolean,
  tries = 6,
): BatchCall {
  const origin = new URL(ep.base).origin;
  const headers = { ...ep.headers };
  delete headers["content-type"];
  return async (method, path, body) => {
    const target = new URL(path, origin);
    const url = /^https?:/.test(path) && target.origin === origin
      ? target.href
      : onBase(ep.base, `${target.pathname}${target.search}`);
    const json = typeof body === "string" || body instanceof Blob;
    const init = {
      method,
      headers: json
        ? { ...headers, "content-type": "application/json" }
        : headers,
      body,
    };
    let response: Response;
    try {
      response = await retry((_, signal) => fetch(url, { ...init, signal }), {
        retries: tries - 1,
        signal,
        maxRetryAfterMs: MAX_RETRY_AFTER_MS,
        // Where an unknown outcome must not be sent again (a create), only
        // a 429 (refused, so nothing was made) is retried.
        shouldRetry: retryAll
          ? undefined
          : (f) =>
            f instanceof Response && f.status === 429 ? undefined : false,
      });
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      const what = scrub((e as Error)?.message ?? String(e), ep.apiKey);
      if (e instanceof QuotaError) throw new BatchRefused(429, what);
      throw new Error(what, { cause: e });
    }
    if (response.ok) return response;
    const what = scrub(
      HttpError.from(response, await response.text()).message,
      ep.apiKey,
    );
    if (
      response.status >= 400 && response.status < 500 && response.status !== 429
    ) {
      throw new BatchRefused(response.status, what);
    }
    throw new Error(what);
  };
}

/**
 * An API path as the provider documents it (`/v1/batches`,
 * `/v1beta/batches/…`) on the base URL given, whose last segment may
 * already be the path's first (`…/v1`, `…/v1beta`).
 */
function onBase(base: string, path: string): string {
  const last = /\/([^/]+)$/.exec(new URL(base).pathname)?.[1];
  return last && path.startsWith(`/${last}/`)
    ? `${base}${path.slice(last.length + 1)}`
    : `${base}${path}`;
}

/** Requests being written to one batch's upload file, for one endpoint. */
class UploadChunk {
  readonly n: number;
  readonly path: string;
  readonly endpoint: string;
  readonly lines: number[] = [];
  count = 0;
  /** Requests as the provider counts them toward its limit (embeddings inputs). */
  weight = 0;
  bytes: number;
  #fd: number;
  #parts: string[] = [];
  #buffered = 0;
  #api: BatchApi;

  constructor(n: number, output: string, endpoint: string, api: BatchApi) {
    this.n = n;
    this.path = `${output}.upload-${n}`;
    this.endpoint = endpoint;
    this.#api = api;
    this.#fd = openSync(this.path, "w");
    this.bytes = Buffer.byteLength(api.framing[0]) +
      Buffer.byteLength(api.framing[2]);
  }

  /** Bytes `entry` would add. */
  cost(entry: string): number {
    return Buffer.byteLength(entry) +
      (this.count ? Buffer.byteLength(this.#api.framing[1]) : 0);
  }

  add(index: number, entry: string, weight: number): void {
    this.weight += weight;
    const piece = (this.count ? this.#api.framing[1] : this.#api.framing[0]) +
      entry;
    this.bytes += this.cost(entry);
    this.count++;
    const last = this.lines.length - 1;
    if (last > 0 && this.lines[last] === index) this.lines[last] = index + 1;
    else this.lines.push(index, index + 1);
    this.#parts.push(piece);
    this.#buffered += piece.length;
    if (this.#buffered > 1 << 16) this.#flush();
  }

  #flush(): void {
    writeAll(this.#fd, this.#parts.join(""));
    this.#parts.length = 0;
    this.#buffered = 0;
  }

  /** Never sent (the run is stopping): the file goes. */
  discard(): void {
    closeSync(this.#fd);
    rmSync(this.path, { force: true });
  }

  /** Writes the closing framing; the file is ready to send. */
  seal(): void {
    this.#parts.push(this.#api.framing[2]);
    this.#flush();
    closeSync(this.#fd);
  }
}

/** What stopped a Batch API run early. */
interface BatchStop {
  /** Exit code: 3 for the provider's refusal, 130 for a signal. */
  code: 3 | 130;
  why: string;
}

/**
 * One `--batch-api` run: recover submissions whose answer was lost, submit
 * every line in no batch (split within the provider's limits, one endpoint
 * per batch where it wants that), watch the batches, and collect their
 * results into the journal and the ordered output — the same output a
 * live run writes.
 */
class BatchApiRun {
  readonly o: RunOptions;
  readonly provider: Provider;
  readonly api: BatchApi;
  readonly ep: Endpoint;
  readonly work: Work;
  readonly journal: Journal;
  readonly output: OrderedOutput;
  readonly log: SubmissionLog;
  readonly ids: string[];
  readonly lineNos: number[];
  readonly inputHash: string;
  /** Lines in a batch that may still answer them. */
  readonly covered: Uint8Array;
  /** Lines given a result by this run. */
  readonly recorded: Uint8Array;
  readonly statuses = new Map<number, BatchStatus>();
  #idIndex: Map<string, number> | undefined;
  #stop: BatchStop | undefined;
  #signals = 0;
  /** Ends waits (polls, pauses) at the first signal. */
  #waiting = new AbortController();
  /** Ends submissions' calls too, at the second signal. */
  #calls = new AbortController();
  /** A batch was refused for room our running batches hold: submit again when one ends. */
  #requeued = false;
  #finished = 0;
  #errors = 0;
  #startedAt = performance.now();
  #lastProgress = 0;
  #lastLine = "";

  constructor(
    o: RunOptions,
    provider: Provider,
    read: { ids: string[]; lineNos: number[] },
    parts: {
      ep: Endpoint;
      work: Work;
      journal: Journal;
      output: OrderedOutput;
      log: SubmissionLog;
    },
  ) {
    this.o = o;
    this.provider = provider;
    this.api = provider.batchApi!;
    this.ids = read.ids;
    this.lineNos = read.lineNos;
    this.inputHash = idsHash(read.ids);
    this.ep = parts.ep;
    this.work = parts.work;
    this.journal = parts.journal;
    this.output = parts.output;
    this.log = parts.log;
    this.covered = new Uint8Array(read.ids.length);
    this.recorded = new Uint8Array(read.ids.length);
  }

  /** The endpoint, the results of earlier runs, and the submissions log. */
  static plan(
    o: RunOptions,
    provider: Provider,
    read: { ids: string[]; lineNos: number[] },
  ): BatchApiRun {
    const ep = endpoint(o, provider);
    const { ids } = read;
    const log = SubmissionLog.open(`${o.output}.batches`, idsHash(ids));
    for (const s of log.pending()) {
      if (
        s.provider !== provider.name || s.base !== ep.base
      ) {
        throw new UsageError(
          `${log.path}: batch ${
            s.id ?? s.n
          } was submitted to ${s.provider} at ${s.base}; this run is for ${provider.name} at ${ep.base}. Give the same --base-url (and key) to collect it. Nothing was sent.`,
        );
      }
    }
    const prior = scanOutput(o.output, ids);
    const { journal, entries } = Journal.open(`${o.output}.journal`, ids);
    const work = planWork(ids.length, prior, entries, o.retryErrored ?? false);
    const output = new OrderedOutput(o.output, work, journal);
    output.flush();
    return new BatchApiRun(o, provider, read, {
      ep,
      work,
      journal,
      output,
      log,
    });
  }

  /** Says what is to run, and what it found from earlier runs. */
  announce(): void {
    const { o, work } = this;
    if (o.quiet) return;
    const pending = this.log.pending();
    const count = this.ids.length;
    const have = count - work.toSend;
    o.err(
      `paceline: ${work.toSend} of ${count} ${this.provider.name} requests need results${
        have ? ` (${have} already have them)` : ""
      }; through the ${this.provider.name} Batch API (${
        Math.round(this.api.priceFactor * 100)
      } % of the live price; results within 24 hours)${
        pending.length
          ? `; ${pending.length} batch${
            pending.length === 1 ? "" : "es"
          } from an earlier run to collect (never submitted twice)`
          : ""
      } → ${o.output}\n`,
    );
    const limits = Object.keys(o.limits);
    if (limits.length) {
      o.err(
        `paceline: note: --${
          limits.join(", --")
        } are live limits; the Batch API has its own, so they are not used\n`,
      );
    }
  }

  /** Recover, submit, watch and collect, until done or stopped. */
  async execute(): Promise<void> {
    const onSignal = (name?: unknown): void => this.#onSignal(name);
    if (this.o.signals !== false) {
      process.on("SIGINT", onSignal);
      process.on("SIGTERM", onSignal);
    }
    try {
      for (const s of this.log.pending()) {
        await this.#recover(s).catch((e) => {
          if (this.#stop) throw e;
          this.#fatal(
            e instanceof BatchRefused ? e.status : 0,
            `could not look for submission ${s.n}'s batch (${
              (e as Error).message
            }); nothing was submitted again`,
          );
        });
      }
      for (const s of this.log.pending()) markLines(s, this.covered);
      await this.#submitAll();
      await this.#watch();
    } catch (e) {
      if (!this.#stop) throw e;
    } finally {
      if (this.o.signals !== false) {
        process.off("SIGINT", onSignal);
        process.off("SIGTERM", onSignal);
      }
      this.output.close();
      const complete = this.output.next === this.ids.length;
      if (complete && !this.log.pending().length) {
        this.journal.remove();
        this.log.remove();
      } else {
        this.journal.close();
        this.log.close();
      }
    }
  }

  #onSignal(name?: unknown): void {
    const why = `interrupted by ${
      typeof name === "string" ? name : "a signal"
    }`;
    this.#stop ??= { code: 130, why };
    this.#waiting.abort(new Error(why));
    if (++this.#signals > 1) this.#calls.abort(new Error(why));
    else if (!this.o.quiet) {
      this.o.err(
        "\npaceline: stopping: no more waiting (again to abort a submission in progress)\n",
      );
    }
  }

  /** The call for waiting work (polls, downloads, cancels): ends at the first signal. */
  #call(retryAll = true): BatchCall {
    return batchCaller(this.ep, this.#waiting.signal, retryAll);
  }

  /**
   * A submission begun but with no batch id: its creation's answer was
   * lost (a crash, a lost network). Find the batch among the provider's
   * recent ones — by its tag (OpenAI keeps it in metadata), else by its
   * request count and creation time (Anthropic) — or create it from the
   * upload already made, or, if it never reached the provider, free its
   * lines.
   */
  async #recover(s: Submission): Promise<void> {
    if (s.id) return;
    const match = await this.#find(s);
    if (match) {
      this.log.note({ n: s.n, batch: match.id });
      this.statuses.set(s.n, match);
    } else if (s.file) {
      await this.#create(s, s.file);
    } else {
      this.log.note({ n: s.n, abandoned: true });
      rmSync(`${this.o.output}.upload-${s.n}`, { force: true });
    }
  }

  /** The provider's batch of a submission whose creation's answer was lost, if it exists. */
  #find(s: Submission): Promise<BatchStatus | undefined> {
    return findSubmitted(
      this.api,
      batchCaller(this.ep, this.#calls.signal, true),
      s,
      this.log,
    );
  }

  /**
   * Creates the batch of a begun submission and journals its id. When the
   * answer is lost (a 5xx, a broken connection), the batch may exist: it is
   * looked for before it is created again.
   */
  async #create(s: Submission, input: Blob | string): Promise<void> {
    const call = batchCaller(this.ep, this.#calls.signal, false);
    let status: BatchStatus | undefined;
    for (let attempt = 1; !status; attempt++) {
      try {
        status = await this.api.create(call, input, s.endpoint, s.tag);
      } catch (e) {
        if (e instanceof BatchRefused) {
          // Refused outright: no batch was made; its lines are free again.
          this.log.note({ n: s.n, abandoned: true });
          this.#fatal(
            e.status,
            `the ${this.provider.name} Batch API refused the batch: ${e.message}`,
          );
        }
        if (this.#calls.signal.aborted || attempt >= 3) {
          // Unknown: the next run finds the batch, or creates it.
          this.#fatal(
            0,
            `could not create a batch (${
              (e as Error).message
            }); it is journaled, and the next run finds it or creates it, never twice`,
          );
        }
        await systemClock.sleep(2000 * attempt, this.#calls.signal);
        status = await this.#find(s).catch((e) =>
          this.#fatal(
            e instanceof BatchRefused ? e.status : 0,
            `could not create a batch (${
              (e as Error).message
            }); it is journaled, and the next run finds it or creates it, never twice`,
          )
        );
      }
    }
    this.log.note({ n: s.n, batch: status.id });
    this.statuses.set(s.n, status);
    rmSync(`${this.o.output}.upload-${s.n}`, { force: true });
  }

  /** A refusal that stops the run: exit 3, nothing recorded for it. */
  #fatal(status: number, why: string): never {
    const what = status === 401
      ? `the API key was refused (HTTP 401): ${why}`
      : status === 403
      ? `not allowed (HTTP 403): ${why}`
      : why;
    this.#stop ??= { code: 3, why: scrub(what, this.ep.apiKey) };
    this.#waiting.abort(new Error("stopped"));
    throw new Error(what);
  }

  /**
   * Submits every line that needs a result and is in no batch, in input
   * order: per endpoint where the provider wants one per batch, each batch
   * within its request and byte limits, each upload written to a file
   * beside the output (memory does not grow with the input).
   */
  async #submitAll(): Promise<void> {
    const open = new Map<string, UploadChunk>();
    let next = Math.max(0, ...this.log.subs.keys()) + 1;
    const entries = batchEntries(
      this.o,
      this.provider,
      (i) => this.work.needs(i) && !this.covered[i],
    );
    for await (const { index, key, entry, weight } of entries) {
      if (this.#stop) break;
      let chunk = open.get(key);
      if (chunk && !chunkFits(this.api, chunk, chunk.cost(entry), weight)) {
        open.delete(key);
        await this.#submit(chunk);
        chunk = undefined;
      }
      if (!chunk) {
        chunk = new UploadChunk(next++, this.o.output, key, this.api);
        open.set(key, chunk);
      }
      chunk.add(index, entry, weight);
    }
    for (const chunk of open.values()) {
      if (this.#stop) chunk.discard();
      else await this.#submit(chunk);
    }
  }

  /** Journals a batch's lines, then uploads (where needed) and creates it. */
  async #submit(chunk: UploadChunk): Promise<void> {
    chunk.seal();
    const s: Submission = {
      n: chunk.n,
      at: Date.now(),
      tag: globalThis.crypto.randomUUID(),
      provider: this.provider.name,
      base: this.ep.base,
      endpoint: chunk.endpoint,
      lines: chunk.lines,
      count: chunk.count,
      bytes: chunk.bytes,
      input: this.inputHash,
      state: "begun",
    };
    const { state: _, ...begin } = s;
    this.log.note({ begin }); // before anything is sent
    markLines(s, this.covered);
    let input: Blob | string = await fileBlob(chunk.path);
    if (this.api.upload) {
      const call = batchCaller(this.ep, this.#calls.signal, true);
      try {
        input = await this.api.upload(call, input, `paceline-${s.tag}.jsonl`);
      } catch (e) {
        if (e instanceof BatchRefused) {
          this.log.note({ n: s.n, abandoned: true });
          this.#fatal(
            e.status,
            `the ${this.provider.name} Files API refused the upload: ${e.message}`,
          );
        }
        if (this.#stop) throw e;
        this.#fatal(
          0,
          `could not upload a batch's requests (${
            (e as Error).message
          }); the submission is journaled, and the next run makes it, never twice`,
        );
      }
      this.log.note({ n: s.n, file: input });
    }
    await this.#create(s, input);
    this.#progress(true);
  }

  /** Polls every batch not yet collected, collecting each as it ends, until none is left. */
  async #watch(): Promise<void> {
    for (let first = true;; first = false) {
      const pending = this.log.pending();
      if (!pending.length || this.#stop) return;
      if (!first) {
        await systemClock.sleep(this.o.pollMs ?? 30_000, this.#waiting.signal);
      }
      for (const s of pending) {
        if (this.#stop) return;
        try {
          const status = await this.api.retrieve(this.#call(), s.id!);
          this.statuses.set(s.n, status);
          if (status.phase === "ended") {
            await this.#collect(s, status);
            if (this.#requeued) {
              // Room freed: what was refused for room goes in again.
              this.#requeued = false;
              await this.#submitAll();
            }
          }
          if (status.phase === "failed") this.#failed(s, status);
        } catch (e) {
          if (this.#stop) return;
          if (e instanceof BatchRefused) {
            this.#fatal(e.status, `batch ${s.id}: ${e.message}`);
          }
          this.#say(
            `could not reach batch ${s.id} (${
              (e as Error).message
            }); trying again at the next poll`,
          );
        }
      }
      this.#progress();
    }
  }

  /**
   * A batch the provider refused whole: its lines are free again. Refused
   * for room that our other batches hold (too many tokens enqueued), it is
   * submitted again when one of them ends; otherwise the run stops (exit 3).
   */
  #failed(s: Submission, status: BatchStatus): void {
    this.log.note({ n: s.n, failed: status.failure });
    markLines(s, this.covered, 0);
    const running = this.log.pending().length;
    if (status.requeue && running > 0) {
      this.#requeued = true;
      this.#say(
        `batch ${s.id} (${s.count} requests) was refused for now: ${status.failure}. Its requests go in again when one of the ${running} batch${
          running === 1 ? "" : "es"
        } still running ends.`,
      );
      return;
    }
    this.#fatal(
      0,
      `batch ${s.id} (${s.count} requests, ${s.endpoint}) failed: ${status.failure}`,
    );
  }

  /**
   * Reads an ended batch's results (and errors) into the journal and the
   * ordered output; a line it gave no result for is errored. Lines that
   * already have a result (an earlier run collected them) are skipped.
   */
  async #collect(s: Submission, status: BatchStatus): Promise<void> {
    const mine = new Uint8Array(this.ids.length);
    markLines(s, mine);
    this.#idIndex ??= new Map(this.ids.map((id, i) => [id, i]));
    for (const path of status.results) {
      const response = await this.#call()("GET", path);
      const rows = this.api.rows?.(response) ?? jsonlRows(response);
      for await (const row of rows) {
        const r = this.api.outcomeOf(row);
        const i = r && this.#idIndex.get(r.customId);
        if (i !== undefined && mine[i]) this.#record(i, r!.outcome);
      }
    }
    for (let k = 0; k < s.lines.length; k += 2) {
      for (let i = s.lines[k]!; i < s.lines[k + 1]!; i++) {
        this.#record(i, {
          ok: false,
          errorType: "missing_result",
          message:
            `batch ${s.id} ended (${status.state}) without a result for this request`,
        });
      }
    }
    this.log.note({ n: s.n, collected: true });
    this.#progress(true);
  }

  /** Journals one line's result and hands it to the ordered output. */
  #record(i: number, outcome: BatchOutcome): void {
    if (this.recorded[i] || !this.work.needs(i)) return;
    this.recorded[i] = 1;
    const item = {
      line: this.lineNos[i]!,
      customId: this.ids[i]!,
      path: "",
      body: {},
    };
    const line = resultLine(this.provider, item, outcome);
    this.output.put(i, this.journal.append(i, !outcome.ok, line));
    this.#finished++;
    if (!outcome.ok) this.#errors++;
  }

  #say(text: string): void {
    if (!this.o.quiet) {
      this.o.err(`${this.o.isTTY ? "\r\x1b[2K" : ""}paceline: ${text}\n`);
    }
  }

  /** The progress line: batches by state, requests by state, results written. */
  #progress(force = false): void {
    const o = this.o;
    if (o.quiet) return;
    const now = performance.now();
    if (!force && now - this.#lastProgress < (o.progressMs ?? 3000)) return;
    this.#lastProgress = now;
    const states = new Map<string, number>();
    const counts = new Map<string, number>();
    for (const s of this.statuses.values()) {
      states.set(s.state, (states.get(s.state) ?? 0) + 1);
      for (const [k, v] of Object.entries(s.counts)) {
        counts.set(k, (counts.get(k) ?? 0) + v);
      }
    }
    const list = (m: Map<string, number>): string =>
      [...m].filter(([, v]) => v > 0).map(([k, v]) => `${fmtCount(v)} ${k}`)
        .join(", ");
    const line = `batches: ${list(states) || "none yet"}${
      list(counts) ? ` · requests: ${list(counts)}` : ""
    } · ${
      fmtCount(this.#finished)
    } results written (${this.#errors} errored) · ${
      fmtDuration(now - this.#startedAt)
    }`;
    if (line === this.#lastLine) return;
    this.#lastLine = line;
    if (o.isTTY) o.err(`\r\x1b[2K${line}`);
    else o.err(`paceline: ${line}\n`);
  }

  /** What is still out at the provider, and what to do about it, in words. */
  #stillOut(pending: Submission[]): string {
    const made = pending.filter((s) => s.id).map((s) => s.id!);
    const unsure = pending.length - made.length;
    const them = (n: number): string => n === 1 ? "it" : "them";
    return (made.length
      ? ` ${made.length} batch${made.length === 1 ? "" : "es"} keep${
        made.length === 1 ? "s" : ""
      } running at ${this.provider.name} (${
        made.join(", ")
      }): run the same command again to collect ${
        them(made.length)
      } (nothing is submitted twice), or \`paceline cancel ${this.o.output}\` to cancel ${
        them(made.length)
      }.`
      : "") +
      (unsure
        ? ` ${unsure} submission${
          unsure === 1 ? "" : "s"
        } went unanswered: the next run looks for ${
          them(unsure)
        } at the provider before sending ${them(unsure)} again.`
        : "");
  }

  /** The final word and the exit code. */
  conclude(): number {
    const { o, output } = this;
    const count = this.ids.length;
    if (!o.quiet) {
      this.#progress(true);
      if (o.isTTY) o.err("\n");
    }
    const kept = `${output.next} of ${count} in order in ${o.output}${
      output.waiting ? `, ${output.waiting} more in ${this.journal.path}` : ""
    }`;
    const pending = this.log.pending();
    const running = this.#stillOut(pending);
    if (this.#stop?.code === 3) {
      o.err(
        `\npaceline: stopped: ${this.#stop.why}.\nNothing was recorded for the lines it concerns. Results kept: ${kept}.${running}\nFix the cause, then run the same command again: lines already in a batch are collected, not submitted again.\n`,
      );
      return 3;
    }
    if (output.next !== count) {
      o.err(
        `\npaceline: ${
          this.#stop?.why ?? "stopped"
        }: no longer waiting. Results kept: ${kept}.${running}\n`,
      );
      return 130;
    }
    if (!o.quiet) {
      o.err(
        `\npaceline: ${count} results (${output.errored} errored) in ${o.output}${
          output.errored
            ? "; --retry-errored runs the errored ones again (live; with --batch-api through a new batch)"
            : ""
        }\n`,
      );
    }
    return output.errored ? 1 : 0;
  }
}

/** Whether one more entry of `bytes` fits a batch within the provider's limits. */
function chunkFits(
  api: BatchApi,
  chunk: { weight: number; bytes: number },
  bytes: number,
  weight: number,
): boolean {
  return chunk.weight + weight <= api.maxRequests &&
    chunk.bytes + bytes <= api.maxBytes;
}

/**
 * `--dry-run --batch-api`: the batches this input makes — endpoint, lines
 * and bytes each — against the provider's per-batch limits, and the price.
 * Sends nothing.
 */
async function dryRunBatchApi(
  o: RunOptions,
  provider: Provider,
): Promise<string> {
  const api = provider.batchApi!;
  const framing = Buffer.byteLength(api.framing[0] + api.framing[2]);
  const sep = Buffer.byteLength(api.framing[1]);
  type Planned = {
    endpoint: string;
    count: number;
    weight: number;
    bytes: number;
  };
  const done: Planned[] = [];
  const open = new Map<string, Planned>();
  let total = 0;
  for await (
    const { key, entry, weight } of batchEntries(o, provider, everyLine)
  ) {
    const bytes = Buffer.byteLength(entry);
    let b = open.get(key);
    if (b && !chunkFits(api, b, bytes + sep, weight)) {
      done.push(b);
      b = undefined;
    }
    if (!b) {
      open.set(
        key,
        b = { endpoint: key, count: 0, weight: 0, bytes: framing - sep },
      );
    }
    b.count++;
    b.weight += weight;
    b.bytes += bytes + sep;
    total++;
  }
  done.push(...open.values());
  const mb = (n: number): string =>
    `${+(n / 1048576).toFixed(n < 1048576 ? 2 : 1)} MB`;
  const num = (n: number): string => n.toLocaleString("en-US");
  return [
    `paceline: dry run with --batch-api: ${
      num(total)
    } ${provider.name} requests in ${done.length} batch${
      done.length === 1 ? "" : "es"
    } (the ${provider.name} Batch API takes ${api.limits}):`,
    ...done.map((b, k) =>
      `  batch ${k + 1}: ${b.endpoint}, ${num(b.count)} requests, ${
        mb(b.bytes)
      }`
    ),
    `Price: ${
      Math.round(api.priceFactor * 100)
    } % of live requests; results within 24 hours (often much sooner), in input order in the output as a live run writes them. A rerun never submits a line twice; \`paceline cancel OUTPUT\` cancels what was submitted. Nothing was sent.`,
    "",
  ].join("\n");
}

/**
 * `paceline cancel OUTPUT`: asks the provider to cancel every batch that
 * `<output>.batches` records as not yet collected. What finished stays; a
 * rerun of the run's command collects it, the canceled requests written
 * as errored (`--retry-errored` redoes them).
 */
export async function cancelBatches(
  output: string,
  io: { out: (s: string) => void; err: (s: string) => void; baseURL?: string },
): Promise<number> {
  const path = `${output}.batches`;
  if (!existsSync(path)) {
    throw new UsageError(
      `${path} not found: no batches of ${output} are waiting (none were submitted, or all were collected)`,
    );
  }
  const log = SubmissionLog.open(path, undefined);
  const pending = log.pending();
  log.close();
  let refused = 0;
  for (const s of pending) {
    const provider = providers.find((p) => p.name === s.provider);
    if (!provider?.batchApi) continue;
    const ep = endpoint(
      { baseURL: io.baseURL ?? s.base } as RunOptions,
      provider,
    );
    const call = batchCaller(ep, new AbortController().signal, true, 3);
    let id = s.id;
    if (!id) {
      id = (await findSubmitted(provider.batchApi, call, s, log))?.id;
    }
    if (!id) {
      io.out(
        `submission ${s.n} (${s.count} requests) never reached ${s.provider}: nothing to cancel\n`,
      );
      continue;
    }
    try {
      const b = await provider.batchApi.cancel(call, id);
      io.out(
        `${id}: ${b.state}, ${fmtCount(b.finished)} of ${
          fmtCount(b.total)
        } requests finished\n`,
      );
    } catch (e) {
      refused++;
      io.err(
        `paceline: ${id}: cancel refused: ${
          scrub((e as Error).message, ep.apiKey)
        }\n`,
      );
    }
  }
  io.err(
    pending.length
      ? `paceline: run the same command again (with --batch-api) to collect what finished; canceled requests are written as errored (--retry-errored redoes them)\n`
      : `paceline: no batch of ${output} is waiting\n`,
  );
  return refused ? 3 : 0;
}

const TOPICS_EN = [
  "sliding-window rate limits",
  "exponential backoff with jitter",
  "the Retry-After header",
  "token buckets",
  "results in input order",
  "idempotent retries",
];
const TOPICS_ZH = [
  "限流算法",
  "指数退避",
  "并发控制",
  "令牌桶",
  "重试策略",
  "批量处理",
];

/** The demo: the simulator in-process, a generated batch, the same run path. */
export async function demo(
  requests: number,
  o: Pick<RunOptions, "out" | "err" | "isTTY" | "quiet" | "lang">,
): Promise<number> {
  const windowMs = 2000; // a compressed "minute"
  const limits = { requests: 50, inputTokens: 3000, outputTokens: 2400 };
  const sim = await startSimulator({
    limits: { ...limits, windowMs },
    faults: { overloaded529: 0.03, error500: 0.01 },
    latency: { baseMs: 40, perOutputTokenMs: 1 },
    retryAfterMs: true,
    seed: 7,
  });
  const dir = mkdtempSync(join(tmpdir(), "paceline-demo-"));
  const input = join(dir, "requests.jsonl");
  const output = join(dir, "results.jsonl");
  const rows: string[] = [];
  for (let i = 0; i < requests; i++) {
    const content = i % 3 === 2
      ? `请用两句话解释${TOPICS_ZH[i % TOPICS_ZH.length]}。（第${i + 1}题）`
      : `In two sentences, explain ${
        TOPICS_EN[i % TOPICS_EN.length]
      }. (question ${i + 1})`;
    rows.push(JSON.stringify({
      custom_id: `demo-${String(i + 1).padStart(4, "0")}`,
      params: {
        model: "claude-sim",
        max_tokens: 64,
        messages: [{ role: "user", content }],
      },
    }));
  }
  writeFileSync(input, rows.join("\n") + "\n");
  if (!o.quiet) {
    o.err(
      `paceline demo: ${requests} requests (a third in Chinese) against the built-in simulator at ${sim.url}\n` +
        `limits per compressed minute (${windowMs} ms): ${limits.requests} requests, ${limits.inputTokens} input tokens, ${limits.outputTokens} output tokens; 3 % 529s and 1 % 500s injected\n\n`,
    );
  }
  try {
    const code = await run({
      input,
      output,
      baseURL: sim.url,
      apiKey: "demo-key",
      limits: {
        rpm: limits.requests,
        itpm: limits.inputTokens,
        otpm: limits.outputTokens,
      },
      windowMs,
      marginMs: 100,
      concurrency: 8,
      retries: 5,
      maxRateLimitedMs: 900_000,
      findPace: true,
      stream: false,
      quiet: o.quiet,
      report: join(dir, "report.html"),
      lang: o.lang,
      out: o.out,
      err: o.err,
      isTTY: o.isTTY,
    });
    const st = sim.stats();
    const refused = Object.values(st.rateLimited).reduce((a, b) => a + b, 0);
    o.out(
      `\nsimulator: ${st.accepted} accepted, ${refused} refused by rate limits, ${
        st.faults.overloaded529 + st.faults.error500
      } faults injected\nresults: ${output}\nreport:  ${
        join(dir, "report.html")
      }\n`,
    );
    return code;
  } finally {
    await sim.close();
  }
}

/** The report's language from `LANG`/`LC_ALL` (zh_* → Chinese). */
function langFromEnv(): Lang {
  const l = process.env.LC_ALL || process.env.LANG || "";
  return /^zh/i.test(l) ? "zh" : "en";
}

// =============================================================================
// Command line: every flag of `paceline run` once, in one table
// =============================================================================

/** What the flags of `paceline run` give, before defaults for the rest. */
type RunFlags = Partial<RunOptions> & {
  limits: Record<string, number>;
  /** `paceline demo --requests N`. */
  requests?: number;
};

/** One flag: its name, its value's placeholder (none: a switch), its help, and how it is read. */
interface Flag {
  name: string;
  short?: string;
  /** The value's placeholder in the help; absent for a switch. */
  arg?: string;
  /** Help lines. */
  help: string[];
  /** Reads the value (a switch gets `""`) into `o`; throws a UsageError naming the flag. */
  set(o: RunFlags, v: string, flag: string): void;
}

/** A limit flag: `--rpm N` and the like. */
function limitFlag(name: string, help: string): Flag {
  return {
    name,
    arg: "N",
    help: [help],
    set: (o, v, flag) => o.limits[name] = num(flag, v),
  };
}

/** A flag whose value must match `pattern`; else `expected` is said. */
function checked(
  v: string,
  flag: string,
  pattern: RegExp,
  expected: string,
  show: (v: string) => string = (x) => x,
): string {
  if (!pattern.test(v)) {
    throw new UsageError(
      `${flag} needs ${expected}: received ${JSON.stringify(show(v))}`,
    );
  }
  return v;
}

/** `--per-model` and `--per-key`: whose limits the given ones are. */
function perFlag(name: string, value: "all" | false, help: string[]): Flag {
  return {
    name,
    help,
    set(o) {
      if (o.perModel !== undefined) {
        throw new UsageError("--per-model and --per-key exclude each other");
      }
      o.perModel = value;
    },
  };
}

const RUN_FLAGS: Flag[] = [
  {
    name: "output",
    short: "o",
    arg: "FILE",
    help: [
      "results file (default: <input>.results.jsonl); an existing",
      "partial file is checked and resumed",
    ],
    set: (o, v, flag) => o.output = checked(v, flag, /./, "a file name"),
  },
  {
    name: "provider",
    arg: "P",
    help: [
      `${
        providers.map((p) => p.name).join(" | ")
      } (default: from the input format)`,
    ],
    set(o, v, flag) {
      const names = providers.map((p) => p.name);
      if (!names.includes(v)) {
        throw new UsageError(
          `${flag} must be ${names.join(" or ")}: received ${
            JSON.stringify(v)
          }`,
        );
      }
      o.provider = v;
    },
  },
  {
    name: "model",
    arg: "M",
    help: [
      "Gemini: the model of lines that name none (its batch",
      'lines carry no model; a line\'s own "model" wins)',
    ],
    set: (o, v, flag) =>
      o.model = checked(v, flag, /^(models\/)?[\w.-]+$/, "a model name"),
  },
  {
    name: "deployment",
    arg: "NAME",
    help: [
      "Azure OpenAI: the deployment every line goes to",
      '(default: each line\'s "model")',
    ],
    set: (o, v, flag) =>
      o.deployment = checked(v, flag, /^[\w.-]+$/, "a deployment name"),
  },
  {
    name: "api-version",
    arg: "V",
    help: [`Azure OpenAI: the api-version (default ${AZURE_API_VERSION})`],
    set: (o, v, flag) =>
      o.apiVersion = checked(
        v,
        flag,
        /^\d{4}-\d{2}-\d{2}(-preview)?$/,
        "a version such as 2024-10-21",
      ),
  },
  {
    name: "base-url",
    arg: "URL",
    help: [
      "API base URL (relays); default ANTHROPIC_BASE_URL /",
      "OPENAI_BASE_URL, else the provider's",
    ],
    set: (o, v, flag) =>
      o.baseURL = checked(v, flag, /^https?:\/\//, "an http(s) URL"),
  },
  limitFlag("rpm", "requests per minute"),
  limitFlag("rpd", "requests per day"),
  limitFlag("itpm", "input tokens per minute"),
  limitFlag("otpm", "output tokens per minute"),
  limitFlag("tpm", "tokens (input + output) per minute"),
  {
    ...limitFlag("tpd", "tokens (input + output) per day"),
    help: [
      "tokens (input + output) per day",
      "limits you do not give are learned from response",
      "headers, for each model (the provider's limits are per model)",
    ],
  },
  perFlag("per-model", "all", [
    "the limits given apply to each model separately",
    "(default: to all requests together, as a relay's might)",
  ]),
  perFlag("per-key", false, [
    "everything for the key as a whole, learned limits too",
  ]),
  {
    name: "no-find-pace",
    help: [
      "with no limits given or in the headers, do not find the",
      "pace from 429s (start at full --concurrency: for a server",
      "with no rate limits)",
    ],
    set: (o) => o.findPace = false,
  },
  {
    name: "redis",
    arg: "URL",
    help: [
      "share the limits (given, learned, pauses) with every",
      "process on this key through Redis (needs npm install redis;",
      "Bun uses its built-in client)",
    ],
    set: (o, v, flag) =>
      o.redis = checked(
        v,
        flag,
        /^rediss?:\/\//,
        "a redis:// or rediss:// URL",
        redactURL,
      ),
  },
  {
    name: "limiter-name",
    arg: "NAME",
    help: [
      "the shared limits' name (default: provider, base URL and",
      "a hash of the key; never the key)",
    ],
    set: (o, v, flag) =>
      o.limiterName = checked(v, flag, /^[^{}]+$/, "a name without braces"),
  },
  {
    name: "shard",
    arg: "K/N",
    help: [
      "run only share K of N (line i goes to shard i mod N + 1);",
      "N processes cover the file exactly once, each with its own",
      "output (default <input>.shard-K-of-N.results.jsonl) and resume",
    ],
    set(o, v, flag) {
      const m = /^(\d+)\/(\d+)$/.exec(v);
      const k = Number(m?.[1]);
      const n = Number(m?.[2]);
      if (!m || !(n >= 1) || !(k >= 1) || k > n) {
        throw new UsageError(
          `${flag} needs K/N with 1 <= K <= N (e.g. 2/4): received ${
            JSON.stringify(v)
          }`,
        );
      }
      o.shard = { k, n };
    },
  },
  {
    name: "concurrency",
    arg: "N",
    help: ["most requests in flight (default 8)"],
    set: (o, v, flag) => o.concurrency = num(flag, v),
  },
  {
    name: "retries",
    arg: "N",
    help: [
      "retries per request after errors (default 5); rate-limit",
      "429s pace a line and use none",
    ],
    set: (o, v, flag) => o.retries = num(flag, v, 0),
  },
  {
    name: "max-rate-limited-ms",
    arg: "N",
    help: [
      "how long one line may keep drawing rate-limit 429s, from",
      "its first, before it is written as errored (default",
      "900000: 15 minutes)",
    ],
    set: (o, v, flag) => o.maxRateLimitedMs = num(flag, v),
  },
  {
    name: "stream",
    help: [
      "use streaming requests (Messages, chat completions,",
      "Gemini's :streamGenerateContent; others are sent whole)",
    ],
    set: (o) => o.stream = true,
  },
  {
    name: "quiet",
    help: ["no progress output"],
    set: (o) => o.quiet = true,
  },
  {
    name: "window-ms",
    arg: "N",
    help: ['length of a "minute" (default 60000; for simulators)'],
    set: (o, v, flag) => o.windowMs = num(flag, v),
  },
  {
    name: "margin-ms",
    arg: "N",
    help: [
      "extra time each request is counted in its windows",
      "(default 0.5 % of the window, at most 1000; 0 = exact)",
    ],
    set: (o, v, flag) => o.marginMs = num(flag, v, 0),
  },
  {
    name: "progress-ms",
    arg: "N",
    help: [
      "progress line interval when stderr is not a terminal",
      "(default 3000)",
    ],
    set: (o, v, flag) => o.progressMs = num(flag, v),
  },
  {
    name: "batch-api",
    help: [
      "send the lines through the provider's Batch API (Anthropic,",
      "OpenAI, Gemini): half the price, results within 24 hours; same",
      "output; a rerun collects, never submits a line twice",
    ],
    set: (o) => o.batchApi = true,
  },
  {
    name: "poll-ms",
    arg: "N",
    help: [
      "with --batch-api: how often to ask how the batches stand",
      "(default 30000)",
    ],
    set: (o, v, flag) => o.pollMs = num(flag, v, 10),
  },
  {
    name: "retry-errored",
    help: [
      "also redo lines whose recorded result is errored (e.g. 5xx",
      "after all retries); the output is rewritten in input order",
    ],
    set: (o) => o.retryErrored = true,
  },
  {
    name: "report",
    arg: "FILE.html",
    help: [
      "write a self-contained page: each limit's use over",
      "time, 429s and retries, latency, totals, and which",
      "limit bound the run",
    ],
    set: (o, v, flag) =>
      o.report = checked(v, flag, /^[^-]/, "a file name (e.g. run.html)"),
  },
  {
    name: "lang",
    arg: "zh|en",
    help: ["the report's language (default from LANG)"],
    set(o, v, flag) {
      if (v !== "en" && v !== "zh") {
        throw new UsageError(
          `${flag} must be en or zh: received ${JSON.stringify(v)}`,
        );
      }
      o.lang = v;
    },
  },
  {
    name: "dry-run",
    help: [
      "validate and plan only: request and token totals (input",
      "estimated, output at max_tokens) and the least time the",
      "limits given allow, naming the binding limit (per model",
      "with --per-model); sends nothing",
    ],
    set: (o) => o.dryRun = true,
  },
];

/** The flags of `paceline demo`. */
const DEMO_FLAGS: Flag[] = [
  {
    name: "requests",
    arg: "N",
    help: ["how many requests (default 200)"],
    set: (o, v, flag) => o.requests = num(flag, v),
  },
  { name: "quiet", help: ["no progress output"], set: (o) => o.quiet = true },
];

/** The help lines of a flag table. */
function flagHelp(flags: Flag[]): string {
  const out: string[] = [];
  for (const f of flags) {
    const left = `  ${f.short ? `-${f.short}, ` : ""}--${f.name}${
      f.arg ? ` ${f.arg}` : ""
    }`;
    f.help.forEach((line, i) => {
      const head = i === 0 ? left : "";
      out.push(
        `${head.padEnd(25)}${
          head.length > 24 && i === 0 ? "\n" + " ".repeat(25) : ""
        }${line}`,
      );
    });
  }
  return out.join("\n");
}

/**
 * Reads `args` against a flag table with `node:util`'s `parseArgs` (it runs
 * in Deno and Bun too): `--flag value` and `--flag=value` alike. Returns
 * the flags given and the positional arguments; `help` when `-h`/`--help`
 * is among them.
 */
function readFlags(
  args: string[],
  flags: Flag[],
  command: string,
): { o: RunFlags; positionals: string[]; help: boolean } {
  const options: Record<
    string,
    { type: "string" | "boolean"; short?: string }
  > = {
    help: { type: "boolean", short: "h" },
  };
  for (const f of flags) {
    options[f.name] = {
      type: f.arg ? "string" : "boolean",
      ...(f.short ? { short: f.short } : {}),
    };
  }
  const { tokens } = parseArgs({
    args,
    options,
    allowPositionals: true,
    strict: false,
    tokens: true,
  });
  const o: RunFlags = { limits: {} };
  const positionals: string[] = [];
  let help = false;
  const byName = new Map(flags.map((f) => [f.name, f]));
  for (const t of tokens) {
    if (t.kind === "positional") positionals.push(t.value);
    if (t.kind !== "option") continue;
    if (t.name === "help") {
      help = true;
      continue;
    }
    const flag = byName.get(t.name);
    if (!flag) {
      const near = didYouMean(
        t.rawName,
        flags.map((f) => `--${f.name}`).concat("--help"),
      );
      throw new UsageError(
        `unknown option ${t.rawName}${
          near ? `; did you mean ${near}?` : ""
        } (see paceline ${command} --help)`,
      );
    }
    if (!flag.arg && t.value !== undefined) {
      throw new UsageError(
        `${t.rawName} takes no value: received ${JSON.stringify(t.value)}`,
      );
    }
    if (flag.arg && t.value === undefined) {
      throw new UsageError(`${t.rawName} needs ${flag.arg}: received nothing`);
    }
    flag.set(o, t.value ?? "", t.rawName);
  }
  return { o, positionals, help };
}

/** The known flag closest to a misspelt one (at most 2 edits away), if any. */
function didYouMean(flag: string, known: string[]): string | undefined {
  let best: { name: string; d: number } | undefined;
  for (const name of known) {
    const d = editDistance(flag, name);
    if (d <= 2 && (!best || d < best.d)) best = { name, d };
  }
  return best?.name;
}

/** Levenshtein distance, one row at a time. */
function editDistance(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const next = [i];
    for (let j = 1; j <= b.length; j++) {
      next[j] = Math.min(
        row[j]! + 1,
        next[j - 1]! + 1,
        row[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    row = next;
  }
  return row[b.length]!;
}

/** `paceline run`: its flags read and checked, then the run. */
async function runCommand(
  rest: string[],
  io: { out: (s: string) => void; err: (s: string) => void; isTTY: boolean },
): Promise<number> {
  const { o, positionals, help } = readFlags(rest, RUN_FLAGS, "run");
  if (help) {
    io.out(helpText());
    return 0;
  }
  if (positionals.length > 1) {
    throw new UsageError(
      `one input file, please: got ${positionals.join(" and ")}`,
    );
  }
  const input = positionals[0];
  if (!input) throw new UsageError("run needs an input file; see --help");
  if (o.redis && o.perModel === "all") {
    throw new UsageError(
      "--per-model with --redis is not supported yet: give the limits for the key (learned limits are per model and shared anyway)",
    );
  }
  if (!o.redis && o.limiterName) {
    throw new UsageError(
      "--limiter-name names the limits shared through --redis: give --redis URL too",
    );
  }
  return await run({
    input,
    output: o.output ?? defaultOutput(input, o.shard),
    provider: o.provider,
    baseURL: o.baseURL,
    limits: o.limits,
    windowMs: o.windowMs ?? 60_000,
    marginMs: o.marginMs,
    concurrency: o.concurrency ?? 8,
    retries: o.retries ?? 5,
    maxRateLimitedMs: o.maxRateLimitedMs ?? 900_000,
    stream: o.stream ?? false,
    findPace: o.findPace ?? true,
    deployment: o.deployment,
    apiVersion: o.apiVersion,
    model: o.model,
    quiet: o.quiet ?? false,
    retryErrored: o.retryErrored ?? false,
    dryRun: o.dryRun ?? false,
    batchApi: o.batchApi ?? false,
    pollMs: o.pollMs,
    perModel: o.perModel,
    report: o.report,
    lang: o.lang ?? langFromEnv(),
    redis: o.redis,
    limiterName: o.limiterName,
    shard: o.shard,
    progressMs: o.progressMs,
    ...io,
  });
}

/** Parses argv and runs; returns the exit code. */
export async function main(argv: string[], io: {
  out: (s: string) => void;
  err: (s: string) => void;
  isTTY: boolean;
} = {
  out: (s: string) => void process.stdout.write(s),
  err: (s: string) => void process.stderr.write(s),
  isTTY: Boolean(process.stderr.isTTY),
}): Promise<number> {
  try {
    const [command, ...rest] = argv;
    if (
      !command || command === "--help" || command === "-h" || command === "help"
    ) {
      io.out(helpText());
      return command ? 0 : 2;
    }
    if (command === "--version" || command === "-v") {
      io.out(`${VERSION}\n`);
      return 0;
    }
    if (command === "demo") {
      const { o, positionals, help } = readFlags(rest, DEMO_FLAGS, "demo");
      if (help) {
        io.out(helpText());
        return 0;
      }
      if (positionals.length) {
        throw new UsageError(
          `demo takes no arguments: received ${positionals[0]}`,
        );
      }
      return await demo(o.requests ?? 200, {
        ...io,
        quiet: o.quiet ?? false,
        lang: langFromEnv(),
      });
    }
    if (command === "cancel") {
      const { positionals, help } = readFlags(rest, [], "cancel");
      if (help) {
        io.out(helpText());
        return 0;
      }
      if (positionals.length !== 1) {
        throw new UsageError(
          "cancel needs the output file of a --batch-api run: paceline cancel OUTPUT",
        );
      }
      return await cancelBatches(positionals[0]!, io);
    }
    if (command !== "run") {
      throw new UsageError(
        `unknown command ${JSON.stringify(command)}; see --help`,
      );
    }
    return await runCommand(rest, io);
  } catch (e) {
    if (
      e instanceof UsageError || (e instanceof RangeError) ||
      (e instanceof TypeError && /option|must/.test(e.message))
    ) {
      io.err(`paceline: ${e.message}\n`);
      return 2;
    }
    io.err(`paceline: ${(e as Error)?.message ?? e}\n`);
    return 1;
  }
}

/** Whether this file is the program (also through the npm bin symlink). */
function isMainModule(): boolean {
  const main = (import.meta as { main?: boolean }).main;
  if (main !== undefined) return main;
  const script = process.argv[1];
  if (!script) return false;
  try {
    return import.meta.url ===
      pathToFileURL(realpathSync(resolve(script))).href;
  } catch {
    return false;
  }
}
const isMain = isMainModule();
if (isMain) {
  let settled = false;
  main(process.argv.slice(2)).then((code) => {
    settled = true;
    process.exitCode = code;
  });
  // A run that stops making progress with nothing left to wait for must
  // never look like success.
  process.on("beforeExit", () => {
    if (settled) return;
    process.stderr.write(
      "\npaceline: internal error: the run stopped with work unfinished and nothing left to wait for. Results kept so far are in the output and journal; run the same command again to resume.\n",
    );
    process.exit(70);
  });
}
