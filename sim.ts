/**
 * An LLM API simulator: a real HTTP server on loopback that speaks the
 * Anthropic Messages API and the OpenAI chat completions, Responses,
 * completions, embeddings and moderations APIs closely enough for the
 * official SDKs, enforces rate limits strictly (sliding log) or as a token
 * bucket — for the whole key, or per model — sends the providers'
 * rate-limit headers, and injects faults from a seeded PRNG. Azure OpenAI
 * routes (`/openai/deployments/{deployment}/chat/completions`,
 * `completions`, `embeddings`) need an `api-version` query parameter, take
 * the key in `api-key`, count against the deployment's windows and also a
 * sixth of the requests limit per sixth of the window (Azure's short
 * windows), send only `x-ratelimit-remaining-*` headers, and answer 429s
 * with `retry-after`, `retry-after-ms` and `x-ms-retry-after-ms`. Gemini
 * routes (`/v1beta/models/{model}:generateContent`,
 * `:streamGenerateContent?alt=sse`) take `x-goog-api-key`, send no limit
 * headers, and say their limits in `RESOURCE_EXHAUSTED` 429 bodies. The
 * Batch APIs — Anthropic's Message Batches (`/v1/messages/batches`),
 * OpenAI's Files and Batches (`/v1/files`, `/v1/batches`) and Gemini's
 * batch mode (`:batchGenerateContent`, `/v1beta/batches`) — end a batch
 * after `batchMs`, results not in request order, some expired or errored
 * with `batchFaults`. paceline's tests, demo and benchmarks run against it.
 *
 * Standalone: `node dist/sim.js --port 8787 --rpm 50 --itpm 30000 --otpm 8000`
 * or `deno run -A sim.ts ...`; `--help` lists the flags. `GET /_sim/stats`
 * returns the counters of {@linkcode Simulator.stats} as JSON.
 *
 * ## Token counting (the simulator's own, documented rule)
 *
 * Text is split into runs: each CJK character (Han, kana, Hangul) is one
 * token; each run of ASCII letters and digits is ⌈length / 4⌉ tokens; every
 * other non-space character is one token; whitespace is free. Input tokens
 * are the tokens of the system prompt, every text part of every message,
 * and the JSON of tool definitions, plus 3 per message and 1 per request.
 * Output is deterministic: a hash of the prompt picks 8–47 tokens (never more
 * than `max_tokens`), as four-letter words of one token each.
 *
 * @module
 */
import {
  createServer,
  type IncomingMessage,
  type ServerResponse,
} from "node:http";
import type { Socket } from "node:net";
import { resolve } from "node:path";
import process from "node:process";
import { pathToFileURL } from "node:url";

/** Rate limits, each optional; all share one window length. */
export interface SimLimits {
  /** Requests per window. */
  requests?: number;
  /** Input tokens per window. */
  inputTokens?: number;
  /** Output tokens per window. */
  outputTokens?: number;
  /** Input + output tokens per window. */
  tokens?: number;
  /** The window length in ms; default 60,000. Compress it for tests. */
  windowMs?: number;
}

/** Fault probabilities (0–1), drawn from the seeded PRNG for every request. */
export interface SimFaults {
  /** HTTP 500 `api_error`. */
  error500?: number;
  /** HTTP 529 `overloaded_error`. */
  overloaded529?: number;
  /** HTTP 503. */
  unavailable503?: number;
  /** Connection reset before any byte is sent. */
  reset?: number;
  /** Headers delayed by `slowHeadersMs`. */
  slowHeaders?: number;
  /** How long slow headers take; default 200 ms. */
  slowHeadersMs?: number;
  /** Streaming: an `event: error` (overloaded) after some deltas. */
  midStreamError?: number;
  /** Streaming: the connection drops after some deltas. */
  truncatedStream?: number;
}

/** Options for {@linkcode startSimulator}. */
export interface SimulatorOptions {
  /** Port; default 0 (a free port). */
  port?: number;
  /** Interface; default `127.0.0.1`. */
  host?: string;
  /** If set, requests must carry it as `x-api-key` or `Authorization: Bearer`. */
  apiKey?: string;
  /** Rate limits; none by default. */
  limits?: SimLimits;
  /**
   * Limits of particular models (the body's `model`), as providers limit
   * per model: each model listed here has windows of its own (same window
   * length as `limits`) and its own rate-limit headers; other models share
   * `limits`.
   */
  modelLimits?: Record<string, Omit<SimLimits, "windowMs">>;
  /**
   * `"sliding"` (default): a strict log over accepted requests; a request
   * that would push any window over its limit is refused. `"bucket"`:
   * continuous refill at `limit / windowMs`, as Anthropic documents.
   */
  mode?: "sliding" | "bucket";
  /**
   * How output tokens count against the limits: `"actual"` (default;
   * Anthropic's current docs) or `"max_tokens"` reserved at admission
   * (OpenAI style).
   */
  outputCounting?: "actual" | "max_tokens";
  /** Fault injection. */
  faults?: SimFaults;
  /**
   * How long a Message Batch (`POST /v1/messages/batches`) takes to end,
   * ms; default 1,000. Its results come back in an order of their own,
   * not the requests' (as Anthropic's do).
   */
  batchMs?: number;
  /**
   * Shares (0–1) of batch requests that come back expired, or errored
   * (500), instead of answered; default none.
   */
  batchFaults?: { expired?: number; errored?: number };
  /**
   * OpenAI batches: the most input tokens one model's running batches may
   * hold; a batch that would pass it fails validation with
   * `token_limit_exceeded`, as OpenAI's do. Default: no limit.
   */
  batchEnqueuedTokens?: number;
  /**
   * After this many accepted requests, every request gets the
   * non-retryable spend-limit 429 (Gemini routes: the per-day requests
   * quota's 429, which names it and carries a short `retryDelay`).
   */
  quotaAfter?: number;
  /** Latency model: `baseMs + perOutputTokenMs × output tokens`. Default 0 and 0. */
  latency?: { baseMs?: number; perOutputTokenMs?: number };
  /** PRNG seed; default 1. */
  seed?: number;
  /** Also send `retry-after-ms` on 429s (precise for compressed windows). Default false. */
  retryAfterMs?: boolean;
  /** Round token `remaining` headers to the nearest thousand, as Anthropic does. Default false. */
  roundTokenRemaining?: boolean;
  /**
   * Send rate-limit headers (`anthropic-ratelimit-*`, `x-ratelimit-*`).
   * Default true; `false` stands in for a relay that passes none on: its
   * limits show only as 429s with a whole-second `retry-after`.
   */
  limitHeaders?: boolean;
  /**
   * Prompt caching as the providers document it (on by default; `false`
   * turns it off). Anthropic: the prefix up to the last `cache_control`
   * breakpoint (tools, then system, then messages) is written by a request
   * and read by later ones for 5 minutes after its last use (1 hour with
   * `"ttl": "1h"`); it is usable once the response that wrote it has begun
   * (requests arriving before that write it too); a prefix shorter than
   * `minTokens` is silently not cached; input-token windows count uncached
   * input and cache writes, not reads; usage reports
   * `cache_creation_input_tokens` and `cache_read_input_tokens`. A cache
   * write larger than a whole window is let into an empty window (it fills
   * it). OpenAI (chat, Responses): prompts of at least 1,024 tokens cache
   * everything before the last message automatically;
   * `cached_tokens` in 128-token steps; cached tokens still count toward
   * the limits.
   */
  promptCache?: false | { minTokens?: number };
  /**
   * Scripted faults for particular logical requests, keyed by client request
   * id (see {@linkcode SimStats.perClient}): the first `times` attempts
   * (default every attempt) wait `delayMs` and/or fail with `status` (429,
   * 500, 503 or 529, in the provider's error shape; `retryAfter` is sent as
   * the `retry-after` header). For tests of one slow or failing line in a
   * batch.
   */
  perClientFaults?: Record<
    string,
    {
      status?: 429 | 500 | 503 | 529;
      delayMs?: number;
      times?: number;
      retryAfter?: string;
    }
  >;
}

/** Counters from {@linkcode Simulator.stats}. */
export interface SimStats {
  /** Every HTTP request received. */
  received: number;
  /** Requests answered 200. */
  accepted: number;
  /** 429s by the window that refused them. */
  rateLimited: Record<
    "requests" | "inputTokens" | "outputTokens" | "tokens",
    number
  >;
  /** Other refusals. */
  rejected: { auth: number; invalid: number; notFound: number; quota: number };
  /** Injected faults by kind. */
  faults: Record<
    | "error500"
    | "overloaded529"
    | "unavailable503"
    | "reset"
    | "slowHeaders"
    | "midStreamError"
    | "truncatedStream",
    number
  >;
  /** The most accepted in any window of `windowMs`, per dimension. */
  maxInWindow: Record<
    "requests" | "inputTokens" | "outputTokens" | "tokens",
    number
  >;
  /**
   * Batches created (either provider's; OpenAI's that then fail validation
   * too), the requests in them, those canceled, OpenAI's that failed
   * validation, and files uploaded to `/v1/files`.
   */
  batches: {
    created: number;
    requests: number;
    canceled: number;
    failed: number;
    files: number;
  };
  /** Simulator clock (`performance.now()`) of the first and last accepted request; -1 before any. */
  acceptedAt: { first: number; last: number };
  /**
   * True token totals of completed responses (streams included): input as
   * the provider counts it toward its limits (Anthropic: without cache reads).
   */
  usage: { inputTokens: number; outputTokens: number };
  /**
   * Prompt cache writes and reads (requests admitted), in all and per
   * prefix (a short id of the model and the prefix), with the prefix's tokens.
   */
  cache: {
    writes: number;
    reads: number;
    prefixes: Record<string, { writes: number; reads: number; tokens: number }>;
  };
  /**
   * Per logical client request (header `x-client-request-id`, or Anthropic
   * `metadata.user_id`, or OpenAI `user`): attempts, and completed successes.
   */
  perClient: Record<string, { attempts: number; succeeded: number }>;
  /** Client request ids in the order their successful responses completed. */
  completed: string[];
  /** The outcome of every request in arrival order: status, or a fault name. */
  log: string[];
  /** When each `log` entry happened (simulator clock, `performance.now()`). */
  logAt: number[];
}

/** A running simulator. */
export interface Simulator {
  /** Base URL, e.g. `http://127.0.0.1:40123` (the SDKs append `/v1/...`). */
  url: string;
  /** Stops the server and drops open connections. */
  close(): Promise<void>;
  /** A snapshot of the counters. */
  stats(): SimStats;
  /** Clears rate-limit state, counters and the PRNG (back to the seed). */
  reset(): void;
}

type Dim = "requests" | "inputTokens" | "outputTokens" | "tokens";
const DIMS: Dim[] = ["requests", "inputTokens", "outputTokens", "tokens"];

/** The simulator's tokenizer; see the module doc. */
export function countTokens(text: string): number {
  let n = 0;
  let run = 0;
  for (const ch of text) {
    const c = ch.codePointAt(0)!;
    if ((c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122)) {
      run++;
      continue;
    }
    if (run) {
      n += Math.ceil(run / 4);
      run = 0;
    }
    if (/\s/.test(ch)) continue;
    n += 1; // CJK characters and any other symbol: one token each
  }
  if (run) n += Math.ceil(run / 4);
  return n;
}

/** All text of a content value: a string, or an array of parts with `text`. */
function contentText(content: unknown): string {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((p) =>
      typeof p === "string"
        ? p
        : typeof p?.text === "string"
        ? p.text
        : typeof p?.content === "string"
        ? p.content
        : ""
    ).join(" ");
  }
  return "";
}

/** The endpoints the simulator serves, by the path after `/v1/`. */
export type Kind =
  | "messages"
  | "messages/count_tokens"
  | "chat/completions"
  | "responses"
  | "completions"
  | "embeddings"
  | "moderations"
  | "generateContent";
const ROUTE =
  /\/v1\/(messages(?:\/count_tokens)?|chat\/completions|responses|completions|embeddings|moderations)$/;
/** Gemini: `/v1beta/models/{model}:generateContent` (or `:streamGenerateContent`). */
const GEMINI_ROUTE =
  /\/models\/([^/:]+):(generateContent|streamGenerateContent)$/;
/** Azure OpenAI: `/openai/deployments/{deployment}/{chat/completions|completions|embeddings}`. */
const AZURE_ROUTE =
  /\/openai\/deployments\/([^/]+)\/(chat\/completions|completions|embeddings)$/;
/** Tokens of a `prompt`/`input` value: a string, strings, token arrays, or parts. */
function textOrTokens(v: unknown): number {
  if (typeof v === "string") return countTokens(v);
  if (!Array.isArray(v)) return 0;
  if (typeof v[0] === "number") return v.length;
  let n = 0;
  for (const x of v) {
    n += Array.isArray(x) ? x.length : countTokens(contentText([x]));
  }
  return n;
}

