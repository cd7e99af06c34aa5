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
 * results come back in the matching results format. Interrupted runs resume
 * where they stopped. `paceline --help` lists everything.
 *
 * @module
 */
import {
  createReadStream,
  existsSync,
  mkdtempSync,
  realpathSync,
  writeFileSync,
} from "node:fs";
import { open, stat, truncate } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import { resolve } from "node:path";
import {
  estimateCost,
  HttpError,
  mapConcurrentIterable,
  rateLimitedFetch,
  type RateLimiterOptions,
  SseParser,
  type Stats,
  type WindowSpec,
} from "./mod.ts";
import { startSimulator } from "./sim.ts";

const VERSION = "0.1.0";

const HELP = `paceline ${VERSION}: rate-limited batch runs against LLM APIs

Usage:
  paceline run <input.jsonl> [options]   run a batch; results in input order
  paceline demo [--requests N]           a demo batch on the built-in simulator
  paceline --help | --version

Input: JSONL in the providers' batch formats (detected per file):
  Anthropic: {"custom_id": "a1", "params": {"model": ..., "max_tokens": ..., "messages": [...]}}
  OpenAI:    {"custom_id": "a1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

Options for run:
  -o, --output FILE      results file (default: <input>.results.jsonl); an existing
                         partial file is checked and resumed
  --provider P           anthropic | openai (default: from the input format)
  --base-url URL         API base URL (relays); default ANTHROPIC_BASE_URL /
                         OPENAI_BASE_URL, else the provider's
  --rpm N --rpd N        requests per minute / day
  --itpm N --otpm N      input / output tokens per minute
  --tpm N --tpd N        tokens (input + output) per minute / day
                         limits you do not give are learned from response headers
  --concurrency N        most requests in flight (default 8)
  --retries N            retries per request (default 5)
  --stream               use streaming requests
  --quiet                no progress output
  --window-ms N          length of a "minute" (default 60000; for simulators)

The API key comes from ANTHROPIC_API_KEY or OPENAI_API_KEY.
Exit codes: 0 all succeeded, 1 some requests errored (results written),
2 usage or input error (nothing sent), 130 interrupted (resume by running again).
`;

/** A usage or input error: exit code 2, nothing sent. */
class UsageError extends Error {
  override name = "UsageError";
}

type Provider = "anthropic" | "openai";

interface Item {
  line: number;
  customId: string;
  body: Record<string, unknown>;
}

interface RunOptions {
  input: string;
  output: string;
  provider?: Provider;
  baseURL?: string;
  apiKey?: string;
  limits: Record<string, number>;
  windowMs: number;
  concurrency: number;
  retries: number;
  stream: boolean;
  quiet: boolean;
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

/** Reads a JSONL file line by line, without holding it all. */
async function* lines(path: string): AsyncGenerator<[number, string]> {
  const rl = createInterface({
    input: createReadStream(path, "utf8"),
    crlfDelay: Infinity,
  });
  let n = 0;
  for await (const line of rl) yield [++n, line];
}

/** Parses and checks one input line; throws a UsageError naming the line. */
function parseLine(
  n: number,
  line: string,
  format: { provider?: Provider },
): Item {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    throw new UsageError(`line ${n}: invalid JSON (${(e as Error).message})`);
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new UsageError(`line ${n}: expected a JSON object`);
  }
  const o = v as Record<string, unknown>;
  if (typeof o.custom_id !== "string" || o.custom_id === "") {
    throw new UsageError(`line ${n}: missing "custom_id" (a non-empty string)`);
  }
  const kind: Provider | undefined = "params" in o
    ? "anthropic"
    : "body" in o
    ? "openai"
    : undefined;
  if (!kind) {
    throw new UsageError(
      `line ${n}: neither an Anthropic batch line ("params") nor an OpenAI batch line ("body")`,
    );
  }
  if (format.provider && format.provider !== kind) {
    throw new UsageError(
      `line ${n}: a ${kind} line in a ${format.provider} file (mixed formats)`,
    );
  }
  format.provider = kind;
  const body = (kind === "anthropic" ? o.params : o.body) as Record<
    string,
    unknown
  >;
  if (
    typeof body !== "object" || body === null || !Array.isArray(body.messages)
  ) {
    throw new UsageError(
      `line ${n}: "${
        kind === "anthropic" ? "params" : "body"
      }" needs a "messages" array`,
    );
  }
  if (kind === "openai") {
    if (o.url !== "/v1/chat/completions") {
      throw new UsageError(
        `line ${n}: "url" must be "/v1/chat/completions": received ${
          JSON.stringify(o.url)
        }`,
      );
    }
    if (o.method !== undefined && o.method !== "POST") {
      throw new UsageError(
        `line ${n}: "method" must be "POST": received ${
          JSON.stringify(o.method)
        }`,
      );
    }
  } else if (typeof body.max_tokens !== "number") {
    throw new UsageError(`line ${n}: "params.max_tokens" is required`);
  }
  return { line: n, customId: o.custom_id, body };
}

