/**
 * An LLM API simulator: a real HTTP server on loopback that speaks the
 * Anthropic Messages API and the OpenAI chat completions, Responses,
 * completions, embeddings and moderations APIs closely enough for the
 * official SDKs, enforces rate limits strictly (sliding log) or as a token
 * bucket — for the whole key, or per model — sends the providers'
 * rate-limit headers, and injects faults from a seeded PRNG. paceline's tests, demo and benchmarks run
 * against it.
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
  /** After this many accepted requests, every request gets the non-retryable spend-limit 429. */
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
  /** Simulator clock (`performance.now()`) of the first and last accepted request; -1 before any. */
  acceptedAt: { first: number; last: number };
  /** True token totals of completed responses (streams included). */
  usage: { inputTokens: number; outputTokens: number };
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
  | "moderations";
const ROUTE =
  /\/v1\/(messages(?:\/count_tokens)?|chat\/completions|responses|completions|embeddings|moderations)$/;
const isText = (v: unknown): boolean =>
  (typeof v === "string" && v !== "") ||
  (Array.isArray(v) && v.length > 0);
/** The field each endpoint cannot do without. */
const REQUIRED: Record<
  Kind,
  { field: string; check: (v: unknown) => boolean }
> = {
  "messages": { field: "messages", check: Array.isArray },
  "messages/count_tokens": { field: "messages", check: Array.isArray },
  "chat/completions": { field: "messages", check: Array.isArray },
  "responses": { field: "input", check: isText },
  "completions": { field: "prompt", check: isText },
  "embeddings": { field: "input", check: isText },
  "moderations": { field: "input", check: isText },
};
const OUTPUTLESS = new Set<Kind>(["embeddings", "moderations"]);
const STREAMS = new Set<Kind>(["messages", "chat/completions"]);

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
  const {
    port = 0,
    host = "127.0.0.1",
    apiKey,
    limits = {},
    mode = "sliding",
    outputCounting = "actual",
    faults = {},
    quotaAfter,
    latency = {},
    seed = 1,
    retryAfterMs = false,
    roundTokenRemaining = false,
  } = options;
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
  if (mode !== "sliding" && mode !== "bucket") {
    throw new TypeError(
      `startSimulator 'mode' must be "sliding" or "bucket": received ${
        String(mode)
      }`,
    );
  }
  const clock = () => performance.now();
  let random = prng(seed);
  /** The windows of each model in `modelLimits`, and of all others (""). */
  let meterSets: Map<string, Partial<Record<Dim, Meter>>>;
  let stats: SimStats;
  let seq = 0;
  const init = (): void => {
    random = prng(seed);
    meterSets = new Map();
    for (
      const [model, l] of [
        ["", limits],
        ...Object.entries(modelLimits),
      ] as const
    ) {
      const meters: Partial<Record<Dim, Meter>> = {};
      for (const d of DIMS) {
        const limit = l[d];
        if (limit !== undefined) {
          meters[d] = new Meter(limit, windowMs, mode === "bucket", clock());
        }
      }
      meterSets.set(model, meters);
    }
    stats = {
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
      usage: { inputTokens: 0, outputTokens: 0 },
      perClient: {},
      completed: [],
      log: [],
      logAt: [],
    };
  };
  init();

  const rateHeaders = (
    now: number,
    meters: Partial<Record<Dim, Meter>>,
  ): Record<string, string> => {
    const h: Record<string, string> = {};
    const wall = Date.now();
    const names: [Dim, string, string | undefined][] = [
      ["requests", "requests", "requests"],
      ["tokens", "tokens", "tokens"],
      ["inputTokens", "input-tokens", undefined],
      ["outputTokens", "output-tokens", undefined],
    ];
    for (const [d, anthropic, openai] of names) {
      const m = meters[d];
      if (!m) continue;
      let remaining = m.remaining(now);
      if (roundTokenRemaining && d !== "requests") {
        remaining = Math.round(remaining / 1000) * 1000;
      }
      const resetMs = m.resetIn(now);
      h[`anthropic-ratelimit-${anthropic}-limit`] = String(m.limit);
      h[`anthropic-ratelimit-${anthropic}-remaining`] = String(remaining);
      h[`anthropic-ratelimit-${anthropic}-reset`] = new Date(
        wall + Math.ceil(resetMs),
      ).toISOString().replace(
        /\.\d{3}Z$/,
        "Z",
      );
      if (openai) {
        h[`x-ratelimit-limit-${openai}`] = String(m.limit);
        h[`x-ratelimit-remaining-${openai}`] = String(remaining);
        h[`x-ratelimit-reset-${openai}`] = goDuration(resetMs);
      }
    }
    return h;
  };

  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    handle(req, res).catch((error) => {
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

  const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

  async function handle(
    req: IncomingMessage,
    res: ServerResponse,
  ): Promise<void> {
    const arrived = clock(); // a request counts when it arrives, as on real servers
    stats.received++;
    const id = `req_sim${String(++seq).padStart(6, "0")}`;
    const chunks: Uint8Array[] = [];
    for await (const c of req) chunks.push(c as Uint8Array);
    const raw = new TextDecoder().decode(concat(chunks));
    const path = (req.url ?? "/").split("?")[0]!;
    const kind = ROUTE.exec(path)?.[1] as Kind | undefined;
    const openai = kind !== "messages" && kind !== "messages/count_tokens";
    let meters = meterSets.get("")!;
    const send = (
      status: number,
      body: unknown,
      headers: Record<string, string> = {},
    ): void => {
      res.writeHead(status, {
        "content-type": "application/json",
        "request-id": id,
        "x-request-id": id,
        ...rateHeaders(clock(), meters),
        ...headers,
      });
      res.end(JSON.stringify(body));
      stats.logAt.push(clock());
      stats.log.push(String(status));
    };
    const error = (
      type: string,
      message: string,
      extra: Record<string, unknown> = {},
    ) =>
      openai
        ? { error: { message, type, param: null, code: extra.code ?? type } }
        : { type: "error", error: { type, message, ...extra }, request_id: id };

    if (req.method === "GET" && path === "/_sim/stats") {
      // For a simulator in another process (benchmarks): its counters.
      stats.received--;
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(stats));
      return;
    }
    if (req.method !== "POST" || !kind) {
      stats.rejected.notFound++;
      return send(
        404,
        error("not_found_error", `No route for ${req.method} ${path}`),
      );
    }
    if (apiKey !== undefined) {
      const auth = req.headers["authorization"];
      const given = req.headers["x-api-key"] ??
        (typeof auth === "string" && auth.startsWith("Bearer ")
          ? auth.slice(7)
          : undefined);
      if (given !== apiKey) {
        stats.rejected.auth++;
        return send(
          401,
          openai
            ? {
              error: {
                message: "Incorrect API key provided.",
                type: "invalid_request_error",
                param: null,
                code: "invalid_api_key",
              },
            }
            : error("authentication_error", "invalid x-api-key"),
        );
      }
    }
    let body: Record<string, unknown>;
    const needs = REQUIRED[kind];
    try {
      body = JSON.parse(raw);
      if (typeof body !== "object" || body === null) throw new Error();
    } catch {
      stats.rejected.invalid++;
      return send(400, error("invalid_request_error", "body: invalid JSON"));
    }
    if (!needs.check(body[needs.field])) {
      stats.rejected.invalid++;
      return send(
        400,
        error("invalid_request_error", `${needs.field}: field required`),
      );
    }
    if (typeof body.model === "string" && meterSets.has(body.model)) {
      meters = meterSets.get(body.model)!;
    }
    const input = inputTokensOf(body, kind);
    if (kind === "messages/count_tokens") {
      return send(200, { input_tokens: input });
    }
    const maxTokens = OUTPUTLESS.has(kind) ? 0 : Number(
      kind === "responses"
        ? body.max_output_tokens ?? 4096
        : kind === "completions"
        ? body.max_tokens ?? 16
        : body.max_tokens ?? body.max_completion_tokens ??
          (openai ? 4096 : NaN),
    );
    if (!OUTPUTLESS.has(kind) && !(maxTokens >= 1)) {
      stats.rejected.invalid++;
      return send(
        400,
        error("invalid_request_error", "max_tokens: field required"),
      );
    }
    if (body.stream === true && !STREAMS.has(kind)) {
      stats.rejected.invalid++;
      return send(
        400,
        error(
          "invalid_request_error",
          `stream: the simulator does not stream /v1/${kind}`,
        ),
      );
    }
    const client = (req.headers["x-client-request-id"] as string | undefined) ??
      ((body.metadata as { user_id?: string } | undefined)?.user_id) ??
      (typeof body.user === "string" ? body.user : undefined);
    if (client !== undefined) {
      const seen = stats.perClient[client] ??= { attempts: 0, succeeded: 0 };
      seen.attempts++;
      const scripted = options.perClientFaults?.[client];
      if (scripted && seen.attempts <= (scripted.times ?? Infinity)) {
        if (scripted.delayMs) await sleep(scripted.delayMs);
        const h: Record<string, string> = scripted.retryAfter === undefined
          ? {}
          : { "retry-after": scripted.retryAfter };
        if (scripted.status === 529) {
          return send(529, error("overloaded_error", "Overloaded"), h);
        }
        if (scripted.status === 429) {
          return send(429, error("rate_limit_error", "Scripted 429"), h);
        }
        if (scripted.status) {
          return send(scripted.status, error("api_error", "Scripted fault"), h);
        }
      }
    }

    // Faults come first and do not count against the limits.
    const draw = {
      reset: random(),
      e500: random(),
      e529: random(),
      e503: random(),
      slow: random(),
      mid: random(),
      trunc: random(),
    };
    if (draw.reset < (faults.reset ?? 0)) {
      stats.faults.reset++;
      stats.logAt.push(clock());
      stats.log.push("reset");
      req.socket.destroy();
      return;
    }
    if (draw.slow < (faults.slowHeaders ?? 0)) {
      stats.faults.slowHeaders++;
      await sleep(faults.slowHeadersMs ?? 200);
    }
    if (draw.e500 < (faults.error500 ?? 0)) {
      stats.faults.error500++;
      return send(500, error("api_error", "Internal server error"));
    }
    if (draw.e529 < (faults.overloaded529 ?? 0)) {
      stats.faults.overloaded529++;
      return send(529, error("overloaded_error", "Overloaded"));
    }
    if (draw.e503 < (faults.unavailable503 ?? 0)) {
      stats.faults.unavailable503++;
      return send(503, error("api_error", "Service unavailable"));
    }
    if (quotaAfter !== undefined && stats.accepted >= quotaAfter) {
      stats.rejected.quota++;
      return send(
        429,
        openai
          ? {
            error: {
              message:
                "You exceeded your current quota, please check your plan and billing details.",
              type: "insufficient_quota",
              param: null,
              code: "insufficient_quota",
            },
          }
          : error(
            "rate_limit_error",
            "You have reached your specified workspace API usage limits.",
            {
              details: { error_code: "enforced_spend_limit_reached" },
            },
          ),
      );
    }

    // Deterministic output, then strict admission against every window.
    const prompt = JSON.stringify(
      body.messages ?? body.input ?? body.prompt,
    ) + contentText(body.system ?? body.instructions);
    const outTokens = Math.min(maxTokens, 8 + (hash(prompt) % 40));
    const outCharge = outputCounting === "max_tokens" ? maxTokens : outTokens;
    const cost: Record<Dim, number> = {
      requests: 1,
      inputTokens: input,
      outputTokens: outCharge,
      tokens: input + outCharge,
    };
    const now = arrived;
    let wait = 0;
    let refusedBy: Dim | undefined;
    for (const d of DIMS) {
      const m = meters[d];
      if (!m) continue;
      const w = m.waitFor(cost[d], now);
      if (w > wait) {
        wait = w;
        refusedBy = d;
      }
    }
    if (refusedBy) {
      stats.rateLimited[refusedBy]++;
      const tooBig = wait === Infinity;
      const headers: Record<string, string> = {};
      if (!tooBig) {
        headers["retry-after"] = String(Math.max(1, Math.ceil(wait / 1000)));
        if (retryAfterMs) headers["retry-after-ms"] = String(Math.ceil(wait));
      }
      const what = refusedBy === "requests"
        ? "requests"
        : refusedBy.replace("T", " t").toLowerCase();
      return send(
        429,
        openai
          ? {
            error: {
              message:
                `Rate limit reached for ${what} per ${windowMs} ms. Please try again in ${
                  (wait / 1000).toFixed(3)
                }s.`,
              type: refusedBy === "requests" ? "requests" : "tokens",
              param: null,
              code: "rate_limit_exceeded",
            },
          }
          : error(
            "rate_limit_error",
            `This request would exceed the rate limit for your organization of ${
              meters[refusedBy]!.limit
            } ${what} per ${windowMs} ms.`,
          ),
        headers,
      );
    }
    for (const d of DIMS) {
      const m = meters[d];
      if (!m) continue;
      m.charge(cost[d], now);
      stats.maxInWindow[d] = Math.max(stats.maxInWindow[d], m.maxSeen);
    }
    stats.accepted++;
    if (stats.acceptedAt.first < 0) stats.acceptedAt.first = now;
    stats.acceptedAt.last = now;

    const words = Array.from(
      { length: outTokens },
      (_, i) => WORDS[(hash(prompt) + i) % WORDS.length]!,
    );
    const text = words.join(" ");
    const stop = outTokens >= maxTokens ? "max_tokens" : "end_turn";
    const model = typeof body.model === "string" ? body.model : "sim-model";
    const delay = (latency.baseMs ?? 0) +
      (latency.perOutputTokenMs ?? 0) * outTokens;
    const done = (): void => {
      // Moderations report no usage; the others do, and it is counted.
      if (kind !== "moderations") stats.usage.inputTokens += input;
      stats.usage.outputTokens += outTokens;
      if (client !== undefined) {
        stats.perClient[client]!.succeeded++;
        stats.completed.push(client);
      }
    };

    if (body.stream === true) {
      const mid = draw.mid < (faults.midStreamError ?? 0);
      const trunc = !mid && draw.trunc < (faults.truncatedStream ?? 0);
      if (mid) stats.faults.midStreamError++;
      if (trunc) stats.faults.truncatedStream++;
      res.writeHead(200, {
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        "request-id": id,
        "x-request-id": id,
        ...rateHeaders(clock(), meters),
      });
      res.flushHeaders();
      stats.logAt.push(clock());
      stats.log.push(
        mid ? "midStreamError" : trunc ? "truncatedStream" : "200",
      );
      const step = words.length ? delay / (words.length + 1) : 0;
      const breakAt = mid || trunc
        ? Math.max(1, Math.floor(words.length / 2))
        : -1;
      const write = (s: string) => res.write(s);
      if (openai) {
        const created = Math.floor(Date.now() / 1000);
        const usage =
          (body.stream_options as { include_usage?: boolean } | undefined)
            ?.include_usage === true;
        const chunk = (delta: unknown, finish: string | null) =>
          `data: ${
            JSON.stringify({
              id: `chatcmpl-${id}`,
              object: "chat.completion.chunk",
              created,
              model,
              choices: [{
                index: 0,
                delta,
                logprobs: null,
                finish_reason: finish,
              }],
              ...(usage ? { usage: null } : {}),
            })
          }\n\n`;
        write(chunk({ role: "assistant", content: "", refusal: null }, null));
        for (let i = 0; i < words.length; i++) {
          if (i === breakAt) {
            if (mid) {
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
              res.end();
            } else await cut(res);
            return;
          }
          if (step) await sleep(step);
          write(chunk({ content: (i ? " " : "") + words[i] }, null));
        }
        write(chunk({}, stop === "end_turn" ? "stop" : "length"));
        if (usage) {
          write(
            `data: ${
              JSON.stringify({
                id: `chatcmpl-${id}`,
                object: "chat.completion.chunk",
                created,
                model,
                choices: [],
                usage: {
                  prompt_tokens: input,
                  completion_tokens: outTokens,
                  total_tokens: input + outTokens,
                },
              })
            }\n\n`,
          );
        }
        write("data: [DONE]\n\n");
        done();
        res.end();
        return;
      }
      const ev = (type: string, data: unknown) =>
        write(`event: ${type}\ndata: ${JSON.stringify(data)}\n\n`);
      ev("message_start", {
        type: "message_start",
        message: {
          id: `msg_${id}`,
          type: "message",
          role: "assistant",
          model,
          content: [],
          stop_reason: null,
          stop_sequence: null,
          usage: {
            input_tokens: input,
            output_tokens: 1,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
          },
        },
      });
      ev("content_block_start", {
        type: "content_block_start",
        index: 0,
        content_block: { type: "text", text: "" },
      });
      ev("ping", { type: "ping" });
      for (let i = 0; i < words.length; i++) {
        if (i === breakAt) {
          if (mid) {
            ev("error", {
              type: "error",
              error: { type: "overloaded_error", message: "Overloaded" },
            });
            res.end();
          } else await cut(res);
          return;
        }
        if (step) await sleep(step);
        ev("content_block_delta", {
          type: "content_block_delta",
          index: 0,
          delta: { type: "text_delta", text: (i ? " " : "") + words[i] },
        });
      }
      ev("content_block_stop", { type: "content_block_stop", index: 0 });
      ev("message_delta", {
        type: "message_delta",
        delta: { stop_reason: stop, stop_sequence: null },
        usage: { output_tokens: outTokens },
      });
      ev("message_stop", { type: "message_stop" });
      done();
      res.end();
      return;
    }

    if (delay) await sleep(delay);
    done();
    const created = Math.floor(Date.now() / 1000);
    const finish = stop === "end_turn" ? "stop" : "length";
    const chatUsage = {
      prompt_tokens: input,
      completion_tokens: outTokens,
      total_tokens: input + outTokens,
    };
    if (kind === "embeddings") {
      const inputs = typeof body.input === "string" ||
          typeof (body.input as unknown[])[0] === "number"
        ? [body.input]
        : body.input as unknown[];
      const dims = Number(body.dimensions ?? 8);
      return send(200, {
        object: "list",
        data: inputs.map((x, index) => ({
          object: "embedding",
          index,
          embedding: vector(
            Array.from(
              { length: dims },
              (_, i) =>
                ((hash(`${JSON.stringify(x)}:${i}`) % 2000) - 1000) / 1000,
            ),
            body.encoding_format === "base64",
          ),
        })),
        model,
        usage: { prompt_tokens: input, total_tokens: input },
      });
    }
    if (kind === "moderations") {
      const inputs = Array.isArray(body.input) ? body.input : [body.input];
      return send(200, {
        id: `modr-${id}`,
        model,
        results: inputs.map(() => ({
          flagged: false,
          categories: { harassment: false, violence: false },
          category_scores: { harassment: 0.0001, violence: 0.0001 },
        })),
      });
    }
    if (kind === "responses") {
      return send(200, {
        id: `resp_${id}`,
        object: "response",
        created_at: created,
        status: stop === "end_turn" ? "completed" : "incomplete",
        incomplete_details: stop === "end_turn"
          ? null
          : { reason: "max_output_tokens" },
        model,
        output: [{
          type: "message",
          id: `msg_${id}`,
          status: "completed",
          role: "assistant",
          content: [{ type: "output_text", text, annotations: [] }],
        }],
        usage: {
          input_tokens: input,
          input_tokens_details: { cached_tokens: 0 },
          output_tokens: outTokens,
          output_tokens_details: { reasoning_tokens: 0 },
          total_tokens: input + outTokens,
        },
      });
    }
    if (kind === "completions") {
      return send(200, {
        id: `cmpl-${id}`,
        object: "text_completion",
        created,
        model,
        choices: [{ text, index: 0, logprobs: null, finish_reason: finish }],
        usage: chatUsage,
      });
    }
    if (openai) {
      return send(200, {
        id: `chatcmpl-${id}`,
        object: "chat.completion",
        created,
        model,
        choices: [{
          index: 0,
          message: { role: "assistant", content: text, refusal: null },
          logprobs: null,
          finish_reason: finish,
        }],
        usage: chatUsage,
      });
    }
    return send(200, {
      id: `msg_${id}`,
      type: "message",
      role: "assistant",
      model,
      content: [{ type: "text", text }],
      stop_reason: stop,
      stop_sequence: null,
      usage: {
        input_tokens: input,
        output_tokens: outTokens,
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
      },
    });
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address() as { port: number };
  return {
    url: `http://${host}:${address.port}`,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
    stats: () => structuredClone(stats),
    reset: init,
  };
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
  --latency-ms N       base latency; --latency-per-token-ms N per output token
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
      case "--model-limit": {
        // MODEL:rpm=8,itpm=1000 (a model name may itself hold colons)
        const v = argv[++i] ?? "";
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
        (o.modelLimits ??= {})[v.slice(0, colon)] = l;
        break;
      }
      default:
        throw new TypeError(`Unknown flag ${JSON.stringify(flag)}; see --help`);
    }
  }
  return o;
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