/**
 * Input tokens of a request body, by the simulator's rule: messages (+ 3
 * each) and system for Messages and chat; `instructions` and `input` items
 * (+ 3 each) for Responses; the `prompt` or `input` for completions,
 * embeddings and moderations (token arrays count their length). Plus 1.
 */
export function inputTokensOf(
  body: Record<string, unknown>,
  kind: Kind = "messages",
): number {
  if (kind === "completions") return 1 + textOrTokens(body.prompt);
  if (kind === "generateContent") {
    const system = body.systemInstruction as { parts?: unknown } | undefined;
    let n = 1 + countTokens(contentText(system?.parts));
    for (const c of Array.isArray(body.contents) ? body.contents : []) {
      n += 3 + countTokens(contentText((c as { parts?: unknown })?.parts));
    }
    return n;
  }
  if (kind === "embeddings" || kind === "moderations") {
    return textOrTokens(body.input);
  }
  if (kind === "responses") {
    let n = 1 + countTokens(contentText(body.instructions));
    if (typeof body.input === "string") return n + countTokens(body.input);
    for (const item of body.input as unknown[]) {
      const it = item as Record<string, unknown> | null;
      n += 3 + countTokens(contentText(it?.content ?? it?.output));
    }
    return n;
  }
  let n = 1;
  n += countTokens(contentText(body.system));
  const messages = Array.isArray(body.messages) ? body.messages : [];
  for (const m of messages) {
    n += 3 + countTokens(contentText((m as { content?: unknown })?.content));
  }
  if (Array.isArray(body.tools)) n += countTokens(JSON.stringify(body.tools));
  return n;
}

const WORDS = [
  "time",
  "pace",
  "rate",
  "wait",
  "send",
  "then",
  "more",
  "data",
  "fast",
  "calm",
  "good",
  "work",
];

function hash(s: string): number {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return h >>> 0;
}

/** mulberry32: a small seeded PRNG. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A Go duration, as OpenAI writes its reset headers: `6m0s`, `1.5s`, `90ms`. */
export function goDuration(ms: number): string {
  if (ms < 1000) return `${Math.ceil(ms)}ms`;
  const h = Math.floor(ms / 3_600_000);
  const m = Math.floor((ms % 3_600_000) / 60_000);
  const s = +((ms % 60_000) / 1000).toFixed(3);
  return `${h ? `${h}h` : ""}${h || m ? `${m}m` : ""}${s}s`;
}

interface Entry {
  t: number;
  amount: number;
}

/** The limit state of one dimension. */
class Meter {
  log: Entry[] = [];
  head = 0;
  sum = 0;
  tokens: number; // bucket mode
  last = 0;
  maxSeen = 0;
  readonly limit: number;
  readonly windowMs: number;
  readonly bucket: boolean;
  constructor(limit: number, windowMs: number, bucket: boolean, now: number) {
    this.limit = limit;
    this.windowMs = windowMs;
    this.bucket = bucket;
    this.tokens = limit;
    this.last = now;
  }
  #expire(now: number): void {
    while (
      this.head < this.log.length &&
      this.log[this.head]!.t + this.windowMs <= now
    ) {
      this.sum -= this.log[this.head++]!.amount;
    }
    if (this.head > 1024 && this.head * 2 > this.log.length) {
      this.log = this.log.slice(this.head);
      this.head = 0;
    }
  }
  #refill(now: number): void {
    this.tokens = Math.min(
      this.limit,
      this.tokens + ((now - this.last) * this.limit) / this.windowMs,
    );
    this.last = now;
  }
  /** ms until `amount` fits; 0 if it fits now; Infinity if it never can. */
  waitFor(amount: number, now: number): number {
    if (amount > this.limit) return Infinity;
    if (this.bucket) {
      this.#refill(now);
      return amount <= this.tokens
        ? 0
        : ((amount - this.tokens) * this.windowMs) / this.limit;
    }
    this.#expire(now);
    let excess = this.sum + amount - this.limit;
    if (excess <= 0) return 0;
    for (let i = this.head; i < this.log.length; i++) {
      excess -= this.log[i]!.amount;
      if (excess <= 0) return this.log[i]!.t + this.windowMs - now;
    }
    return this.windowMs;
  }
  charge(amount: number, now: number): void {
    if (this.bucket) {
      this.#refill(now);
      this.tokens -= amount;
    }
    this.#expire(now);
    // Arrival times can come out of order (bodies finish reading in any
    // order); keep the log sorted by never stamping before the last entry.
    const last = this.log[this.log.length - 1];
    this.log.push({ t: last && last.t > now ? last.t : now, amount });
    this.sum += amount;
    if (this.sum > this.maxSeen) this.maxSeen = this.sum;
  }
  remaining(now: number): number {
    if (this.bucket) {
      this.#refill(now);
      return Math.max(0, Math.floor(this.tokens));
    }
    this.#expire(now);
    return Math.max(0, this.limit - this.sum);
  }
  /** ms until the meter is fully replenished. */
  resetIn(now: number): number {
    if (this.bucket) {
      this.#refill(now);
      return ((this.limit - this.tokens) * this.windowMs) / this.limit;
    }
    this.#expire(now);
    const last = this.log[this.log.length - 1];
    return this.sum > 0 && last ? last.t + this.windowMs - now : 0;
  }
}

/**
 * Starts a simulator.
 *
 * @param options Limits, mode, faults, auth; see {@linkcode SimulatorOptions}.
 * @returns The running simulator: its `url`, `stats()`, `reset()` and `close()`.
 */