/** Checks the whole input before anything is sent; returns the format and count. */
async function validate(
  path: string,
): Promise<{ provider: Provider; count: number; ids: string[] }> {
  if (!existsSync(path)) throw new UsageError(`input file not found: ${path}`);
  const format: { provider?: Provider } = {};
  const seen = new Map<string, number>();
  const ids: string[] = [];
  for await (const [n, line] of lines(path)) {
    if (line.trim() === "") continue;
    const item = parseLine(n, line, format);
    const first = seen.get(item.customId);
    if (first !== undefined) {
      throw new UsageError(
        `line ${n}: duplicate custom_id ${
          JSON.stringify(item.customId)
        } (first on line ${first})`,
      );
    }
    seen.set(item.customId, n);
    ids.push(item.customId);
  }
  if (!format.provider) {
    throw new UsageError(`${path}: no requests (the file is empty)`);
  }
  return { provider: format.provider, count: ids.length, ids };
}

/**
 * Checks an existing results file against the input: it must be a prefix
 * (same custom_ids in the same order). A torn last line is cut away.
 * Returns how many inputs are already done.
 */
async function resumePoint(output: string, ids: string[]): Promise<number> {
  if (!existsSync(output)) return 0;
  const size = (await stat(output)).size;
  if (size === 0) return 0;
  const fh = await open(output, "r");
  let text: string;
  try {
    text = (await fh.readFile()).toString("utf8");
  } finally {
    await fh.close();
  }
  let done = 0;
  let good = 0; // bytes of complete, valid lines
  let pos = 0;
  while (pos < text.length) {
    const nl = text.indexOf("\n", pos);
    if (nl < 0) break; // torn last line: no newline
    const line = text.slice(pos, nl);
    let id: unknown;
    try {
      id = JSON.parse(line).custom_id;
    } catch {
      if (text.indexOf("\n", nl + 1) < 0 && nl + 1 >= text.length) break; // torn, last
      throw new UsageError(
        `${output}: line ${done + 1} is not valid JSON; not resuming`,
      );
    }
    if (done >= ids.length || id !== ids[done]) {
      throw new UsageError(
        `${output}: line ${done + 1} has custom_id ${
          JSON.stringify(id)
        } but input has ${
          JSON.stringify(ids[done])
        }; this is not a results file of this input (use another -o)`,
      );
    }
    done++;
    pos = nl + 1;
    good = new TextEncoder().encode(text.slice(0, pos)).length;
  }
  if (good < size) await truncate(output, good);
  return done;
}

function resultLine(provider: Provider, item: Item, outcome: Outcome): string {
  if (provider === "anthropic") {
    const result = outcome.ok ? { type: "succeeded", message: outcome.body } : {
      type: "errored",
      error: outcome.body && typeof outcome.body === "object" &&
          "error" in (outcome.body as object)
        ? outcome.body
        : {
          type: "error",
          error: {
            type: outcome.errorType ?? "api_error",
            message: outcome.message,
          },
        },
    };
    return JSON.stringify({ custom_id: item.customId, result });
  }
  return JSON.stringify({
    id: `batch_req_${item.line}`,
    custom_id: item.customId,
    response: outcome.status
      ? {
        status_code: outcome.status,
        request_id: outcome.requestId ?? null,
        body: outcome.body,
      }
      : null,
    error: outcome.status ? null : {
      code: outcome.errorType ?? "network_error",
      message: outcome.message,
    },
  });
}