export async function startSimulator(
  options: SimulatorOptions = {},
): Promise<Simulator> {
  const sim = new SimServer(checkSimOptions(options));
  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    sim.handle(req, res).catch((error) => {
      if (!res.headersSent) {
        res.writeHead(500, { "content-type": "application/json" });
        res.end(
          JSON.stringify({
            type: "error",
            error: { type: "api_error", message: String(error) },
          }),
        );
      } else res.destroy();
    });
  });
  server.on("connection", (s: Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(
      options.port ?? 0,
      options.host ?? "127.0.0.1",
      () => resolve(),
    );
  });
  const address = server.address() as { port: number };
  return {
    url: `http://${options.host ?? "127.0.0.1"}:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
    stats: () => structuredClone(sim.stats),
    reset: () => sim.reset(),
  };
}

/** The options with defaults filled in. */
type SimSettings =
  & Required<
    Omit<
      SimulatorOptions,
      | "apiKey"
      | "quotaAfter"
      | "perClientFaults"
      | "port"
      | "host"
      | "promptCache"
      | "batchEnqueuedTokens"
    >
  >
  & Pick<
    SimulatorOptions,
    "apiKey" | "quotaAfter" | "perClientFaults" | "batchEnqueuedTokens"
  >
  & { windowMs: number; promptCache: false | { minTokens: number } };

/** Checks the options of {@linkcode startSimulator}; throws naming the bad one. */
function checkSimOptions(options: SimulatorOptions): SimSettings {
  const limits = options.limits ?? {};
  const windowMs = limits.windowMs ?? 60_000;
  if (!(windowMs > 0)) {
    throw new RangeError(
      `startSimulator 'limits.windowMs' must be > 0: received ${windowMs}`,
    );
  }
  const modelLimits = options.modelLimits ?? {};
  for (
    const [where, l] of [
      ["limits", limits],
      ...Object.entries(modelLimits).map(([m, l]) => [`modelLimits.${m}`, l]),
    ] as [string, Omit<SimLimits, "windowMs">][]
  ) {
    for (const d of DIMS) {
      const v = l[d];
      if (v !== undefined && !(v > 0 && Number.isFinite(v))) {
        throw new RangeError(
          `startSimulator '${where}.${d}' must be a positive number: received ${v}`,
        );
      }
    }
  }
  const mode = options.mode ?? "sliding";
  if (mode !== "sliding" && mode !== "bucket") {
    throw new TypeError(
      `startSimulator 'mode' must be "sliding" or "bucket": received ${
        String(mode)
      }`,
    );
  }
  return {
    apiKey: options.apiKey,
    limits,
    modelLimits,
    mode,
    outputCounting: options.outputCounting ?? "actual",
    faults: options.faults ?? {},
    quotaAfter: options.quotaAfter,
    latency: options.latency ?? {},
    seed: options.seed ?? 1,
    retryAfterMs: options.retryAfterMs ?? false,
    roundTokenRemaining: options.roundTokenRemaining ?? false,
    limitHeaders: options.limitHeaders ?? true,
    batchMs: checkBatchMs(options.batchMs),
    batchFaults: checkBatchFaults(options.batchFaults),
    batchEnqueuedTokens: options.batchEnqueuedTokens,
    promptCache: checkPromptCache(options.promptCache),
    perClientFaults: options.perClientFaults,
    windowMs,
  };
}

/** The `batchMs` option, checked. */
function checkBatchMs(ms: number | undefined): number {
  if (ms === undefined) return 1000;
  if (!(ms >= 0 && Number.isFinite(ms))) {
    throw new RangeError(
      `startSimulator 'batchMs' must be a finite number >= 0: received ${
        String(ms)
      }`,
    );
  }
  return ms;
}

/** The `batchFaults` option, checked. */
function checkBatchFaults(
  f: SimulatorOptions["batchFaults"],
): { expired?: number; errored?: number } {
  for (const k of ["expired", "errored"] as const) {
    const x = f?.[k];
    if (x !== undefined && !(x >= 0 && x <= 1)) {
      throw new RangeError(
        `startSimulator 'batchFaults.${k}' must be a share from 0 to 1: received ${x}`,
      );
    }
  }
  return { ...f };
}

/** The `promptCache` option, checked. */
function checkPromptCache(
  option: SimulatorOptions["promptCache"],
): false | { minTokens: number } {
  if (option === false) return false;
  const minTokens = option?.minTokens ?? 1024;
  if (!(minTokens >= 0 && Number.isFinite(minTokens))) {
    throw new RangeError(
      `startSimulator 'promptCache.minTokens' must be a number ≥ 0: received ${minTokens}`,
    );
  }
  return { minTokens };
}

/** The counters of a fresh simulator. */
function newStats(): SimStats {
  return {
    received: 0,
    accepted: 0,
    rateLimited: { requests: 0, inputTokens: 0, outputTokens: 0, tokens: 0 },
    rejected: { auth: 0, invalid: 0, notFound: 0, quota: 0 },
    faults: {
      error500: 0,
      overloaded529: 0,
      unavailable503: 0,
      reset: 0,
      slowHeaders: 0,
      midStreamError: 0,
      truncatedStream: 0,
    },
    maxInWindow: { requests: 0, inputTokens: 0, outputTokens: 0, tokens: 0 },
    acceptedAt: { first: -1, last: -1 },
    batches: { created: 0, requests: 0, canceled: 0, failed: 0, files: 0 },
    usage: { inputTokens: 0, outputTokens: 0 },
    cache: { writes: 0, reads: 0, prefixes: {} },
    perClient: {},
    completed: [],
    log: [],
    logAt: [],
  };
}

/** One request being answered: what its route's handler needs. */
interface Exchange {
  id: string;
  kind: Kind;
  /** Sent to an Azure OpenAI route. */
  azure: boolean;
  body: Record<string, unknown>;
  res: ServerResponse;
  /** The windows it counts against. */
  meters: Partial<Record<Dim, Meter>>;
  input: number;
  maxTokens: number;
  words: string[];
  text: string;
  stop: "end_turn" | "max_tokens";
  model: string;
  /** Latency before the answer (spread over the events of a stream). */
  delay: number;
  /** Whether this stream breaks halfway: with an error event, or cut. */
  breaks: "error" | "cut" | undefined;
  /** Its prompt-cache lookup, if its prompt has a cacheable prefix. */
  cache: CacheLookup | undefined;
  /** Input tokens read from and written to the prompt cache. */
  cacheRead: number;
  cacheWrite: number;
  /** The response begins: a prefix it writes is usable from now. */
  begin(): void;
  /** Counts the exchange as completed (usage, per client). */
  done(): void;
}

/** What the prompt cache holds for a request's prefix, and what this request does with it. */
interface CacheLookup {
  key: string;
  /** The prefix's tokens (OpenAI: what it reports cached, in 128-token steps). */
  tokens: number;
  ttlMs: number;
  style: "anthropic" | "openai";
  role: "write" | "read";
}

/** A prefix found in a request, before the cache is asked about it. */
interface FoundPrefix {
  text: string;
  tokens: number;
  ttlMs: number;
}

/** Anthropic: every block up to the last `cache_control`, tools first, then system, then messages. */
function anthropicPrefix(
  body: Record<string, unknown>,
): FoundPrefix | undefined {
  const blocks: { where: string; block: Record<string, unknown> }[] = [];
  const add = (where: string, content: unknown): void => {
    if (typeof content === "string") {
      blocks.push({ where, block: { type: "text", text: content } });
    } else if (Array.isArray(content)) {
      for (const b of content) blocks.push({ where, block: b ?? {} });
    }
  };
  add("tools", body.tools);
  add("system", body.system);
  const messages = Array.isArray(body.messages) ? body.messages : [];
  messages.forEach((m, i) =>
    add(`message ${i} ${m?.role}`, (m as { content?: unknown })?.content)
  );
  let last = blocks.length - 1;
  while (last >= 0 && !blocks[last]!.block.cache_control) last--;
  if (last < 0) return undefined;
  const prefix = blocks.slice(0, last + 1);
  // The prefix's blocks by where they sit, counted as inputTokensOf counts.
  const parts = new Map<string, Record<string, unknown>[]>();
  for (const b of prefix) {
    const list = parts.get(b.where);
    if (list) list.push(b.block);
    else parts.set(b.where, [b.block]);
  }
  let tokens = 1;
  for (const [where, part] of parts) {
    tokens += where === "tools"
      ? countTokens(JSON.stringify(part))
      : (where === "system" ? 0 : 3) + countTokens(contentText(part));
  }
  const mark = blocks[last]!.block.cache_control as { ttl?: unknown };
  return {
    text: JSON.stringify(prefix),
    tokens,
    ttlMs: mark?.ttl === "1h" ? 3_600_000 : 300_000,
  };
}

/** OpenAI: everything before the last message (or input item) of a long enough prompt. */
function openaiPrefix(
  body: Record<string, unknown>,
  kind: Kind,
): FoundPrefix | undefined {
  const items = kind === "responses" ? body.input : body.messages;
  if (!Array.isArray(items) || items.length < 2) return undefined;
  const before = items.slice(0, -1) as {
    content?: unknown;
    output?: unknown;
  }[];
  let tokens = 1 + countTokens(contentText(body.instructions));
  for (const m of before) {
    tokens += 3 + countTokens(contentText(m?.content ?? m?.output));
  }
  return {
    text: JSON.stringify([body.instructions ?? null, before]),
    tokens,
    ttlMs: 300_000,
  };
}

/** Prompt caching as Anthropic and OpenAI document it; see {@linkcode SimulatorOptions.promptCache}. */
class SimCache {
  #entries = new Map<string, { usableAt: number; expiresAt: number }>();
  #minTokens: number;

  constructor(minTokens: number) {
    this.#minTokens = minTokens;
  }

  /** Whether a request would write or read its prefix, arriving `now`. */
  lookup(x: Exchange, now: number): CacheLookup | undefined {
    const style = x.kind === "messages"
      ? "anthropic"
      : x.kind === "chat/completions" || x.kind === "responses"
      ? "openai"
      : undefined;
    if (!style) return undefined;
    const found = style === "anthropic"
      ? anthropicPrefix(x.body)
      : openaiPrefix(x.body, x.kind);
    if (!found) return undefined;
    let tokens = Math.min(found.tokens, x.input - 1);
    if (tokens < (style === "openai" ? 1024 : this.#minTokens)) {
      return undefined;
    }
    if (style === "openai") tokens = Math.floor(tokens / 128) * 128;
    const key = `${hash(`${x.model}\n${found.text}`).toString(36)}.${
      found.text.length.toString(36)
    }`;
    const e = this.#entries.get(key);
    const read = e !== undefined && e.usableAt <= now && now < e.expiresAt;
    return {
      key,
      tokens,
      ttlMs: found.ttlMs,
      style,
      role: read ? "read" : "write",
    };
  }

  /** The request was admitted: count it; a read keeps the prefix for another lifetime. */
  commit(c: CacheLookup, now: number, stats: SimStats["cache"]): void {
    const per = stats.prefixes[c.key] ??= { writes: 0, reads: 0, tokens: 0 };
    per.tokens = c.tokens;
    const e = this.#entries.get(c.key);
    if (c.role === "read") {
      stats.reads++;
      per.reads++;
      e!.expiresAt = Math.max(e!.expiresAt, now + c.ttlMs);
      return;
    }
    stats.writes++;
    per.writes++;
    if (!e || e.expiresAt <= now) {
      this.#entries.set(c.key, { usableAt: Infinity, expiresAt: Infinity });
    }
  }

  /** The response that wrote a prefix has begun: others read it from now. */
  begun(c: CacheLookup, now: number): void {
    const e = this.#entries.get(c.key);
    if (!e || e.usableAt <= now) return;
    e.usableAt = now;
    e.expiresAt = now + c.ttlMs;
  }
}

/** The simulator's state and request handling: one route table, one pipeline. */
class SimServer {
  stats: SimStats = newStats();
  #s: SimSettings;
  #random: () => number;
  /** The windows of each model in `modelLimits`, and of all others (""). */
  #meterSets = new Map<string, Partial<Record<Dim, Meter>>>();
  /** Azure's short windows, by the requests window they shorten. */
  #short = new Map<Meter, Meter>();
  #batches: SimBatches = new SimBatches(this);
  #cache: SimCache | undefined;
  #seq = 0;

  constructor(settings: SimSettings) {
    this.#s = settings;
    this.#random = prng(settings.seed);
    this.reset();
  }

  /** How long a batch takes to end, ms. */
  get batchMs(): number {
    return this.#s.batchMs;
  }

  /** The shares of batch requests that come back expired or errored. */
  get batchFaults(): { expired?: number; errored?: number } {
    return this.#s.batchFaults;
  }

  /** OpenAI: the most input tokens one model's running batches may hold. */
  get batchEnqueuedTokens(): number | undefined {
    return this.#s.batchEnqueuedTokens;
  }

  /** The seeded PRNG (batch faults draw from it too). */
  random(): number {
    return this.#random();
  }

  /** The answer of route `kind` to `body`, outside the rate limits (a batch's), its usage counted. */
  answer(kind: Kind, body: Record<string, unknown>): unknown {
    const x = this.#exchange(
      `req_batch${String(++this.#seq).padStart(6, "0")}`,
      kind,
      body,
      undefined as unknown as ServerResponse, // never streamed
      this.meterSetOf(""),
      inputTokensOf(body, kind),
      undefined,
    );
    x.done();
    return ROUTES[kind].reply(x);
  }

  /** Clears windows, counters and the PRNG. */
  reset(): void {
    const s = this.#s;
    this.#random = prng(s.seed);
    this.#meterSets = new Map();
    this.#short = new Map();
    this.#batches = new SimBatches(this);
    for (
      const [model, l] of [["", s.limits], ...Object.entries(s.modelLimits)]
    ) {
      const meters: Partial<Record<Dim, Meter>> = {};
      for (const d of DIMS) {
        const limit = (l as SimLimits)[d];
        if (limit !== undefined) {
          meters[d] = new Meter(
            limit,
            s.windowMs,
            s.mode === "bucket",
            performance.now(),
          );
        }
      }
      this.#meterSets.set(model as string, meters);
    }
    this.#cache = s.promptCache
      ? new SimCache(s.promptCache.minTokens)
      : undefined;
    this.stats = newStats();
  }

  /** The Batch API routes (both providers'), if `path` is one: their answer. */
  #batchRoute(
    req: IncomingMessage,
    res: ServerResponse,
    id: string,
    path: string,
    bytes: Uint8Array,
  ): Promise<void> | undefined {
    const method = req.method ?? "GET";
    const batch = BATCH_ROUTE.exec(path);
    if (batch) {
      const anthropic = new Replier(this, res, id, "messages"); // its shapes
      if (!this.#authorized(req)) return settle(anthropic.unauthorized());
      return settle(this.#batches.anthropic(
        method,
        batch[1],
        batch[2],
        new TextDecoder().decode(bytes),
        anthropic,
        `http://${req.headers.host}`,
      ));
    }
    const gemini = GEMINI_BATCH_ROUTE.exec(path);
    if (gemini) {
      const google = new Replier(this, res, id, "generateContent"); // its shapes
      if (!this.#authorized(req)) return settle(google.unauthorized());
      return settle(this.#batches.gemini(
        method,
        gemini[1],
        gemini[2],
        gemini[3],
        new TextDecoder().decode(bytes),
        google,
      ));
    }
    const files = OPENAI_BATCH_ROUTE.exec(path);
    if (!files) return undefined;
    const openai = new Replier(this, res, id, "chat/completions"); // its shapes
    if (!this.#authorized(req)) return settle(openai.unauthorized());
    return settle(this.#batches.openai(
      method,
      files[1]!,
      files[2],
      files[3],
      bytes,
      req.headers["content-type"] ?? "",
      openai,
    ));
  }

  /** Answers one HTTP request: route, auth, checks, faults, quota, limits, reply. */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const arrived = performance.now(); // a request counts when it arrives, as on real servers
    this.stats.received++;
    const id = `req_sim${String(++this.#seq).padStart(6, "0")}`;
    const bytes = await readBytes(req);
    const raw = new TextDecoder().decode(bytes);
    const [path, query = ""] = (req.url ?? "/").split("?") as [string, string?];
    const azure = AZURE_ROUTE.exec(path);
    const gemini = GEMINI_ROUTE.exec(path);
    const kind =
      (gemini ? "generateContent" : azure?.[2] ?? ROUTE.exec(path)?.[1]) as
        | Kind
        | undefined;
    const reply = new Replier(this, res, id, kind);
    reply.azure = azure !== null;
    if (req.method === "GET" && path === "/_sim/stats") {
      // For a simulator in another process (benchmarks): its counters.
      this.stats.received--;
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(this.stats));
      return;
    }
    const batches = this.#batchRoute(req, res, id, path, bytes);
    if (batches) return batches;
    if (req.method !== "POST" || !kind) {
      this.stats.rejected.notFound++;
      return reply.error(
        404,
        "not_found_error",
        `No route for ${req.method} ${path}`,
      );
    }
    if (!this.#authorized(req)) return reply.unauthorized();
    const route = ROUTES[kind];
    const body = parseObject(raw);
    if (azure) {
      if (!new URLSearchParams(query).get("api-version")) {
        this.stats.rejected.invalid++;
        return reply.error(
          400,
          "invalid_request_error",
          "Missing required query parameter: api-version",
        );
      }
      // The deployment names the model; a body's "model" is not needed.
      if (body) body.model = decodeURIComponent(azure[1]!);
    }
    if (gemini && body) {
      body.model = decodeURIComponent(gemini[1]!);
      if (gemini[2] === "streamGenerateContent") body.stream = true;
    }
    const invalid = body === undefined
      ? "body: invalid JSON"
      : invalidFor(route, kind, body);
    if (invalid !== undefined || body === undefined) {
      this.stats.rejected.invalid++;
      return reply.error(400, "invalid_request_error", invalid!);
    }
    if (typeof body.model === "string") reply.model = body.model;
    if (typeof body.model === "string" && this.#meterSets.has(body.model)) {
      reply.meters = this.#meterSets.get(body.model)!;
    }
    const input = inputTokensOf(body, kind);
    if (kind === "messages/count_tokens") {
      return reply.json(200, { input_tokens: input });
    }
    const client = clientOf(req, body);
    if (await this.#scripted(client, reply)) return;
    const x = this.#exchange(id, kind, body, res, reply.meters, input, client);
    x.azure = reply.azure;
    if (await this.#faulted(req, reply, x)) return;
    if (this.#overQuota(reply)) return;
    x.cache = this.#cache?.lookup(x, arrived);
    if (!this.#admit(x, arrived, reply)) return;
    if (x.cache) {
      this.#cache!.commit(x.cache, arrived, this.stats.cache);
      if (x.cache.role === "read") x.cacheRead = x.cache.tokens;
      else if (x.cache.style === "anthropic") x.cacheWrite = x.cache.tokens;
    }
    if (body.stream === true) return streamReply(this, x, route);
    if (x.delay) await sleep(x.delay);
    x.begin();
    x.done();
    return reply.json(200, route.reply(x));
  }

  /** The rate-limit headers of a set of windows: Anthropic's and OpenAI's names. */
  rateHeaders(
    meters: Partial<Record<Dim, Meter>>,
    azure = false,
  ): Record<string, string> {
    const now = performance.now();
    const h: Record<string, string> = {};
    if (!this.#s.limitHeaders) return h;
    if (azure) {
      // Azure sends what is left, never the limit.
      for (const d of ["requests", "tokens"] as const) {
        const m = meters[d];
        if (m) h[`x-ratelimit-remaining-${d}`] = String(m.remaining(now));
      }
      return h;
    }
    const wall = Date.now();
    for (const [d, anthropic, openai] of HEADER_NAMES) {
      const m = meters[d];
      if (!m) continue;
      let remaining = m.remaining(now);
      if (this.#s.roundTokenRemaining && d !== "requests") {
        remaining = Math.round(remaining / 1000) * 1000;
      }
      const resetMs = m.resetIn(now);
      h[`anthropic-ratelimit-${anthropic}-limit`] = String(m.limit);
      h[`anthropic-ratelimit-${anthropic}-remaining`] = String(remaining);
      h[`anthropic-ratelimit-${anthropic}-reset`] = new Date(
        wall + Math.ceil(resetMs),
      ).toISOString().replace(/\.\d{3}Z$/, "Z");
      if (openai) {
        h[`x-ratelimit-limit-${openai}`] = String(m.limit);
        h[`x-ratelimit-remaining-${openai}`] = String(remaining);
        h[`x-ratelimit-reset-${openai}`] = goDuration(resetMs);
      }
    }
    return h;
  }

  /** The windows of a model with limits of its own, or of all others (`""`). */
  meterSetOf(model: string): Partial<Record<Dim, Meter>> {
    return this.#meterSets.get(model)!;
  }

  /** Logs an outcome (a status or a fault's name). */
  log(outcome: string): void {
    this.stats.logAt.push(performance.now());
    this.stats.log.push(outcome);
  }

  #authorized(req: IncomingMessage): boolean {
    const apiKey = this.#s.apiKey;
    if (apiKey === undefined) return true;
    const auth = req.headers["authorization"];
    const given = req.headers["x-api-key"] ?? req.headers["api-key"] ??
      req.headers["x-goog-api-key"] ??
      (typeof auth === "string" && auth.startsWith("Bearer ")
        ? auth.slice(7)
        : undefined);
    if (given === apiKey) return true;
    this.stats.rejected.auth++;
    return false;
  }

  /** A scripted fault for this client's attempt, if any: answered. */
  async #scripted(
    client: string | undefined,
    reply: Replier,
  ): Promise<boolean> {
    if (client === undefined) return false;
    const seen = this.stats.perClient[client] ??= { attempts: 0, succeeded: 0 };
    seen.attempts++;
    const scripted = this.#s.perClientFaults?.[client];
    if (!scripted || seen.attempts > (scripted.times ?? Infinity)) return false;
    if (scripted.delayMs) await sleep(scripted.delayMs);
    const h: Record<string, string> = scripted.retryAfter === undefined
      ? {}
      : { "retry-after": scripted.retryAfter };
    if (scripted.status === 529) {
      reply.error(529, "overloaded_error", "Overloaded", h);
    } else if (scripted.status === 429) {
      reply.error(429, "rate_limit_error", "Scripted 429", h);
    } else if (scripted.status) {
      reply.error(scripted.status, "api_error", "Scripted fault", h);
    } else return false;
    return true;
  }

  /** The exchange's deterministic answer, before admission. */
  #exchange(
    id: string,
    kind: Kind,
    body: Record<string, unknown>,
    res: ServerResponse,
    meters: Partial<Record<Dim, Meter>>,
    input: number,
    client: string | undefined,
  ): Exchange {
    const route = ROUTES[kind];
    const maxTokens = route.output ? route.maxTokens(body) : 0;
    const prompt = JSON.stringify(body.messages ?? body.input ?? body.prompt) +
      contentText(body.system ?? body.instructions);
    const outTokens = Math.min(maxTokens, 8 + (hash(prompt) % 40));
    const words = Array.from(
      { length: outTokens },
      (_, i) => WORDS[(hash(prompt) + i) % WORDS.length]!,
    );
    const latency = this.#s.latency;
    const stats = this.stats;
    const cache = this.#cache;
    return {
      id,
      kind,
      azure: false,
      body,
      res,
      meters,
      input,
      maxTokens,
      words,
      text: words.join(" "),
      stop: outTokens >= maxTokens ? "max_tokens" : "end_turn",
      model: typeof body.model === "string" ? body.model : "sim-model",
      delay: (latency.baseMs ?? 0) +
        (latency.perOutputTokenMs ?? 0) * outTokens,
      breaks: undefined,
      cache: undefined,
      cacheRead: 0,
      cacheWrite: 0,
      begin() {
        if (this.cache?.role === "write") {
          cache?.begun(this.cache, performance.now());
        }
      },
      done() {
        // Moderations report no usage; the others do, and it is counted
        // as the provider counts it (Anthropic: cache reads are not).
        if (kind !== "moderations") {
          stats.usage.inputTokens += input -
            (this.cache?.style === "anthropic" ? this.cacheRead : 0);
        }
        stats.usage.outputTokens += outTokens;
        if (client !== undefined) {
          stats.perClient[client]!.succeeded++;
          stats.completed.push(client);
        }
      },
    };
  }

  /** Injected faults come first and do not count against the limits; true if one answered. */
  async #faulted(
    req: IncomingMessage,
    reply: Replier,
    x: Exchange,
  ): Promise<boolean> {
    const f = this.#s.faults;
    const r = this.#random;
    const draw = {
      reset: r(),
      e500: r(),
      e529: r(),
      e503: r(),
      slow: r(),
      mid: r(),
      trunc: r(),
    };
    const faults = this.stats.faults;
    if (draw.reset < (f.reset ?? 0)) {
      faults.reset++;
      this.log("reset");
      req.socket.destroy();
      return true;
    }
    if (draw.slow < (f.slowHeaders ?? 0)) {
      faults.slowHeaders++;
      await sleep(f.slowHeadersMs ?? 200);
    }
    if (draw.e500 < (f.error500 ?? 0)) {
      faults.error500++;
      reply.error(500, "api_error", "Internal server error");
    } else if (draw.e529 < (f.overloaded529 ?? 0)) {
      faults.overloaded529++;
      reply.error(529, "overloaded_error", "Overloaded");
    } else if (draw.e503 < (f.unavailable503 ?? 0)) {
      faults.unavailable503++;
      reply.error(503, "api_error", "Service unavailable");
    } else {
      if (x.body.stream === true) {
        if (draw.mid < (f.midStreamError ?? 0)) x.breaks = "error";
        else if (draw.trunc < (f.truncatedStream ?? 0)) x.breaks = "cut";
      }
      return false;
    }
    return true;
  }

  /** Past `quotaAfter` accepted requests: the non-retryable spend-limit 429. */
  #overQuota(reply: Replier): boolean {
    const { quotaAfter } = this.#s;
    if (quotaAfter === undefined || this.stats.accepted < quotaAfter) {
      return false;
    }
    this.stats.rejected.quota++;
    reply.quota(quotaAfter);
    return true;
  }

  /** Strict admission against every window: charged, or refused with a 429. */
  /**
   * Azure's short window for a set of windows: requests per minute
   * evaluated over a sixth of the window, at a sixth of the limit.
   */
  #shortMeter(meters: Partial<Record<Dim, Meter>>): Meter | undefined {
    const m = meters.requests;
    if (!m) return undefined;
    let short = this.#short.get(m);
    if (!short) {
      short = new Meter(
        Math.max(1, Math.floor(m.limit / 6)),
        m.windowMs / 6,
        this.#s.mode === "bucket",
        performance.now(),
      );
      this.#short.set(m, short);
    }
    return short;
  }

  #admit(x: Exchange, now: number, reply: Replier): boolean {
    const outTokens = x.words.length;
    const outCharge = this.#s.outputCounting === "max_tokens"
      ? x.maxTokens
      : outTokens;
    // Anthropic counts uncached input and cache writes, not reads.
    const input = x.cache?.role === "read" && x.cache.style === "anthropic"
      ? x.input - x.cache.tokens
      : x.input;
    const cost: Record<Dim, number> = {
      requests: 1,
      inputTokens: input,
      outputTokens: outCharge,
      tokens: input + outCharge,
    };
    const writes = x.cache?.role === "write" && x.cache.style === "anthropic";
    let wait = 0;
    let refusedBy: Dim | undefined;
    for (const d of DIMS) {
      const m = x.meters[d];
      // A cache write larger than the whole window is let into an empty one.
      const w = m && writes && cost[d] > m.limit
        ? m.resetIn(now)
        : m?.waitFor(cost[d], now) ?? 0;
      if (w > wait) {
        wait = w;
        refusedBy = d;
      }
    }
    const short = reply.azure ? this.#shortMeter(x.meters) : undefined;
    const shortWait = short?.waitFor(1, now) ?? 0;
    if (shortWait > wait) {
      wait = shortWait;
      refusedBy = "requests";
    }
    const stats = this.stats;
    if (refusedBy) {
      stats.rateLimited[refusedBy]++;
      reply.rateLimited(
        refusedBy,
        wait,
        this.#s.windowMs,
        this.#s.retryAfterMs || reply.azure,
      );
      return false;
    }
    short?.charge(1, now);
    for (const d of DIMS) {
      const m = x.meters[d];
      if (!m) continue;
      m.charge(cost[d], now);
      stats.maxInWindow[d] = Math.max(stats.maxInWindow[d], m.maxSeen);
    }
    stats.accepted++;
    if (stats.acceptedAt.first < 0) stats.acceptedAt.first = now;
    stats.acceptedAt.last = now;
    return true;
  }
}

/** A route's answer, settled or not, as a promise. */
function settle(answer: void | Promise<void>): Promise<void> {
  return Promise.resolve(answer);
}

/** `/v1/messages/batches`, `…/{id}`, `…/{id}/results`, `…/{id}/cancel`. */
const BATCH_ROUTE =
  /\/v1\/messages\/batches(?:\/([\w-]+))?(?:\/(results|cancel))?$/;
/** OpenAI's Files (`/v1/files`, `…/{id}`, `…/{id}/content`) and Batches (`/v1/batches`, `…/{id}`, `…/{id}/cancel`). */
const OPENAI_BATCH_ROUTE =
  /\/v1\/(files|batches)(?:\/([\w-]+))?(?:\/(content|cancel))?$/;
/** Gemini's Batch API: `/v1beta/models/{model}:batchGenerateContent`, `/v1beta/batches`, `…/batches/{id}`, `…/batches/{id}:cancel`. */
const GEMINI_BATCH_ROUTE =
  /\/v1beta\/(?:models\/([^/:]+):batchGenerateContent|batches(?:\/([\w-]+))?(?::(cancel))?)$/;
/** The endpoints an OpenAI batch may be for. */
const OPENAI_BATCH_ENDPOINTS = [
  "/v1/chat/completions",
  "/v1/responses",
  "/v1/completions",
  "/v1/embeddings",
  "/v1/moderations",
];

/** One request of a batch: its id, route and body. */
interface SimBatchRequest {
  customId: string;
  kind: Kind;
  body: Record<string, unknown>;
}

/** What became of one batch request. */
type SimBatchResult =
  | { type: "succeeded"; body: unknown }
  | { type: "errored" | "expired" | "canceled" };

/** One batch (either provider's): its requests, and when it ends. */
interface SimBatch {
  id: string;
  /** Epoch ms. */
  createdAt: number;
  /** `performance.now()` when it was created, and when it ends (sooner when canceled). */
  startsAt: number;
  endsAt: number;
  canceled: boolean;
  cancelAt?: number;
  requests: SimBatchRequest[];
  /** OpenAI: the endpoint, input file, metadata, and why validation failed. */
  endpoint?: string;
  inputFileId?: string;
  metadata?: unknown;
  failure?: { code: string; message: string; line: number | null }[];
  /** Every request's result, once it has ended, in an order of their own. */
  results?: { request: SimBatchRequest; result: SimBatchResult }[];
  /** OpenAI: the output and error files, once it has ended. */
  outputFileId?: string | null;
  errorFileId?: string | null;
}

/** A file uploaded to `/v1/files`. */
interface SimFile {
  id: string;
  filename: string;
  purpose: string;
  createdAt: number;
  text: string;
}

/**
 * The providers' Batch APIs, with time compressed: a batch ends `batchMs`
 * after it is created, each request answered as its route would, outside
 * the rate limits (batches have their own); `batchFaults` makes some come
 * back errored or expired; results are never in request order.
 *
 * Anthropic's Message Batches (docs.anthropic.com/en/api/creating-message-batches):
 * create, list, retrieve, results (JSONL), cancel. OpenAI's Files and Batches
 * (platform.openai.com/docs/api-reference/batch): upload a JSONL file
 * (multipart, `purpose=batch`), create a batch for one endpoint, list,
 * retrieve, cancel; the output and error files come back through
 * `/v1/files/{id}/content`. A batch is `validating` for its first tenth; a
 * file with a bad line, more than 50,000 requests, or (with
 * `batchEnqueuedTokens`) more input tokens than one model may have
 * enqueued fails validation, as OpenAI's do. Gemini's batch mode
 * (ai.google.dev/api/batch-api): `:batchGenerateContent` with inlined
 * requests, get, list, `:cancel`; the batch is the operation's metadata,
 * its inlined responses in request order, each with its request's metadata.
 */
class SimBatches {
  #sim: SimServer;
  #batches = new Map<string, SimBatch>();
  #files = new Map<string, SimFile>();
  #seq = 0;

  constructor(sim: SimServer) {
    this.#sim = sim;
  }