interface Outcome {
  ok: boolean;
  status?: number;
  body?: unknown;
  requestId?: string;
  errorType?: string;
  message?: string;
}

/** Sends one request; never throws (except on abort): failures become outcomes. */
async function perform(
  f: typeof fetch,
  provider: Provider,
  url: string,
  headers: Record<string, string>,
  item: Item,
  stream: boolean,
  signal: AbortSignal,
): Promise<Outcome> {
  const body = stream
    ? {
      ...item.body,
      stream: true,
      ...(provider === "openai"
        ? { stream_options: { include_usage: true } }
        : {}),
    }
    : { ...item.body, stream: false };
  let response: Response;
  try {
    response = await f(url, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (signal.aborted) throw e;
    const cause = (e as { cause?: unknown }).cause;
    return {
      ok: false,
      errorType: e instanceof HttpError ? e.type : "network_error",
      message: `${(e as Error).message}${
        cause instanceof Error ? ` (${cause.message})` : ""
      }`,
    };
  }
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
    return {
      ok: false,
      status: response.status,
      body: parsed,
      requestId,
      errorType: err.type,
      message: err.message,
    };
  }
  // Streaming: assemble the final object from the events.
  try {
    const assembled = await assembleStream(provider, response);
    return { ok: true, status: 200, body: assembled, requestId };
  } catch (e) {
    if (signal.aborted) throw e;
    return {
      ok: false,
      status: 0,
      errorType: (e as HttpError).type ?? "stream_error",
      message: (e as Error).message,
    };
  }
}

async function assembleStream(
  provider: Provider,
  response: Response,
): Promise<unknown> {
  const parser = new SseParser();
  const decoder = new TextDecoder();
  const reader = response.body!.getReader();
  let message: Record<string, unknown> | undefined;
  const blocks: Record<string, unknown>[] = [];
  let text = "";
  let usage: unknown;
  let finish: unknown = null;
  let done = false;
  const apply = (data: Record<string, unknown>): void => {
    if (provider === "anthropic") {
      if (data.type === "error") {
        const e = data.error as { type?: string; message?: string };
        throw new HttpError(500, {
          type: e?.type,
          message: `${e?.message} (in the stream)`,
        });
      }
      if (data.type === "message_start") {
        message = { ...(data.message as object) } as Record<string, unknown>;
      }
      if (data.type === "content_block_start") {
        blocks[data.index as number] = { ...(data.content_block as object) };
      }
      if (data.type === "content_block_delta") {
        const b = blocks[data.index as number];
        const d = data.delta as { text?: string };
        if (b && typeof d.text === "string") {
          b.text = String(b.text ?? "") + d.text;
        }
      }
      if (data.type === "message_delta" && message) {
        Object.assign(message, data.delta as object);
        message.usage = {
          ...(message.usage as object),
          ...(data.usage as object),
        };
      }
      if (data.type === "message_stop") done = true;
    } else {
      if (data.error) {
        throw new HttpError(500, {
          type: "server_error",
          message: "error in the stream",
        });
      }
      message ??= {
        id: data.id,
        object: "chat.completion",
        created: data.created,
        model: data.model,
      };
      const c = (data.choices as {
        delta?: { content?: string };
        finish_reason?: unknown;
      }[] | undefined)?.[0];
      if (c?.delta?.content) text += c.delta.content;
      if (c?.finish_reason) finish = c.finish_reason;
      if (data.usage) usage = data.usage;
    }
  };
  for (;;) {
    const { value, done: end } = await reader.read();
    const events = end
      ? parser.end()
      : parser.push(decoder.decode(value, { stream: true }));
    for (const e of events) {
      if (e.data === "[DONE]") {
        done = true;
        continue;
      }
      try {
        apply(JSON.parse(e.data));
      } catch (err) {
        if (err instanceof HttpError) throw err;
      }
    }
    if (end) break;
  }
  if (!done) {
    throw new HttpError(502, {
      type: "incomplete_stream",
      message: "The stream ended early",
    });
  }
  if (provider === "anthropic") return { ...message, content: blocks };
  return {
    ...message,
    choices: [{
      index: 0,
      message: { role: "assistant", content: text },
      finish_reason: finish,
    }],
    usage,
  };
}