  /** Anthropic's routes. */
  anthropic(
    method: string,
    id: string | undefined,
    action: string | undefined,
    raw: string,
    reply: Replier,
    base: string,
  ): void {
    if (!id && method === "POST") {
      return this.#createAnthropic(raw, reply, base);
    }
    if (!id && method === "GET") {
      return reply.json(
        200,
        this.#list("msgbatch_", (b) => this.#view(b, base)),
      );
    }
    const b = id ? this.#batches.get(id) : undefined;
    if (!b || !b.id.startsWith("msgbatch_")) {
      return reply.error(404, "not_found_error", `No batch ${String(id)}`);
    }
    if (method === "POST" && action === "cancel") {
      this.#cancel(b);
      return reply.json(200, this.#view(b, base));
    }
    if (method === "GET" && action === "results") {
      if (performance.now() < b.endsAt) {
        return reply.error(
          400,
          "invalid_request_error",
          `Batch ${b.id} is still processing; results are available once it has ended`,
        );
      }
      const lines = this.#results(b).map(({ request, result }) =>
        JSON.stringify({
          custom_id: request.customId,
          result: anthropicResult(result),
        })
      );
      return reply.text(200, lines.join("\n") + "\n");
    }
    if (method === "GET" && !action) {
      return reply.json(200, this.#view(b, base));
    }
    return reply.error(404, "not_found_error", `No route for ${method} ${id}`);
  }

  /** OpenAI's Files and Batches routes. */
  openai(
    method: string,
    what: string,
    id: string | undefined,
    action: string | undefined,
    raw: Uint8Array,
    contentType: string,
    reply: Replier,
  ): Promise<void> | void {
    if (what === "files") {
      if (!id && method === "POST") {
        return this.#upload(raw, contentType, reply);
      }
      const f = id ? this.#files.get(id) : undefined;
      if (!f) {
        return reply.error(
          404,
          "invalid_request_error",
          `No such File object: ${id}`,
        );
      }
      if (method === "GET" && action === "content") {
        return reply.text(200, f.text);
      }
      if (method === "GET" && !action) return reply.json(200, fileView(f));
      return reply.error(
        404,
        "invalid_request_error",
        `No route for ${method} ${id}`,
      );
    }
    if (!id && method === "POST") return this.#createOpenAI(raw, reply);
    if (!id && method === "GET") {
      return reply.json(200, {
        object: "list",
        ...this.#list("batch_", (b) => this.#openaiView(b)),
      });
    }
    const b = id ? this.#batches.get(id) : undefined;
    if (!b || !b.id.startsWith("batch_")) {
      return reply.error(
        404,
        "invalid_request_error",
        `No such Batch object: ${id}`,
      );
    }
    if (method === "POST" && action === "cancel") {
      this.#cancel(b);
      return reply.json(200, this.#openaiView(b));
    }
    if (method === "GET" && !action) {
      return reply.json(200, this.#openaiView(b));
    }
    return reply.error(
      404,
      "invalid_request_error",
      `No route for ${method} ${id}`,
    );
  }

  /** Gemini's routes (ai.google.dev/api/batch-api): inlined requests only. */
  gemini(
    method: string,
    model: string | undefined,
    id: string | undefined,
    action: string | undefined,
    raw: string,
    reply: Replier,
  ): void {
    if (model !== undefined && method === "POST") {
      return this.#createGemini(model, raw, reply);
    }
    if (!id && method === "GET") {
      const { data } = this.#list("batches/", (b) => this.#geminiView(b));
      return reply.json(200, { operations: data }); // no nextPageToken: one page
    }
    const b = this.#batches.get(`batches/${id}`);
    if (!b) {
      return reply.error(404, "NOT_FOUND", `Batch batches/${id} not found.`);
    }
    if (method === "POST" && action === "cancel") {
      this.#cancel(b);
      return reply.json(200, {});
    }
    if (method === "GET" && !action) {
      return reply.json(200, this.#geminiView(b));
    }
    return reply.error(404, "NOT_FOUND", `No route for ${method} ${id}`);
  }

  #createGemini(model: string, raw: string, reply: Replier): void {
    const batch = parseObject(raw)?.batch as
      | Record<string, unknown>
      | undefined;
    const input = (batch?.inputConfig ?? batch?.input_config) as
      | { requests?: { requests?: unknown } }
      | undefined;
    const requests = input?.requests?.requests;
    const name = batch?.displayName ?? batch?.display_name;
    const invalid = typeof name !== "string" || name === ""
      ? "batch.display_name: required"
      : !Array.isArray(requests) || requests.length === 0
      ? "batch.input_config.requests.requests: a non-empty list is required"
      : requests.map((r, i) => {
        const request = (r as { request?: unknown })?.request;
        return typeof request !== "object" || request === null ||
            !Array.isArray((request as { contents?: unknown }).contents)
          ? `batch.input_config.requests.requests[${i}].request.contents: required`
          : undefined;
      }).find((why) => why);
    if (invalid) {
      this.#sim.stats.rejected.invalid++;
      return reply.error(400, "INVALID_ARGUMENT", invalid);
    }
    const b = this.#add({
      id: `batches/sim${String(++this.#seq).padStart(6, "0")}`,
      requests: (requests as {
        request: Record<string, unknown>;
        metadata?: { key?: unknown };
      }[])
        .map((r, i) => ({
          customId: String(r.metadata?.key ?? i),
          kind: "generateContent" as Kind,
          body: { ...r.request, model },
        })),
      metadata: { displayName: name, model },
    });
    reply.json(200, this.#geminiView(b));
  }

  /** Gemini's view: an operation whose metadata is the batch (with its output once done). */
  #geminiView(b: SimBatch): Record<string, unknown> {
    const now = performance.now();
    const ended = now >= b.endsAt;
    const { displayName, model } = b.metadata as {
      displayName: string;
      model: string;
    };
    const n = b.requests.length;
    let ok = 0;
    let failed = 0;
    let output: Record<string, unknown> | undefined;
    if (ended) {
      // In request order, as Gemini's inlined responses are.
      const byId = new Map(this.#results(b).map((x) => [x.request, x.result]));
      const list = b.requests.map((request) => {
        const result = byId.get(request)!;
        if (result.type === "succeeded") ok++;
        else failed++;
        return { ...geminiResult(result), metadata: { key: request.customId } };
      });
      output = { inlinedResponses: { inlinedResponses: list } };
    } else ok = this.#doneSoFar(b);
    const state = ended
      ? b.canceled ? "BATCH_STATE_CANCELLED" : "BATCH_STATE_SUCCEEDED"
      : now < b.startsAt + (b.endsAt - b.startsAt) / 10
      ? "BATCH_STATE_PENDING"
      : "BATCH_STATE_RUNNING";
    const metadata = {
      "@type":
        "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
      model: `models/${model}`,
      displayName,
      createTime: new Date(b.createdAt).toISOString(),
      updateTime: new Date().toISOString(),
      ...(ended ? { endTime: new Date().toISOString() } : {}),
      batchStats: {
        requestCount: String(n),
        successfulRequestCount: String(ok),
        failedRequestCount: String(failed),
        pendingRequestCount: String(n - ok - failed),
      },
      state,
      name: b.id,
      ...(output ? { output } : {}),
    };
    return {
      name: b.id,
      metadata,
      done: ended,
      ...(output
        ? {
          response: {
            "@type":
              "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput",
            ...output,
          },
        }
        : {}),
    };
  }

  /** Both list routes: newest first, as the providers list them. */
  #list(
    prefix: string,
    view: (b: SimBatch) => Record<string, unknown>,
  ): Record<string, unknown> {
    const data = [...this.#batches.values()]
      .filter((b) => b.id.startsWith(prefix)).reverse().map(view);
    return {
      data,
      has_more: false,
      first_id: data[0]?.id ?? null,
      last_id: data.at(-1)?.id ?? null,
    };
  }

  #cancel(b: SimBatch): void {
    const now = performance.now();
    if (now < b.endsAt && !b.canceled && !b.failure) {
      b.canceled = true;
      b.cancelAt = Date.now();
      // Canceling takes a moment (OpenAI: up to 10 minutes).
      b.endsAt = Math.min(
        b.endsAt,
        now + Math.min(100, this.#sim.batchMs / 10),
      );
      this.#sim.stats.batches.canceled++;
    }
  }

  #add(
    b: Omit<SimBatch, "startsAt" | "endsAt" | "createdAt" | "canceled">,
  ): SimBatch {
    const now = performance.now();
    const batch: SimBatch = {
      ...b,
      createdAt: Date.now(),
      startsAt: now,
      endsAt: now + this.#sim.batchMs,
      canceled: false,
    };
    this.#batches.set(batch.id, batch);
    this.#sim.stats.batches.created++;
    this.#sim.stats.batches.requests += batch.requests.length;
    return batch;
  }

  #createAnthropic(raw: string, reply: Replier, base: string): void {
    const body = parseObject(raw);
    const requests = body?.requests;
    const seen = new Set<string>();
    const invalid = !Array.isArray(requests) || requests.length === 0
      ? "requests: a non-empty array is required"
      : requests.length > 100_000
      ? "requests: at most 100,000 per batch"
      : requests.map((r, i) => {
        const id = (r as { custom_id?: unknown })?.custom_id;
        const params = (r as { params?: unknown })?.params;
        if (typeof id !== "string" || id === "" || seen.has(id)) {
          return `requests.${i}.custom_id: a unique non-empty string is required`;
        }
        seen.add(id);
        if (typeof params !== "object" || params === null) {
          return `requests.${i}.params: required`;
        }
        const why = invalidFor(
          ROUTES.messages,
          "messages",
          params as Record<string, unknown>,
        );
        return why && `requests.${i}.params.${why}`;
      }).find((why) => why);
    if (invalid) {
      this.#sim.stats.rejected.invalid++;
      return reply.error(400, "invalid_request_error", invalid);
    }
    const b = this.#add({
      id: `msgbatch_sim${String(++this.#seq).padStart(6, "0")}`,
      requests:
        (requests as { custom_id: string; params: Record<string, unknown> }[])
          .map((r) => ({
            customId: r.custom_id,
            kind: "messages",
            body: r.params,
          })),
    });
    reply.json(200, this.#view(b, base));
  }

  /** Anthropic's view of a batch, as `GET …/batches/{id}` returns it. */
  #view(b: SimBatch, base: string): Record<string, unknown> {
    const ended = performance.now() >= b.endsAt;
    const counts = {
      processing: 0,
      succeeded: 0,
      errored: 0,
      canceled: 0,
      expired: 0,
    };
    if (!ended) {
      counts.succeeded = this.#doneSoFar(b);
      counts.processing = b.requests.length - counts.succeeded;
    } else for (const { result } of this.#results(b)) counts[result.type]++;
    return {
      id: b.id,
      type: "message_batch",
      processing_status: ended
        ? "ended"
        : b.canceled
        ? "canceling"
        : "in_progress",
      request_counts: counts,
      ended_at: ended ? new Date().toISOString() : null,
      created_at: new Date(b.createdAt).toISOString(),
      expires_at: new Date(b.createdAt + 86_400_000).toISOString(),
      cancel_initiated_at: b.cancelAt
        ? new Date(b.cancelAt).toISOString()
        : null,
      archived_at: null,
      results_url: ended ? `${base}/v1/messages/batches/${b.id}/results` : null,
    };
  }

  /** Requests finished so far of a batch still running: linear in time. */
  #doneSoFar(b: SimBatch): number {
    const span = b.endsAt - b.startsAt;
    const f = span > 0 ? (performance.now() - b.startsAt) / span : 1;
    return Math.floor(b.requests.length * Math.min(1, Math.max(0, f)));
  }

  /**
   * The results, computed once: each request answered as its route would,
   * except the share `batchFaults` makes errored or expired, and (when the
   * batch was canceled before it ended) every other one canceled; in an
   * order of their own (interleaved from both ends).
   */
  #results(b: SimBatch): NonNullable<SimBatch["results"]> {
    if (b.results) return b.results;
    const { expired = 0, errored = 0 } = this.#sim.batchFaults;
    const sim = this.#sim;
    const all = b.requests.map((request, i) => {
      const draw = sim.random();
      const result: SimBatchResult = b.canceled && i % 2 === 1
        ? { type: "canceled" }
        : draw < expired
        ? { type: "expired" }
        : draw < expired + errored
        ? { type: "errored" }
        : {
          type: "succeeded",
          body: this.#sim.answer(request.kind, request.body),
        };
      return { request, result };
    });
    const out: typeof all = [];
    for (let lo = 0, hi = all.length - 1; lo <= hi; lo++, hi--) {
      out.push(all[hi]!);
      if (lo < hi) out.push(all[lo]!);
    }
    return b.results = out;
  }

  /** `POST /v1/files`: a multipart upload (`purpose`, `file`). */
  async #upload(
    raw: Uint8Array,
    contentType: string,
    reply: Replier,
  ): Promise<void> {
    let form: FormData;
    try {
      form = await new Request("http://sim/", {
        method: "POST",
        headers: { "content-type": contentType },
        body: raw as Uint8Array<ArrayBuffer>,
      }).formData();
    } catch {
      return reply.error(
        400,
        "invalid_request_error",
        "expected a multipart/form-data body",
      );
    }
    const file = form.get("file");
    const purpose = form.get("purpose");
    if (typeof file === "string" || file === null) {
      return reply.error(400, "invalid_request_error", "file: required");
    }
    if (purpose !== "batch") {
      return reply.error(
        400,
        "invalid_request_error",
        `purpose: expected "batch": received ${JSON.stringify(purpose)}`,
      );
    }
    const f: SimFile = {
      id: `file-sim${String(++this.#seq).padStart(6, "0")}`,
      filename: file.name,
      purpose,
      createdAt: Date.now(),
      text: await file.text(),
    };
    this.#files.set(f.id, f);
    this.#sim.stats.batches.files++;
    reply.json(200, fileView(f));
  }

  /** `POST /v1/batches`: a batch of an uploaded file's requests. */
  #createOpenAI(raw: Uint8Array, reply: Replier): void {
    const body = parseObject(new TextDecoder().decode(raw));
    const file = this.#files.get(String(body?.input_file_id));
    const refuse = (message: string): void => {
      this.#sim.stats.rejected.invalid++;
      reply.error(400, "invalid_request_error", message);
    };
    if (!file || file.purpose !== "batch") {
      return refuse(
        `input_file_id: no batch file ${JSON.stringify(body?.input_file_id)}`,
      );
    }
    if (!OPENAI_BATCH_ENDPOINTS.includes(String(body?.endpoint))) {
      return refuse(
        `endpoint: must be one of ${OPENAI_BATCH_ENDPOINTS.join(", ")}`,
      );
    }
    if (body?.completion_window !== "24h") {
      return refuse(`completion_window: must be "24h"`);
    }
    const endpoint = body.endpoint as string;
    const { requests, failure } = this.#validate(file.text, endpoint);
    const b = this.#add({
      id: `batch_sim${String(++this.#seq).padStart(6, "0")}`,
      requests,
      endpoint,
      inputFileId: file.id,
      metadata: body.metadata ?? null,
      failure,
    });
    if (failure) this.#sim.stats.batches.failed++;
    reply.json(200, this.#openaiView(b));
  }

  /** An OpenAI batch file's requests, or why validation fails it. */
  #validate(
    text: string,
    endpoint: string,
  ): { requests: SimBatchRequest[]; failure?: SimBatch["failure"] } {
    const requests: SimBatchRequest[] = [];
    const errors: NonNullable<SimBatch["failure"]> = [];
    const seen = new Set<string>();
    const kind = endpoint.slice(4) as Kind;
    text.split("\n").forEach((line, i) => {
      if (line.trim() === "" || errors.length >= 10) return;
      const o = parseObject(line);
      const id = o?.custom_id;
      const why = !o
        ? "invalid JSON"
        : typeof id !== "string" || id === "" || seen.has(id)
        ? "custom_id: a unique non-empty string is required"
        : o.method !== "POST"
        ? `method: must be "POST"`
        : o.url !== endpoint
        ? `url: ${
          JSON.stringify(o.url)
        } is not this batch's endpoint ${endpoint}`
        : typeof o.body !== "object" || o.body === null
        ? "body: required"
        : invalidFor(ROUTES[kind], kind, o.body as Record<string, unknown>);
      if (why) {
        errors.push({
          code: "invalid_request",
          message: `Line ${i + 1}: ${why}`,
          line: i + 1,
        });
        return;
      }
      seen.add(id as string);
      requests.push({
        customId: id as string,
        kind,
        body: o!.body as Record<string, unknown>,
      });
    });
    const inputs = kind === "embeddings"
      ? requests.reduce((n, r) => {
        const input = r.body.input;
        return n + (Array.isArray(input) && typeof input[0] !== "number"
          ? input.length
          : 1);
      }, 0)
      : 0;
    if (!errors.length && inputs > 50_000) {
      errors.push({
        code: "too_many_inputs",
        message:
          `The batch input file has ${inputs} embedding inputs; an embeddings batch holds at most 50,000.`,
        line: null,
      });
    }
    if (!errors.length && requests.length > 50_000) {
      errors.push({
        code: "too_many_requests",
        message:
          `The batch input file has ${requests.length} requests; a batch holds at most 50,000.`,
        line: null,
      });
    }
    if (!errors.length) {
      const over = this.#overEnqueued(requests);
      if (over) {
        errors.push({
          code: "token_limit_exceeded",
          message: over,
          line: null,
        });
      }
    }
    return errors.length ? { requests, failure: errors } : { requests };
  }

  /** With `batchEnqueuedTokens`: why these requests would enqueue too many input tokens for a model. */
  #overEnqueued(requests: SimBatchRequest[]): string | undefined {
    const limit = this.#sim.batchEnqueuedTokens;
    if (limit === undefined) return undefined;
    const enqueued = new Map<string, number>();
    const add = (r: SimBatchRequest): void => {
      const model = String(r.body.model);
      enqueued.set(
        model,
        (enqueued.get(model) ?? 0) + inputTokensOf(r.body, r.kind),
      );
    };
    const now = performance.now();
    for (const b of this.#batches.values()) {
      if (b.endpoint && !b.failure && now < b.endsAt) b.requests.forEach(add);
    }
    const before = new Map(enqueued);
    requests.forEach(add);
    for (const [model, n] of enqueued) {
      if (n > limit && n !== before.get(model)) {
        return `Enqueued token limit reached for ${model} in organization org-sim. Limit: ${
          limit.toLocaleString("en-US")
        } enqueued tokens. Please try again once some in_progress batches have been completed.`;
      }
    }
    return undefined;
  }

  /** OpenAI's view of a batch, as `GET /v1/batches/{id}` returns it. */
  #openaiView(b: SimBatch): Record<string, unknown> {
    const now = performance.now();
    const s = (ms: number | undefined): number | null =>
      ms === undefined ? null : Math.floor(ms / 1000);
    const validated = now >= b.startsAt + (b.endsAt - b.startsAt) / 10 ||
      b.canceled;
    const ended = now >= b.endsAt;
    const counts = { total: b.requests.length, completed: 0, failed: 0 };
    let status: string;
    if (b.failure && validated) status = "failed";
    else if (!validated) status = "validating";
    else if (!ended) {
      status = b.canceled ? "cancelling" : "in_progress";
      counts.completed = this.#doneSoFar(b);
    } else {
      const results = this.#results(b);
      for (const { result } of results) {
        if (result.type === "succeeded") counts.completed++;
        else counts.failed++;
      }
      this.#makeFiles(b);
      status = b.canceled
        ? "cancelled"
        : results.some((r) => r.result.type === "expired")
        ? "expired"
        : "completed";
    }
    if (b.failure) counts.total = 0;
    return {
      id: b.id,
      object: "batch",
      endpoint: b.endpoint,
      errors: b.failure && validated
        ? {
          object: "list",
          data: b.failure.map((e) => ({ ...e, param: null })),
        }
        : null,
      input_file_id: b.inputFileId,
      completion_window: "24h",
      status,
      output_file_id: ended && !b.failure ? b.outputFileId ?? null : null,
      error_file_id: ended && !b.failure ? b.errorFileId ?? null : null,
      created_at: s(b.createdAt),
      in_progress_at: validated && !b.failure ? s(b.createdAt) : null,
      expires_at: s(b.createdAt + 86_400_000),
      completed_at: ended && status === "completed" ? s(Date.now()) : null,
      failed_at: status === "failed" ? s(Date.now()) : null,
      expired_at: status === "expired" ? s(Date.now()) : null,
      cancelling_at: s(b.cancelAt),
      cancelled_at: status === "cancelled" ? s(Date.now()) : null,
      request_counts: counts,
      metadata: b.metadata ?? null,
    };
  }

  /** An ended OpenAI batch's output file (successes) and error file (the rest), made once. */
  #makeFiles(b: SimBatch): void {
    if (b.outputFileId !== undefined) return;
    const output: string[] = [];
    const errors: string[] = [];
    for (const { request, result } of this.#results(b)) {
      const row = openaiRow(
        `batch_req_sim${String(++this.#seq).padStart(6, "0")}`,
        request,
        result,
      );
      (result.type === "succeeded" ? output : errors).push(JSON.stringify(row));
    }
    const file = (lines: string[], kind: string): string | null => {
      if (!lines.length) return null;
      const f: SimFile = {
        id: `file-sim${String(++this.#seq).padStart(6, "0")}`,
        filename: `${b.id}_${kind}.jsonl`,
        purpose: kind === "output" ? "batch_output" : "batch_error",
        createdAt: Date.now(),
        text: lines.join("\n") + "\n",
      };
      this.#files.set(f.id, f);
      return f.id;
    };
    b.outputFileId = file(output, "output");
    b.errorFileId = file(errors, "error");
  }
}

/** An Anthropic batch result for a request's outcome. */
function anthropicResult(result: SimBatchResult): Record<string, unknown> {
  if (result.type === "succeeded") {
    return { type: "succeeded", message: result.body };
  }
  if (result.type === "errored") {
    return {
      type: "errored",
      error: {
        type: "error",
        error: { type: "api_error", message: "Internal server error" },
      },
    };
  }
  return { type: result.type };
}

/** A Gemini inlined response for a request's outcome. */
function geminiResult(result: SimBatchResult): Record<string, unknown> {
  if (result.type === "succeeded") return { response: result.body };
  const [code, status, message] = result.type === "errored"
    ? [500, "INTERNAL", "Internal error encountered."]
    : result.type === "expired"
    ? [
      504,
      "DEADLINE_EXCEEDED",
      "The batch expired before this request was processed.",
    ]
    : [
      499,
      "CANCELLED",
      "The batch was cancelled before this request was processed.",
    ];
  return { error: { code, message, status } };
}

/** An OpenAI batch output or error file row for a request's outcome. */
function openaiRow(
  id: string,
  request: SimBatchRequest,
  result: SimBatchResult,
): Record<string, unknown> {
  const requestId = `req_${id.slice(10)}`;
  if (result.type === "succeeded" || result.type === "errored") {
    return {
      id,
      custom_id: request.customId,
      response: result.type === "succeeded"
        ? { status_code: 200, request_id: requestId, body: result.body }
        : {
          status_code: 500,
          request_id: requestId,
          body: {
            error: {
              message: "The server had an error while processing your request.",
              type: "server_error",
              param: null,
              code: null,
            },
          },
        },
      error: null,
    };
  }
  return {
    id,
    custom_id: request.customId,
    response: null,
    error: result.type === "expired"
      ? {
        code: "batch_expired",
        message:
          "This request could not be executed before the completion window expired.",
      }
      : {
        code: "batch_cancelled",
        message: "This request was cancelled before it was executed.",
      },
  };
}

/** A File object, as `/v1/files` returns it. */
function fileView(f: SimFile): Record<string, unknown> {
  return {
    id: f.id,
    object: "file",
    bytes: new TextEncoder().encode(f.text).length,
    created_at: Math.floor(f.createdAt / 1000),
    filename: f.filename,
    purpose: f.purpose,
    status: "processed",
    expires_at: null,
  };
}

/** gRPC status names of the HTTP statuses the simulator answers Gemini requests with. */
const GRPC_STATUS: Record<number, string> = {
  400: "INVALID_ARGUMENT",
  403: "PERMISSION_DENIED",
  404: "NOT_FOUND",
  429: "RESOURCE_EXHAUSTED",
  500: "INTERNAL",
  503: "UNAVAILABLE",
  529: "UNAVAILABLE",
};

/** Rate-limit header names per window: Anthropic's, and OpenAI's where it has one. */
const HEADER_NAMES: [Dim, string, string | undefined][] = [
  ["requests", "requests", "requests"],
  ["tokens", "tokens", "tokens"],
  ["inputTokens", "input-tokens", undefined],
  ["outputTokens", "output-tokens", undefined],
];

/** Writes one request's non-streaming answers, in its provider's error shape. */
class Replier {
  meters: Partial<Record<Dim, Meter>>;
  /** An Azure OpenAI route: its headers and short windows. */
  azure = false;
  /** The request's model (Gemini's 429s name it). */
  model: string | undefined;
  #gemini = false;
  #sim: SimServer;
  #res: ServerResponse;
  #id: string;
  #openai: boolean;

  constructor(
    sim: SimServer,
    res: ServerResponse,
    id: string,
    kind: Kind | undefined,
  ) {
    this.#sim = sim;
    this.#res = res;
    this.#id = id;
    // An unknown route gets OpenAI's error shape.
    this.#openai = kind === undefined || ROUTES[kind].style === "openai";
    this.#gemini = kind !== undefined && ROUTES[kind].style === "gemini";
    this.meters = sim.meterSetOf("");
  }