function fmtDuration(ms: number): string {
  if (!Number.isFinite(ms)) return "?";
  const s = Math.round(ms / 1000);
  return s >= 3600
    ? `${Math.floor(s / 3600)}h${
      String(Math.floor((s % 3600) / 60)).padStart(2, "0")
    }m`
    : s >= 60
    ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`
    : `${s}s`;
}

/**
 * Requests and tokens sent in the last "minute" (the limits' window), from
 * snapshots of the stats taken at each progress tick: what the limits
 * count, never an extrapolation from a first burst.
 */
class RecentRate {
  #samples: { t: number; requests: number; tokens: number }[] = [];
  #minute: number;
  constructor(minute: number) {
    this.#minute = minute;
  }
  update(
    requests: number,
    tokens: number,
  ): { requests: number; tokens: number } {
    const now = performance.now();
    const since = now - this.#minute;
    // Only samples inside the last minute: the window shown is at most a
    // minute long, so it never reads above what the limits allow.
    while (this.#samples.length && this.#samples[0]!.t < since) {
      this.#full = true;
      this.#samples.shift(); // a few samples per second: a short array
    }
    const base = this.#full && this.#samples.length
      ? this.#samples[0]!
      : { requests: 0, tokens: 0 };
    this.#samples.push({ t: now, requests, tokens });
    return { requests: requests - base.requests, tokens: tokens - base.tokens };
  }
  /** Whether a minute has passed since the first sample. */
  #full = false;
}

function progressLine(
  done: number,
  total: number,
  errors: number,
  stats: Stats,
  limits: Record<string, number>,
  startedAt: number,
  recent: RecentRate,
): string {
  const s = stats.toJSON();
  const pct = total ? (done / total) * 100 : 100;
  const elapsed = performance.now() - startedAt;
  const eta = done ? (elapsed / done) * (total - done) : Infinity;
  const last = recent.update(s.requests, s.inputTokens + s.outputTokens);
  const lim = (k: string) => (limits[k] ? `/${limits[k]}` : "");
  return `${done}/${total} (${pct.toFixed(1)}%) ETA ${
    fmtDuration(eta)
  } · ${last.requests}${lim("rpm")} req/min · ${last.tokens}${
    lim("tpm")
  } tok/min · 429s ${s.rateLimited} · retries ${s.retries} · errors ${errors}`;
}

/** Runs a batch. Returns the exit code. */
export async function run(o: RunOptions): Promise<number> {
  const { provider, count, ids } = await validate(o.input);
  const p = o.provider ?? provider;
  if (p !== provider) {
    throw new UsageError(
      `--provider ${o.provider} but the input is in the ${provider} batch format`,
    );
  }
  const envKey = p === "anthropic" ? "ANTHROPIC_API_KEY" : "OPENAI_API_KEY";
  const envURL = p === "anthropic" ? "ANTHROPIC_BASE_URL" : "OPENAI_BASE_URL";
  const apiKey = o.apiKey ?? (process.env[envKey] || undefined);
  const baseURL = (o.baseURL ?? (process.env[envURL] || undefined))?.replace(
    /\/+$/,
    "",
  );
  if (!apiKey && !baseURL) {
    throw new UsageError(
      `no API key: set ${envKey} (or give --base-url for a relay or simulator that needs none). Nothing was sent.`,
    );
  }
  if (apiKey !== undefined && !/^[\x21-\x7e]+$/.test(apiKey)) {
    throw new UsageError(
      `${envKey} has characters an HTTP header cannot carry`,
    );
  }
  const base = baseURL ??
    (p === "anthropic"
      ? "https://api.anthropic.com"
      : "https://api.openai.com/v1");
  const url = p === "anthropic"
    ? `${base}${/\/v1$/.test(base) ? "" : "/v1"}/messages`
    : `${base}/chat/completions`;
  const headers: Record<string, string> = {
    "content-type": "application/json",
  };
  if (p === "anthropic") {
    headers["anthropic-version"] = "2023-06-01";
    if (apiKey) headers["x-api-key"] = apiKey;
  } else if (apiKey) headers["authorization"] = `Bearer ${apiKey}`;

  const skip = await resumePoint(o.output, ids);
  const minute = o.windowMs;
  const day = minute * 1440;
  const windows: WindowSpec[] = [];
  const add = (flag: string, key: string, ms: number) => {
    if (o.limits[flag] !== undefined) {
      windows.push({ key, limit: o.limits[flag]!, ms });
    }
  };
  add("rpm", "requests", minute);
  add("rpd", "requests", day);
  add("itpm", "inputTokens", minute);
  add("otpm", "outputTokens", minute);
  add("tpm", "tokens", minute);
  add("tpd", "tokens", day);
  const limiterOptions: RateLimiterOptions = { windows };
  if (o.marginMs !== undefined) limiterOptions.marginMs = o.marginMs;
  const f = rateLimitedFetch({
    limiter: limiterOptions,
    concurrency: o.concurrency,
    retry: { retries: o.retries },
    learn: { windowMs: minute },
  });
  // A request that can never fit is an input error, found before sending.
  {
    let n = 0;
    for await (const [line, text] of lines(o.input)) {
      if (text.trim() === "" || n++ < skip) continue;
      const item = parseLine(line, text, {});
      try {
        f.limiter.timeUntil(estimateCost(url, item.body));
      } catch (e) {
        throw new UsageError(`line ${line}: ${(e as Error).message}`);
      }
    }
  }

  const remaining = count - skip;
  if (!o.quiet) {
    o.err(
      `paceline: ${remaining} of ${count} ${p} requests to run${
        skip ? ` (resuming after ${skip})` : ""
      } → ${o.output}\n`,
    );
  }
  const fh = await open(o.output, "a");
  let stopping = false;
  const abort = new AbortController();
  let signalCount = 0;
  const onSignal = (): void => {
    signalCount++;
    if (signalCount === 1) {
      stopping = true;
      if (!o.quiet) {
        o.err(
          "\npaceline: stopping: finishing requests in flight (again to abort them)\n",
        );
      }
    } else abort.abort(new Error("interrupted"));
  };
  if (o.signals !== false) {
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  }
  async function* items(): AsyncGenerator<Item> {
    let n = 0;
    for await (const [line, text] of lines(o.input)) {
      if (stopping) return;
      if (text.trim() === "") continue;
      if (n++ < skip) continue;
      yield parseLine(line, text, {});
    }
  }
  const startedAt = performance.now();
  const recent = new RecentRate(minute);
  let done = 0;
  let errors = 0;
  let lastProgress = 0;
  const interval = o.isTTY ? 200 : o.progressMs ?? 3000;
  const progress = (final = false): void => {
    if (o.quiet) return;
    const now = performance.now();
    if (!final && now - lastProgress < interval) return;
    lastProgress = now;
    const line = progressLine(
      done,
      remaining,
      errors,
      f.stats,
      o.limits,
      startedAt,
      recent,
    );
    if (o.isTTY) o.err(`\r\x1b[2K${line}${final ? "\n" : ""}`);
    else o.err(`${line}\n`);
  };
  const ticker = setInterval(() => progress(), Math.min(interval, 1000));
  let interrupted = false;
  try {
    const results = mapConcurrentIterable(
      items(),
      async (item, _i, signal) => {
        const s = AbortSignal.any([signal, abort.signal]);
        try {
          return {
            item,
            outcome: await perform(f, p, url, headers, item, o.stream, s),
          };
        } catch {
          return { item, outcome: undefined }; // aborted: not written
        }
      },
      { concurrency: Math.max(o.concurrency * 2, 16) },
    );
    for await (const { item, outcome } of results) {
      if (!outcome) {
        interrupted = true;
        break; // keep the file a prefix of the input
      }
      await fh.write(resultLine(p, item, outcome) + "\n"); // one write per line
      done++;
      if (!outcome.ok) errors++;
      progress();
    }
  } finally {
    clearInterval(ticker);
    await fh.close();
    if (o.signals !== false) {
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
    }
  }
  if (stopping) interrupted = true;
  progress(true);
  if (!o.quiet) {
    o.err(`\n${f.stats.report()}\n`);
    o.err(
      interrupted
        ? `\npaceline: interrupted after ${
          skip + done
        } of ${count}; run the same command again to resume.\n`
        : `\npaceline: ${done} results (${errors} errored) in ${o.output}\n`,
    );
  }
  if (interrupted) return 130;
  return errors ? 1 : 0;
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
  o: Pick<RunOptions, "out" | "err" | "isTTY" | "quiet">,
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
      stream: false,
      quiet: o.quiet,
      out: o.out,
      err: o.err,
      isTTY: o.isTTY,
    });
    const st = sim.stats();
    const refused = Object.values(st.rateLimited).reduce((a, b) => a + b, 0);
    o.out(
      `\nsimulator: ${st.accepted} accepted, ${refused} refused by rate limits, ${
        st.faults.overloaded529 + st.faults.error500
      } faults injected\nresults: ${output}\n`,
    );
    return code;
  } finally {
    await sim.close();
  }
}

/** Parses argv and runs; returns the exit code. */
export async function main(argv: string[], io = {
  out: (s: string) => void process.stdout.write(s),
  err: (s: string) => void process.stderr.write(s),
  isTTY: Boolean(process.stderr.isTTY),
}): Promise<number> {
  try {
    const [command, ...rest] = argv;
    if (
      !command || command === "--help" || command === "-h" || command === "help"
    ) {
      io.out(HELP);
      return command ? 0 : 2;
    }
    if (command === "--version" || command === "-v") {
      io.out(`${VERSION}\n`);
      return 0;
    }
    if (command === "demo") {
      let requests = 200;
      let quiet = false;
      for (let i = 0; i < rest.length; i++) {
        if (rest[i] === "--requests") requests = num("--requests", rest[++i]);
        else if (rest[i] === "--quiet") quiet = true;
        else throw new UsageError(`unknown option for demo: ${rest[i]}`);
      }
      return await demo(requests, { ...io, quiet });
    }
    if (command !== "run") {
      throw new UsageError(
        `unknown command ${JSON.stringify(command)}; see --help`,
      );
    }
    let input: string | undefined;
    const o: Partial<RunOptions> & { limits: Record<string, number> } = {
      limits: {},
    };
    for (let i = 0; i < rest.length; i++) {
      const a = rest[i]!;
      const next = () => rest[++i];
      switch (a) {
        case "-o":
        case "--output":
          o.output = next();
          if (!o.output) throw new UsageError(`${a} needs a file name`);
          break;
        case "--provider": {
          const v = next();
          if (v !== "anthropic" && v !== "openai") {
            throw new UsageError(
              `--provider must be anthropic or openai: received ${
                JSON.stringify(v)
              }`,
            );
          }
          o.provider = v;
          break;
        }
        case "--base-url":
          o.baseURL = next();
          if (!o.baseURL || !/^https?:\/\//.test(o.baseURL)) {
            throw new UsageError(
              `--base-url needs an http(s) URL: received ${
                JSON.stringify(o.baseURL)
              }`,
            );
          }
          break;
        case "--rpm":
        case "--rpd":
        case "--itpm":
        case "--otpm":
        case "--tpm":
        case "--tpd":
          o.limits[a.slice(2)] = num(a, next());
          break;
        case "--concurrency":
          o.concurrency = num(a, next());
          break;
        case "--retries":
          o.retries = num(a, next(), 0);
          break;
        case "--window-ms":
          o.windowMs = num(a, next());
          break;
        case "--margin-ms":
          o.marginMs = num(a, next(), 0);
          break;
        case "--progress-ms":
          o.progressMs = num(a, next());
          break;
        case "--stream":
          o.stream = true;
          break;
        case "--quiet":
          o.quiet = true;
          break;
        default:
          if (a.startsWith("-")) {
            throw new UsageError(`unknown option ${a}; see --help`);
          }
          if (input) {
            throw new UsageError(
              `one input file, please: got ${input} and ${a}`,
            );
          }
          input = a;
      }
    }
    if (!input) throw new UsageError("run needs an input file; see --help");
    return await run({
      input,
      output: o.output ?? input.replace(/(\.jsonl)?$/, ".results.jsonl"),
      provider: o.provider,
      baseURL: o.baseURL,
      limits: o.limits,
      windowMs: o.windowMs ?? 60_000,
      marginMs: o.marginMs,
      concurrency: o.concurrency ?? 8,
      retries: o.retries ?? 5,
      stream: o.stream ?? false,
      quiet: o.quiet ?? false,
      progressMs: o.progressMs,
      ...io,
    });
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
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