  json(
    status: number,
    body: unknown,
    headers: Record<string, string> = {},
  ): void {
    this.#res.writeHead(status, {
      "content-type": "application/json",
      "request-id": this.#id,
      "x-request-id": this.#id,
      ...(this.#gemini ? {} : this.#sim.rateHeaders(this.meters, this.azure)),
      ...headers,
    });
    this.#res.end(JSON.stringify(body));
    this.#sim.log(String(status));
  }

  /** A 200 body that is not JSON (a batch's JSONL results). */
  text(status: number, body: string): void {
    this.#res.writeHead(status, {
      "content-type": "application/binary",
      "request-id": this.#id,
    });
    this.#res.end(body);
    this.#sim.log(String(status));
  }

  error(
    status: number,
    type: string,
    message: string,
    headers: Record<string, string> = {},
    extra: Record<string, unknown> = {},
  ): void {
    if (this.#gemini) {
      return this.json(status, {
        error: {
          code: status,
          message,
          status: GRPC_STATUS[status] ?? "UNKNOWN",
          ...extra,
        },
      }, headers);
    }
    this.json(
      status,
      this.#openai
        ? { error: { message, type, param: null, code: extra.code ?? type } }
        : {
          type: "error",
          error: { type, message, ...extra },
          request_id: this.#id,
        },
      headers,
    );
  }

  /**
   * Gemini's 429: `RESOURCE_EXHAUSTED` with a `google.rpc.QuotaFailure`
   * naming the quota and its value, and a `google.rpc.RetryInfo` delay
   * (a per-day quota's is short too, though it resets only at midnight).
   */
  #geminiQuota(id: string, what: string, limit: number, wait: number): void {
    const model = String(this.model ?? "");
    const delay = `${Math.max(1, Math.ceil(wait / 1000))}s`;
    this.json(429, {
      error: {
        code: 429,
        message:
          `You exceeded your current quota, please check your plan and billing details. Quota exceeded for metric: ${what}, limit: ${limit}, model: ${model}. Please retry in ${delay}.`,
        status: "RESOURCE_EXHAUSTED",
        details: [
          {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            violations: [{
              quotaMetric: `generativelanguage.googleapis.com/${what}`,
              quotaId: id,
              quotaDimensions: { location: "global", model },
              quotaValue: String(limit),
            }],
          },
          {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            retryDelay: delay,
          },
        ],
      },
    });
  }

  unauthorized(): void {
    if (this.#gemini) {
      // Gemini answers a bad key with 400 INVALID_ARGUMENT.
      return this.error(
        400,
        "",
        "API key not valid. Please pass a valid API key.",
      );
    }
    if (!this.#openai) {
      return this.error(401, "authentication_error", "invalid x-api-key");
    }
    this.json(401, {
      error: {
        message: "Incorrect API key provided.",
        type: "invalid_request_error",
        param: null,
        code: "invalid_api_key",
      },
    });
  }

  quota(perDay: number): void {
    if (this.#gemini) {
      return this.#geminiQuota(
        "GenerateRequestsPerDayPerProjectPerModel",
        "requests",
        perDay,
        1000,
      );
    }
    if (!this.#openai) {
      return this.error(
        429,
        "rate_limit_error",
        "You have reached your specified workspace API usage limits.",
        {},
        { details: { error_code: "enforced_spend_limit_reached" } },
      );
    }
    this.json(429, {
      error: {
        message:
          "You exceeded your current quota, please check your plan and billing details.",
        type: "insufficient_quota",
        param: null,
        code: "insufficient_quota",
      },
    });
  }

  rateLimited(
    refusedBy: Dim,
    wait: number,
    windowMs: number,
    retryAfterMs: boolean,
  ): void {
    const headers: Record<string, string> = {};
    if (wait !== Infinity) {
      headers["retry-after"] = String(Math.max(1, Math.ceil(wait / 1000)));
      if (retryAfterMs) headers["retry-after-ms"] = String(Math.ceil(wait));
      if (this.azure) headers["x-ms-retry-after-ms"] = String(Math.ceil(wait));
    }
    const what = refusedBy === "requests"
      ? "requests"
      : refusedBy.replace("T", " t").toLowerCase();
    if (this.#gemini) {
      const id = refusedBy === "requests"
        ? "GenerateRequestsPerMinutePerProjectPerModel"
        : "GenerateContentInputTokensPerModelPerMinute";
      return this.#geminiQuota(
        id,
        refusedBy,
        this.meters[refusedBy]!.limit,
        wait,
      );
    }
    if (!this.#openai) {
      return this.error(
        429,
        "rate_limit_error",
        `This request would exceed the rate limit for your organization of ${
          this.meters[refusedBy]!.limit
        } ${what} per ${windowMs} ms.`,
        headers,
      );
    }
    this.json(429, {
      error: {
        message:
          `Rate limit reached for ${what} per ${windowMs} ms. Please try again in ${
            (wait / 1000).toFixed(3)
          }s.`,
        type: refusedBy === "requests" ? "requests" : "tokens",
        param: null,
        code: "rate_limit_exceeded",
      },
    }, headers);
  }
}

/** The whole request body. */
async function readBytes(req: IncomingMessage): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  for await (const c of req) chunks.push(c as Uint8Array);
  return concat(chunks);
}

/** A JSON object, or `undefined` for anything else. */
function parseObject(raw: string): Record<string, unknown> | undefined {
  try {
    const v = JSON.parse(raw);
    return typeof v === "object" && v !== null ? v : undefined;
  } catch {
    return undefined;
  }
}

/** The logical request id: `x-client-request-id`, Anthropic `metadata.user_id`, or OpenAI `user`. */
function clientOf(
  req: IncomingMessage,
  body: Record<string, unknown>,
): string | undefined {
  return (req.headers["x-client-request-id"] as string | undefined) ??
    ((body.metadata as { user_id?: string } | undefined)?.user_id) ??
    (typeof body.user === "string" ? body.user : undefined);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** One endpoint the simulator serves: its checks, its answer, its stream. */
interface Route {
  /** Whose wire format: error bodies and auth failures follow it. */
  style: "anthropic" | "openai" | "gemini";
  /** Whether it answers with output tokens (embeddings and moderations do not). */
  output: boolean;
  /** The field a request cannot do without, and its check. */
  needs: { field: string; check: (v: unknown) => boolean };
  /** The request's output cap; NaN when a required one is missing. */
  maxTokens(body: Record<string, unknown>): number;
  /** The 200 body of a whole (non-streaming) answer. */
  reply(x: Exchange): unknown;
  /** Writes a streamed answer's events; absent: the route does not stream. */
  stream?(x: Exchange, write: (s: string) => void): Generator<number, boolean>;
}

/** The reason a body is refused with a 400, or `undefined`. */
function invalidFor(
  route: Route,
  kind: Kind,
  body: Record<string, unknown>,
): string | undefined {
  if (!route.needs.check(body[route.needs.field])) {
    return `${route.needs.field}: field required`;
  }
  if (kind === "messages/count_tokens") return undefined;
  if (route.output && !(route.maxTokens(body) >= 1)) {
    return "max_tokens: field required";
  }
  if (body.stream === true && !route.stream) {
    return `stream: the simulator does not stream /v1/${kind}`;
  }
  return undefined;
}

const isText = (v: unknown): boolean =>
  (typeof v === "string" && v !== "") ||
  (Array.isArray(v) && v.length > 0);
const needsMessages = { field: "messages", check: Array.isArray };
const needsInput = { field: "input", check: isText };
const noOutput = (): number => 0;

function created(): number {
  return Math.floor(Date.now() / 1000);
}

function chatUsage(x: Exchange): Record<string, unknown> {
  return {
    prompt_tokens: x.input,
    completion_tokens: x.words.length,
    total_tokens: x.input + x.words.length,
    prompt_tokens_details: { cached_tokens: x.cacheRead },
  };
}

function finishReason(x: Exchange): string {
  return x.stop === "end_turn" ? "stop" : "length";
}

/** Gemini's answer body (the whole, or a streamed chunk's). */
function geminiBody(
  x: Exchange,
  text: string,
  done: boolean,
): Record<string, unknown> {
  return {
    candidates: [{
      content: { role: "model", parts: [{ text }] },
      ...(done
        ? { finishReason: x.stop === "end_turn" ? "STOP" : "MAX_TOKENS" }
        : {}),
      index: 0,
    }],
    usageMetadata: {
      promptTokenCount: x.input,
      ...(done
        ? {
          candidatesTokenCount: x.words.length,
          totalTokenCount: x.input + x.words.length,
        }
        : { totalTokenCount: x.input }),
    },
    modelVersion: x.model,
    responseId: x.id,
  };
}

function* geminiStream(
  x: Exchange,
  write: (s: string) => void,
): Generator<number, boolean> {
  for (let i = 0; i < x.words.length; i++) {
    if (i === breakAt(x)) return false;
    yield i;
    const last = i === x.words.length - 1;
    write(
      `data: ${
        JSON.stringify(geminiBody(x, (i ? " " : "") + x.words[i], last))
      }\r\n\r\n`,
    );
  }
  if (!x.words.length) {
    write(`data: ${JSON.stringify(geminiBody(x, "", true))}\r\n\r\n`);
  }
  return true;
}

/** Every route, by the path after `/v1/`. */
const ROUTES: Record<Kind, Route> = {
  "generateContent": {
    style: "gemini",
    output: true,
    needs: { field: "contents", check: Array.isArray },
    maxTokens: (b) =>
      Number(
        (b.generationConfig as { maxOutputTokens?: unknown } | undefined)
          ?.maxOutputTokens ?? 8192,
      ),
    reply: (x) => geminiBody(x, x.text, true),
    stream: geminiStream,
  },
  "messages": {
    style: "anthropic",
    output: true,
    needs: needsMessages,
    maxTokens: (b) => Number(b.max_tokens ?? b.max_completion_tokens ?? NaN),
    reply: (x) => ({
      id: `msg_${x.id}`,
      type: "message",
      role: "assistant",
      model: x.model,
      content: [{ type: "text", text: x.text }],
      stop_reason: x.stop,
      stop_sequence: null,
      usage: {
        input_tokens: x.input - x.cacheRead - x.cacheWrite,
        output_tokens: x.words.length,
        cache_creation_input_tokens: x.cacheWrite,
        cache_read_input_tokens: x.cacheRead,
      },
    }),
    stream: messagesStream,
  },
  "messages/count_tokens": {
    style: "anthropic",
    output: false,
    needs: needsMessages,
    maxTokens: noOutput,
    reply: (x) => ({ input_tokens: x.input }),
  },
  "chat/completions": {
    style: "openai",
    output: true,
    needs: needsMessages,
    maxTokens: (b) => Number(b.max_tokens ?? b.max_completion_tokens ?? 4096),
    reply: (x) => ({
      id: `chatcmpl-${x.id}`,
      object: "chat.completion",
      created: created(),
      model: x.model,
      choices: [{
        index: 0,
        message: { role: "assistant", content: x.text, refusal: null },
        logprobs: null,
        finish_reason: finishReason(x),
      }],
      usage: chatUsage(x),
    }),
    stream: chatStream,
  },
  "responses": {
    style: "openai",
    output: true,
    needs: needsInput,
    maxTokens: (b) => Number(b.max_output_tokens ?? 4096),
    reply: (x) => ({
      id: `resp_${x.id}`,
      object: "response",
      created_at: created(),
      status: x.stop === "end_turn" ? "completed" : "incomplete",
      incomplete_details: x.stop === "end_turn"
        ? null
        : { reason: "max_output_tokens" },
      model: x.model,
      output: [{
        type: "message",
        id: `msg_${x.id}`,
        status: "completed",
        role: "assistant",
        content: [{ type: "output_text", text: x.text, annotations: [] }],
      }],
      usage: {
        input_tokens: x.input,
        input_tokens_details: { cached_tokens: x.cacheRead },
        output_tokens: x.words.length,
        output_tokens_details: { reasoning_tokens: 0 },
        total_tokens: x.input + x.words.length,
      },
    }),
  },
  "completions": {
    style: "openai",
    output: true,
    needs: { field: "prompt", check: isText },
    maxTokens: (b) => Number(b.max_tokens ?? 16),
    reply: (x) => ({
      id: `cmpl-${x.id}`,
      object: "text_completion",
      created: created(),
      model: x.model,
      choices: [{
        text: x.text,
        index: 0,
        logprobs: null,
        finish_reason: finishReason(x),
      }],
      usage: chatUsage(x),
    }),
  },
  "embeddings": {
    style: "openai",
    output: false,
    needs: needsInput,
    maxTokens: noOutput,
    reply: embeddingsReply,
  },
  "moderations": {
    style: "openai",
    output: false,
    needs: needsInput,
    maxTokens: noOutput,
    reply(x) {
      const input = x.body.input;
      const inputs = Array.isArray(input) ? input : [input];
      return {
        id: `modr-${x.id}`,
        model: x.model,
        results: inputs.map(() => ({
          flagged: false,
          categories: { harassment: false, violence: false },
          category_scores: { harassment: 0.0001, violence: 0.0001 },
        })),
      };
    },
  },
};

function embeddingsReply(x: Exchange): unknown {
  const body = x.body;
  const inputs = typeof body.input === "string" ||
      typeof (body.input as unknown[])[0] === "number"
    ? [body.input]
    : body.input as unknown[];
  const dims = Number(body.dimensions ?? 8);
  return {
    object: "list",
    data: inputs.map((v, index) => ({
      object: "embedding",
      index,
      embedding: vector(
        Array.from(
          { length: dims },
          (_, i) => ((hash(`${JSON.stringify(v)}:${i}`) % 2000) - 1000) / 1000,
        ),
        body.encoding_format === "base64",
      ),
    })),
    model: x.model,
    usage: { prompt_tokens: x.input, total_tokens: x.input },
  };
}

/**
 * Anthropic Messages events: message_start, a text block, a delta per word,
 * message_delta with the cumulative usage, message_stop. Yields before each
 * word (the caller paces them); returns false if the stream broke halfway.
 */
function* messagesStream(
  x: Exchange,
  write: (s: string) => void,
): Generator<number, boolean> {
  const ev = (type: string, data: unknown) =>
    write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
  ev("message_start", {
    type: "message_start",
    message: {
      id: `msg_${x.id}`,
      type: "message",
      role: "assistant",
      model: x.model,
      content: [],
      stop_reason: null,
      stop_sequence: null,
      usage: {
        input_tokens: x.input - x.cacheRead - x.cacheWrite,
        output_tokens: 1,
        cache_creation_input_tokens: x.cacheWrite,
        cache_read_input_tokens: x.cacheRead,
      },
    },
  });
  ev("content_block_start", {
    type: "content_block_start",
    index: 0,
    content_block: { type: "text", text: "" },
  });
  ev("ping", { type: "ping" });
  for (let i = 0; i < x.words.length; i++) {
    if (i === breakAt(x)) {
      if (x.breaks === "error") {
        ev("error", {
          type: "error",
          error: { type: "overloaded_error", message: "Overloaded" },
        });
      }
      return false;
    }
    yield i;
    ev("content_block_delta", {
      type: "content_block_delta",
      index: 0,
      delta: { type: "text_delta", text: (i ? " " : "") + x.words[i] },
    });
  }
  ev("content_block_stop", { type: "content_block_stop", index: 0 });
  ev("message_delta", {
    type: "message_delta",
    delta: { stop_reason: x.stop, stop_sequence: null },
    usage: { output_tokens: x.words.length },
  });
  ev("message_stop", { type: "message_stop" });
  return true;
}

/** OpenAI chat chunks: a role chunk, one per word, the finish, the usage chunk if asked, `[DONE]`. */
function* chatStream(
  x: Exchange,
  write: (s: string) => void,
): Generator<number, boolean> {
  const at = created();
  const usage =
    (x.body.stream_options as { include_usage?: boolean } | undefined)
      ?.include_usage === true;
  const chunk = (delta: unknown, finish: string | null) =>
    `data: ${
      JSON.stringify({
        id: `chatcmpl-${x.id}`,
        object: "chat.completion.chunk",
        created: at,
        model: x.model,
        choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
        ...(usage ? { usage: null } : {}),
      })
    }\n\n`;
  write(chunk({ role: "assistant", content: "", refusal: null }, null));
  for (let i = 0; i < x.words.length; i++) {
    if (i === breakAt(x)) {
      if (x.breaks === "error") {
        write(
          `data: ${
            JSON.stringify({
              error: {
                message: "Overloaded",
                type: "server_error",
                code: null,
              },
            })
          }\n\n`,
        );
      }
      return false;
    }
    yield i;
    write(chunk({ content: (i ? " " : "") + x.words[i] }, null));
  }
  write(chunk({}, finishReason(x)));
  if (usage) {
    write(
      `data: ${
        JSON.stringify({
          id: `chatcmpl-${x.id}`,
          object: "chat.completion.chunk",
          created: at,
          model: x.model,
          choices: [],
          usage: chatUsage(x),
        })
      }\n\n`,
    );
  }
  write("data: [DONE]\n\n");
  return true;
}

/** The word at which a breaking stream breaks (-1: it does not). */
function breakAt(x: Exchange): number {
  return x.breaks ? Math.max(1, Math.floor(x.words.length / 2)) : -1;
}

/** Writes a streamed answer: headers, then the route's events paced over the latency. */
async function streamReply(
  sim: SimServer,
  x: Exchange,
  route: Route,
): Promise<void> {
  const res = x.res;
  if (x.breaks === "error") sim.stats.faults.midStreamError++;
  if (x.breaks === "cut") sim.stats.faults.truncatedStream++;
  res.writeHead(200, {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "request-id": x.id,
    "x-request-id": x.id,
    // Gemini sends no rate-limit headers.
    ...(x.kind === "generateContent" ? {} : sim.rateHeaders(x.meters, x.azure)),
  });
  res.flushHeaders();
  x.begin();
  sim.log(
    x.breaks === "error"
      ? "midStreamError"
      : x.breaks === "cut"
      ? "truncatedStream"
      : "200",
  );
  const step = x.words.length ? x.delay / (x.words.length + 1) : 0;
  const events = route.stream!(x, (s) => res.write(s));
  for (let next = events.next();; next = events.next()) {
    if (next.done) {
      if (next.value) {
        x.done();
        res.end();
      } else if (x.breaks === "error") res.end();
      else await cut(res);
      return;
    }
    if (step) await sleep(step);
  }
}

/**
 * An embedding as floats, or (what the openai SDK asks for by default) as
 * base64 of little-endian float32s.
 */
function vector(values: number[], base64: boolean): number[] | string {
  if (!base64) return values;
  const bytes = new Uint8Array(new Float32Array(values).buffer);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

/** Drops the connection once what was written has gone out: a truncated stream. */
function cut(res: ServerResponse): Promise<void> {
  return new Promise((resolve) => {
    res.write("", () => {
      setTimeout(() => {
        res.destroy();
        resolve();
      }, 5);
    });
  });
}

function concat(chunks: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const c of chunks) n += c.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

const HELP =
  `paceline LLM API simulator (Anthropic /v1/messages; OpenAI /v1/chat/completions,
/v1/responses, /v1/completions, /v1/embeddings, /v1/moderations)

Usage: node dist/sim.js [flags]      deno run -A sim.ts [flags]

  --port N             listen port (default 8787; 0 picks a free port)
  --host H             interface (default 127.0.0.1)
  --api-key KEY        require this key (x-api-key or Authorization: Bearer)
  --rpm N              requests per window
  --itpm N             input tokens per window
  --otpm N             output tokens per window
  --tpm N              input + output tokens per window
  --window-ms N        window length (default 60000)
  --model-limit M:rpm=N[,itpm=N,otpm=N,tpm=N]
                       a model with limits of its own (repeatable); other
                       models share the limits above
  --mode M             sliding (default) | bucket
  --output-counting M  actual (default) | max_tokens
  --seed N             PRNG seed for faults (default 1)
  --fault-500 P, --fault-529 P, --fault-503 P, --fault-reset P,
  --fault-slow P, --fault-mid-stream P, --fault-truncate P   probabilities 0..1
  --quota-after N      after N accepted requests, answer the spend-limit 429
  --no-limit-headers   send no rate-limit headers (a relay that passes none on)
  --retry-after-ms     also send the wait to the ms on 429s (retry-after-ms)
  --no-prompt-cache    cache nothing; --cache-min-tokens N  the shortest
                       prefix Anthropic-style caching keeps (default 1024)
  --latency-ms N       base latency; --latency-per-token-ms N per output token
  --batch-ms N         how long a batch (Anthropic's or OpenAI's) takes to
                       end (default 1000)
  --batch-expired P, --batch-errored P   shares of batch requests that come
                       back expired / errored (default 0)
  --batch-enqueued-tokens N   OpenAI: most input tokens one model's running
                       batches may hold; past it a batch fails validation
`;

/** Parses the standalone flags into options. */
export function parseSimArgs(
  argv: string[],
): SimulatorOptions & { help?: boolean } {
  const o: SimulatorOptions & { help?: boolean } = {
    port: 8787,
    limits: {},
    faults: {},
    latency: {},
  };
  const num = (flag: string, v: string | undefined): number => {
    const n = Number(v);
    if (v === undefined || v.trim() === "" || !Number.isFinite(n)) {
      throw new RangeError(
        `${flag} needs a number: received ${
          v === undefined ? "nothing" : JSON.stringify(v)
        }`,
      );
    }
    return n;
  };
  const limits = o.limits!;
  const faults = o.faults!;
  const latency = o.latency!;
  // Flags that take a number, and where each one goes.
  const numeric: Record<string, (n: number) => void> = {
    "--port": (n) => (o.port = n),
    "--rpm": (n) => (limits.requests = n),
    "--itpm": (n) => (limits.inputTokens = n),
    "--otpm": (n) => (limits.outputTokens = n),
    "--tpm": (n) => (limits.tokens = n),
    "--window-ms": (n) => (limits.windowMs = n),
    "--seed": (n) => (o.seed = n),
    "--fault-500": (n) => (faults.error500 = n),
    "--fault-529": (n) => (faults.overloaded529 = n),
    "--fault-503": (n) => (faults.unavailable503 = n),
    "--fault-reset": (n) => (faults.reset = n),
    "--fault-slow": (n) => (faults.slowHeaders = n),
    "--fault-mid-stream": (n) => (faults.midStreamError = n),
    "--fault-truncate": (n) => (faults.truncatedStream = n),
    "--quota-after": (n) => (o.quotaAfter = n),
    "--batch-ms": (n) => (o.batchMs = n),
    "--batch-expired": (n) => ((o.batchFaults ??= {}).expired = n),
    "--batch-errored": (n) => ((o.batchFaults ??= {}).errored = n),
    "--batch-enqueued-tokens": (n) => (o.batchEnqueuedTokens = n),
    "--latency-ms": (n) => (latency.baseMs = n),
    "--latency-per-token-ms": (n) => (latency.perOutputTokenMs = n),
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]!;
    const set = numeric[flag];
    if (set) {
      set(num(flag, argv[++i]));
      continue;
    }
    switch (flag) {
      case "--help":
      case "-h":
        o.help = true;
        break;
      case "--host":
        o.host = argv[++i];
        break;
      case "--api-key":
        o.apiKey = argv[++i];
        break;
      case "--mode":
        o.mode = argv[++i] as "sliding" | "bucket";
        break;
      case "--output-counting":
        o.outputCounting = argv[++i] as "actual" | "max_tokens";
        break;
      case "--no-limit-headers":
        o.limitHeaders = false;
        break;
      case "--retry-after-ms":
        o.retryAfterMs = true;
        break;
      case "--no-prompt-cache":
        o.promptCache = false;
        break;
      case "--cache-min-tokens":
        o.promptCache = { minTokens: num(flag, argv[++i]) };
        break;
      case "--model-limit": {
        const [model, l] = parseModelLimit(argv[++i] ?? "", num);
        (o.modelLimits ??= {})[model] = l;
        break;
      }
      default:
        throw new TypeError(`Unknown flag ${JSON.stringify(flag)}; see --help`);
    }
  }
  return o;
}

/** `--model-limit MODEL:rpm=8,itpm=1000` (a model name may itself hold colons). */
function parseModelLimit(
  v: string,
  num: (flag: string, v: string | undefined) => number,
): [string, Omit<SimLimits, "windowMs">] {
  const eq = v.indexOf("=");
  const colon = v.lastIndexOf(":", eq);
  if (eq < 0 || colon <= 0) {
    throw new RangeError(
      `--model-limit needs MODEL:rpm=N[,itpm=N,otpm=N,tpm=N]: received ${
        JSON.stringify(v)
      }`,
    );
  }
  const l: Omit<SimLimits, "windowMs"> = {};
  const keys: Record<string, Dim> = {
    rpm: "requests",
    itpm: "inputTokens",
    otpm: "outputTokens",
    tpm: "tokens",
  };
  for (const part of v.slice(colon + 1).split(",")) {
    const [k, n] = part.split("=");
    const key = keys[k ?? ""];
    if (!key) {
      throw new RangeError(
        `--model-limit: unknown limit ${
          JSON.stringify(k)
        } (rpm, itpm, otpm or tpm)`,
      );
    }
    l[key] = num(`--model-limit ${k}`, n);
  }
  return [v.slice(0, colon), l];
}

async function main(): Promise<void> {
  let options: ReturnType<typeof parseSimArgs>;
  try {
    options = parseSimArgs(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${(error as Error).message}\n`);
    process.exitCode = 2;
    return;
  }
  if (options.help) {
    process.stdout.write(HELP);
    return;
  }
  const sim = await startSimulator(options);
  const l = options.limits ?? {};
  process.stdout.write(
    `paceline simulator listening on ${sim.url}\n` +
      `limits per ${l.windowMs ?? 60_000} ms: requests ${
        l.requests ?? "∞"
      }, input tokens ${l.inputTokens ?? "∞"}, output tokens ${
        l.outputTokens ?? "∞"
      }, tokens ${l.tokens ?? "∞"} (${options.mode ?? "sliding"})\n`,
  );
  const stop = () => {
    sim.close().then(() => process.exit(0));
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

const isMain = (import.meta as { main?: boolean }).main ??
  (process.argv[1] !== undefined &&
    import.meta.url === pathToFileURL(resolve(process.argv[1])).href);
if (isMain) void main();
