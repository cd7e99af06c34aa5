/**
 * paceline: call rate-limited HTTP APIs (above all LLM APIs) as fast as the
 * provider allows, without 429 storms and with results in input order.
 *
 * One self-contained file with no imports. Its sections, in order, and every
 * export in each (functions and values first, then types):
 *
 * 1. **Time**: {@linkcode systemClock}, {@linkcode ManualClock};
 *    {@linkcode Clock}.
 * 2. **Mutex**: {@linkcode Mutex} (FIFO, abortable waiters); {@linkcode Lock}.
 *    (The fetch's in-flight slots are an internal `Semaphore` here too.)
 * 3. **RateLimiter**: {@linkcode RateLimiter} (an exact sliding-window log
 *    over several windows at once, weighted costs, FIFO waiters),
 *    {@linkcode Permit} (settles to the real usage); {@linkcode Limiter}
 *    (what both limiter kinds implement), {@linkcode WindowSpec},
 *    {@linkcode Cost}, {@linkcode RateLimiterOptions},
 *    {@linkcode WindowUsage}, {@linkcode AcquireOptions}.
 * 4. **Shared limits**: {@linkcode RedisRateLimiter} (one key's limits
 *    shared by many processes through your own Redis client),
 *    {@linkcode RedisLimiterError}; {@linkcode RedisEval},
 *    {@linkcode RedisRateLimiterOptions}.
 * 5. **Retry**: {@linkcode backoff}, {@linkcode parseRetryAfter} (every form
 *    of server-told wait), {@linkcode retry}, {@linkcode RetryError},
 *    {@linkcode QuotaError}, {@linkcode HttpError}; {@linkcode Jitter},
 *    {@linkcode BackoffOptions}, {@linkcode HeadersLike},
 *    {@linkcode ParseRetryAfterOptions}, {@linkcode RetryInfo},
 *    {@linkcode RetryOptions}.
 * 6. **Concurrency**: {@linkcode mapConcurrent},
 *    {@linkcode mapConcurrentSettled}, {@linkcode mapConcurrentIterable},
 *    {@linkcode mapConcurrentUnordered} (bounded, ordered, lazy,
 *    abortable); {@linkcode MapProgress}, {@linkcode MapOptions},
 *    {@linkcode MapIterableOptions}, {@linkcode MapInput}, {@linkcode MapFn},
 *    {@linkcode Indexed}.
 * 7. **Stats**: {@linkcode Stats}; {@linkcode StatsSnapshot},
 *    {@linkcode TimelinePoint}, {@linkcode StatsOptions},
 *    {@linkcode Percentiles}.
 * 8. **Providers** (everything paceline knows about each API family, in one
 *    description each): {@linkcode anthropicProvider},
 *    {@linkcode openaiProvider}, {@linkcode azureProvider},
 *    {@linkcode geminiProvider},
 *    {@linkcode AZURE_API_VERSION}, {@linkcode providers},
 *    {@linkcode providerOf}, {@linkcode estimateTokens},
 *    {@linkcode outputCapOf}, {@linkcode estimateCost}, {@linkcode usageOf};
 *    {@linkcode Provider}, {@linkcode ProviderEndpoint},
 *    {@linkcode LimitHeaders}, {@linkcode StreamAssembler},
 *    {@linkcode BatchFormat}, {@linkcode BatchOutcome},
 *    {@linkcode BatchApi}, {@linkcode BatchStatus}, {@linkcode BatchCall},
 *    {@linkcode ProviderMatch}, {@linkcode UsageOptions},
 *    {@linkcode CachePrefix}, {@linkcode CacheUsage}, {@linkcode UrlTarget}.
 * 9. **Fetch**: {@linkcode rateLimitedFetch} (a `fetch` for the official
 *    SDKs), {@linkcode windowLoads}, {@linkcode SseParser};
 *    {@linkcode RateLimitedFetchOptions}, {@linkcode RateLimitedFetch},
 *    {@linkcode SseEvent}. The request path's parts, in the order a request
 *    meets them: `normalizeRequest`, `ModelLanes`, `PromptCache`,
 *    `Admission` (with `PaceFinder` while no limits are known),
 *    `learnLimits`, `readResponse`, wired by `RequestPath`.
 * 10. **Clients**: {@linkcode anthropic}, {@linkcode openai},
 *    {@linkcode gemini}, {@linkcode GeminiClient}, {@linkcode GeminiRequest},
 *    {@linkcode GeminiResponse},
 *    {@linkcode assembleStream}; {@linkcode ClientOptions},
 *    {@linkcode AnthropicOptions}, {@linkcode AnthropicClient},
 *    {@linkcode AnthropicRequest}, {@linkcode AnthropicMessage},
 *    {@linkcode AnthropicContentBlock}, {@linkcode AnthropicStreamEvent},
 *    {@linkcode AnthropicStream}, {@linkcode Conversation},
 *    {@linkcode OpenAIClient}, {@linkcode ChatRequest},
 *    {@linkcode ChatCompletion}, {@linkcode ChatChunk},
 *    {@linkcode ChatStream}.
 *
 * @example A batch of prompts, in input order, within the limits
 * ```ts
 * import { mapConcurrent, rateLimitedFetch } from "./mod.ts";
 *
 * const fetch2 = rateLimitedFetch({
 *   limiter: { rpm: 50, itpm: 30_000, otpm: 8_000 },
 *   // stands in for the network in this example
 *   fetch: () => Promise.resolve(Response.json({ usage: { input_tokens: 9, output_tokens: 5 } })),
 * });
 * const out = await mapConcurrent(["a", "b", "c"], async (prompt) => {
 *   const res = await fetch2("https://api.anthropic.com/v1/messages", {
 *     method: "POST",
 *     body: JSON.stringify({ model: "m", max_tokens: 64, messages: [{ role: "user", content: prompt }] }),
 *   });
 *   return (await res.json()).usage.output_tokens as number;
 * }, { concurrency: 2 });
 * if (out.join() !== "5,5,5" || fetch2.stats.toJSON().inputTokens !== 27) throw new Error();
 * ```
 *
 * @module
 */

// =============================================================================
// Time
// =============================================================================

/**
 * A source of time. Everything in paceline that waits or stamps takes one, so
 * tests can pass a {@linkcode ManualClock} and run instantly and exactly.
 *
 * `now()` is monotonic milliseconds (not wall-clock time). `sleep(ms, signal)`
 * resolves after `ms` milliseconds, or rejects with `signal.reason` as soon as
 * the signal aborts, removing its timer and listener either way.
 *
 * @example A clock that is always at time 0 and never sleeps
 * ```ts
 * import type { Clock } from "./mod.ts";
 *
 * const frozen: Clock = { now: () => 0, sleep: () => Promise.resolve() };
 * if (frozen.now() !== 0) throw new Error("unreachable");
 * ```
 */
export interface Clock {
  /** Monotonic time in milliseconds. */
  now(): number;
  /**
   * Waits `ms` milliseconds. `NaN` and negative delays wait 0 ms. Rejects with
   * `signal.reason` if the signal is or becomes aborted.
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** Node clamps larger `setTimeout` delays to 1 ms, so longer sleeps are chained. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * The real clock: `performance.now()` for time (it never jumps with the wall
 * clock) and `setTimeout` for sleeping. Sleeps longer than 2^31-1 ms are
 * chained, so a long wait never fires at once.
 *
 * @example
 * ```ts
 * import { systemClock } from "./mod.ts";
 *
 * const start = systemClock.now();
 * await systemClock.sleep(5);
 * if (systemClock.now() - start < 4) throw new Error("woke too early");
 * ```
 */
export const systemClock: Clock = {
  now(): number {
    return performance.now();
  },
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    const delay = ms > 0 ? ms : 0; // NaN and negatives become 0
    if (delay === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const end = performance.now() + delay;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const onAbort = (): void => {
        clearTimeout(timer);
        reject(signal!.reason);
      };
      const arm = (): void => {
        const left = end - performance.now();
        if (left <= 0) {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        } else {
          timer = setTimeout(arm, Math.min(Math.ceil(left), MAX_TIMER_MS));
        }
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      arm();
    });
  },
};

interface Sleeper {
  due: number;
  seq: number;
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
}

/**
 * A deterministic {@linkcode Clock} for tests: time stands still until
 * {@linkcode ManualClock.advance} moves it. Sleepers fire in time order, and
 * promise reactions run between them, so code that sleeps, wakes and sleeps
 * again behaves as it would in real time, only instantly.
 *
 * @example
 * ```ts
 * import { ManualClock } from "./mod.ts";
 *
 * const clock = new ManualClock();
 * let woke = false;
 * clock.sleep(1000).then(() => (woke = true));
 * await clock.advance(999);
 * if (woke) throw new Error("woke too early");
 * await clock.advance(1);
 * if (!woke || clock.now() !== 1000) throw new Error("did not wake at 1000");
 * ```
 */
export class ManualClock implements Clock {
  #now: number;
  #seq = 0;
  #sleepers: Sleeper[] = [];

  /**
   * Creates a clock whose time starts at `start` milliseconds.
   *
   * @param start The initial value of {@linkcode ManualClock.now}; default 0.
   * @throws {RangeError} If `start` is not a finite number.
   */
  constructor(start = 0) {
    if (typeof start !== "number" || !Number.isFinite(start)) {
      throw new RangeError(
        `ManualClock 'start' must be a finite number: received ${
          String(start)
        }`,
      );
    }
    this.#now = start;
  }

  /** The current time in milliseconds. */
  now(): number {
    return this.#now;
  }

  /** The number of sleepers waiting for time to advance. */
  get pending(): number {
    return this.#sleepers.length;
  }

  /** The time at which the earliest sleeper is due, or `undefined` if none. */
  get nextAt(): number | undefined {
    let best: Sleeper | undefined;
    for (const s of this.#sleepers) if (!best || s.due < best.due) best = s;
    return best?.due;
  }

  /**
   * Sleeps until {@linkcode ManualClock.advance} moves time `ms` past now.
   * Delays of 0, negative or `NaN` resolve at once.
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    const delay = ms > 0 ? ms : 0;
    if (delay === 0) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const sleeper: Sleeper = {
        due: this.#now + delay,
        seq: this.#seq++,
        resolve,
        reject,
        signal,
        onAbort: undefined,
      };
      if (signal) {
        sleeper.onAbort = () => {
          this.#remove(sleeper);
          reject(signal.reason);
        };
        signal.addEventListener("abort", sleeper.onAbort, { once: true });
      }
      this.#sleepers.push(sleeper);
    });
  }

  /**
   * Moves time forward by `ms`, waking every sleeper that falls due, in time
   * order. Before each wake-up, time is set to that sleeper's due time; after
   * it, pending promise reactions run (a macrotask turn), so a woken task can
   * schedule its next sleep before later sleepers fire.
   *
   * @param ms How far to move; must be finite and ≥ 0.
   * @throws {RangeError} If `ms` is negative or not finite.
   */
  async advance(ms: number): Promise<void> {
    if (typeof ms !== "number" || !(ms >= 0) || ms === Infinity) {
      throw new RangeError(
        `ManualClock.advance 'ms' must be a finite number >= 0: received ${
          String(ms)
        }`,
      );
    }
    const target = this.#now + ms;
    await flushMacrotask();
    for (;;) {
      let next: Sleeper | undefined;
      for (const s of this.#sleepers) {
        if (
          s.due <= target &&
          (!next || s.due < next.due ||
            (s.due === next.due && s.seq < next.seq))
        ) next = s;
      }
      if (!next) break;
      this.#remove(next);
      this.#now = Math.max(this.#now, next.due);
      next.resolve();
      await flushMacrotask();
    }
    this.#now = target;
    await flushMacrotask();
  }

  /**
   * Lets pending promise reactions and macrotasks run without moving time.
   */
  flush(): Promise<void> {
    return flushMacrotask();
  }

  #remove(sleeper: Sleeper): void {
    const i = this.#sleepers.indexOf(sleeper);
    if (i >= 0) this.#sleepers.splice(i, 1);
    if (sleeper.signal && sleeper.onAbort) {
      sleeper.signal.removeEventListener("abort", sleeper.onAbort);
    }
  }
}

const setImmediateFn = (globalThis as {
  setImmediate?: (cb: () => void) => unknown;
}).setImmediate;

/** Resolves after one macrotask turn, so every queued microtask has run. */
function flushMacrotask(): Promise<void> {
  return new Promise<void>((resolve) => {
    if (setImmediateFn) setImmediateFn(resolve);
    else setTimeout(resolve, 0);
  });
}

// =============================================================================
// Mutex
// =============================================================================

/**
 * A held {@linkcode Mutex} lock. `release()` is idempotent, and the lock is
 * `Disposable`, so `using lock = await mutex.lock()` releases it at the end
 * of the block.
 *
 * @example
 * ```ts
 * import { Mutex } from "./mod.ts";
 *
 * const mutex = new Mutex();
 * {
 *   using _lock = await mutex.lock(); // released at the end of the block
 *   if (!mutex.locked) throw new Error("should hold the lock");
 * }
 * if (mutex.locked) throw new Error("should be released");
 * ```
 */
export interface Lock extends Disposable {
  /** Releases the lock, handing it to the next waiter. Safe to call twice. */
  release(): void;
}

interface Waiter {
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  cancelled: boolean;
}

/**
 * A FIFO counting semaphore whose waiters can abort; the queue behind
 * {@linkcode Mutex} and the in-flight slots of {@linkcode rateLimitedFetch}.
 */
class Semaphore {
  #free: number;
  #queue: (Waiter | undefined)[] = [];
  #head = 0;
  #cancelled = 0;

  constructor(permits: number) {
    this.#free = permits;
  }

  /** Permits free now. */
  get free(): number {
    return this.#free;
  }

  /** Waiters in the queue (aborted ones excluded). */
  get waiting(): number {
    return this.#queue.length - this.#head - this.#cancelled;
  }

  /** Takes a permit if one is free and nobody waits. */
  tryAcquire(): boolean {
    if (this.#free > 0 && this.waiting === 0) {
      this.#free--;
      return true;
    }
    return false;
  }

  acquire(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.tryAcquire()) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: undefined,
        cancelled: false,
      };
      if (signal) {
        waiter.onAbort = () => {
          waiter.cancelled = true;
          this.#cancelled++;
          reject(signal.reason);
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#queue.push(waiter);
    });
  }

  /** Returns a permit, handing it straight to the next waiter if any. */
  release(): void {
    const q = this.#queue;
    while (this.#head < q.length) {
      const w = q[this.#head]!;
      q[this.#head++] = undefined;
      if (w.cancelled) {
        this.#cancelled--;
        continue;
      }
      if (w.signal && w.onAbort) {
        w.signal.removeEventListener("abort", w.onAbort);
      }
      this.#compact();
      w.resolve();
      return;
    }
    this.#compact();
    this.#free++;
  }

  #compact(): void {
    const q = this.#queue;
    if (this.#head === q.length) {
      q.length = 0;
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > q.length) {
      this.#queue = q.slice(this.#head);
      this.#head = 0;
    }
  }
}

/**
 * A FIFO promise mutex. Waiters get the lock in the order they asked for it;
 * a waiter whose signal aborts leaves the queue without ever holding the lock.
 *
 * @example
 * ```ts
 * import { Mutex } from "./mod.ts";
 *
 * const mutex = new Mutex();
 * const order: number[] = [];
 * await Promise.all([1, 2, 3].map(async (n) => {
 *   const lock = await mutex.lock();
 *   try {
 *     order.push(n);
 *     await new Promise((r) => setTimeout(r, 1));
 *   } finally {
 *     lock.release();
 *   }
 * }));
 * if (order.join() !== "1,2,3") throw new Error("not FIFO");
 * ```
 */
export class Mutex {
  #sem = new Semaphore(1);

  /** Whether some caller holds the lock. */
  get locked(): boolean {
    return this.#sem.free === 0;
  }

  /** The number of callers waiting for the lock (aborted ones excluded). */
  get waiting(): number {
    return this.#sem.waiting;
  }

  /**
   * Waits for the lock.
   *
   * @param signal Aborting it while waiting rejects with `signal.reason` and
   *   removes the waiter from the queue.
   * @returns The held lock; release it when done.
   */
  lock(signal?: AbortSignal): Promise<Lock> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#sem.tryAcquire()) return Promise.resolve(this.#newLock());
    return this.#sem.acquire(signal).then(() => this.#newLock());
  }

  #newLock(): Lock {
    let held = true;
    const release = (): void => {
      if (!held) return;
      held = false;
      this.#sem.release();
    };
    return { release, [Symbol.dispose]: release };
  }
}

// =============================================================================
// RateLimiter
// =============================================================================

/**
 * One sliding window of a {@linkcode RateLimiter}: at most `limit` units of
 * `key` in any `ms` milliseconds.
 *
 * @example
 * ```ts
 * import { RateLimiter, type WindowSpec } from "./mod.ts";
 *
 * // 50 per minute, and at most 5 in any second to smooth bursts.
 * const windows: WindowSpec[] = [
 *   { key: "requests", limit: 50, ms: 60_000 },
 *   { key: "requests", limit: 5, ms: 1000 },
 * ];
 * const limiter = new RateLimiter({ windows });
 * if (limiter.usage().length !== 2) throw new Error();
 * ```
 */
export interface WindowSpec {
  /** The cost key this window counts, e.g. `"requests"` or `"inputTokens"`. */
  key: string;
  /** The most units of `key` admitted in any span of `ms` milliseconds. */
  limit: number;
  /** The window length in milliseconds. */
  ms: number;
  /** Overrides the limiter's {@linkcode RateLimiterOptions.marginMs} for this window. */
  marginMs?: number;
}

/**
 * The amounts one request uses, per key: `{ requests: 1, inputTokens: 900 }`.
 * Keys without a window are ignored. If the limiter has a `"tokens"` window
 * and the cost has no `tokens`, tokens = `inputTokens` + `outputTokens`.
 *
 * @example
 * ```ts
 * import { type Cost, RateLimiter } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ tpm: 1000 });
 * const cost: Cost = { requests: 1, inputTokens: 300, outputTokens: 200 };
 * await limiter.acquire(cost); // "tokens" = 300 + 200
 * if (limiter.usage()[0]!.used !== 500) throw new Error();
 * ```
 */
export type Cost = Record<string, number>;

/**
 * Options for {@linkcode RateLimiter}. All limits are optional.
 *
 * @example
 * ```ts
 * import { RateLimiter, type RateLimiterOptions } from "./mod.ts";
 *
 * const options: RateLimiterOptions = { rpm: 50, itpm: 30_000, otpm: 8_000, marginMs: 0 };
 * const limiter = new RateLimiter(options);
 * if (limiter.usage().map((w) => w.key).join() !== "requests,inputTokens,outputTokens") throw new Error();
 * ```
 */
export interface RateLimiterOptions {
  /** Explicit windows; combined with the shorthands below. */
  windows?: WindowSpec[];
  /** Requests per minute: `{ key: "requests", ms: 60_000 }`. */
  rpm?: number;
  /** Requests per day: `{ key: "requests", ms: 86_400_000 }`. */
  rpd?: number;
  /** Tokens (input + output) per minute: `{ key: "tokens", ms: 60_000 }`. */
  tpm?: number;
  /** Tokens (input + output) per day. */
  tpd?: number;
  /** Input tokens per minute: `{ key: "inputTokens", ms: 60_000 }`. */
  itpm?: number;
  /** Output tokens per minute: `{ key: "outputTokens", ms: 60_000 }`. */
  otpm?: number;
  /**
   * How much longer than its window each entry is kept, in ms. We stamp a
   * request when we send it; the server counts it when it arrives, and a
   * request sent right at a window's edge can overtake an older one. Default:
   * 0.5 % of each window, at most 1000 ms (300 ms for a minute, 5 ms for a
   * second): ten times the 20–40 ms skew measured on loopback for a minute,
   * at a cost of 0.5 % of throughput at the edges. `0` gives the
   * exact textbook window.
   */
  marginMs?: number;
  /** Time source; default {@linkcode systemClock}. */
  clock?: Clock;
}

/**
 * A snapshot of one window, from {@linkcode RateLimiter.usage}.
 *
 * @example
 * ```ts
 * import { RateLimiter, type WindowUsage } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ rpm: 10 });
 * limiter.tryAcquire();
 * const [w]: WindowUsage[] = limiter.usage();
 * if (w!.used !== 1 || w!.remaining !== 9) throw new Error();
 * ```
 */
export interface WindowUsage {
  /** The cost key. */
  key: string;
  /** The window's limit. */
  limit: number;
  /** The window length in ms. */
  ms: number;
  /** The margin in ms added to the window for expiry. */
  marginMs: number;
  /** Units charged inside the window now. */
  used: number;
  /** `limit - used`, never below 0. */
  remaining: number;
  /** Stored log entries (bounded; see {@linkcode RateLimiter}). */
  entries: number;
}

/**
 * Options for {@linkcode RateLimiter.acquire}.
 *
 * @example
 * ```ts
 * import { type AcquireOptions, RateLimiter } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ rpm: 1 });
 * await limiter.acquire();
 * const options: AcquireOptions = { signal: AbortSignal.timeout(10) };
 * const error = await limiter.acquire(undefined, options).catch((e) => e);
 * if ((error as Error).name !== "TimeoutError") throw error; // gave up, charged nothing
 * ```
 */
export interface AcquireOptions {
  /** Aborting it while waiting rejects with `signal.reason`; nothing is charged. */
  signal?: AbortSignal;
}

const SHORTHANDS: Record<string, readonly [string, number]> = {
  rpm: ["requests", 60_000],
  rpd: ["requests", 86_400_000],
  tpm: ["tokens", 60_000],
  tpd: ["tokens", 86_400_000],
  itpm: ["inputTokens", 60_000],
  otpm: ["outputTokens", 60_000],
};
const LIMITER_OPTIONS = new Set([
  "windows",
  "marginMs",
  "clock",
  ...Object.keys(SHORTHANDS),
]);
const DEFAULT_COST: Cost = Object.freeze({ requests: 1 });
/** Windows longer than this store entries in time buckets of `ms / 1024`. */
const BUCKET_ABOVE_MS = 3_600_000;
const BUCKETS = 1024;
/** Hard cap on stored entries per window; past it, new amounts merge. */
const MAX_ENTRIES = 8192;
const WAKE: unique symbol = Symbol("paceline.wake");

/**
 * What every limiter does: {@linkcode RateLimiter} (in this process) and
 * {@linkcode RedisRateLimiter} (shared through Redis) both implement it, and
 * {@linkcode rateLimitedFetch} takes either.
 *
 * @example
 * ```ts
 * import { type Limiter, RateLimiter } from "./mod.ts";
 *
 * async function send(limiter: Limiter): Promise<void> {
 *   const permit = await limiter.acquire({ requests: 1, inputTokens: 500 });
 *   permit.settle({ inputTokens: 420 }); // what the response said
 * }
 * const limiter = new RateLimiter({ rpm: 50, itpm: 10_000 });
 * await send(limiter);
 * if (limiter.usage()[1]!.used !== 420) throw new Error();
 * ```
 */
export interface Limiter {
  /** Callers waiting in {@linkcode Limiter.acquire}. */
  readonly pending: number;
  /** The time (clock ms) before which nothing is admitted; `-Infinity` if not paused. */
  readonly pausedUntil: number;
  /**
   * Waits until `cost` fits in every window, charges it, and returns the
   * {@linkcode Permit}; `signal` gives up waiting (nothing is charged).
   */
  acquire(cost?: Cost, options?: AcquireOptions): Promise<Permit>;
  /** Milliseconds until `cost` would fit (a lower bound for a shared limiter). */
  timeUntil(cost?: Cost): number;
  /** Admits nothing before clock time `time`; never shortens a pause. */
  pauseUntil(time: number): void;
  /** Admits nothing for the next `ms` milliseconds. */
  pause(ms: number): void;
  /** Changes (or, with `ms`, adds) a window's limit. */
  setLimit(key: string, limit: number, ms?: number): void;
  /** Changes the margin of the windows of `key` (or the one of `ms`). */
  setMargin(key: string, marginMs: number, ms?: number): void;
  /** Charges usage that did not go through {@linkcode Limiter.acquire}, now. */
  record(cost: Cost): void;
  /** A snapshot of every window, in window order. */
  usage(): WindowUsage[];
}

/**
 * A permission to send one request, from {@linkcode RateLimiter.acquire}. It
 * is charged to every window already; call {@linkcode Permit.settle} when
 * the real cost is known (e.g. token usage from the response).
 *
 * @example
 * ```ts
 * import { RateLimiter } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ otpm: 1000 });
 * const permit = await limiter.acquire({ outputTokens: 800 }); // max_tokens
 * permit.settle({ outputTokens: 120 }); // what the response used
 * if (limiter.usage()[0]!.used !== 120) throw new Error();
 * ```
 */
export class Permit {
  /** The clock time at which the permit was granted. */
  readonly at: number;
  /** The cost charged, as requested. */
  readonly cost: Readonly<Cost>;
  #hold: PermitHold;

  /** @internal Created by a limiter only. */
  constructor(hold: PermitHold, at: number, cost: Readonly<Cost>) {
    this.#hold = hold;
    this.at = at;
    this.cost = cost;
  }

  /** The amount currently charged to each window, in the limiter's window order. */
  get charged(): readonly number[] {
    return this.#hold.charged();
  }

  /**
   * Replaces the estimated amounts with the actual ones. Keys missing from
   * `actual` keep their estimate. Freed capacity wakes waiters at once; extra
   * usage is charged (to the original entry while it is inside its window,
   * else as a new entry now). May be called more than once; the latest wins.
   *
   * @param actual The real cost, e.g. `{ inputTokens: 812, outputTokens: 95 }`.
   * @throws {TypeError | RangeError} If an amount is not a finite number ≥ 0.
   */
  settle(actual: Cost): void {
    const merged = { ...this.cost };
    for (const k of Object.keys(actual)) {
      merged[k] = checkAmount(actual[k], k, "settle");
    }
    this.#hold.settle(merged);
  }

  /**
   * Moves this permit's entries to now: for a caller that held it while it
   * waited for something else (another limiter, a pause), since the server
   * counts the request when it arrives.
   */
  restamp(): void {
    this.#hold.restamp();
  }
}

/**
 * What a {@linkcode Permit} holds in its limiter's windows: each limiter
 * kind (in-process, Redis) has its own, so a permit needs no subclass.
 */
interface PermitHold {
  /** The amount charged to each window, in window order. */
  charged(): number[];
  /** Replaces the charge with `actual` (checked, estimate-filled). */
  settle(actual: Cost): void;
  /** Moves the entries to now. */
  restamp(): void;
}

/** The in-process limiter's side of its windows, for its permits' holds. */
interface WindowLedger {
  settle(cost: Cost, charged: number[], own: number[], seqs: number[]): void;
  restamp(own: number[], seqs: number[]): void;
}

/** A permit's entries in a {@linkcode RateLimiter}'s windows. */
class WindowHold implements PermitHold {
  #ledger: WindowLedger;
  #charged: number[]; // may be shared with other permits until settled
  #own: number[] | undefined; // what this permit put into each entry
  #seqs: number[];

  constructor(ledger: WindowLedger, charged: number[], seqs: number[]) {
    this.#ledger = ledger;
    this.#charged = charged;
    this.#own = undefined;
    this.#seqs = seqs;
  }

  charged(): number[] {
    return this.#charged.slice();
  }

  settle(actual: Cost): void {
    const own = this.#owned(); // first: it may replace #charged with a copy
    this.#ledger.settle(actual, this.#charged, own, this.#seqs);
  }

  restamp(): void {
    this.#ledger.restamp(this.#owned(), this.#seqs);
  }

  /** This permit's own amounts, copied from the shared ones on first use. */
  #owned(): number[] {
    if (!this.#own) {
      this.#charged = this.#charged.slice();
      this.#own = this.#charged.slice();
    }
    return this.#own;
  }
}

/** {@linkcode RateLimiterOptions}, checked, with each window's margin resolved. */
interface LimiterSettings {
  windows: Required<WindowSpec>[];
  marginMs: number | undefined;
  clock: Clock;
}

/**
 * Checks a limiter's options (both limiter kinds read them here) and
 * lists its windows, given ones first, then shorthands; throws naming the
 * bad option.
 */
function limiterSettings(options: RateLimiterOptions): LimiterSettings {
  checkOptions(options, LIMITER_OPTIONS, "RateLimiter");
  const { windows = [], marginMs, clock = systemClock } = options;
  if (
    typeof clock !== "object" || clock === null ||
    typeof clock.now !== "function" || typeof clock.sleep !== "function"
  ) {
    throw new TypeError(
      "RateLimiter 'clock' must have now() and sleep(ms, signal) methods",
    );
  }
  if (marginMs !== undefined) checkMargin(marginMs, "marginMs");
  if (!Array.isArray(windows)) {
    throw new TypeError(
      `RateLimiter 'windows' must be an array: received ${typeof windows}`,
    );
  }
  const out: Required<WindowSpec>[] = [];
  const add = (key: string, limit: number, ms: number, margin?: number) => {
    if (out.some((w) => w.key === key && w.ms === ms)) {
      throw new RangeError(
        `RateLimiter has two windows for key '${key}' with ms ${ms}`,
      );
    }
    out.push({
      key,
      limit,
      ms,
      marginMs: margin ?? defaultMargin(ms, marginMs),
    });
  };
  windows.forEach((w, i) => {
    if (typeof w !== "object" || w === null) {
      throw new TypeError(
        `RateLimiter 'windows[${i}]' must be an object: received ${String(w)}`,
      );
    }
    if (typeof w.key !== "string" || w.key === "") {
      throw new TypeError(
        `RateLimiter 'windows[${i}].key' must be a non-empty string: received ${
          String(w.key)
        }`,
      );
    }
    checkLimit(w.limit, `windows[${i}].limit`);
    checkMs(w.ms, `windows[${i}].ms`);
    if (w.marginMs !== undefined) {
      checkMargin(w.marginMs, `windows[${i}].marginMs`);
    }
    add(w.key, w.limit, w.ms, w.marginMs);
  });
  for (const [name, [key, ms]] of Object.entries(SHORTHANDS)) {
    const limit = (options as Record<string, unknown>)[name];
    if (limit === undefined) continue;
    checkLimit(limit, name);
    if (!Number.isInteger(limit)) {
      throw new RangeError(
        `RateLimiter '${name}' must be a positive integer: received ${limit}`,
      );
    }
    add(key, limit as number, ms);
  }
  return { windows: out, marginMs, clock };
}

/** A window's margin when none is given: the limiter's, else 0.5 % of the window, at most 1 s. */
function defaultMargin(ms: number, limiterMargin: number | undefined): number {
  return limiterMargin ?? Math.min(ms / 200, 1000);
}

/**
 * Checks `setLimit`'s arguments and finds the windows it changes (both
 * limiter kinds): with `ms`, the one of that key and length (none: it is
 * added); without, the key must name exactly one window.
 */
function setLimitTargets<W extends { key: string; ms: number }>(
  where: string,
  windows: W[],
  key: string,
  limit: number,
  ms: number | undefined,
): W[] {
  if (typeof key !== "string" || key === "") {
    throw new TypeError(
      `${where}.setLimit 'key' must be a non-empty string: received ${
        String(key)
      }`,
    );
  }
  checkLimit(limit, "limit");
  if (ms !== undefined) checkMs(ms, "ms");
  const matches = windows.filter((w) =>
    w.key === key && (ms === undefined || w.ms === ms)
  );
  if (ms === undefined && matches.length !== 1) {
    throw new RangeError(
      `${where}.setLimit: key '${key}' names ${matches.length} windows; pass 'ms' to pick or add one`,
    );
  }
  return matches;
}

/** Checks `setMargin`'s arguments and finds its windows (both limiter kinds); none is an error. */
function setMarginTargets<W extends { key: string; ms: number }>(
  where: string,
  windows: W[],
  key: string,
  marginMs: number,
  ms: number | undefined,
): W[] {
  checkMargin(marginMs, "marginMs");
  const matches = windows.filter((w) =>
    w.key === key && (ms === undefined || w.ms === ms)
  );
  if (matches.length === 0) {
    throw new RangeError(
      `${where}.setMargin: no window with key '${key}'${
        ms === undefined ? "" : ` and ms ${ms}`
      }`,
    );
  }
  return matches;
}

/**
 * A sliding-window rate limiter over several windows at once.
 *
 * Each window keeps a log of `(time, amount)` entries. A cost is admitted
 * when, for every window, the amounts inside the last `ms` (+ `marginMs`)
 * plus the new cost stay ≤ `limit`; admission is atomic across windows.
 * Callers that do not fit wait in FIFO order: the head waiter sleeps until
 * the earliest time its whole cost fits, then checks again.
 *
 * Memory is bounded: expired entries are dropped; windows longer than an
 * hour store entries in time buckets of `ms / 1024` (rounded up, so the
 * limiter errs on the safe side by at most 0.1 % of the window), and no
 * window stores more than 8192 entries (past that, new amounts merge into
 * the newest entry, which takes the later time).
 *
 * Most callers want {@linkcode RateLimiter.acquire}.
 *
 * @example Fifty requests and 30,000 input tokens per minute
 * ```ts
 * import { RateLimiter } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ rpm: 50, itpm: 30_000 });
 * const permit = await limiter.acquire({ requests: 1, inputTokens: 1200 });
 * permit.settle({ inputTokens: 1000 }); // the response said 1000
 * const used = limiter.usage().map((w) => w.used);
 * if (used.join() !== "1,1000") throw new Error(`unexpected ${used}`);
 * ```
 */
export class RateLimiter implements Limiter {
  #clock: Clock;
  #windows: WindowLog[] = [];
  #defaultMargin: number | undefined;
  #mutex = new Mutex();
  #pausedUntil = -Infinity;
  #wake: AbortController | undefined;
  /** What the sleeping head waiter waits for, and until when it sleeps. */
  #head: { amounts: number[]; until: number } | undefined;
  #hasTokens = false;
  #defaultAmounts: number[] | undefined;

  /** What this limiter's permits call back into. */
  #ledger: WindowLedger = {
    settle: (cost, charged, own, seqs) =>
      this.#settle(cost, charged, own, seqs),
    restamp: (own, seqs) => this.#restamp(own, seqs),
  };

  /**
   * Creates a limiter with the given windows. With none, it admits
   * everything except during a pause, until {@linkcode RateLimiter.setLimit}
   * adds a window.
   *
   * @param options Windows and shorthands; see {@linkcode RateLimiterOptions}.
   * @throws {TypeError} For an unknown option or a value of the wrong type.
   * @throws {RangeError} For a limit or window that is not a positive finite
   *   number, or two windows with the same key and length.
   */
  constructor(options: RateLimiterOptions = {}) {
    const { windows, marginMs, clock } = limiterSettings(options);
    this.#clock = clock;
    this.#defaultMargin = marginMs;
    for (const w of windows) this.#addWindow(w.key, w.limit, w.ms, w.marginMs);
  }

  /** The number of callers waiting in {@linkcode RateLimiter.acquire}. */
  get pending(): number {
    return this.#mutex.waiting + (this.#mutex.locked ? 1 : 0);
  }

  /** The time (clock ms) before which nothing is admitted; `-Infinity` if not paused. */
  get pausedUntil(): number {
    return this.#pausedUntil;
  }

  /**
   * Waits until `cost` fits in every window, charges it, and returns the
   * {@linkcode Permit}. Waiters are served in call order.
   *
   * @param cost The amounts to charge; default `{ requests: 1 }`.
   * @param options `signal` to stop waiting (rejects with `signal.reason`,
   *   charges nothing).
   * @returns A permit; settle it with the real cost when you know it.
   * @throws {RangeError} (rejects) If an amount exceeds a window's limit, so
   *   it could never fit, or is negative or not finite.
   * @throws {TypeError} (rejects) If an amount is not a number.
   */
  acquire(
    cost: Cost = DEFAULT_COST,
    options?: AcquireOptions,
  ): Promise<Permit> {
    const signal = options?.signal;
    let amounts: number[];
    try {
      amounts = this.#amounts(cost);
    } catch (error) {
      return Promise.reject(error);
    }
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (!this.#mutex.locked) {
      const now = this.#clock.now();
      if (this.#fits(amounts, now)) {
        return Promise.resolve(this.#charge(cost, amounts, now));
      }
    }
    return this.#acquireSlow(cost, amounts, signal);
  }

  /**
   * Charges `cost` and returns a {@linkcode Permit} if it fits now and nobody
   * is waiting; otherwise returns `undefined` and charges nothing.
   *
   * @param cost The amounts to charge; default `{ requests: 1 }`.
   * @returns The permit, or `undefined` if the cost does not fit now.
   * @throws {RangeError} If an amount exceeds a window's limit, or is
   *   negative or not finite.
   */
  tryAcquire(cost: Cost = DEFAULT_COST): Permit | undefined {
    const amounts = this.#amounts(cost);
    if (this.#mutex.locked) return undefined;
    const now = this.#clock.now();
    if (!this.#fits(amounts, now)) return undefined;
    return this.#charge(cost, amounts, now);
  }

  /**
   * How long, in ms, until `cost` would fit, ignoring waiters ahead of it.
   * `0` means it fits now.
   *
   * @param cost The amounts; default `{ requests: 1 }`.
   * @returns Milliseconds from now.
   */
  timeUntil(cost: Cost = DEFAULT_COST): number {
    const amounts = this.#amounts(cost);
    return Math.max(0, this.#waitMs(amounts, this.#clock.now()));
  }

  /**
   * Admits nothing before clock time `time` (e.g. when a server said
   * `retry-after`). A pause never shortens an existing one.
   *
   * @param time Clock time in ms (compare {@linkcode Clock.now}).
   * @throws {RangeError} If `time` is `NaN`.
   */
  pauseUntil(time: number): void {
    if (typeof time !== "number" || Number.isNaN(time)) {
      throw new RangeError(
        `RateLimiter.pauseUntil 'time' must be a number: received ${
          String(time)
        }`,
      );
    }
    if (time > this.#pausedUntil) this.#pausedUntil = time;
  }

  /**
   * Admits nothing for the next `ms` milliseconds.
   *
   * @param ms Duration; must be ≥ 0 and finite.
   * @throws {RangeError} If `ms` is negative, `NaN` or infinite.
   */
  pause(ms: number): void {
    checkMargin(ms, "pause ms");
    this.pauseUntil(this.#clock.now() + ms);
  }

  /**
   * Changes a window's limit at runtime (e.g. a limit learned from response
   * headers); waiters re-check at once. With `ms`, changes the window with
   * that key and length, or adds one if there is none. Without `ms`, the key
   * must name exactly one window.
   *
   * @param key The window's cost key.
   * @param limit The new limit, a positive finite number.
   * @param ms The window length, to pick or add a window.
   * @throws {RangeError} If the limit or `ms` is invalid, or `ms` is omitted
   *   and the key names no window or several.
   */
  setLimit(key: string, limit: number, ms?: number): void {
    const target: WindowLog | undefined = setLimitTargets(
      "RateLimiter",
      this.#windows,
      key,
      limit,
      ms,
    )[0];
    if (target) target.limit = limit;
    else this.#addWindow(key, limit, ms!, undefined);
    this.#defaultAmounts = undefined;
    this.#wakeHead();
  }

  /**
   * Changes the margin of every window with this key (or only the one with
   * this key and `ms`) at runtime; see {@linkcode RateLimiterOptions.marginMs}.
   * A wider margin holds entries longer; waiters re-check at once.
   *
   * @param key The windows' cost key.
   * @param marginMs The new margin, a finite number ≥ 0.
   * @param ms Only the window of this length.
   * @throws {RangeError} If `marginMs` is invalid or no window matches.
   */
  setMargin(key: string, marginMs: number, ms?: number): void {
    const matches = setMarginTargets(
      "RateLimiter",
      this.#windows,
      key,
      marginMs,
      ms,
    );
    for (const w of matches) {
      w.margin = marginMs;
      w.life = w.ms + marginMs;
    }
    this.#wakeHead();
  }

  /**
   * Records usage that happened outside this limiter — e.g. other clients
   * sharing the same API key, seen in a server's `remaining` headers — as
   * if admitted now, without waiting and even if it exceeds a limit.
   *
   * @param cost The amounts to record.
   * @throws {TypeError | RangeError} If an amount is not a finite number ≥ 0.
   */
  record(cost: Cost): void {
    if (typeof cost !== "object" || cost === null) {
      throw new TypeError(
        `RateLimiter.record cost must be an object: received ${String(cost)}`,
      );
    }
    const now = this.#clock.now();
    for (const w of this.#windows) {
      const a = cost[w.key];
      if (a === undefined) continue;
      checkAmount(a, w.key, "record");
      if (a > 0) w.push(now, a);
    }
  }

  /**
   * A snapshot of every window's usage, in window order.
   *
   * @returns One {@linkcode WindowUsage} per window.
   */
  usage(): WindowUsage[] {
    const now = this.#clock.now();
    return this.#windows.map((w) => {
      w.expire(now);
      return {
        key: w.key,
        limit: w.limit,
        ms: w.ms,
        marginMs: w.margin,
        used: w.used,
        remaining: Math.max(0, w.limit - w.used),
        entries: w.size,
      };
    });
  }

  // --- private ---------------------------------------------------------------

  #addWindow(
    key: string,
    limit: number,
    ms: number,
    margin: number | undefined,
  ): void {
    if (this.#windows.some((w) => w.key === key && w.ms === ms)) {
      throw new RangeError(
        `RateLimiter has two windows for key '${key}' with ms ${ms}`,
      );
    }
    const m = margin ?? defaultMargin(ms, this.#defaultMargin);
    this.#windows.push(new SlidingWindow(key, limit, ms, m));
    if (key === "tokens") this.#hasTokens = true;
    this.#defaultAmounts = undefined;
  }

  /**
   * Per-window amounts for a cost; validates it and fails fast if it can
   * never fit. The default cost's array is cached and shared (permits copy
   * it before they change it).
   */
  #amounts(cost: Cost): number[] {
    if (cost === DEFAULT_COST) {
      return this.#defaultAmounts ??= this.#computeAmounts(cost);
    }
    return this.#computeAmounts(cost);
  }

  #computeAmounts(cost: Cost): number[] {
    if (typeof cost !== "object" || cost === null) {
      throw new TypeError(
        `RateLimiter cost must be an object like { requests: 1 }: received ${
          String(cost)
        }`,
      );
    }
    const ws = this.#windows;
    const out: number[] = new Array(ws.length).fill(0);
    let derivedTokens = -1;
    for (let i = 0; i < ws.length; i++) {
      const w = ws[i]!;
      let a = cost[w.key];
      if (a === undefined) {
        if (w.key === "tokens" && this.#hasTokens) {
          if (derivedTokens < 0) {
            derivedTokens =
              checkAmount(cost.inputTokens ?? 0, "inputTokens", "cost") +
              checkAmount(cost.outputTokens ?? 0, "outputTokens", "cost");
          }
          a = derivedTokens;
        } else continue;
      } else checkAmount(a, w.key, "cost");
      if (a > w.limit) {
        throw new RangeError(
          `Cost can never fit: ${w.key} ${a} exceeds the window limit ${w.limit} per ${w.ms} ms`,
        );
      }
      out[i] = a;
    }
    return out;
  }

  /** Whether `amounts` fit in every window now (the hot path). */
  #fits(amounts: number[], now: number): boolean {
    if (this.#pausedUntil > now) return false;
    const ws = this.#windows;
    for (let i = 0; i < ws.length; i++) {
      const a = amounts[i]!;
      if (a !== 0 && !ws[i]!.fits(a, now)) return false;
    }
    return true;
  }

  /** ms until `amounts` fit in every window and any pause is over; ≤ 0 means now. */
  #waitMs(amounts: number[], now: number): number {
    let wait = this.#pausedUntil - now;
    const ws = this.#windows;
    for (let i = 0; i < ws.length; i++) {
      const a = amounts[i]!;
      if (a === 0) continue;
      const w = ws[i]!;
      const t = w.timeUntilFits(a, now);
      if (t > wait) wait = t;
    }
    return wait;
  }

  #charge(cost: Cost, amounts: number[], now: number): Permit {
    const ws = this.#windows;
    const seqs: number[] = new Array(ws.length);
    // Zero amounts get entries too, so a later settle lands at the right time.
    for (let i = 0; i < ws.length; i++) seqs[i] = ws[i]!.push(now, amounts[i]!);
    return new Permit(new WindowHold(this.#ledger, amounts, seqs), now, cost);
  }

  async #acquireSlow(
    cost: Cost,
    amounts: number[],
    signal: AbortSignal | undefined,
  ): Promise<Permit> {
    const lock = await this.#mutex.lock(signal);
    try {
      for (;;) {
        // Limits may have changed while we waited; re-derive and re-check.
        amounts = this.#amounts(cost);
        const now = this.#clock.now();
        const wait = this.#waitMs(amounts, now);
        if (wait <= 0) return this.#charge(cost, amounts, now);
        this.#head = { amounts, until: now + wait };
        await this.#sleepHead(wait, signal);
      }
    } finally {
      lock.release();
    }
  }

  /** Sleeps as the head waiter; returns early (no error) when woken. */
  async #sleepHead(ms: number, signal: AbortSignal | undefined): Promise<void> {
    const ctl = new AbortController();
    this.#wake = ctl;
    const onAbort = (): void => ctl.abort(signal!.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      await this.#clock.sleep(ms, ctl.signal);
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      if (error !== WAKE) throw error;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (this.#wake === ctl) this.#wake = undefined;
    }
  }

  #wakeHead(): void {
    this.#wake?.abort(WAKE);
  }

  /**
   * Wakes the head waiter if freed capacity lets it go sooner than it
   * planned; a settle that frees a window that does not bind it changes
   * nothing, and waking it would only cost a new timer.
   */
  #wakeHeadIfSooner(): void {
    const head = this.#head;
    if (!this.#wake || !head) return;
    if (head.amounts.length !== this.#windows.length) return this.#wakeHead();
    const now = this.#clock.now();
    if (now + this.#waitMs(head.amounts, now) < head.until - 0.5) {
      this.#wakeHead();
    }
  }

  #restamp(own: number[], seqs: number[]): void {
    const ws = this.#windows;
    const now = this.#clock.now();
    const n = Math.min(ws.length, seqs.length);
    for (let i = 0; i < n; i++) {
      const w = ws[i]!;
      w.expire(now);
      if (!w.holds(seqs[i]!)) continue;
      w.addTo(seqs[i]!, -own[i]!);
      seqs[i] = w.push(now, own[i]!);
    }
  }

  #settle(
    cost: Cost,
    charged: number[],
    own: number[],
    seqs: number[],
  ): void {
    const ws = this.#windows;
    const now = this.#clock.now();
    let freed = false;
    let derived = -1;
    const n = Math.min(ws.length, charged.length);
    for (let i = 0; i < n; i++) {
      const w = ws[i]!;
      let a = cost[w.key];
      if (a === undefined) {
        if (w.key !== "tokens") continue;
        if (derived < 0) {
          derived = (cost.inputTokens ?? 0) + (cost.outputTokens ?? 0);
        }
        a = derived;
      }
      const delta = a - charged[i]!;
      if (delta === 0) continue;
      charged[i] = a;
      w.expire(now);
      if (w.holds(seqs[i]!)) {
        // Never take back more than this permit put into its entry (entries
        // may be shared with other permits stamped at the same time).
        const d = Math.max(delta, -own[i]!);
        w.addTo(seqs[i]!, d);
        own[i]! += d;
        if (d < 0) freed = true;
      } else if (delta > 0) {
        // The entry left its window; the extra usage counts from now.
        seqs[i] = w.push(now, delta);
        own[i] = delta;
      }
    }
    if (freed) this.#wakeHeadIfSooner();
  }
}

/**
 * What the limiter needs from the state of one window. Everything it does
 * goes through these few operations — check (`fits`, `timeUntilFits`),
 * insert (`push`) and settle (`holds`, `addTo`) — so a shared store (say,
 * Redis with a sorted set per window and a script for check-and-insert)
 * can implement it for several workers on one API key without touching the
 * limiter's queueing logic.
 */
interface WindowLog {
  readonly key: string;
  readonly ms: number;
  limit: number;
  margin: number;
  life: number;
  readonly used: number;
  readonly size: number;
  expire(now: number): void;
  fits(amount: number, now: number): boolean;
  timeUntilFits(amount: number, now: number): number;
  push(now: number, amount: number): number;
  holds(seq: number): boolean;
  addTo(seq: number, delta: number): void;
}

/**
 * The in-memory {@linkcode WindowLog}: a ring buffer of `(time, amount)`
 * entries with a running sum. Entries are addressed by a sequence number
 * that keeps growing, so a {@linkcode Permit} can find its entry until it
 * expires.
 */
class SlidingWindow implements WindowLog {
  key: string;
  limit: number;
  readonly ms: number;
  margin: number;
  /** Entry lifetime: an entry at time t counts while now < t + life. */
  life: number;
  readonly bucket: number;
  used = 0;
  #times = new Float64Array(16);
  #amounts = new Float64Array(16);
  #mask = 15;
  #head = 0; // sequence number of the oldest entry
  #tail = 0; // sequence number of the next entry

  constructor(key: string, limit: number, ms: number, margin: number) {
    this.key = key;
    this.limit = limit;
    this.ms = ms;
    this.margin = margin;
    this.life = ms + margin;
    this.bucket = ms > BUCKET_ABOVE_MS ? ms / BUCKETS : 0;
  }

  get size(): number {
    return this.#tail - this.#head;
  }

  expire(now: number): void {
    const times = this.#times;
    const amounts = this.#amounts;
    const mask = this.#mask;
    const life = this.life;
    let h = this.#head;
    const t = this.#tail;
    while (h < t && times[h & mask]! + life <= now) {
      this.used -= amounts[h & mask]!;
      h++;
    }
    this.#head = h;
    if (h === t) this.used = 0; // no drift from fractional amounts
  }

  fits(amount: number, now: number): boolean {
    this.expire(now);
    return this.used + amount <= this.limit;
  }

  /** ms from `now` until `amount` more fits; ≤ 0 if it fits now. */
  timeUntilFits(amount: number, now: number): number {
    this.expire(now);
    const excess = this.used + amount - this.limit;
    if (excess <= 0) return 0;
    const times = this.#times;
    const amounts = this.#amounts;
    const mask = this.#mask;
    let freed = 0;
    let h = this.#head;
    for (; h < this.#tail; h++) {
      freed += amounts[h & mask]!;
      if (freed >= excess) break;
    }
    if (h === this.#tail) h--; // rounding: wait for everything to expire
    return times[h & mask]! + this.life - now;
  }

  /** Adds an entry (or merges into the newest one); returns its sequence number. */
  push(now: number, amount: number): number {
    this.used += amount;
    const time = this.bucket > 0
      ? Math.ceil(now / this.bucket) * this.bucket
      : now;
    const size = this.#tail - this.#head;
    if (size > 0) {
      const last = (this.#tail - 1) & this.#mask;
      if (this.#times[last] === time || size >= MAX_ENTRIES) {
        if (time > this.#times[last]!) this.#times[last] = time;
        this.#amounts[last]! += amount;
        return this.#tail - 1;
      }
    }
    if (size === this.#mask + 1) this.#grow();
    const i = this.#tail & this.#mask;
    this.#times[i] = time;
    this.#amounts[i] = amount;
    return this.#tail++;
  }

  /** Whether the entry with sequence number `seq` is still stored. */
  holds(seq: number): boolean {
    return seq >= this.#head && seq < this.#tail;
  }

  /** Adds `delta` to a stored entry's amount. */
  addTo(seq: number, delta: number): void {
    this.#amounts[seq & this.#mask]! += delta;
    this.used += delta;
  }

  #grow(): void {
    const cap = (this.#mask + 1) * 2;
    const times = new Float64Array(cap);
    const amounts = new Float64Array(cap);
    const newMask = cap - 1;
    for (let s = this.#head; s < this.#tail; s++) {
      times[s & newMask] = this.#times[s & this.#mask]!;
      amounts[s & newMask] = this.#amounts[s & this.#mask]!;
    }
    this.#times = times;
    this.#amounts = amounts;
    this.#mask = newMask;
  }
}

/**
 * Checks that `options` is an object whose keys are all known, so a typo
 * (`retires: 3`) fails loudly instead of being ignored.
 */
function checkOptions(
  options: unknown,
  known: ReadonlySet<string>,
  where: string,
): void {
  if (typeof options !== "object" || options === null) {
    throw new TypeError(
      `${where} options must be an object: received ${String(options)}`,
    );
  }
  for (const k of Object.keys(options)) {
    if (!known.has(k)) {
      throw new TypeError(
        `Unknown ${where} option '${k}': expected one of ${
          [...known].join(", ")
        }`,
      );
    }
  }
}

function checkNumber(
  value: unknown,
  name: string,
  where: string,
): asserts value is number {
  if (typeof value !== "number") {
    throw new TypeError(
      `${where} '${name}' must be a number: received ${typeof value} ${
        String(value)
      }`,
    );
  }
}

/** A finite number ≥ 0. */
function checkNonNegative(
  value: unknown,
  name: string,
  where: string,
): asserts value is number {
  checkNumber(value, name, where);
  if (!(value >= 0) || value === Infinity) {
    throw new RangeError(
      `${where} '${name}' must be a finite number >= 0: received ${value}`,
    );
  }
}

/** A finite number > 0. */
function checkPositive(
  value: unknown,
  name: string,
  where: string,
): asserts value is number {
  checkNumber(value, name, where);
  if (!(value > 0) || value === Infinity) {
    throw new RangeError(
      `${where} '${name}' must be a positive finite number: received ${value}`,
    );
  }
}

function checkLimit(value: unknown, name: string): void {
  checkPositive(value, name, "RateLimiter");
}

function checkMs(value: unknown, name: string): void {
  checkPositive(value, name, "RateLimiter");
}

function checkMargin(value: unknown, name: string): void {
  checkNonNegative(value, name, "RateLimiter");
}

function checkAmount(value: unknown, key: string, where: string): number {
  checkNonNegative(value, key, `RateLimiter ${where}`);
  return value;
}

// =============================================================================
// Shared limits: RedisRateLimiter
// =============================================================================

/**
 * Runs a Lua script on Redis with `EVAL`: your own client's call, so
 * paceline needs no Redis package. Resolve with the script's reply (an array
 * of strings here).
 *
 * @example
 * ```ts
 * import type { RedisEval } from "./mod.ts";
 *
 * // node-redis 5/6:  (script, keys, args) => client.eval(script, { keys, arguments: args })
 * // ioredis:         (script, keys, args) => client.eval(script, keys.length, ...keys, ...args)
 * // Bun RedisClient: (script, keys, args) => client.send("EVAL", [script, String(keys.length), ...keys, ...args])
 * const inMemoryStub: RedisEval = () => Promise.resolve(["ok"]);
 * if (!Array.isArray(await inMemoryStub("return 1", [], []))) throw new Error();
 * ```
 */
export type RedisEval = (
  script: string,
  keys: string[],
  args: string[],
) => Promise<unknown>;

/**
 * Options for {@linkcode RedisRateLimiter}: the limits of
 * {@linkcode RateLimiterOptions}, and where the shared state lives.
 *
 * @example
 * ```ts
 * import type { RedisRateLimiterOptions } from "./mod.ts";
 *
 * const options: RedisRateLimiterOptions = {
 *   redis: () => Promise.resolve([]), // your client's EVAL
 *   name: "anthropic-team-key",
 *   rpm: 50,
 *   itpm: 30_000,
 * };
 * if (options.name !== "anthropic-team-key") throw new Error();
 * ```
 */
export interface RedisRateLimiterOptions extends RateLimiterOptions {
  /** Runs `EVAL` on your Redis client; see {@linkcode RedisEval}. */
  redis: RedisEval;
  /** Instances with the same name share every window, the pause and learned limits. */
  name: string;
  /**
   * How long one Redis call may take before the limiter gives up on it and
   * fails the acquire with a {@linkcode RedisLimiterError}, ms. Default 5,000.
   */
  timeoutMs?: number;
  /** The Redis key's prefix; default `"paceline"` (key `paceline:{name}`). */
  prefix?: string;
}

/**
 * Redis failed or did not answer in time, so a {@linkcode RedisRateLimiter}
 * admitted nothing (it fails closed). `cause` holds the client's error.
 *
 * @example
 * ```ts
 * import { RedisLimiterError, RedisRateLimiter } from "./mod.ts";
 *
 * const limiter = new RedisRateLimiter({
 *   redis: () => Promise.reject(new Error("ECONNREFUSED")),
 *   name: "demo",
 *   rpm: 10,
 * });
 * const error = await limiter.acquire().catch((e) => e);
 * if (!(error instanceof RedisLimiterError) || !/Redis/.test(error.message)) throw error;
 * ```
 */
export class RedisLimiterError extends Error {
  /**
   * Creates the error; {@linkcode RedisRateLimiter} does this for you.
   *
   * @param message What failed, naming Redis and the limiter.
   * @param cause The client's error, if any.
   */
  constructor(message: string, cause?: unknown) {
    super(message, { cause });
    this.name = "RedisLimiterError";
  }
}

/**
 * Entry numbers of a new shared state start at `EPOCH_BASE ×` its start
 * time (Redis ms): above any number an earlier state could have reached
 * (fewer than this many entries per ms), and exact in a double.
 */
const EPOCH_BASE = 1024;

/**
 * The one script every {@linkcode RedisRateLimiter} call runs. All state of
 * a name lives in one hash (`KEYS[1]`), so Redis Cluster sees one key:
 *
 * - `cfg`: the windows, `key|ms|limit|margin;…` (given, learned, set);
 * - `last`: the latest reserved time; `paused`: the pause's end;
 * - `epoch`: which state this is (a new one after the hash was lost);
 * - per window `W` (`key|ms`): `W|h` oldest stored entry, `W|n` next
 *   entry, `W|hs` sum of stored entries, `W|p` first entry inside the
 *   window that ends at `last`, `W|ts` the sum from there; entries `W|i` =
 *   `time,amount`.
 *
 * An acquire reserves the earliest time, not before `last` (FIFO across
 * processes) nor the pause, at which the cost fits every window; the
 * pointers only move forward, so a call costs O(windows) amortized however
 * many entries a window holds. Times are Redis `TIME` in ms.
 */
const REDIS_SCRIPT = `
local K = KEYS[1]
-- ARGV[1]: the operation, then what the calling instance holds: its windows
-- (the configuration it last saw), its pause left (ms), the epoch it knows.
local op, mycfg, mypause, myepoch =
  string.match(ARGV[1], '^([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)$')
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local m = redis.call('HMGET', K, 'cfg', 'last', 'paused', 'epoch')
local cfg = m[1] or ''
local last = tonumber(m[2]) or 0
local paused = tonumber(m[3]) or 0
local epoch = m[4]
local dirtyMeta = false
local function s(x)
  if x == math.floor(x) and math.abs(x) < 1e15 then return string.format('%d', x) end
  return string.format('%.17g', x)
end
local function prep(w)
  w.life = w.ms + w.margin
  w.id = w.key .. '|' .. s(w.ms)
  if w.ms > ${BUCKET_ABOVE_MS} then w.bucket = w.ms / ${BUCKETS} else w.bucket = 0 end
end
-- The windows of a configuration "key|ms|limit|margin;…".
local function parse(spec)
  local out = {}
  for one in string.gmatch(spec, '[^;]+') do
    local key, ms, limit, margin = string.match(one, '^(.*)|([^|]+)|([^|]+)|([^|]+)$')
    local w = { key = key, ms = tonumber(ms), limit = tonumber(limit), margin = tonumber(margin) }
    prep(w)
    out[#out + 1] = w
  end
  return out
end
local ws = parse(cfg)
local function save()
  local parts = {}
  for i, w in ipairs(ws) do
    parts[i] = w.key .. '|' .. s(w.ms) .. '|' .. s(w.limit) .. '|' .. s(w.margin)
  end
  cfg = table.concat(parts, ';')
  redis.call('HSET', K, 'cfg', cfg)
end
local function entry(w, i)
  local v = redis.call('HGET', K, w.id .. '|' .. s(i))
  if not v then return nil, 0 end
  local c = string.find(v, ',', 1, true)
  return tonumber(string.sub(v, 1, c - 1)), tonumber(string.sub(v, c + 1))
end
-- Loads a window's pointers once per call and drops its expired entries.
local function load(w)
  if w.h then return end
  local v = redis.call('HMGET', K, w.id .. '|h', w.id .. '|p', w.id .. '|n', w.id .. '|hs', w.id .. '|ts')
  w.h = tonumber(v[1]) or 0
  w.p = tonumber(v[2]) or 0
  w.n = tonumber(v[3]) or 0
  w.hs = tonumber(v[4]) or 0
  w.ts = tonumber(v[5]) or 0
  while w.h < w.n do
    local t, a = entry(w, w.h)
    if t and t + w.life > now then break end
    w.hs = w.hs - a
    if w.h >= w.p then
      w.ts = w.ts - a
      w.p = w.h + 1
    end
    redis.call('HDEL', K, w.id .. '|' .. s(w.h))
    w.h = w.h + 1
    w.dirty = true
  end
  if w.h >= w.n and (w.hs ~= 0 or w.ts ~= 0 or w.p ~= w.n) then
    w.hs = 0
    w.ts = 0
    w.p = w.n
    w.dirty = true
  end
end
local function amountOf(w, cost)
  local a = cost[w.key]
  if a == nil and w.key == 'tokens' and (cost.inputTokens or cost.outputTokens) then
    a = (cost.inputTokens or 0) + (cost.outputTokens or 0)
  end
  return a
end
-- Adds amount a to window w at time t (merging into a bucket); returns the entry index.
local function push(w, t, a)
  if w.bucket > 0 then t = math.ceil(t / w.bucket) * w.bucket end
  w.hs = w.hs + a
  w.ts = w.ts + a
  w.dirty = true
  if w.n > w.h then
    local lt, la = entry(w, w.n - 1)
    if lt == t then
      redis.call('HSET', K, w.id .. '|' .. s(w.n - 1), s(t) .. ',' .. s(la + a))
      return w.n - 1
    end
  end
  redis.call('HSET', K, w.id .. '|' .. s(w.n), s(t) .. ',' .. s(a))
  w.n = w.n + 1
  return w.n - 1
end
-- cost pairs "key=amount" from ARGV[from..]
local function costFrom(from)
  local cost = {}
  for i = from, #ARGV do
    local k, v = string.match(ARGV[i], '^(.*)=([^=]+)$')
    cost[k] = tonumber(v)
  end
  return cost
end
-- a cost as one argument: "key=amount,key=amount"
local function costOf(str)
  local cost = {}
  for k, v in string.gmatch(str, '([^,=]+)=([^,=]+)') do cost[k] = tonumber(v) end
  return cost
end
local function byId(id)
  for _, w in ipairs(ws) do
    if w.id == id then return w end
  end
end
-- "id=idx=delta;..." applied: the settle of a permit. Returns the new "id=idx;...".
local function settle(spec)
  local out = {}
  for id, idx, d in string.gmatch(spec, '([^;]*)=([^=;]+)=([^=;]+)') do
    local w = byId(id)
    if w then
      idx = tonumber(idx)
      d = tonumber(d)
      load(w)
      if idx >= w.h and idx < w.n then
        local t, a = entry(w, idx)
        redis.call('HSET', K, w.id .. '|' .. s(idx), s(t) .. ',' .. s(math.max(0, a + d)))
        w.hs = w.hs + d
        if idx >= w.p then w.ts = w.ts + d end
        w.dirty = true
      elseif d > 0 then
        idx = push(w, math.max(now, last), d)
      else
        idx = -1
      end
      out[#out + 1] = id .. '=' .. s(idx)
    end
  end
  return table.concat(out, ';')
end
local function reserve(cost)
  local T = math.max(now, last, paused)
  local amounts = {}
  for i, w in ipairs(ws) do
    local a = amountOf(w, cost)
    amounts[i] = a
    if a and a > w.limit then
      return nil, w.key .. '|' .. s(a) .. '|' .. s(w.limit) .. '|' .. s(w.ms)
    end
  end
  local moved = true
  while moved do
    moved = false
    for i, w in ipairs(ws) do
      local a = amounts[i]
      if a and a > 0 then
        load(w)
        while w.p < w.n do
          local t, b = entry(w, w.p)
          if t and t + w.life > T then break end
          w.ts = w.ts - b
          w.p = w.p + 1
          w.dirty = true
        end
        while w.ts + a > w.limit and w.p < w.n do
          local t, b = entry(w, w.p)
          if t and t + w.life > T then
            T = t + w.life
            moved = true
          end
          w.ts = w.ts - b
          w.p = w.p + 1
          w.dirty = true
        end
        if w.p >= w.n then w.ts = 0 end
      end
    end
  end
  local out = {}
  for i, w in ipairs(ws) do
    local a = amounts[i]
    if a then
      load(w)
      out[#out + 1] = w.id .. '=' .. s(push(w, T, a))
    end
  end
  last = T
  dirtyMeta = true
  return T, table.concat(out, ';')
end
-- Writes what changed, keeps the key alive while it matters, and answers:
-- { tag, wait, pause left, cfg, used per window, extra }.
local function reply(tag, wait, extra)
  local used = {}
  local life = 60000
  for i, w in ipairs(ws) do
    load(w)
    if w.dirty then
      redis.call('HSET', K, w.id .. '|h', s(w.h), w.id .. '|p', s(w.p), w.id .. '|n', s(w.n),
        w.id .. '|hs', s(w.hs), w.id .. '|ts', s(w.ts))
    end
    used[i] = s(math.max(0, w.hs))
    if w.life > life then life = w.life end
  end
  if dirtyMeta then redis.call('HSET', K, 'last', s(last), 'paused', s(paused)) end
  redis.call('PEXPIRE', K, math.ceil(math.max(last, paused, now) - now + life + 60000))
  return { tag, s(wait), s(paused - now), cfg, table.concat(used, ','), extra or '', epoch }
end

-- The state is missing (Redis restarted empty, was flushed, failed over to
-- a replica that missed it, or evicted the key) or was never made: install
-- the caller's windows and pause, never "no windows". Each new state is an
-- epoch whose entry numbers start at BASE × its start time, above every
-- number of an earlier state, so entries held from before read as gone.
if cfg == '' and mycfg ~= '' or not epoch then
  local base = now * ${EPOCH_BASE}
  epoch = s(base)
  redis.call('HSET', K, 'epoch', epoch)
  if cfg == '' and mycfg ~= '' then
    cfg = mycfg
    ws = parse(cfg)
    for _, w in ipairs(ws) do
      w.h, w.p, w.n, w.hs, w.ts, w.dirty = base, base, base, 0, 0, true
    end
    save()
    paused = math.max(paused, now + (tonumber(mypause) or 0))
    dirtyMeta = true
  end
end
-- A caller that knew another epoch re-seeds its own recent grants first.
if myepoch ~= '' and myepoch ~= epoch and op ~= 'seed' and op ~= 'init' then
  return reply('reseed', 0)
end

if op == 'init' then
  -- given windows: ARGV[2..] as key|ms|limit|margin; they replace same-key, same-ms ones
  for i = 2, #ARGV do
    local key, ms, limit, margin = string.match(ARGV[i], '^(.*)|([^|]+)|([^|]+)|([^|]+)$')
    local found = false
    for _, w in ipairs(ws) do
      if w.key == key and w.ms == tonumber(ms) then
        w.limit = tonumber(limit)
        w.margin = tonumber(margin)
        prep(w)
        found = true
      end
    end
    if not found then
      local w = { key = key, ms = tonumber(ms), limit = tonumber(limit), margin = tonumber(margin) }
      prep(w)
      ws[#ws + 1] = w
    end
  end
  save()
  return reply('ok', 0)
elseif op == 'acquire' then
  -- ARGV[2..]: one cost each, reserved in order (a batch of this process's
  -- callers): per cost "ok <wait> <entries>" or "never <why>", one a line.
  local out = {}
  for i = 2, #ARGV do
    local T, extra = reserve(costOf(ARGV[i]))
    if T then
      out[#out + 1] = 'ok ' .. s(T - now) .. ' ' .. extra
    else
      out[#out + 1] = 'never ' .. extra
    end
  end
  return reply('ok', 0, table.concat(out, '\\n'))
elseif op == 'confirm' then
  -- ARGV[2]: the entries held (given back if a pause moved us); ARGV[3]: the cost
  -- Entries from before a lost state are gone: reserve anew.
  local held = true
  for id, idx in string.gmatch(ARGV[2], '([^;]*)=([^=;]+)=[^=;]+') do
    local w = byId(id)
    if w then
      load(w)
      idx = tonumber(idx)
      if idx < w.h or idx >= w.n then held = false end
    end
  end
  if held then
    if now >= paused then
      -- Sending now: the entries count from now, not from their reserved time
      -- (later times only make the log more cautious).
      for id, idx in string.gmatch(ARGV[2], '([^;]*)=([^=;]+)=[^=;]+') do
        local w = byId(id)
        if w and w.bucket == 0 then
          local t, a = entry(w, tonumber(idx))
          if t and t < now then
            redis.call('HSET', K, w.id .. '|' .. idx, s(now) .. ',' .. s(a))
          end
        end
      end
      return reply('go', 0)
    end
    settle(ARGV[2])
  end
  local T, extra = reserve(costOf(ARGV[3]))
  if not T then return reply('never', 0, extra) end
  return reply('ok', T - now, extra)
elseif op == 'settle' then
  return reply('ok', 0, settle(ARGV[2]))
elseif op == 'seed' then
  -- ARGV[2..]: "age,key=amount,…": what this instance was granted, age ms
  -- ago; each goes back into the windows it is still inside.
  for i = 2, #ARGV do
    local age, rest = string.match(ARGV[i], '^([^,]+),(.*)$')
    age = tonumber(age)
    local cost = costOf(rest)
    for _, w in ipairs(ws) do
      local a = amountOf(w, cost)
      if a and a > 0 and age < w.life then
        load(w)
        push(w, now - age, a)
      end
    end
  end
  return reply('ok', 0)
elseif op == 'record' then
  local cost = costFrom(2)
  for _, w in ipairs(ws) do
    local a = amountOf(w, cost)
    if a and a > 0 then
      load(w)
      push(w, math.max(now, last), a)
    end
  end
  return reply('ok', 0)
elseif op == 'pause' then
  paused = math.max(paused, now + tonumber(ARGV[2]))
  dirtyMeta = true
  return reply('ok', 0)
elseif op == 'limit' or op == 'margin' then
  -- ARGV: key, ms ('' = every window of that key), value, default margin
  local key, ms, value = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local found = false
  for _, w in ipairs(ws) do
    if w.key == key and (ms == nil or w.ms == ms) then
      if op == 'limit' then w.limit = value else w.margin = value end
      prep(w)
      found = true
    end
  end
  if not found and op == 'limit' and ms then
    local w = { key = key, ms = ms, limit = value, margin = tonumber(ARGV[5]) }
    prep(w)
    ws[#ws + 1] = w
  end
  save()
  return reply('ok', 0)
end
return reply('ok', 0)
`;

/** A reply of {@linkcode REDIS_SCRIPT}, parsed. */
interface RedisReply {
  tag: string;
  wait: number;
  pausedIn: number;
  windows: WindowUsage[];
  /** Entries held, `id=idx;…`, or why a cost can never fit. */
  extra: string;
}

/** Window specs as the script stores them: `key|ms|limit|margin`. */
function specOf(
  w: { key: string; ms: number; limit: number; marginMs: number },
): string {
  return `${w.key}|${w.ms}|${w.limit}|${w.marginMs}`;
}

/** A limiter for one model of a shared key: the same Redis, a name of its own. Internal. */
const REDIS_OPTIONS = new Set([
  ...LIMITER_OPTIONS,
  "redis",
  "name",
  "timeoutMs",
  "prefix",
]);

/**
 * A {@linkcode RateLimiter} whose windows live in Redis, so several
 * processes or machines share one key's limits: every instance with the
 * same `name` shares every window, the pause and learned limits. Bring your
 * own client (see {@linkcode RedisEval}); paceline stays dependency-free.
 *
 * Same meaning as {@linkcode RateLimiter} for windows, weighted costs,
 * `marginMs`, `acquire(cost, { signal })`, {@linkcode Permit.settle},
 * `pause`/`pauseUntil` and `setLimit`. How it works: one script call (for
 * all of this instance's callers waiting at that moment, in their order)
 * reserves, atomically over every window, the earliest time at
 * which the cost fits — never before the last reservation (so admission is
 * **FIFO across processes**: a large cost is not starved by others' small
 * ones) nor before a pause — and the caller sleeps until then. Entries are
 * stamped with Redis `TIME`; the local clock only sleeps. A caller that
 * wakes inside a pause set meanwhile (another process got a 429) takes a
 * new place after it. The cost of a call does not grow with the entries in
 * a window. All state of a name is one hash, `paceline:{name}` (one key,
 * so Redis Cluster works), which expires when no longer used.
 *
 * Differences from the in-memory limiter: a reservation made earlier is not
 * moved earlier when capacity is freed (settling helps later reservations);
 * `usage()` and `pausedUntil` are what this instance last saw from Redis
 * (`refresh()` reads them now); `setLimit`, `setMargin`, `record` and
 * `pause` are sent in the background, in order, before this instance's next
 * acquire; `tryAcquire` cannot answer synchronously and throws.
 *
 * Fails closed: if Redis errors or does not answer within `timeoutMs`, the
 * acquire rejects with a {@linkcode RedisLimiterError} and nothing is
 * admitted. A connection lost and back within `timeoutMs` (a restart, a
 * failover) is a blip: calls are tried again meanwhile. An aborted waiter
 * gives its reservation back. A reply lost to a timeout may leave its
 * reservation behind: it expires with its window and can only slow others,
 * never admit more.
 *
 * Never unlimited when Redis loses the state (a restart without
 * persistence, `FLUSHALL`, a failover to a replica that missed it, an
 * eviction): every call carries this instance's windows (given and
 * learned) and its pause, and the script installs them when the hash is
 * gone. The new state is a new epoch: each instance, on its next call,
 * puts back what it was granted within the last window, so the rebuilt
 * windows are close to what the server still counts, and reservations held
 * from before are made anew.
 *
 * @example Four workers sharing one key's "50 per minute" (here, an in-memory stand-in for Redis)
 * ```ts
 * import { RedisRateLimiter } from "./mod.ts";
 *
 * // With node-redis: const client = await createClient({ url }).connect();
 * //   const redis = (s, k, a) => client.eval(s, { keys: k, arguments: a });
 * const redis = () => Promise.reject(new Error("no Redis in this example"));
 * const limiter = new RedisRateLimiter({ redis, name: "team-key", rpm: 50, timeoutMs: 100 });
 * if (limiter.usage()[0]!.limit !== 50) throw new Error();
 * ```
 */
export class RedisRateLimiter implements Limiter {
  readonly #redis: RedisEval;
  readonly #key: string;
  readonly #name: string;
  readonly #clock: Clock;
  readonly #timeoutMs: number;
  readonly #given: string[];
  readonly #defaultMargin: number | undefined;
  readonly #options: RedisRateLimiterOptions;
  #ready: Promise<void> | undefined;
  #background: Promise<unknown> = Promise.resolve();
  #windows: WindowUsage[];
  #pausedUntil = -Infinity;
  #waiting = 0;
  #batch: BatchJob[] = [];
  #batching = false;
  /** The shared state this instance knows (see the script's epochs). */
  #epoch = "";
  /** What this instance was granted lately: re-seeded if the state is lost. */
  readonly #grants = new GrantLog();

  /**
   * Creates a limiter on the shared state of `name` (nothing is sent to
   * Redis until the first call).
   *
   * @param options The client's `EVAL`, the shared name, and the limits;
   *   see {@linkcode RedisRateLimiterOptions}.
   * @throws {TypeError | RangeError} For invalid options, naming them.
   */
  constructor(options: RedisRateLimiterOptions) {
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `RedisRateLimiter options must be an object: received ${
          String(options)
        }`,
      );
    }
    checkOptions(options, REDIS_OPTIONS, "RedisRateLimiter");
    const { redis, name, timeoutMs = 5000, prefix = "paceline", ...limits } =
      options;
    const settings = limiterSettings(limits);
    if (typeof redis !== "function") {
      throw new TypeError(
        `RedisRateLimiter 'redis' must be a function (script, keys, args) => Promise: received ${typeof redis}`,
      );
    }
    if (typeof name !== "string" || name === "" || /[{}]/.test(name)) {
      throw new TypeError(
        `RedisRateLimiter 'name' must be a non-empty string without braces: received ${
          JSON.stringify(name)
        }`,
      );
    }
    if (typeof prefix !== "string") {
      throw new TypeError(
        `RedisRateLimiter 'prefix' must be a string: received ${typeof prefix}`,
      );
    }
    checkPositive(timeoutMs, "timeoutMs", "RedisRateLimiter");
    this.#redis = redis;
    this.#name = name;
    this.#key = `${prefix}:{${name}}`;
    this.#clock = settings.clock;
    this.#timeoutMs = timeoutMs;
    this.#defaultMargin = limits.marginMs;
    this.#options = options;
    this.#windows = settings.windows.map((w) => ({
      ...w,
      used: 0,
      remaining: w.limit,
      entries: 0,
    }));
    this.#given = this.#windows.map(specOf);
  }

  /** The shared name. */
  get name(): string {
    return this.#name;
  }

  /** Callers of this instance waiting in {@linkcode RedisRateLimiter.acquire}. */
  get pending(): number {
    return this.#waiting;
  }

  /** The pause's end as this instance last saw it (local clock ms); `-Infinity` if none. */
  get pausedUntil(): number {
    return this.#pausedUntil > this.#clock.now()
      ? this.#pausedUntil
      : -Infinity;
  }

  /**
   * Waits for a place for `cost` in every shared window, then charges it.
   *
   * @param cost Amounts per key; default `{ requests: 1 }`.
   * @param options `signal` to give up waiting (the reservation is given back).
   * @returns A permit; settle it with the real cost when known.
   * @throws {RangeError} If the cost can never fit a window.
   * @throws {RedisLimiterError} If Redis fails or does not answer in time.
   */
  async acquire(
    cost: Cost = { requests: 1 },
    options?: AcquireOptions,
  ): Promise<Permit> {
    const signal = options?.signal;
    const pairs = costPairs(cost).join(",");
    if (signal?.aborted) throw signal.reason;
    this.#waiting++;
    /** The entries this caller holds (`id=idx;…`). */
    let entries = "";
    // A reply that arrives after an abort: give back what it reserved.
    const late = (r: RedisReply): void => {
      if (r.tag === "ok") this.#giveBack(r.extra, cost);
      else if (r.tag === "go") this.#giveBack(entries, cost);
    };
    try {
      let reply = await this.#reserve(pairs, cost, signal);
      for (;;) {
        if (reply.tag === "never") {
          const [key, amount, limit, ms] = reply.extra.split("|");
          throw new RangeError(
            `Cost can never fit: ${key} ${amount} exceeds the window limit ${limit} per ${ms} ms`,
          );
        }
        if (reply.tag === "go") break;
        entries = reply.extra;
        if (reply.wait <= 0) break;
        try {
          await this.#clock.sleep(reply.wait, signal);
        } catch (error) {
          this.#giveBack(entries, cost);
          throw signal?.aborted ? signal.reason : error;
        }
        // Woken: go, unless a pause began meanwhile (then a new place after it).
        reply = await this.#call(
          ["confirm", settleSpec(entries, cost, true), pairs],
          signal,
          late,
        );
      }
      const now = this.#clock.now();
      const grant = this.#grants.add(now, cost, this.#longestLife());
      const hold = new RedisHold(cost, entries, (spec, actual) => {
        grant.cost = actual;
        this.#queue(["settle", spec]);
      });
      return new Permit(hold, now, cost);
    } finally {
      this.#waiting--;
    }
  }

  /**
   * Not available: admission needs a Redis round trip.
   *
   * @throws {TypeError} Always; use {@linkcode RedisRateLimiter.acquire}.
   */
  tryAcquire(_cost?: Cost): Permit | undefined {
    throw new TypeError(
      "RedisRateLimiter.tryAcquire cannot answer without a Redis round trip: use acquire()",
    );
  }

  /**
   * Checks that `cost` can ever fit, from the windows last seen; returns the
   * time until the pause last seen ends (a lower bound on the wait).
   *
   * @param cost Amounts per key.
   * @returns ms, ≥ 0.
   * @throws {RangeError} If the cost can never fit a window.
   */
  timeUntil(cost: Cost = { requests: 1 }): number {
    costPairs(cost);
    for (const w of this.#windows) {
      const a = cost[w.key] ??
        (w.key === "tokens" &&
            (cost.inputTokens !== undefined || cost.outputTokens !== undefined)
          ? (cost.inputTokens ?? 0) + (cost.outputTokens ?? 0)
          : 0);
      if (a > w.limit) {
        throw new RangeError(
          `Cost can never fit: ${w.key} ${a} exceeds the window limit ${w.limit} per ${w.ms} ms`,
        );
      }
    }
    return Math.max(0, this.#pausedUntil - this.#clock.now());
  }

  /**
   * Pauses every instance of this name for the next `ms` milliseconds.
   *
   * @param ms Duration; must be ≥ 0 and finite.
   * @throws {RangeError} If `ms` is negative, `NaN` or infinite.
   */
  pause(ms: number): void {
    checkMargin(ms, "pause ms");
    this.pauseUntil(this.#clock.now() + ms);
  }

  /**
   * Pauses every instance of this name until `time` (local clock ms).
   *
   * @param time When admission may resume.
   */
  pauseUntil(time: number): void {
    if (typeof time !== "number" || Number.isNaN(time)) {
      throw new RangeError(
        `RedisRateLimiter.pauseUntil 'time' must be a number: received ${
          String(time)
        }`,
      );
    }
    const ms = time - this.#clock.now();
    if (!(ms > 0)) return;
    if (time > this.#pausedUntil) this.#pausedUntil = time;
    this.#queue(["pause", String(Math.ceil(ms))]);
  }

  /**
   * Sets (or adds) a shared window's limit: every instance of this name
   * uses it from its next acquire.
   *
   * @param key The cost key.
   * @param limit The new limit.
   * @param ms The window length; required to add a window.
   */
  setLimit(key: string, limit: number, ms?: number): void {
    const matches = setLimitTargets(
      "RedisRateLimiter",
      this.#windows,
      key,
      limit,
      ms,
    );
    const margin = defaultMargin(ms ?? 0, this.#defaultMargin);
    if (matches.length) { for (const w of matches) w.limit = limit; }
    else {
      this.#windows.push({
        key,
        limit,
        ms: ms!,
        marginMs: margin,
        used: 0,
        remaining: limit,
        entries: 0,
      });
    }
    this.#queue([
      "limit",
      key,
      ms === undefined ? "" : String(ms),
      String(limit),
      String(margin),
    ]);
  }

  /**
   * Sets a shared window's margin (every window of `key`, or the one of `ms`).
   *
   * @param key The cost key.
   * @param marginMs The new margin.
   * @param ms The window length, to pick one window.
   */
  setMargin(key: string, marginMs: number, ms?: number): void {
    const matches = setMarginTargets(
      "RedisRateLimiter",
      this.#windows,
      key,
      marginMs,
      ms,
    );
    for (const w of matches) w.marginMs = marginMs;
    this.#queue([
      "margin",
      key,
      ms === undefined ? "" : String(ms),
      String(marginMs),
    ]);
  }

  /**
   * Charges usage that did not go through `acquire` (e.g. seen in a
   * server's `remaining` header), now, in every shared window.
   *
   * @param cost Amounts per key.
   */
  record(cost: Cost): void {
    this.#queue(["record", ...costPairs(cost)]);
  }

  /**
   * The windows as this instance last saw them in Redis (after its latest
   * call); see {@linkcode RedisRateLimiter.refresh} for a fresh view.
   *
   * @returns One snapshot per window.
   */
  usage(): WindowUsage[] {
    return this.#windows.map((w) => ({ ...w }));
  }

  /**
   * Reads every shared window from Redis now.
   *
   * @returns One snapshot per window, with every instance's usage.
   * @throws {RedisLimiterError} If Redis fails or does not answer in time.
   */
  async refresh(): Promise<WindowUsage[]> {
    await this.#call(["usage"], undefined);
    return this.usage();
  }

  /**
   * A limiter for one model's own windows on the same Redis (client,
   * prefix, timeout, default margin), under the name
   * `<name>:model:<model>`: every process on this name shares each model's
   * windows too.
   *
   * @param model The model's name (braces become `_`).
   * @param limits The model's windows, if any are known yet.
   * @returns The model's limiter.
   */
  forModel(model: string, limits: RateLimiterOptions = {}): RedisRateLimiter {
    return new RedisRateLimiter({
      redis: this.#redis,
      timeoutMs: this.#timeoutMs,
      prefix: this.#options.prefix,
      ...(this.#defaultMargin === undefined
        ? {}
        : { marginMs: this.#defaultMargin }),
      ...limits,
      name: `${this.#name}:model:${model.replace(/[{}]/g, "_")}`,
    });
  }

  // --- private ---------------------------------------------------------------

  /**
   * A first reservation. Callers of this instance that arrive while a
   * batch is in flight go together in the next one (one script call for
   * many, in their order), so one process makes few round trips however
   * many callers it has.
   */
  #reserve(
    pairs: string,
    cost: Cost,
    signal: AbortSignal | undefined,
  ): Promise<RedisReply> {
    return new Promise((resolve, reject) => {
      const job: BatchJob = { pairs, cost, signal, resolve, reject };
      if (signal) {
        job.onAbort = () => {
          const i = this.#batch.indexOf(job);
          if (i >= 0) this.#batch.splice(i, 1); // not sent yet: nothing to give back
          reject(signal.reason);
        };
        signal.addEventListener("abort", job.onAbort, { once: true });
      }
      this.#batch.push(job);
      if (!this.#batching) {
        this.#batching = true;
        queueMicrotask(() => this.#flush());
      }
    });
  }

  async #flush(): Promise<void> {
    const jobs = this.#batch.splice(0, 256);
    if (jobs.length === 0) {
      this.#batching = false;
      return;
    }
    try {
      const reply = await this.#call(
        ["acquire", ...jobs.map((j) => j.pairs)],
        undefined,
      );
      const lines = reply.extra.split("\n");
      jobs.forEach((job, i) => {
        const [tag = "", a = "", b = ""] = (lines[i] ?? "").split(" ");
        const mine: RedisReply = tag === "ok"
          ? { ...reply, tag, wait: Number(a), extra: b }
          : { ...reply, tag, wait: 0, extra: a };
        if (job.signal) {
          job.signal.removeEventListener("abort", job.onAbort!);
          if (job.signal.aborted) {
            // Aborted while its batch was in flight: give its place back.
            if (tag === "ok") this.#giveBack(b, job.cost);
            return;
          }
        }
        job.resolve(mine);
      });
    } catch (error) {
      for (const job of jobs) {
        if (job.signal) job.signal.removeEventListener("abort", job.onAbort!);
        job.reject(error);
      }
    }
    void this.#flush();
  }

  /** Runs a write in the background, after those before it. */
  #queue(args: string[]): void {
    this.#background = this.#background
      .then(() => this.#call(args, undefined, undefined, false))
      .catch(() => {
        // Redis is failing: the next acquire fails closed and says so.
      });
  }

  /** The longest time an entry counts: the longest window plus its margin. */
  #longestLife(): number {
    let life = 0;
    for (const w of this.#windows) life = Math.max(life, w.ms + w.marginMs);
    return life;
  }

  #giveBack(entries: string, cost: Cost): void {
    if (entries) this.#queue(["settle", settleSpec(entries, cost, true)]);
  }

  /**
   * One script call: this instance's windows first (once), queued writes
   * before it, a timeout, and the caller's signal. `late` gets a reply that
   * arrives after an abort (to give back what it reserved).
   */
  async #call(
    args: string[],
    signal: AbortSignal | undefined,
    late?: (reply: RedisReply) => void,
    afterWrites = true,
  ): Promise<RedisReply> {
    // Queued writes go first, except for a queued write itself.
    const before = afterWrites ? this.#background : undefined;
    const ctl = new AbortController();
    let failure: RedisLimiterError | undefined;
    const work = this.#untilAnswered(args, before, ctl.signal, (e) => {
      failure = e;
    });
    if (late) {
      work.then((r) => {
        if (signal?.aborted) late(r);
      }, () => {});
    }
    const onAbort = (): void => ctl.abort(signal!.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    const timer = this.#clock.sleep(this.#timeoutMs, ctl.signal).then(() => {
      throw failure
        ? new RedisLimiterError(
          `${
            failure.message.replace(/; nothing was admitted$/, "")
          }, and it did not come back within ${this.#timeoutMs} ms; nothing was admitted`,
          failure.cause,
        )
        : new RedisLimiterError(
          `RedisRateLimiter "${this.#name}": Redis did not answer within ${this.#timeoutMs} ms; nothing was admitted`,
        );
    });
    try {
      return await Promise.race([work, timer]);
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      throw error;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      ctl.abort();
      timer.catch(() => {});
    }
  }

  /**
   * Runs one call (this instance's windows installed first, once), again
   * and again while the client fails — a connection lost and back within
   * `timeoutMs` is a blip, not an outage — until it answers or `stop`
   * aborts (the caller's timeout). A lost reply may have been applied: a
   * repeated reservation only holds more, but a repeated give-back would
   * free too much, so a settle is never repeated (its estimate stays, the
   * cautious side).
   */
  async #untilAnswered(
    args: string[],
    before: Promise<unknown> | undefined,
    stop: AbortSignal,
    failed: (error: RedisLimiterError) => void,
  ): Promise<RedisReply> {
    for (let attempt = 0;; attempt++) {
      try {
        this.#ready ??= this.#run(["init", ...this.#given]).then(() => {});
        await this.#ready.catch((error) => {
          this.#ready = undefined; // try again
          throw error;
        });
        await before;
        return await this.#run(args);
      } catch (error) {
        const blip = error instanceof RedisLimiterError &&
          error.cause !== undefined && args[0] !== "settle";
        if (!blip || stop.aborted) throw error;
        failed(error);
        const pauseMs = Math.min(25 * 2 ** Math.min(attempt, 4), 250);
        await this.#clock.sleep(pauseMs, stop).catch(() => {});
        if (stop.aborted) throw error;
      }
    }
  }

  async #run(args: string[]): Promise<RedisReply> {
    for (let tries = 0;; tries++) {
      const reply = await this.#runOnce(args);
      if (reply.tag !== "reseed" || tries === 2) return reply;
      // The shared state was lost and rebuilt since this instance last
      // called: put back what it was granted, then do what it came for.
      await this.#runOnce(["seed", ...this.#grants.recent(this.#clock.now())]);
    }
  }

  async #runOnce(args: string[]): Promise<RedisReply> {
    const head = [
      args[0],
      this.#windows.map(specOf).join(";"),
      String(Math.max(0, Math.ceil(this.#pausedUntil - this.#clock.now()))),
      this.#epoch,
    ].join("\n");
    let raw: unknown;
    try {
      raw = await this.#redis(REDIS_SCRIPT, [this.#key], [
        head,
        ...args.slice(1),
      ]);
    } catch (error) {
      throw new RedisLimiterError(
        `RedisRateLimiter "${this.#name}": Redis failed (${
          error instanceof Error ? error.message : String(error)
        }); nothing was admitted`,
        error,
      );
    }
    if (!Array.isArray(raw) || raw.length < 6) {
      throw new RedisLimiterError(
        `RedisRateLimiter "${this.#name}": unexpected reply from Redis's EVAL (${
          JSON.stringify(raw)?.slice(0, 80)
        }); is 'redis' calling EVAL with (script, keys, args)?`,
      );
    }
    const [tag, wait, pausedIn, cfg, used, extra, epoch] = raw.map(String);
    if (epoch !== undefined) this.#epoch = epoch;
    const now = this.#clock.now();
    const p = Number(pausedIn);
    this.#pausedUntil = p > 0 ? now + p : -Infinity;
    const useds = used!.split(",");
    this.#windows = cfg!.split(";").filter(Boolean).map((spec, i) => {
      const m = /^(.*)\|([^|]+)\|([^|]+)\|([^|]+)$/.exec(spec)!;
      const limit = Number(m[3]);
      const u = Number(useds[i] ?? 0);
      return {
        key: m[1]!,
        ms: Number(m[2]),
        limit,
        marginMs: Number(m[4]),
        used: u,
        remaining: Math.max(0, limit - u),
        entries: 0,
      };
    });
    return {
      tag: tag!,
      wait: Number(wait),
      pausedIn: p,
      windows: this.#windows,
      extra: extra!,
    };
  }
}

/** A caller waiting for its first reservation, in a batch. */
interface BatchJob {
  pairs: string;
  cost: Cost;
  signal: AbortSignal | undefined;
  onAbort?: () => void;
  resolve: (reply: RedisReply) => void;
  reject: (error: unknown) => void;
}

/**
 * What one {@linkcode RedisRateLimiter} instance was granted within its
 * longest window: if Redis loses the shared state, each instance puts its
 * own grants back, so the rebuilt windows are close to what the server
 * still counts. Bounded: entries older than the longest window go, and
 * grants close together share one entry (stamped at the later time, which
 * only keeps them a little longer).
 */
class GrantLog {
  #log: { t: number; cost: Cost }[] = [];
  #head = 0;
  #life = 0;

  add(now: number, cost: Cost, life: number): { t: number; cost: Cost } {
    this.#life = life;
    this.#prune(now);
    const last = this.#log[this.#log.length - 1];
    const bucket = life / 1024;
    if (last && this.#log.length - this.#head > 256 && now - last.t < bucket) {
      // Share the entry: a sum that later settles replace only their part.
      // A new object: settles of the grants inside it are not tracked (it
      // keeps their estimates).
      const sum: Cost = { ...last.cost };
      for (const k of Object.keys(cost)) sum[k] = (sum[k] ?? 0) + cost[k]!;
      this.#log[this.#log.length - 1] = { t: now, cost: sum };
      return { t: now, cost };
    }
    const g = { t: now, cost };
    this.#log.push(g);
    return g;
  }

  /** `age,key=amount,…` for each grant still inside the longest window. */
  recent(now: number): string[] {
    this.#prune(now);
    const out: string[] = [];
    for (let i = this.#head; i < this.#log.length; i++) {
      const g = this.#log[i]!;
      out.push(
        `${Math.max(0, Math.round(now - g.t))},${costPairs(g.cost).join(",")}`,
      );
    }
    return out;
  }

  #prune(now: number): void {
    while (
      this.#head < this.#log.length &&
      now - this.#log[this.#head]!.t >= this.#life
    ) this.#head++;
    if (this.#head > 1024 && this.#head * 2 > this.#log.length) {
      this.#log = this.#log.slice(this.#head);
      this.#head = 0;
    }
  }
}

/** A permit's entries in a {@linkcode RedisRateLimiter}'s shared windows: settling sends the difference to Redis. */
class RedisHold implements PermitHold {
  /** Per window id (`key|ms`): the entry held and what this permit put in it. */
  #held = new Map<string, { idx: string; own: number }>();
  #send: (spec: string, actual: Cost) => void;

  constructor(
    cost: Cost,
    extra: string,
    send: (spec: string, actual: Cost) => void,
  ) {
    this.#send = send;
    for (const part of extra.split(";").filter(Boolean)) {
      const eq = part.lastIndexOf("=");
      const id = part.slice(0, eq);
      const key = id.slice(0, id.lastIndexOf("|"));
      this.#held.set(id, {
        idx: part.slice(eq + 1),
        own: amountFor(cost, key),
      });
    }
  }

  /** The shared windows' amounts are Redis's: none are kept here. */
  charged(): number[] {
    return [];
  }

  settle(merged: Cost): void {
    const parts: string[] = [];
    for (const [id, h] of this.#held) {
      const key = id.slice(0, id.lastIndexOf("|"));
      const a = amountFor(merged, key);
      const d = a - h.own;
      if (d === 0) continue;
      h.own = a;
      parts.push(`${id}=${h.idx}=${d}`);
    }
    if (parts.length) this.#send(parts.join(";"), merged);
  }

  /** Entries are stamped by Redis when reserved; they stay where they are. */
  restamp(): void {}
}

/** A cost's amount for a window key (`tokens` derived from input + output). */
function amountFor(cost: Cost, key: string): number {
  const a = cost[key];
  if (a !== undefined) return a;
  if (key === "tokens") {
    return (cost.inputTokens ?? 0) + (cost.outputTokens ?? 0);
  }
  return 0;
}

/** A cost as the script's `key=amount` arguments, checked. */
function costPairs(cost: Cost): string[] {
  if (typeof cost !== "object" || cost === null) {
    throw new TypeError(
      `RateLimiter cost must be an object like { requests: 1 }: received ${
        String(cost)
      }`,
    );
  }
  return Object.keys(cost).map((k) =>
    `${k}=${checkAmount(cost[k], k, "cost")}`
  );
}

/**
 * Held entries (`id=idx;…`) as a settle spec that gives back all of
 * `cost` (`id=idx=-amount;…`).
 */
function settleSpec(entries: string, cost: Cost, release: boolean): string {
  return entries.split(";").filter(Boolean).map((p) => {
    const id = p.slice(0, p.lastIndexOf("="));
    const a = release ? -amountFor(cost, id.slice(0, id.lastIndexOf("|"))) : 0;
    return `${p}=${a}`;
  }).join(";");
}

// =============================================================================
// Retry
// =============================================================================

/**
 * How {@linkcode backoff} spreads delays.
 *
 * @example
 * ```ts
 * import { backoff, type Jitter } from "./mod.ts";
 *
 * const jitter: Jitter = "none";
 * if (backoff(3, { baseMs: 100, jitter }) !== 400) throw new Error();
 * ```
 */
export type Jitter = "full" | "equal" | "none";

/**
 * Options for {@linkcode backoff}.
 *
 * @example
 * ```ts
 * import { backoff, type BackoffOptions } from "./mod.ts";
 *
 * const options: BackoffOptions = { baseMs: 200, factor: 3, maxMs: 1000, jitter: "none" };
 * if ([1, 2, 3].map((n) => backoff(n, options)).join() !== "200,600,1000") throw new Error();
 * ```
 */
export interface BackoffOptions {
  /** Delay before the first retry (before jitter), in ms. Default 500. */
  baseMs?: number;
  /** Upper bound on any backoff delay, in ms. Default 20,000. */
  maxMs?: number;
  /** Growth per attempt. Default 2. */
  factor?: number;
  /**
   * `"equal"` (default): uniform in [d/2, d] — never near 0, so a failing
   * server is not hammered. `"full"`: uniform in [0, d]. `"none"`: exactly d.
   */
  jitter?: Jitter;
}

const JITTERS: readonly string[] = ["full", "equal", "none"];

/**
 * The exponential backoff delay before retry number `attempt`:
 * `d = min(maxMs, baseMs × factor^(attempt − 1))`, then jittered.
 *
 * @param attempt Failures so far: 1 before the first retry. An integer ≥ 1.
 * @param options Base, cap, factor and jitter; see {@linkcode BackoffOptions}.
 * @param random A source of uniform numbers in [0, 1); default `Math.random`.
 * @returns The delay in milliseconds.
 * @throws {RangeError | TypeError} If an argument is out of range or of the
 *   wrong type, naming it.
 *
 * @example
 * ```ts
 * import { backoff } from "./mod.ts";
 *
 * const d = [1, 2, 3, 4].map((n) => backoff(n, { baseMs: 100, maxMs: 500, jitter: "none" }));
 * if (d.join() !== "100,200,400,500") throw new Error(d.join());
 * ```
 */
export function backoff(
  attempt: number,
  options: BackoffOptions = {},
  random: () => number = Math.random,
): number {
  if (
    typeof attempt !== "number" || !Number.isInteger(attempt) || attempt < 1
  ) {
    throw new RangeError(
      `backoff 'attempt' must be an integer >= 1: received ${String(attempt)}`,
    );
  }
  const { baseMs, maxMs, factor, jitter } = backoffDefaults(options, "backoff");
  const d = Math.min(maxMs, baseMs * factor ** (attempt - 1));
  if (jitter === "none") return d;
  const r = random();
  if (typeof r !== "number" || !(r >= 0 && r < 1)) {
    throw new RangeError(
      `backoff 'random' must return a number in [0, 1): received ${String(r)}`,
    );
  }
  return jitter === "full" ? d * r : d / 2 + (d / 2) * r;
}

function backoffDefaults(
  options: BackoffOptions,
  where: string,
): Required<BackoffOptions> {
  const { baseMs = 500, maxMs = 20_000, factor = 2, jitter = "equal" } =
    options;
  checkNonNegative(baseMs, "baseMs", where);
  checkNonNegative(maxMs, "maxMs", where);
  checkNumber(factor, "factor", where);
  if (!(factor >= 1) || factor === Infinity) {
    throw new RangeError(
      `${where} 'factor' must be a finite number >= 1: received ${factor}`,
    );
  }
  if (!JITTERS.includes(jitter)) {
    throw new TypeError(
      `${where} 'jitter' must be "full", "equal" or "none": received ${
        String(jitter)
      }`,
    );
  }
  return { baseMs, maxMs, factor, jitter };
}

/**
 * Headers as a `Headers` object or a plain record (keys in any case).
 *
 * @example
 * ```ts
 * import { type HeadersLike, parseRetryAfter } from "./mod.ts";
 *
 * const record: HeadersLike = { "Retry-After": "3" };
 * const headers: HeadersLike = new Headers({ "retry-after-ms": "250" });
 * if (parseRetryAfter(record) !== 3000 || parseRetryAfter(headers) !== 250) throw new Error();
 * ```
 */
export type HeadersLike =
  | Headers
  | Record<string, string | readonly string[] | number | null | undefined>;

/**
 * Options for {@linkcode parseRetryAfter}.
 *
 * @example
 * ```ts
 * import { parseRetryAfter, type ParseRetryAfterOptions } from "./mod.ts";
 *
 * const h = { "x-ratelimit-reset-requests": "2s" };
 * const on503: ParseRetryAfterOptions = { resetHeaders: false };
 * if (parseRetryAfter(h) !== 2000 || parseRetryAfter(h, Date.now(), on503) !== undefined) {
 *   throw new Error();
 * }
 * ```
 */
export interface ParseRetryAfterOptions {
  /**
   * Also read the providers' rate-limit reset headers (Anthropic
   * `anthropic-ratelimit-*-reset`, OpenAI `x-ratelimit-reset-*`, IETF
   * `ratelimit`/`ratelimit-reset`, GitHub `x-ratelimit-reset`). Use it for
   * 429 responses only: on other responses they describe the quota, not a
   * wait. Default `true`.
   */
  resetHeaders?: boolean;
  /**
   * Longest wait returned; a longer one yields `undefined`. Default one day
   * (86,400,000), so a caller that only sleeps never sleeps for years.
   * `Infinity` returns any parseable wait as it is, for callers that want to
   * tell "the server asked for 30 years" apart from "the server said
   * nothing" ({@linkcode retry} does: it fails at once on a wait above its
   * `maxRetryAfterMs`).
   */
  maxMs?: number;
}

/** parseRetryAfter's default limit: longer waits are not slept. */
const ABSURD_MS = 86_400_000;

/**
 * How long a server asked us to wait, in ms, or `undefined` if it did not say
 * so in a form we trust. Reads, in order:
 *
 * 1. `retry-after-ms` — milliseconds, decimals allowed (OpenAI, Anthropic),
 *    or Azure's `x-ms-retry-after-ms` (the same, as Azure OpenAI sends it
 *    beside `retry-after`);
 * 2. `retry-after` — delay-seconds (decimals allowed) or an HTTP-date in any
 *    of RFC 9110's three forms (IMF-fixdate, RFC 850, asctime);
 * 3. with `resetHeaders` (default): the providers' reset headers. Anthropic
 *    `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`
 *    (RFC 3339 times); OpenAI and Azure `x-ratelimit-reset-{requests,tokens}`
 *    (Go durations like `6m0s`, `19m45.394s`, `90ms`, or whole seconds); IETF
 *    `RateLimit: …;t=N` and `RateLimit-Reset` (delta-seconds); GitHub
 *    `x-ratelimit-reset` (epoch seconds). Buckets whose `remaining` is 0 are
 *    preferred; the longest of those (or of all, if none says 0) wins.
 *
 * Parsing is strict: no `Date.parse`. Garbage, negative values, `NaN` and
 * dates without a zone yield `undefined`, so the caller falls back to its
 * own backoff instead of hammering. A date in the past also yields
 * `undefined`. Waits over `maxMs` (default one day) yield `undefined` too, so
 * nobody sleeps for years; {@linkcode retry} reads them with `maxMs:
 * Infinity` and fails at once instead. Repeated values (`"5, 10"`) yield the
 * longest.
 *
 * @param headers A `Headers` object or a plain record.
 * @param now The current wall-clock time in epoch ms, for dates; default
 *   `Date.now()`.
 * @param options See {@linkcode ParseRetryAfterOptions}.
 * @returns Milliseconds to wait (≥ 0, ≤ `maxMs`), or `undefined`.
 *
 * @example
 * ```ts
 * import { parseRetryAfter } from "./mod.ts";
 *
 * const now = Date.UTC(2015, 9, 21, 7, 27, 0);
 * const cases = [
 *   parseRetryAfter({ "Retry-After": "2" }),
 *   parseRetryAfter({ "retry-after": "Wed, 21 Oct 2015 07:28:00 GMT" }, now),
 *   parseRetryAfter(new Headers({ "x-ratelimit-reset-requests": "1m26.4s" })),
 *   parseRetryAfter({ "retry-after": "-3" }),
 * ];
 * if (cases.join() !== "2000,60000,86400,") throw new Error(cases.join());
 * ```
 */
export function parseRetryAfter(
  headers: HeadersLike | undefined | null,
  now: number = Date.now(),
  options: ParseRetryAfterOptions = {},
): number | undefined {
  if (!headers) return undefined;
  const { resetHeaders = true, maxMs = ABSURD_MS } = options;
  const get = headerGetter(headers);
  const ms = get("retry-after-ms") ?? get("x-ms-retry-after-ms");
  if (ms !== undefined) {
    const v = maxOfList(ms, (s) => parseDecimal(s));
    if (v !== undefined) return sane(v, maxMs);
  }
  const ra = get("retry-after");
  if (ra !== undefined) {
    const v = parseDelaySecondsOrDate(ra, now);
    if (v !== undefined) return sane(v, maxMs);
  }
  if (!resetHeaders) return undefined;
  return sane(parseResets(get, now), maxMs);
}

/** A finite wait in [0, maxMs], else undefined. */
function sane(v: number | undefined, maxMs: number): number | undefined {
  return v !== undefined && v >= 0 && v <= maxMs && Number.isFinite(v)
    ? v
    : undefined;
}

/** A case-insensitive single-value getter over either kind of headers. */
function headerGetter(
  headers: HeadersLike,
): (name: string) => string | undefined {
  if (typeof (headers as Headers).get === "function") {
    const h = headers as Headers;
    return (name) => h.get(name) ?? undefined;
  }
  const lower = new Map<string, string>();
  for (const [k, v] of Object.entries(headers)) {
    if (v === undefined || v === null) continue;
    const s = Array.isArray(v) ? v.join(", ") : String(v);
    const key = k.toLowerCase();
    const prev = lower.get(key);
    lower.set(key, prev === undefined ? s : `${prev}, ${s}`);
  }
  return (name) => lower.get(name);
}

/** `"1500"`, `"1.5"`: non-negative decimal numbers, nothing else. */
function parseDecimal(s: string): number | undefined {
  const t = s.trim();
  if (!/^\d{1,15}(\.\d{1,9})?$/.test(t)) return undefined;
  return Number(t);
}

/** Applies `parse` to each comma-separated part; the maximum, or undefined if any fails. */
function maxOfList(
  value: string,
  parse: (s: string) => number | undefined,
): number | undefined {
  let best: number | undefined;
  for (const part of value.split(",")) {
    const v = parse(part);
    if (v === undefined) return undefined;
    if (best === undefined || v > best) best = v;
  }
  return best;
}

function parseDelaySecondsOrDate(
  value: string,
  now: number,
): number | undefined {
  const seconds = maxOfList(value, parseDecimal);
  if (seconds !== undefined) return seconds * 1000;
  // A single HTTP-date contains a comma (IMF-fixdate, RFC 850); a repeated
  // header joins several with ", ", so split before each weekday name.
  let best: number | undefined;
  const parts = value.split(/,\s*(?=[A-Za-z]{3,9}(?:,|\s))/);
  for (const part of parts) {
    const t = parseHttpDate(part);
    if (t === undefined) return undefined;
    if (best === undefined || t > best) best = t;
  }
  if (best === undefined) return undefined;
  const delta = best - now;
  return delta >= 0 ? delta : undefined; // a past date: fall back to backoff
}

const MONTHS = [
  "jan",
  "feb",
  "mar",
  "apr",
  "may",
  "jun",
  "jul",
  "aug",
  "sep",
  "oct",
  "nov",
  "dec",
];
const DAY = "(?:mon|tue|wed|thu|fri|sat|sun)";
const LONG_DAY = "(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)";
const MON = "(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)";
const TIME = "(\\d{2}):(\\d{2}):(\\d{2})";
const IMF_FIXDATE = new RegExp(
  `^${DAY},\\s+(\\d{1,2})\\s+${MON}\\s+(\\d{4})\\s+${TIME}\\s+gmt$`,
  "i",
);
const RFC850 = new RegExp(
  `^${LONG_DAY},\\s+(\\d{1,2})-${MON}-(\\d{2})\\s+${TIME}\\s+gmt$`,
  "i",
);
const ASCTIME = new RegExp(
  `^${DAY}\\s+${MON}\\s+(\\d{1,2})\\s+${TIME}\\s+(\\d{4})$`,
  "i",
);

/**
 * Epoch ms of an HTTP-date (RFC 9110 §5.6.7) in any of its three forms, or
 * undefined. Case and runs of spaces are forgiven; the zone is not.
 */
function parseHttpDate(value: string): number | undefined {
  const s = value.trim();
  let m = IMF_FIXDATE.exec(s);
  if (m) return utc(+m[3]!, m[2]!, +m[1]!, +m[4]!, +m[5]!, +m[6]!);
  m = RFC850.exec(s);
  if (m) {
    // Two-digit years: the most recent year with those digits that is not
    // more than 50 years in the future (RFC 9110).
    const yy = +m[3]!;
    const thisYear = new Date().getUTCFullYear();
    let year = Math.floor(thisYear / 100) * 100 + yy;
    if (year > thisYear + 50) year -= 100;
    return utc(year, m[2]!, +m[1]!, +m[4]!, +m[5]!, +m[6]!);
  }
  m = ASCTIME.exec(s);
  if (m) return utc(+m[6]!, m[1]!, +m[2]!, +m[3]!, +m[4]!, +m[5]!);
  return undefined;
}

function utc(
  year: number,
  month: string,
  day: number,
  h: number,
  min: number,
  sec: number,
): number | undefined {
  const mon = MONTHS.indexOf(month.toLowerCase());
  if (day < 1 || day > 31 || h > 23 || min > 59 || sec > 60) return undefined;
  const t = Date.UTC(year, mon, day, h, min, Math.min(sec, 59));
  // Reject days that roll over into the next month (e.g. 31 Feb).
  return new Date(t).getUTCDate() === day ? t : undefined;
}

const RFC3339 =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$/;

/** Epoch ms of an RFC 3339 timestamp, or undefined. */
function parseRfc3339(value: string): number | undefined {
  const m = RFC3339.exec(value.trim());
  if (!m) return undefined;
  const [, y, mo, d, h, mi, s, frac, zone] = m;
  if (+mo! < 1 || +mo! > 12 || +d! < 1 || +h! > 23 || +mi! > 59 || +s! > 60) {
    return undefined;
  }
  let t = Date.UTC(+y!, +mo! - 1, +d!, +h!, +mi!, Math.min(+s!, 59));
  if (new Date(t).getUTCDate() !== +d!) return undefined;
  if (frac) t += Number(`0${frac}`) * 1000;
  if (zone !== "Z" && zone !== "z") {
    const sign = zone![0] === "-" ? -1 : 1;
    const oh = +zone!.slice(1, 3);
    const om = +zone!.slice(4, 6);
    if (oh > 23 || om > 59) return undefined;
    t -= sign * (oh * 60 + om) * 60_000;
  }
  return t;
}

const GO_UNITS: Record<string, number> = {
  h: 3_600_000,
  m: 60_000,
  s: 1000,
  ms: 1,
  us: 0.001,
  "µs": 0.001,
  "μs": 0.001,
  ns: 0.000001,
};

/** Milliseconds of a Go duration (`1h4m48s`, `19m45.394s`, `90ms`, `0s`), or undefined. */
function parseGoDuration(value: string): number | undefined {
  const s = value.trim();
  if (!/^(?:\d+(?:\.\d+)?(?:h|ms|m|s|us|µs|μs|ns))+$/.test(s)) return undefined;
  let total = 0;
  for (const m of s.matchAll(/(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|μs|ns)/g)) {
    total += Number(m[1]) * GO_UNITS[m[2]!]!;
  }
  return total;
}

function parseResets(
  get: (name: string) => string | undefined,
  now: number,
): number | undefined {
  const zero: number[] = [];
  const all: number[] = [];
  const add = (wait: number | undefined, remaining: string | undefined) => {
    if (wait === undefined || !(wait >= 0)) return;
    all.push(wait);
    if (remaining !== undefined && parseDecimal(remaining) === 0) {
      zero.push(wait);
    }
  };
  // The providers' own headers (see Providers).
  for (const h of LIMIT_HEADERS) {
    const reset = get(h.reset);
    if (reset === undefined) continue;
    add(resetWait(h, reset, now), get(h.remaining));
  }
  const ietf = get("ratelimit");
  if (ietf !== undefined) {
    const m = /(?:^|;)\s*t=(\d+)\s*(?:;|,|$)/.exec(ietf);
    const r = /(?:^|;)\s*r=(\d+)\s*(?:;|,|$)/.exec(ietf);
    if (m) add(Number(m[1]) * 1000, r?.[1]);
  }
  const legacy = get("ratelimit-reset");
  if (legacy !== undefined) {
    const secs = parseDecimal(legacy);
    add(
      secs === undefined ? undefined : secs * 1000,
      get("ratelimit-remaining"),
    );
  }
  const github = get("x-ratelimit-reset");
  if (github !== undefined) {
    const epoch = parseDecimal(github);
    add(
      epoch === undefined ? undefined : Math.max(0, epoch * 1000 - now),
      get("x-ratelimit-remaining"),
    );
  }
  const pick = zero.length ? zero : all;
  return pick.length ? Math.max(...pick) : undefined;
}

/** The wait a provider's reset header tells: a time (RFC 3339), or a Go duration or seconds (Azure). */
function resetWait(
  h: LimitHeaders,
  reset: string,
  now: number,
): number | undefined {
  if (h.resetAs === "time") {
    const t = parseRfc3339(reset);
    return t === undefined ? undefined : Math.max(0, t - now);
  }
  const secs = parseDecimal(reset);
  return secs !== undefined ? secs * 1000 : parseGoDuration(reset);
}

/**
 * Thrown by {@linkcode retry} when it gives up on a retryable failure: the
 * attempts ran out, the server asked for a wait longer than
 * `maxRetryAfterMs`, or the next wait would pass `maxElapsedMs`.
 *
 * @example
 * ```ts
 * import { retry, RetryError } from "./mod.ts";
 *
 * const error = await retry(() => {
 *   throw Object.assign(new Error("overloaded"), { status: 529 });
 * }, { retries: 0 }).catch((e) => e);
 * if (!(error instanceof RetryError) || error.attempts !== 1) throw error;
 * ```
 */
export class RetryError extends Error {
  /** How many times the function was called. */
  readonly attempts: number;
  /**
   * The last `Response`, when the function returned one (its body unread),
   * so a fetch wrapper can hand it back to its caller.
   */
  readonly response: Response | undefined;

  /**
   * Creates the error; {@linkcode retry} does this for you.
   *
   * @param message What happened, for humans.
   * @param attempts How many attempts were made.
   * @param cause The last failure.
   * @param response The last `Response`, if the failure was one.
   */
  constructor(
    message: string,
    attempts: number,
    cause: unknown,
    response?: Response,
  ) {
    super(message, { cause });
    this.name = "RetryError";
    this.attempts = attempts;
    this.response = response;
  }
}

/**
 * Thrown at once, without retrying, when a 429 means the account's quota,
 * credit or spend limit is exhausted (Anthropic `enforced_spend_limit_reached`;
 * OpenAI `insufficient_quota`, `credit_balance_exhausted`, and the spend and
 * usage limit codes). Waiting will not help; stop the batch.
 *
 * @example
 * ```ts
 * import { QuotaError, retry } from "./mod.ts";
 *
 * const error = await retry(() => {
 *   throw Object.assign(new Error("quota"), {
 *     status: 429,
 *     error: { error: { type: "insufficient_quota", code: "insufficient_quota" } },
 *   });
 * }).catch((e) => e);
 * if (!(error instanceof QuotaError) || error.code !== "insufficient_quota") throw error;
 * ```
 */
export class QuotaError extends Error {
  /** The provider's code, e.g. `"insufficient_quota"`. */
  readonly code: string;
  /** How many times the function was called (always 1 unless other failures came first). */
  readonly attempts: number;
  /** The `Response`, when the function returned one (its body unread). */
  readonly response: Response | undefined;

  /**
   * Creates the error; {@linkcode retry} does this for you.
   *
   * @param code The provider's error code.
   * @param attempts Attempts made.
   * @param cause The failure.
   * @param response The `Response`, if the failure was one.
   */
  constructor(
    code: string,
    attempts: number,
    cause: unknown,
    response?: Response,
  ) {
    super(
      `Quota exhausted (${code}): the provider refuses further requests until the quota, credit or spend limit is raised or resets; not retried`,
      { cause },
    );
    this.name = "QuotaError";
    this.code = code;
    this.attempts = attempts;
    this.response = response;
  }
}

/**
 * An HTTP response that failed: status, the provider's error type and
 * message, request id and headers. Carries no request data, so no API key.
 *
 * @example
 * ```ts
 * import { HttpError } from "./mod.ts";
 *
 * const e = new HttpError(429, { type: "rate_limit_error", message: "Slow down" });
 * if (e.message !== "HTTP 429 rate_limit_error: Slow down") throw e;
 * ```
 */
export class HttpError extends Error {
  /** The HTTP status. */
  readonly status: number;
  /** The provider's error type or code, e.g. `"rate_limit_error"`. */
  readonly type: string | undefined;
  /** The request id header (`request-id`, `x-request-id`), if any. */
  readonly requestId: string | undefined;
  /** The response headers. */
  readonly headers: Headers;
  /** The parsed error body, if it was JSON. */
  readonly body: unknown;
  /**
   * For a 429 whose body says the quota, credit or spend limit is exhausted
   * (see {@linkcode QuotaError}): the provider's code. Waiting will not help.
   */
  readonly quota: string | undefined;

  /**
   * Creates the error; see {@linkcode HttpError.from} to build one from a
   * `Response`.
   *
   * @param status The HTTP status.
   * @param details Provider error type, message, request id, headers, body.
   */
  constructor(
    status: number,
    details: {
      type?: string;
      message?: string;
      requestId?: string;
      headers?: Headers;
      body?: unknown;
    } = {},
  ) {
    const what = [details.type, details.message].filter(Boolean).join(": ");
    super(`HTTP ${status}${what ? ` ${what}` : ""}`);
    this.name = "HttpError";
    this.status = status;
    this.type = details.type;
    this.requestId = details.requestId;
    this.headers = details.headers ?? new Headers();
    this.body = details.body;
    this.quota = status === 429 ? quotaCode(details.body) : undefined;
  }

  /**
   * Builds an `HttpError` from a response and its body text, reading the
   * Anthropic (`{type:"error", error:{type, message}}`) and OpenAI
   * (`{error:{message, type, code}}`) shapes.
   *
   * @param response The failed response (its body is not read).
   * @param text The body text, if read.
   * @returns The error.
   */
  static from(response: Response, text = ""): HttpError {
    let body: unknown = undefined;
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch {
      body = text.slice(0, 500);
    }
    const err = (body as { error?: Record<string, unknown> } | undefined)
      ?.error;
    const type = typeof err?.type === "string"
      ? err.type
      : typeof err?.code === "string"
      ? err.code
      : undefined;
    const message = typeof err?.message === "string"
      ? err.message
      : typeof body === "string"
      ? body
      : response.statusText;
    return new HttpError(response.status, {
      type,
      message,
      requestId: response.headers.get("request-id") ??
        response.headers.get("x-request-id") ?? undefined,
      headers: response.headers,
      body,
    });
  }
}

/**
 * What {@linkcode retry} passes to `onRetry` before each wait.
 *
 * @example
 * ```ts
 * import { ManualClock, retry, type RetryInfo } from "./mod.ts";
 *
 * const clock = new ManualClock();
 * const seen: RetryInfo[] = [];
 * let calls = 0;
 * const p = retry(() => (++calls < 2 ? new Response("", { status: 429, headers: { "retry-after": "1" } }) : "ok"), {
 *   clock,
 *   onRetry: (info) => seen.push(info),
 * });
 * await clock.advance(1000);
 * await p;
 * if (seen[0]?.delayMs !== 1000 || !seen[0].serverTold) throw new Error();
 * ```
 */
export interface RetryInfo {
  /** The attempt that just failed (1 for the first). */
  attempt: number;
  /** What it failed with: the thrown error, or the `Response`. */
  error: unknown;
  /** How long we wait before the next attempt, in ms. */
  delayMs: number;
  /** Whether the delay came from the server (`retry-after` …) rather than backoff. */
  serverTold: boolean;
}

/**
 * Options for {@linkcode retry}.
 *
 * @example
 * ```ts
 * import { retry, type RetryOptions } from "./mod.ts";
 *
 * const options: RetryOptions = { retries: 2, baseMs: 1, maxRetryAfterMs: 60_000 };
 * let calls = 0;
 * const value = await retry(() => {
 *   if (++calls < 3) throw Object.assign(new Error("busy"), { status: 503 });
 *   return calls;
 * }, options);
 * if (value !== 3) throw new Error();
 * ```
 */
export interface RetryOptions extends BackoffOptions {
  /** Retries after the first attempt: an integer ≥ 0 or `Infinity`. Default 5. */
  retries?: number;
  /** Give up when the next wait would end more than this many ms after the start. Default `Infinity`. */
  maxElapsedMs?: number;
  /**
   * A rate-limit 429 (not a quota one) is a pace signal, not a failure:
   * with this set, such 429s do not use up `retries`; instead a call gives
   * up when the next wait would end more than this many ms after its first
   * rate-limit 429. Default `Infinity`: 429s count as retries, like any
   * failure. {@linkcode rateLimitedFetch} sets 15 minutes.
   */
  maxRateLimitedMs?: number;
  /**
   * The longest server-told wait we honour, in ms. A server asking for more
   * — absurd asks included, such as `retry-after: 946080000` (30 years) or a
   * date decades ahead — fails at once, without another attempt, with a
   * {@linkcode RetryError} that says how long it asked for: the server said
   * "not for a long time", so we neither sleep that long nor hammer it with
   * backoff. Waits over one day fail even with `Infinity`. Only values that
   * do not parse fall back to backoff. Default 120,000 (two minutes: a
   * per-minute window plus slack; longer asks usually mean a daily limit,
   * where failing fast beats a silent stall).
   */
  maxRetryAfterMs?: number;
  /**
   * Overrides the default classification: return `true` to retry, `false`
   * to stop, `undefined` to use the default.
   */
  shouldRetry?: (failure: unknown, attempt: number) => boolean | undefined;
  /** Called before each wait. */
  onRetry?: (info: RetryInfo) => void;
  /** Aborting it stops at once (during an attempt or a wait) with `signal.reason`. */
  signal?: AbortSignal;
  /** Time source for waits; default {@linkcode systemClock}. */
  clock?: Clock;
  /** Wall-clock epoch ms, for HTTP-date and RFC 3339 headers; default `Date.now`. */
  dateNow?: () => number;
  /** Uniform numbers in [0, 1) for jitter; default `Math.random`. */
  random?: () => number;
}

const RETRY_OPTIONS = new Set([
  "baseMs",
  "maxMs",
  "factor",
  "jitter",
  "retries",
  "maxElapsedMs",
  "maxRateLimitedMs",
  "maxRetryAfterMs",
  "shouldRetry",
  "onRetry",
  "signal",
  "clock",
  "dateNow",
  "random",
]);

/** Quota and billing codes that a retry can never fix. */
const NETWORK_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ECONNABORTED",
  "ETIMEDOUT",
  "EPIPE",
  "EAI_AGAIN",
  "ENETUNREACH",
  "EHOSTUNREACH",
  "UND_ERR_SOCKET",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_CLOSED",
  "ConnectionRefused",
  "ConnectionClosed",
]);

/**
 * Calls `fn` until it succeeds, retrying what is transient with backoff and
 * honouring every form of server-told wait.
 *
 * `fn(attempt, signal)` may throw or return a `Response`. A failure is
 * retried when it is HTTP 408, 409, 429 or 5xx (529 included), or a network
 * error — unless the response says `x-should-retry: false` (and
 * `x-should-retry: true` makes anything retryable). Never retried: other
 * 4xx, aborts, and 429s that mean an exhausted quota ({@linkcode QuotaError}).
 * Non-retryable errors are rethrown as they are; a non-retryable `Response`
 * (e.g. 400, or 200) is returned as it is.
 *
 * Errors are read the way the official SDKs shape them: `status`,
 * `headers` (a `Headers` or a record) or `response.headers`, and the body in
 * `error` (`@anthropic-ai/sdk`, `openai`).
 *
 * The wait before each retry is the server's ({@linkcode parseRetryAfter}:
 * `retry-after-ms`, `retry-after`, and for 429s the reset headers), exactly,
 * without jitter, if it gave one; otherwise {@linkcode backoff}. There is no
 * wait after the last attempt. The bodies of discarded responses are
 * cancelled so connections are freed.
 *
 * @param fn The operation; gets the attempt number (from 1) and the signal.
 * @param options Limits and hooks; see {@linkcode RetryOptions}.
 * @returns What `fn` returned.
 * @throws {RetryError} When it gives up on a retryable failure.
 * @throws {QuotaError} At once, for a quota or billing 429.
 * @throws {TypeError | RangeError} For invalid options.
 *
 * @example Retry a flaky call, honouring `retry-after`
 * ```ts
 * import { ManualClock, retry } from "./mod.ts";
 *
 * const clock = new ManualClock();
 * let calls = 0;
 * const result = retry(async () => {
 *   if (++calls < 3) {
 *     return new Response("busy", { status: 503, headers: { "retry-after": "2" } });
 *   }
 *   return new Response("ok");
 * }, { clock });
 * await clock.advance(4000);
 * const response = await result;
 * if ((await response.text()) !== "ok" || clock.now() !== 4000) throw new Error();
 * ```
 */
export async function retry<T>(
  fn: (attempt: number, signal: AbortSignal | undefined) => T | Promise<T>,
  options: RetryOptions = {},
): Promise<T> {
  if (typeof fn !== "function") {
    throw new TypeError(`retry 'fn' must be a function: received ${typeof fn}`);
  }
  return await retryChecked(fn, checkRetryOptions(options));
}

/** The retry loop, with options already validated (callers on hot paths validate once). */
async function retryChecked<T>(
  fn: (attempt: number, signal: AbortSignal | undefined) => T | Promise<T>,
  o: CheckedRetryOptions,
): Promise<T> {
  const { signal, clock, random } = o;
  const start = clock.now();
  let counted = 0; // failures that use up `retries`
  let limitedSince: number | undefined; // the first rate-limit 429
  for (let attempt = 1;; attempt++) {
    if (signal?.aborted) throw signal.reason;
    let failure: Failure;
    try {
      const value = await fn(attempt, signal);
      if (
        !(value instanceof Response) ||
        (value.status < 400 && value.headers.get("x-should-retry") !== "true")
      ) return value;
      failure = await describeResponse(value);
    } catch (error) {
      if (signal?.aborted) throw signal.reason;
      failure = describeError(error);
    }
    let retryable = failure.retryable;
    const verdict = o.shouldRetry?.(failure.value, attempt);
    if (verdict !== undefined) retryable = verdict;
    else if (failure.quota) {
      throw new QuotaError(
        failure.quota,
        attempt,
        failure.cause,
        failure.response,
      );
    }
    if (!retryable) {
      if (failure.response) return failure.response as T;
      throw failure.value;
    }
    const giveUp = (why: string): never => {
      throw new RetryError(
        `${why}; last failure: ${failure.summary}`,
        attempt,
        failure.cause,
        failure.response,
      );
    };
    // A rate-limit 429 paces rather than fails when maxRateLimitedMs is set.
    const paced = failure.status === 429 && !failure.quota &&
      o.maxRateLimitedMs !== Infinity;
    if (paced) limitedSince ??= clock.now();
    else if (++counted > o.retries) {
      giveUp(`Gave up after ${attempt} attempt${attempt === 1 ? "" : "s"}`);
    }
    // Any parseable wait, absurd ones included: a server that says "not
    // for 30 years" is obeyed by not retrying, never hammered with backoff.
    const told = parseRetryAfter(failure.headers, o.dateNow(), {
      resetHeaders: failure.status === 429,
      maxMs: Infinity,
    }) ?? failure.bodyTold;
    let delayMs: number;
    if (told !== undefined) {
      if (told > o.maxRetryAfterMs || told > ABSURD_MS) {
        giveUp(
          `The server asked to wait ${
            formatMs(told)
          }, longer than maxRetryAfterMs (${
            formatMs(o.maxRetryAfterMs)
          }); not waiting`,
        );
      }
      delayMs = told;
    } else delayMs = backoff(attempt, o, random);
    const now = clock.now();
    const budgets = [[start, o.maxElapsedMs, "maxElapsedMs"]] as const;
    for (
      const [since, most, name] of paced
        ? [
          ...budgets,
          [limitedSince!, o.maxRateLimitedMs, "maxRateLimitedMs"] as const,
        ]
        : budgets
    ) {
      if (now - since + delayMs > most) {
        giveUp(
          `Gave up after ${attempt} attempts: waiting ${
            formatMs(delayMs)
          } more would pass ${name} (${formatMs(most)})`,
        );
      }
    }
    await failure.response?.body?.cancel().catch(() => {});
    o.onRetry?.({
      attempt,
      error: failure.value,
      delayMs,
      serverTold: told !== undefined,
    });
    await clock.sleep(delayMs, signal);
  }
}

interface Failure {
  /** What fn threw, or the Response it returned. */
  value: unknown;
  /** An Error for RetryError.cause: the thrown error, or an HttpError. */
  cause: unknown;
  response: Response | undefined;
  status: number | undefined;
  headers: HeadersLike | undefined;
  retryable: boolean;
  quota: string | undefined;
  summary: string;
  /** A wait the error body told (Gemini's `google.rpc.RetryInfo`), ms. */
  bodyTold?: number;
}

function isRetryableStatus(r: Response): boolean {
  const should = r.headers.get("x-should-retry");
  if (should === "true") return true;
  if (should === "false") return false;
  return retryableStatus(r.status);
}

function retryableStatus(status: number): boolean {
  return status === 408 || status === 409 || status === 429 || status >= 500;
}

async function describeResponse(response: Response): Promise<Failure> {
  let text = "";
  if (response.status < 500) {
    // Small error bodies; read a copy, so the caller can still read the original.
    text = await response.clone().text().catch(() => "");
  }
  const error = HttpError.from(response, text);
  return {
    value: response,
    cause: error,
    response,
    status: response.status,
    headers: response.headers,
    retryable: isRetryableStatus(response),
    quota: response.status === 429 ? quotaCode(error.body) : undefined,
    summary: error.message,
    bodyTold: retryDelayIn(error.body),
  };
}

function describeError(error: unknown): Failure {
  const e = (typeof error === "object" && error !== null ? error : {}) as {
    status?: unknown;
    statusCode?: unknown;
    headers?: unknown;
    response?: { status?: unknown; headers?: unknown };
    error?: unknown;
    body?: unknown;
    code?: unknown;
    type?: unknown;
    name?: unknown;
    message?: unknown;
    cause?: unknown;
  };
  const status = [e.status, e.statusCode, e.response?.status].find((s) =>
    typeof s === "number"
  ) as number | undefined;
  const rawHeaders = e.headers ?? e.response?.headers;
  const headers = typeof rawHeaders === "object" && rawHeaders !== null
    ? rawHeaders as HeadersLike
    : undefined;
  const should = headers ? headerGetter(headers)("x-should-retry") : undefined;
  let retryable: boolean;
  if (should === "true") retryable = true;
  else if (should === "false") retryable = false;
  else if (status !== undefined) retryable = retryableStatus(status);
  else retryable = isNetworkError(error);
  const quota = status === 429
    ? quotaCode(e.error) ?? quotaCode(e.body) ?? quotaCode(e)
    : undefined;
  const summary = error instanceof Error
    ? `${error.name}: ${error.message}`
    : String(error);
  return {
    value: error,
    cause: error,
    response: undefined,
    status,
    headers,
    retryable,
    quota,
    summary,
  };
}

function isAbortError(error: unknown): boolean {
  const name = (error as { name?: unknown } | null)?.name;
  return name === "AbortError" || name === "TimeoutError";
}

function isNetworkError(error: unknown): boolean {
  if (typeof error !== "object" || error === null) return false;
  if (isAbortError(error)) return false;
  const seen = new Set<unknown>();
  for (let e: unknown = error; e && typeof e === "object" && !seen.has(e);) {
    seen.add(e);
    const x = e as {
      code?: unknown;
      name?: unknown;
      message?: unknown;
      cause?: unknown;
    };
    if (typeof x.code === "string" && NETWORK_CODES.has(x.code)) return true;
    if (
      x.name === "APIConnectionError" ||
      x.name === "APIConnectionTimeoutError" ||
      x.name === "FetchError"
    ) return true;
    if (
      x.name === "TypeError" && typeof x.message === "string" &&
      /fetch failed|network|socket|connection|terminated|reset|refused|error sending request/i
        .test(x.message)
    ) return true;
    e = x.cause;
  }
  return false;
}

/** The quota/billing code in an error body (any of the providers' shapes), if any. */
function quotaCode(body: unknown): string | undefined {
  const daily = quotaViolations(body).find((v) => /PerDay/i.test(v.quotaId));
  if (daily) return daily.quotaId;
  const seen = new Set<unknown>();
  const visit = (v: unknown, depth: number): string | undefined => {
    if (typeof v !== "object" || v === null || depth > 4 || seen.has(v)) {
      return undefined;
    }
    seen.add(v);
    const o = v as Record<string, unknown>;
    for (const k of ["error_code", "code", "type"]) {
      const c = o[k];
      if (typeof c === "string" && QUOTA_CODES.has(c)) return c;
    }
    for (const k of ["error", "details"]) {
      const found = visit(o[k], depth + 1);
      if (found) return found;
    }
    return undefined;
  };
  return visit(body, 0);
}

/** One violated quota of a Gemini 429 (`google.rpc.QuotaFailure`). */
interface QuotaViolation {
  /** E.g. `GenerateContentInputTokensPerModelPerMinute-FreeTier`. */
  quotaId: string;
  /** The quota's value, when the body gives it. */
  value: number | undefined;
  /** The model it is for, when the body names one. */
  model: string | undefined;
}

/** The details of a Google error body (`{error: {details: [...]}}`). */
function googleDetails(body: unknown): Record<string, unknown>[] {
  const details = (body as { error?: { details?: unknown } } | null)?.error
    ?.details;
  return Array.isArray(details)
    ? details.filter((d) => typeof d === "object" && d !== null)
    : [];
}

/**
 * The quotas a Gemini 429 says were exceeded
 * (ai.google.dev/gemini-api/docs/troubleshooting: `RESOURCE_EXHAUSTED`
 * with `google.rpc.QuotaFailure` details).
 */
function quotaViolations(body: unknown): QuotaViolation[] {
  const out: QuotaViolation[] = [];
  for (const d of googleDetails(body)) {
    if (!String(d["@type"]).endsWith("google.rpc.QuotaFailure")) continue;
    for (const v of Array.isArray(d.violations) ? d.violations : []) {
      const id = (v as { quotaId?: unknown })?.quotaId;
      if (typeof id !== "string") continue;
      const value = Number((v as { quotaValue?: unknown }).quotaValue);
      const model = (v as { quotaDimensions?: { model?: unknown } })
        .quotaDimensions?.model;
      out.push({
        quotaId: id,
        value: value > 0 && Number.isFinite(value) ? value : undefined,
        model: typeof model === "string" ? model : undefined,
      });
    }
  }
  return out;
}

/** The wait a Google error body's `google.rpc.RetryInfo` asks for (`"26s"`, `"1.5s"`), ms. */
function retryDelayIn(body: unknown): number | undefined {
  for (const d of googleDetails(body)) {
    if (!String(d["@type"]).endsWith("google.rpc.RetryInfo")) continue;
    const m = /^(\d+(?:\.\d+)?)s$/.exec(String(d.retryDelay));
    if (m) return Math.ceil(Number(m[1]) * 1000);
  }
  return undefined;
}

function formatMs(ms: number): string {
  if (ms === Infinity) return "unlimited";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120_000) return `${+(ms / 1000).toFixed(1)} s`;
  if (ms < 7_200_000) return `${+(ms / 60_000).toFixed(1)} min`;
  if (ms < 172_800_000) return `${+(ms / 3_600_000).toFixed(1)} h`;
  if (ms < 2 * 31_557_600_000) return `${+(ms / 86_400_000).toFixed(1)} days`;
  return `${+(ms / 31_557_600_000).toFixed(1)} years`;
}

interface CheckedRetryOptions extends Required<BackoffOptions> {
  retries: number;
  maxElapsedMs: number;
  maxRateLimitedMs: number;
  maxRetryAfterMs: number;
  shouldRetry: RetryOptions["shouldRetry"];
  onRetry: RetryOptions["onRetry"];
  signal: AbortSignal | undefined;
  clock: Clock;
  dateNow: () => number;
  random: () => number;
}

function checkRetryOptions(options: RetryOptions): CheckedRetryOptions {
  checkOptions(options, RETRY_OPTIONS, "retry");
  const {
    retries = 5,
    maxElapsedMs = Infinity,
    maxRateLimitedMs = Infinity,
    maxRetryAfterMs = 120_000,
    shouldRetry,
    onRetry,
    signal,
    clock = systemClock,
    dateNow = Date.now,
    random = Math.random,
  } = options;
  checkNumber(retries, "retries", "retry");
  if (!(retries >= 0) || (!Number.isInteger(retries) && retries !== Infinity)) {
    throw new RangeError(
      `retry 'retries' must be an integer >= 0 or Infinity: received ${retries}`,
    );
  }
  for (
    const [name, v] of [
      ["maxElapsedMs", maxElapsedMs],
      ["maxRateLimitedMs", maxRateLimitedMs],
    ] as const
  ) {
    checkNumber(v, name, "retry");
    if (!(v > 0)) {
      throw new RangeError(
        `retry '${name}' must be a number > 0 or Infinity: received ${v}`,
      );
    }
  }
  checkNumber(maxRetryAfterMs, "maxRetryAfterMs", "retry");
  if (!(maxRetryAfterMs >= 0)) {
    throw new RangeError(
      `retry 'maxRetryAfterMs' must be a number >= 0 or Infinity: received ${maxRetryAfterMs}`,
    );
  }
  for (
    const [name, f] of [
      ["shouldRetry", shouldRetry],
      ["onRetry", onRetry],
      ["dateNow", dateNow],
      ["random", random],
    ] as const
  ) {
    if (f !== undefined && typeof f !== "function") {
      throw new TypeError(
        `retry '${name}' must be a function: received ${typeof f}`,
      );
    }
  }
  if (signal !== undefined && !(signal instanceof AbortSignal)) {
    throw new TypeError(`retry 'signal' must be an AbortSignal`);
  }
  if (
    typeof clock !== "object" || clock === null ||
    typeof clock.now !== "function" || typeof clock.sleep !== "function"
  ) {
    throw new TypeError(
      "retry 'clock' must have now() and sleep(ms, signal) methods",
    );
  }
  return {
    ...backoffDefaults(options, "retry"),
    retries,
    maxElapsedMs,
    maxRateLimitedMs,
    maxRetryAfterMs,
    shouldRetry,
    onRetry,
    signal,
    clock,
    dateNow,
    random,
  };
}

// =============================================================================
// Concurrency
// =============================================================================

/**
 * Progress of a {@linkcode mapConcurrent} run, passed to `onProgress`.
 *
 * @example
 * ```ts
 * import { mapConcurrent, type MapProgress } from "./mod.ts";
 *
 * const seen: MapProgress[] = [];
 * await mapConcurrent([1, 2, 3], (n) => n, { onProgress: (p) => seen.push(p) });
 * const last = seen.at(-1)!;
 * if (last.done !== 3 || last.total !== 3 || last.failed !== 0) throw new Error();
 * ```
 */
export interface MapProgress {
  /** Items settled so far, successes and failures. */
  done: number;
  /** How many of those failed. */
  failed: number;
  /** Items whose `fn` is running now. */
  running: number;
  /** The number of items, when the input's size is known (arrays, sets, maps, `length`). */
  total?: number;
}

/**
 * Options for {@linkcode mapConcurrent} and {@linkcode mapConcurrentSettled}.
 *
 * @example
 * ```ts
 * import { mapConcurrent, type MapOptions } from "./mod.ts";
 *
 * const options: MapOptions = { concurrency: 2, stopOnError: false };
 * const error = await mapConcurrent([1, 2, 3], (n) => {
 *   if (n !== 2) throw new Error(`bad ${n}`);
 *   return n;
 * }, options).catch((e) => e);
 * if (!(error instanceof AggregateError) || error.errors.length !== 2) throw error;
 * ```
 */
export interface MapOptions {
  /** Most `fn` calls running at once: an integer ≥ 1 or `Infinity`. Default 5. */
  concurrency?: number;
  /**
   * Aborting it stops pulling input, aborts the signal given to running
   * `fn`s, and rejects with `signal.reason` once they have settled.
   */
  signal?: AbortSignal;
  /**
   * `true` (default): on the first error start nothing new, abort running
   * `fn`s, and reject with that error once they have settled. `false`: run
   * everything, then reject with an `AggregateError` of all errors in input
   * order. (Ignored by {@linkcode mapConcurrentSettled}.)
   */
  stopOnError?: boolean;
  /** Called once after each item settles. Keep it cheap. */
  onProgress?: (progress: MapProgress) => void;
}

/**
 * Options for {@linkcode mapConcurrentIterable}.
 *
 * @example
 * ```ts
 * import { mapConcurrentIterable, type MapIterableOptions } from "./mod.ts";
 *
 * const options: MapIterableOptions = { concurrency: 4, buffer: 8 };
 * const out: number[] = [];
 * for await (const x of mapConcurrentIterable([3, 1, 2], (n) => n * 10, options)) out.push(x);
 * if (out.join() !== "30,10,20") throw new Error();
 * ```
 */
export interface MapIterableOptions extends Omit<MapOptions, "stopOnError"> {
  /**
   * Most items between the consumer and the input: results finished but not
   * yet taken, plus items still running. Input is not pulled further until
   * the consumer catches up. An integer ≥ 1 or `Infinity`.
   *
   * Default for {@linkcode mapConcurrentIterable}: `max(16 × concurrency,
   * 256)`. In input order, one slow item (a request sleeping in backoff)
   * holds every result behind it; with 16 × concurrency the pool stays busy
   * behind a straggler 16 times slower than the rest (measured: 2,000 items,
   * concurrency 16, 5 % of them 20 × slower, as fast as
   * {@linkcode mapConcurrent}; at `2 × concurrency` it took 3 × as long). It
   * costs up to that many results held in memory at once; set a smaller
   * `buffer` for large results and a tight bound.
   *
   * Default for {@linkcode mapConcurrentUnordered}: `2 × concurrency`
   * (nothing waits behind a slow item there; the buffer only matters when
   * the consumer is slower than the pool). Below `concurrency`, it limits
   * concurrency too.
   */
  buffer?: number;
}

/**
 * Anything {@linkcode mapConcurrent} accepts as input: an iterable or an
 * async iterable. Promises inside a sync iterable (an array of promises) are
 * awaited before `fn` sees them, as p-map and `Array.fromAsync` do; a
 * rejected one is that item's error.
 *
 * @example
 * ```ts
 * import { mapConcurrent, type MapInput } from "./mod.ts";
 *
 * async function* lines() {
 *   yield "a";
 *   yield "b";
 * }
 * const input: MapInput<string> = lines();
 * if ((await mapConcurrent(input, (s) => s.toUpperCase())).join() !== "A,B") throw new Error();
 * ```
 */
export type MapInput<T> = Iterable<T | PromiseLike<T>> | AsyncIterable<T>;

/**
 * The function {@linkcode mapConcurrent} applies to each item.
 *
 * @example
 * ```ts
 * import { mapConcurrent, type MapFn } from "./mod.ts";
 *
 * const fn: MapFn<string, string> = (item, index, signal) => {
 *   signal.throwIfAborted();
 *   return `${index}:${item}`;
 * };
 * if ((await mapConcurrent(["x", "y"], fn)).join() !== "0:x,1:y") throw new Error();
 * ```
 */
export type MapFn<T, R> = (
  item: T,
  index: number,
  signal: AbortSignal,
) => R | PromiseLike<R>;

/**
 * Maps `input` through `fn` with at most `concurrency` calls at once and
 * returns the results in input order — like `Promise.all(input.map(fn))`,
 * but bounded, lazy and abortable.
 *
 * `input` may be any iterable or async iterable; it is pulled lazily, never
 * more than `concurrency` items ahead of completion, so an endless generator
 * is fine. `fn(item, index, signal)` may return a value or a promise, or
 * throw. On the first error (with `stopOnError`, the default) nothing new
 * starts, the `signal` given to running calls aborts with the error as
 * reason, and the returned promise rejects with that error once every running
 * call has settled: no work is left running behind your back. The input
 * iterator is closed (`return()`) whenever we stop early.
 *
 * @param input The items.
 * @param fn Called with each item, its index and a signal that aborts when the map stops.
 * @param options Concurrency, signal, error policy, progress; see {@linkcode MapOptions}.
 * @returns The results, in input order.
 * @throws {TypeError | RangeError} (rejects) For an input that is not
 *   iterable, a `fn` that is not a function, or a bad `concurrency`.
 * @throws {AggregateError} (rejects) With `stopOnError: false`, all errors in input order.
 *
 * @example Three at a time, results in order
 * ```ts
 * import { mapConcurrent } from "./mod.ts";
 *
 * let running = 0, peak = 0;
 * const out = await mapConcurrent([30, 10, 20, 5, 15], async (ms, i) => {
 *   peak = Math.max(peak, ++running);
 *   await new Promise((r) => setTimeout(r, ms));
 *   running--;
 *   return i * 10;
 * }, { concurrency: 3 });
 * if (out.join() !== "0,10,20,30,40" || peak !== 3) throw new Error(`${out} ${peak}`);
 * ```
 */
export function mapConcurrent<T, R>(
  input: MapInput<T>,
  fn: MapFn<T, R>,
  options: MapOptions = {},
): Promise<R[]> {
  let pool: Pool<T, R>;
  try {
    pool = new Pool(input, fn, options, "mapConcurrent");
  } catch (error) {
    return Promise.reject(error);
  }
  const results: R[] = pool.total !== undefined ? new Array(pool.total) : [];
  const stopOnError = options.stopOnError ?? true;
  let errors: unknown[] | undefined;
  pool.ok = (i, v) => {
    results[i] = v;
  };
  pool.fail = (i, e) => {
    if (stopOnError) return true;
    (errors ??= [])[i] = e;
    return false;
  };
  return pool.run().then(() => {
    if (errors) {
      const list = errors.filter(() => true); // sparse → dense, in index order
      throw new AggregateError(
        list,
        `${list.length} of ${pool.started} items failed`,
      );
    }
    return results;
  });
}

/**
 * Like {@linkcode mapConcurrent}, but never rejects because of `fn`: every
 * item's outcome comes back as a `PromiseSettledResult`, in input order —
 * `Promise.allSettled` with a bound, or Python's
 * `asyncio.gather(..., return_exceptions=True)` under a semaphore. Still
 * rejects on an aborted `signal` or an input iterator that throws.
 *
 * @param input The items.
 * @param fn Called with each item, its index and a signal.
 * @param options Concurrency, signal, progress (`stopOnError` is ignored).
 * @returns Every outcome, in input order.
 *
 * @example
 * ```ts
 * import { mapConcurrentSettled } from "./mod.ts";
 *
 * const out = await mapConcurrentSettled([1, 2, 3], (n) => {
 *   if (n === 2) throw new Error("two");
 *   return n;
 * });
 * if (out.map((r) => r.status).join() !== "fulfilled,rejected,fulfilled") throw new Error();
 * ```
 */
export function mapConcurrentSettled<T, R>(
  input: MapInput<T>,
  fn: MapFn<T, R>,
  options: MapOptions = {},
): Promise<PromiseSettledResult<R>[]> {
  let pool: Pool<T, R>;
  try {
    pool = new Pool(input, fn, options, "mapConcurrentSettled");
  } catch (error) {
    return Promise.reject(error);
  }
  const results: PromiseSettledResult<R>[] = pool.total !== undefined
    ? new Array(pool.total)
    : [];
  pool.ok = (i, value) => {
    results[i] = { status: "fulfilled", value };
  };
  pool.fail = (i, reason) => {
    results[i] = { status: "rejected", reason };
    return false;
  };
  return pool.run().then(() => results);
}

/**
 * Like {@linkcode mapConcurrent}, but yields results in input order as soon
 * as the next one is ready, holding at most `buffer` results (finished or
 * still running) ahead of the consumer — so a 10-million-line input runs in
 * bounded memory. If one item is slow, finished results wait behind it; the
 * pool keeps pulling input until `buffer` items are waiting (default
 * `max(16 × concurrency, 256)`: enough to ride out ordinary stragglers), then
 * waits for the slow one. When you do not need input order, use
 * {@linkcode mapConcurrentUnordered}: it never waits behind a slow item.
 *
 * The first error stops the map (as with `stopOnError`), and the iteration
 * throws it once running calls have settled; wrap `fn` to turn errors into
 * values if you want to go on. Breaking out of the `for await` loop aborts
 * running calls, waits for them, and closes the input iterator. Nothing
 * starts before the first `next()`.
 *
 * @param input The items.
 * @param fn Called with each item, its index and a signal.
 * @param options Concurrency, buffer, signal, progress; see {@linkcode MapIterableOptions}.
 * @returns An async iterable of the results, in input order.
 * @throws {TypeError | RangeError} For invalid arguments, at once.
 *
 * @example
 * ```ts
 * import { mapConcurrentIterable } from "./mod.ts";
 *
 * function* naturals() {
 *   for (let n = 0;; n++) yield n;
 * }
 * const squares: number[] = [];
 * for await (const sq of mapConcurrentIterable(naturals(), (n) => n * n, { concurrency: 4 })) {
 *   if (squares.push(sq) === 5) break; // stops the endless input
 * }
 * if (squares.join() !== "0,1,4,9,16") throw new Error(squares.join());
 * ```
 */
export function mapConcurrentIterable<T, R>(
  input: MapInput<T>,
  fn: MapFn<T, R>,
  options: MapIterableOptions = {},
): AsyncIterableIterator<R> {
  const pool = new Pool<T, R>(input, fn, options, "mapConcurrentIterable");
  const { buffer = Math.max(pool.concurrency * 16, 256) } = options;
  checkCount(buffer, "buffer", "mapConcurrentIterable");
  return streamPool(pool, buffer, new OrderedResults<R>());
}

/**
 * One result of {@linkcode mapConcurrentUnordered}: the value and the index
 * of the item it came from.
 *
 * @example
 * ```ts
 * import { type Indexed, mapConcurrentUnordered } from "./mod.ts";
 *
 * const out: Indexed<string>[] = [];
 * for await (const r of mapConcurrentUnordered(["a", "b"], (s) => s.toUpperCase())) out.push(r);
 * out.sort((x, y) => x.index - y.index);
 * if (out.map((r) => `${r.index}${r.value}`).join() !== "0A,1B") throw new Error();
 * ```
 */
export interface Indexed<R> {
  /** The item's position in the input (0-based, in pull order). */
  index: number;
  /** What `fn` returned for it. */
  value: R;
}

/**
 * Like {@linkcode mapConcurrentIterable}, but yields each result as soon as
 * it finishes, as `{ index, value }`, in completion order: a slow item holds
 * nothing back, so the pool stays full however long one item takes. Memory
 * is bounded by `buffer` (default `2 × concurrency`): running items plus
 * finished results the consumer has not taken yet.
 *
 * Use it when you do not need input order, or when you put results in
 * order yourself (write them where `index` says, or record them and
 * reassemble later). The first error stops the map and the iteration throws
 * it once running calls have settled; `break` aborts running calls and
 * closes the input — exactly as with {@linkcode mapConcurrentIterable}.
 *
 * @param input The items.
 * @param fn Called with each item, its index and a signal.
 * @param options Concurrency, buffer, signal, progress; see {@linkcode MapIterableOptions}.
 * @returns An async iterable of `{ index, value }`, in completion order.
 * @throws {TypeError | RangeError} For invalid arguments, at once.
 *
 * @example Results as they finish, each with its index
 * ```ts
 * import { mapConcurrentUnordered } from "./mod.ts";
 *
 * const delays = [50, 5, 20];
 * const order: number[] = [];
 * const values: string[] = [];
 * for await (const { index, value } of mapConcurrentUnordered(delays, async (ms, i) => {
 *   await new Promise((r) => setTimeout(r, ms));
 *   return `item ${i}`;
 * }, { concurrency: 3 })) {
 *   order.push(index);
 *   values[index] = value;
 * }
 * if (order.join() !== "1,2,0") throw new Error(order.join());
 * if (values.join() !== "item 0,item 1,item 2") throw new Error(values.join());
 * ```
 */
export function mapConcurrentUnordered<T, R>(
  input: MapInput<T>,
  fn: MapFn<T, R>,
  options: MapIterableOptions = {},
): AsyncIterableIterator<Indexed<R>> {
  const pool = new Pool<T, R>(input, fn, options, "mapConcurrentUnordered");
  const { buffer = pool.concurrency * 2 } = options;
  checkCount(buffer, "buffer", "mapConcurrentUnordered");
  return streamPool(pool, buffer, new CompletedResults<R>());
}

/** Where a streaming pool keeps finished results until the consumer takes them. */
interface ResultQueue<R, Y> {
  /** Stores a result; returns whether the consumer can now take one. */
  put(index: number, value: R): boolean;
  /** Whether the next result to yield is here. */
  ready(): boolean;
  /** Removes and returns the next result to yield (call only when ready). */
  take(): Y;
}

/** Input order: results wait in a map until every earlier one was taken. */
class OrderedResults<R> implements ResultQueue<R, R> {
  #map = new Map<number, R>();
  #next = 0;
  put(index: number, value: R): boolean {
    this.#map.set(index, value);
    return index === this.#next;
  }
  ready(): boolean {
    return this.#map.has(this.#next);
  }
  take(): R {
    const v = this.#map.get(this.#next)!;
    this.#map.delete(this.#next++);
    return v;
  }
}

/** Completion order: a FIFO queue (head index, compacted now and then: no shift()). */
class CompletedResults<R> implements ResultQueue<R, Indexed<R>> {
  #items: Indexed<R>[] = [];
  #head = 0;
  put(index: number, value: R): boolean {
    this.#items.push({ index, value });
    return true;
  }
  ready(): boolean {
    return this.#head < this.#items.length;
  }
  take(): Indexed<R> {
    const items = this.#items;
    const r = items[this.#head]!;
    items[this.#head++] = undefined as never; // let it be collected
    if (this.#head === items.length) {
      items.length = 0;
      this.#head = 0;
    } else if (this.#head >= 1024 && this.#head * 2 >= items.length) {
      items.splice(0, this.#head);
      this.#head = 0;
    }
    return r;
  }
}

async function* streamPool<T, R, Y>(
  pool: Pool<T, R>,
  buffer: number,
  results: ResultQueue<R, Y>,
): AsyncGenerator<Y, void, undefined> {
  let taken = 0; // results yielded so far
  let wakeConsumer: (() => void) | undefined;
  let wakeProducers: (() => void) | undefined;
  let space: Promise<void> | undefined;
  const notify = (): void => {
    const w = wakeConsumer;
    wakeConsumer = undefined;
    w?.();
  };
  pool.ok = (i, v) => {
    if (results.put(i, v)) notify();
  };
  pool.fail = () => true;
  pool.gate = (started) => {
    if (started - taken < buffer) return undefined;
    return space ??= new Promise<void>((r) => (wakeProducers = r));
  };
  pool.onStop = () => {
    notify();
    const w = wakeProducers;
    wakeProducers = undefined;
    space = undefined;
    w?.();
  };
  const finished = pool.run();
  let result: unknown = undefined;
  let failed = false;
  finished.then(notify, (e) => {
    failed = true;
    result = e;
    notify();
  });
  let completed = false;
  try {
    for (;;) {
      if (results.ready()) {
        const v = results.take();
        taken++;
        if (wakeProducers) {
          const w = wakeProducers;
          wakeProducers = undefined;
          space = undefined;
          w();
        }
        yield v;
        continue;
      }
      if (pool.stopped || pool.settled) {
        // Stopped by an error or abort: wait for running calls, then report.
        await finished.catch(() => {});
        if (failed) throw result;
        if (results.ready()) continue; // finished normally; drain the rest
        completed = true;
        return;
      }
      await new Promise<void>((r) => (wakeConsumer = r));
    }
  } finally {
    if (!completed) {
      pool.stop(
        new DOMException("The consumer stopped iterating", "AbortError"),
      );
      if (wakeProducers) wakeProducers();
      await finished.catch(() => {});
    }
  }
}

/**
 * The engine behind the map functions: self-starting workers that pull from
 * the input one item at a time. Results and errors go to hooks (`ok`,
 * `fail`), set by the caller; `gate` lets the streaming variant hold workers
 * back. Workers never reject, so nothing goes unhandled.
 */
class Pool<T, R> {
  readonly concurrency: number;
  readonly total: number | undefined;
  ok: (index: number, value: R) => void = () => {};
  /** Returns true to stop the whole map. */
  fail: (index: number, error: unknown) => boolean = () => true;
  gate: ((index: number) => Promise<void> | undefined) | undefined;
  onStop: (() => void) | undefined;
  started = 0;
  stopped = false;
  settled = false;
  #fn: MapFn<T, R>;
  #array: ArrayLike<T> | undefined;
  #input: MapInput<T>;
  #iterator: Iterator<T> | AsyncIterator<T> | undefined;
  #async = false;
  #exhausted = false;
  #pulling: Promise<unknown> = Promise.resolve();
  #ctl = new AbortController();
  #signal: AbortSignal | undefined;
  #onProgress: ((p: MapProgress) => void) | undefined;
  #workers = 0;
  #running = 0;
  #done = 0;
  #failed = 0;
  #error: unknown;
  #hasError = false;
  #finish: (() => void) | undefined;
  #onAbort: (() => void) | undefined;

  constructor(
    input: MapInput<T>,
    fn: MapFn<T, R>,
    options: MapOptions,
    where: string,
  ) {
    if (
      input === null || input === undefined ||
      (typeof (input as Iterable<T>)[Symbol.iterator] !== "function" &&
        typeof (input as AsyncIterable<T>)[Symbol.asyncIterator] !==
          "function")
    ) {
      throw new TypeError(
        `${where} 'input' must be an iterable or async iterable: received ${
          input === null ? "null" : typeof input
        }`,
      );
    }
    if (typeof fn !== "function") {
      throw new TypeError(
        `${where} 'fn' must be a function: received ${typeof fn}`,
      );
    }
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `${where} options must be an object: received ${String(options)}`,
      );
    }
    const { concurrency = 5, signal, onProgress } = options;
    checkCount(concurrency, "concurrency", where);
    if (onProgress !== undefined && typeof onProgress !== "function") {
      throw new TypeError(
        `${where} 'onProgress' must be a function: received ${typeof onProgress}`,
      );
    }
    if (signal !== undefined && !(signal instanceof AbortSignal)) {
      throw new TypeError(`${where} 'signal' must be an AbortSignal`);
    }
    this.concurrency = concurrency;
    shareSignal(this.#ctl.signal); // handed to every call of fn
    this.#fn = fn;
    this.#input = input;
    this.#signal = signal;
    this.#onProgress = onProgress;
    if (Array.isArray(input)) {
      this.#array = input;
      this.total = input.length;
    } else {
      const size = (input as { size?: unknown; length?: unknown }).size ??
        (input as { length?: unknown }).length;
      this.total = typeof size === "number" && size >= 0 ? size : undefined;
    }
  }

  /** Runs to the end; resolves when every worker is done, rejects with the stop reason. */
  run(): Promise<void> {
    const signal = this.#signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (!this.#array) {
      const input = this.#input as Partial<AsyncIterable<T> & Iterable<T>>;
      try {
        if (typeof input[Symbol.asyncIterator] === "function") {
          this.#iterator = input[Symbol.asyncIterator]!();
          this.#async = true;
        } else this.#iterator = input[Symbol.iterator]!();
      } catch (error) {
        return Promise.reject(error);
      }
    }
    return new Promise<void>((resolve, reject) => {
      this.#finish = () => {
        if (signal && this.#onAbort) {
          signal.removeEventListener("abort", this.#onAbort);
        }
        this.settled = true;
        const close = this.stopped && !this.#exhausted
          ? this.#close()
          : undefined;
        const end = (): void => {
          if (this.#hasError) reject(this.#error);
          else resolve();
        };
        if (close) close.then(end, end);
        else end();
      };
      if (signal) {
        this.#onAbort = () => this.stop(signal.reason);
        signal.addEventListener("abort", this.#onAbort, { once: true });
      }
      const n = this.#array
        ? Math.min(this.concurrency, this.#array.length)
        : 1; // iterables: workers start more workers as items arrive
      if (n === 0) this.#finish();
      else for (let i = 0; i < n; i++) this.#spawn();
    });
  }

  /** Stops the map: nothing new starts; running calls see their signal abort. */
  stop(reason: unknown): void {
    if (this.stopped) return;
    this.stopped = true;
    if (!this.#hasError) {
      this.#hasError = true;
      this.#error = reason;
    }
    this.#ctl.abort(reason);
    this.onStop?.();
  }

  #spawn(): void {
    this.#workers++;
    this.#work().then(() => {
      if (--this.#workers === 0) this.#finish!();
    });
  }

  /** Closes the input iterator after an early stop; its own errors are ignored. */
  #close(): Promise<unknown> | undefined {
    const it = this.#iterator;
    if (!it || typeof it.return !== "function") return undefined;
    try {
      const r = it.return();
      return r instanceof Promise ? r.catch(() => {}) : undefined;
    } catch {
      return undefined;
    }
  }

  async #work(): Promise<void> {
    const fn = this.#fn;
    const array = this.#array;
    const signal = this.#ctl.signal;
    while (!this.stopped) {
      if (this.gate) {
        const wait = this.gate(this.started);
        if (wait) {
          await wait;
          continue; // re-check stop and the gate
        }
      }
      let item: T;
      let i: number;
      if (array) {
        i = this.started;
        if (i >= array.length) return;
        item = array[i]!;
        this.started++;
      } else {
        if (this.#async) {
          const r = await this.#pullAsync();
          if (r === undefined) return;
          item = r.value;
          i = r.index;
        } else {
          const r = this.#pullSync();
          if (r === undefined) return;
          item = r.value;
          i = this.started - 1;
        }
        if (this.#workers < this.concurrency && !this.#exhausted) this.#spawn();
      }
      this.#running++;
      try {
        // Like p-map and Array.fromAsync: a promise in a sync input is
        // awaited first; its rejection is this item's error.
        if (
          !this.#async && item !== null && typeof item === "object" &&
          typeof (item as { then?: unknown }).then === "function"
        ) item = await item;
        this.ok(i, await fn(item, i, signal));
      } catch (error) {
        this.#failed++;
        if (this.fail(i, error)) this.stop(error);
      }
      this.#running--;
      this.#done++;
      if (this.#onProgress) {
        this.#onProgress({
          done: this.#done,
          failed: this.#failed,
          running: this.#running,
          total: this.total,
        });
      }
    }
  }

  /** The next item, or undefined when the input is exhausted or broke. */
  #pullSync(): IteratorResult<T> | undefined {
    if (this.#exhausted) return undefined;
    let r: IteratorResult<T>;
    try {
      r = (this.#iterator as Iterator<T>).next();
    } catch (error) {
      this.#exhausted = true; // a throwing iterator is finished
      this.stop(error);
      return undefined;
    }
    if (r.done) {
      this.#exhausted = true;
      return undefined;
    }
    this.started++;
    return r;
  }

  /**
   * The same for async iterators, one pull at a time (they need not support
   * overlapping `next()` calls). The index is assigned when the pull
   * completes, so indices follow pull order.
   */
  async #pullAsync(): Promise<{ value: T; index: number } | undefined> {
    const it = this.#iterator as AsyncIterator<T>;
    const p = this.#pulling.then(() =>
      this.#exhausted || this.stopped ? undefined : it.next()
    );
    this.#pulling = p.catch(() => {});
    let r: IteratorResult<T> | undefined;
    try {
      r = await p;
    } catch (error) {
      this.#exhausted = true;
      this.stop(error);
      return undefined;
    }
    if (r === undefined) return undefined;
    if (r.done) {
      this.#exhausted = true;
      return undefined;
    }
    if (this.stopped) return undefined;
    return { value: r.value, index: this.started++ };
  }
}

/**
 * Lifts Node's "possible EventTarget memory leak" warning (more than 10
 * listeners) for a signal we share with many concurrent calls by design.
 * Uses `process.getBuiltinModule` when the runtime has it; a no-op elsewhere.
 */
function shareSignal(signal: AbortSignal): void {
  try {
    const p = (globalThis as {
      process?: { getBuiltinModule?: (id: string) => unknown };
    }).process;
    const events = p?.getBuiltinModule?.("node:events") as
      | { setMaxListeners?: (n: number, ...targets: EventTarget[]) => void }
      | undefined;
    events?.setMaxListeners?.(0, signal);
  } catch {
    // not Node, or not allowed: only a warning is at stake
  }
}

/** An integer ≥ 1, or Infinity. */
function checkCount(value: unknown, name: string, where: string): void {
  checkNumber(value, name, where);
  if (!(value >= 1) || (!Number.isInteger(value) && value !== Infinity)) {
    throw new RangeError(
      `${where} '${name}' must be an integer >= 1 or Infinity: received ${value}`,
    );
  }
}

// =============================================================================
// Stats
// =============================================================================

/**
 * A plain snapshot of {@linkcode Stats}, from `toJSON()`.
 *
 * @example
 * ```ts
 * import { Stats, type StatsSnapshot } from "./mod.ts";
 *
 * const stats = new Stats();
 * stats.call();
 * stats.attempt(0, 100, 200);
 * stats.end(true);
 * const s: StatsSnapshot = stats.toJSON();
 * if (s.successRate !== 1 || s.requests !== 1) throw new Error();
 * ```
 */
export interface StatsSnapshot {
  /** Logical calls made (one per `fetch`/`messages` call, retries not counted). */
  calls: number;
  /** Calls that ended in a 2xx response. */
  succeeded: number;
  /** Calls that ended otherwise (HTTP error after retries, network error, quota). */
  failed: number;
  /**
   * Calls ended by their caller's abort signal: cancelled, not failed (a
   * batch stopped with Ctrl-C has lines that were never run).
   */
  cancelled: number;
  /** HTTP attempts sent, retries included. */
  requests: number;
  /** Retries made. */
  retries: number;
  /** Attempts answered 429. */
  rateLimited: number;
  /** Of those, 429s although our limiter had admitted the request. */
  unexpected429: number;
  /** Times the limiter margin was widened after an unexpected 429. */
  marginWidened: number;
  /** Failed attempts by kind: `"http_500"`, `"network"`, `"quota"`, `"aborted"` … */
  errors: Record<string, number>;
  /** Real input tokens (from responses). */
  inputTokens: number;
  /** Real output tokens (from responses). */
  outputTokens: number;
  /**
   * Input tokens read from the provider's prompt cache (not in
   * `inputTokens` unless reads count; see {@linkcode UsageOptions}).
   */
  cacheReadTokens: number;
  /** Input tokens written to the prompt cache (also in `inputTokens`, as they count toward limits). */
  cacheWriteTokens: number;
  /**
   * The pace found from 429s while no limits were known (see
   * {@linkcode RateLimitedFetchOptions.findPace}), as amounts per second
   * by key (`requests`, `inputTokens`); absent before the first 429, and
   * when limits were given or learned from headers.
   */
  pace?: Record<string, number>;
  /** `succeeded / (succeeded + failed)`, or 1 before any call ends. */
  successRate: number;
  /** Wall time from the first call to the last response, in ms. */
  elapsedMs: number;
  /** Achieved requests (attempts) per minute over `elapsedMs`. */
  requestsPerMinute: number;
  /** Achieved input + output tokens per minute over `elapsedMs`. */
  tokensPerMinute: number;
  /** Attempt latency (send → response complete), ms. */
  latencyMs: Percentiles;
  /** Time waiting for a slot and a rate permit before each attempt, ms. */
  queueWaitMs: Percentiles;
  /** What happened over time; see {@linkcode Stats.timeline}. */
  timeline: TimelinePoint[];
}

/**
 * One stretch of a run in {@linkcode Stats.timeline}: counts of what
 * happened in it, and the most seen at once.
 *
 * @example
 * ```ts
 * import { ManualClock, Stats, type TimelinePoint } from "./mod.ts";
 *
 * const clock = new ManualClock();
 * const stats = new Stats(clock);
 * stats.call();
 * stats.attempt(0, 50, 200);
 * const [p]: TimelinePoint[] = stats.timeline();
 * if (p!.sent !== 1 || p!.ms !== 1000) throw new Error();
 * ```
 */
export interface TimelinePoint {
  /** Start, ms after the first call. */
  t: number;
  /** Length, ms (buckets double as a long run is merged). */
  ms: number;
  /** Attempts sent (retries included). */
  sent: number;
  /** Real input tokens settled. */
  inputTokens: number;
  /** Real output tokens settled. */
  outputTokens: number;
  /** Attempts answered 429. */
  rateLimited: number;
  /** Retries. */
  retries: number;
  /** Failed attempts (429s included). */
  errors: number;
  /** Most requests in flight at once. */
  inFlight: number;
  /** Most requests waiting for a slot or a rate permit at once. */
  queued: number;
  /** Mean wait for a slot and a permit of the attempts sent, ms. */
  queueWaitMs: number;
  /**
   * Each window's highest use seen, by label (`"requests/60000"`, or with
   * a model: `"gpt-4o: requests/60000"`), with its limit.
   */
  windows: Record<string, { used: number; limit: number }>;
  /** Events noted in this stretch (see {@linkcode Stats.note}), e.g. a fatal stop. */
  notes?: string[];
  /** The pace found from 429s when it changed in this stretch: the last value (see {@linkcode StatsSnapshot.pace}). */
  pace?: Record<string, number>;
}

/** A timeline bucket as kept (wait as sum and count, to merge exactly). */
interface Bucket extends Omit<TimelinePoint, "queueWaitMs"> {
  waitSum: number;
}

/**
 * Options for {@linkcode Stats}.
 *
 * @example
 * ```ts
 * import { Stats, type StatsOptions } from "./mod.ts";
 *
 * const options: StatsOptions = { bucketMs: 500, maxPoints: 600 };
 * if (new Stats(undefined, options).timeline().length !== 0) throw new Error();
 * ```
 */
export interface StatsOptions {
  /** The timeline's first bucket length, ms; default 1,000. */
  bucketMs?: number;
  /**
   * Most timeline points kept; past it, neighbours merge and buckets double
   * (a week at one-second buckets ends as ~1,200 points). Default 2,000.
   */
  maxPoints?: number;
}

/**
 * p50/p95/p99 and max of a sample.
 *
 * @example
 * ```ts
 * import { type Percentiles, Stats } from "./mod.ts";
 *
 * const stats = new Stats();
 * for (const ms of [10, 20, 30, 40, 1000]) stats.attempt(0, ms, 200);
 * const p: Percentiles = stats.toJSON().latencyMs;
 * if (p.p50 !== 30 || p.max !== 1000 || p.count !== 5) throw new Error();
 * ```
 */
export interface Percentiles {
  /** Median. */
  p50: number;
  /** 95th percentile. */
  p95: number;
  /** 99th percentile. */
  p99: number;
  /** Largest seen. */
  max: number;
  /** Samples seen. */
  count: number;
}

const RESERVOIR = 4096;

/** A bounded uniform sample (reservoir sampling) for percentiles. */
class Sample {
  #values: number[] = [];
  #seen = 0;
  #max = 0;
  add(v: number): void {
    this.#seen++;
    if (v > this.#max) this.#max = v;
    if (this.#values.length < RESERVOIR) this.#values.push(v);
    else {
      const j = Math.floor(Math.random() * this.#seen);
      if (j < RESERVOIR) this.#values[j] = v;
    }
  }
  /** The kept sample (up to 4,096 values). */
  values(): number[] {
    return this.#values.slice();
  }
  percentiles(): Percentiles {
    const s = [...this.#values].sort((a, b) => a - b);
    const at = (q: number): number =>
      s.length ? s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]! : 0;
    return {
      p50: at(0.5),
      p95: at(0.95),
      p99: at(0.99),
      max: this.#max,
      count: this.#seen,
    };
  }
}

/**
 * Counters and timings of a run: what the seed's `APIStats` printed, and
 * more. {@linkcode rateLimitedFetch} fills one in; `report()` formats it for
 * humans, `toJSON()` for machines. It never holds request data, URLs or keys.
 *
 * @example
 * ```ts
 * import { Stats } from "./mod.ts";
 *
 * const stats = new Stats();
 * stats.call();
 * stats.attempt(12, 340, 200);
 * stats.end(true);
 * stats.tokens(900, 120);
 * const s = stats.toJSON();
 * if (s.succeeded !== 1 || s.inputTokens !== 900) throw new Error();
 * if (!stats.report().includes("success")) throw new Error();
 * ```
 */
export class Stats {
  #calls = 0;
  #succeeded = 0;
  #failed = 0;
  #cancelled = 0;
  #requests = 0;
  #retries = 0;
  #rateLimited = 0;
  #unexpected429 = 0;
  #marginWidened = 0;
  #errors: Record<string, number> = {};
  #input = 0;
  #output = 0;
  #cacheRead = 0;
  #cacheWrite = 0;
  #pace: Record<string, number> | undefined;
  #first = -1;
  #last = -1;
  #latency = new Sample();
  #queue = new Sample();
  #now: () => number;
  #points: Bucket[] = [];
  #width: number;
  #maxPoints: number;
  /** Start of the timeline (the first call or event). */
  #origin = -1;
  #notes = 0;

  /**
   * Creates empty stats.
   *
   * @param clock Time source for rates; default {@linkcode systemClock}.
   * @param options The timeline's bucket length and size; see {@linkcode StatsOptions}.
   */
  constructor(clock: Clock = systemClock, options: StatsOptions = {}) {
    this.#now = () => clock.now();
    const { bucketMs = 1000, maxPoints = 2000 } = options;
    checkPositive(bucketMs, "bucketMs", "Stats");
    checkCount(maxPoints, "maxPoints", "Stats");
    if (maxPoints < 2 || maxPoints === Infinity) {
      throw new RangeError(
        `Stats 'maxPoints' must be a finite integer >= 2: received ${maxPoints}`,
      );
    }
    this.#width = bucketMs;
    this.#maxPoints = maxPoints;
  }

  /** The bucket for now, adding empty ones for a quiet stretch and merging past the cap. */
  #bucket(): Bucket {
    const now = this.#now();
    if (this.#origin < 0) this.#origin = now;
    for (;;) {
      const pts = this.#points;
      const idx = Math.max(0, Math.floor((now - this.#origin) / this.#width));
      const last = pts[pts.length - 1];
      const lastIdx = last ? Math.round(last.t / this.#width) : -1;
      if (lastIdx >= idx) return last!;
      if (idx - lastIdx > 2 * this.#maxPoints) {
        // A long quiet stretch: widen first rather than fill it.
        this.#merge();
        continue;
      }
      pts.push({
        t: (lastIdx + 1) * this.#width,
        ms: this.#width,
        sent: 0,
        inputTokens: 0,
        outputTokens: 0,
        rateLimited: 0,
        retries: 0,
        errors: 0,
        inFlight: 0,
        queued: 0,
        waitSum: 0,
        windows: {},
      });
      if (pts.length > this.#maxPoints) this.#merge();
    }
  }

  /** Merges neighbours: half the points, buckets twice as long. */
  #merge(): void {
    const pts = this.#points;
    const out: Bucket[] = [];
    this.#width *= 2;
    for (const p of pts) {
      const at = Math.floor(p.t / this.#width) * this.#width;
      const q = out[out.length - 1];
      if (!q || q.t !== at) {
        out.push({ ...p, t: at, ms: this.#width, windows: { ...p.windows } });
        continue;
      }
      q.sent += p.sent;
      q.inputTokens += p.inputTokens;
      q.outputTokens += p.outputTokens;
      q.rateLimited += p.rateLimited;
      q.retries += p.retries;
      q.errors += p.errors;
      q.waitSum += p.waitSum;
      q.inFlight = Math.max(q.inFlight, p.inFlight);
      q.queued = Math.max(q.queued, p.queued);
      for (const [k, w] of Object.entries(p.windows)) {
        const o = q.windows[k];
        if (!o || w.used > o.used) q.windows[k] = { ...w };
      }
      if (p.notes) q.notes = [...(q.notes ?? []), ...p.notes];
      if (p.pace) q.pace = p.pace;
    }
    this.#points = out;
  }

  /**
   * Notes an event at the current point of the timeline (at most 100 are
   * kept), e.g. `"stopped: quota exhausted"`; the run report marks it.
   *
   * @param text What happened. Keep secrets out of it.
   */
  note(text: string): void {
    if (this.#notes >= 100) return;
    this.#notes++;
    const b = this.#bucket();
    (b.notes ??= []).push(String(text));
  }

  /**
   * Records what is true now, for the timeline: requests in flight and
   * waiting, and each window's use against its limit (labels as in
   * {@linkcode TimelinePoint.windows}). {@linkcode rateLimitedFetch} calls
   * it; call it yourself to chart your own limiter.
   *
   * @param state Any of `inFlight`, `queued`, and `windows` (label → use).
   */
  sample(state: {
    inFlight?: number;
    queued?: number;
    windows?: Record<string, { used: number; limit: number }>;
  }): void {
    const b = this.#bucket();
    if (state.inFlight !== undefined && state.inFlight > b.inFlight) {
      b.inFlight = state.inFlight;
    }
    if (state.queued !== undefined && state.queued > b.queued) {
      b.queued = state.queued;
    }
    if (state.windows) {
      for (const [k, w] of Object.entries(state.windows)) {
        const o = b.windows[k];
        if (!o || w.used > o.used || w.limit !== o.limit) {
          b.windows[k] = {
            used: Math.max(w.used, o?.used ?? 0),
            limit: w.limit,
          };
        }
      }
    }
  }

  /**
   * What happened over time, oldest first: fixed buckets (one second at
   * first) that merge as the run grows, so memory stays bounded (at most
   * `maxPoints`) however long it runs. Quiet stretches are empty points.
   *
   * @returns A copy of the points.
   */
  timeline(): TimelinePoint[] {
    return this.#points.map(({ waitSum, windows, notes, pace, ...p }) => ({
      ...p,
      queueWaitMs: p.sent ? waitSum / p.sent : 0,
      windows: { ...windows },
      ...(notes ? { notes: [...notes] } : {}),
      ...(pace ? { pace: { ...pace } } : {}),
    }));
  }

  /**
   * The latencies kept for percentiles (a uniform sample of at most 4,096),
   * for a histogram.
   *
   * @returns Attempt latencies, ms.
   */
  latencies(): number[] {
    return this.#latency.values();
  }

  /** Records the start of a logical call. */
  call(): void {
    this.#calls++;
    if (this.#first < 0) this.#first = this.#now();
    this.#bucket();
  }

  /**
   * Records one HTTP attempt.
   *
   * @param queueMs Time spent waiting for a slot and a permit.
   * @param latencyMs Send → response complete.
   * @param status The HTTP status, or 0 for a network error.
   * @param kind For failures: the error kind (defaults from the status).
   */
  attempt(
    queueMs: number,
    latencyMs: number,
    status: number,
    kind?: string,
  ): void {
    this.#requests++;
    this.#queue.add(queueMs);
    this.#latency.add(latencyMs);
    this.#last = this.#now();
    const b = this.#bucket();
    b.sent++;
    b.waitSum += queueMs;
    if (status === 429) {
      this.#rateLimited++;
      b.rateLimited++;
    }
    if (status < 200 || status >= 300) {
      const k = kind ?? (status ? `http_${status}` : "network");
      this.#errors[k] = (this.#errors[k] ?? 0) + 1;
      b.errors++;
    }
  }

  /** Records a retry. */
  retry(): void {
    this.#retries++;
    this.#bucket().retries++;
  }

  /** Records a 429 for a request our limiter had admitted, and whether the margin was widened. */
  unexpected429(widened: boolean): void {
    this.#unexpected429++;
    if (widened) this.#marginWidened++;
  }

  /**
   * Records the end of a logical call.
   *
   * @param ok Whether it succeeded.
   * @param kind For failures that made no attempt (e.g. `"aborted"`), the kind.
   */
  end(ok: boolean, kind?: string): void {
    if (ok) this.#succeeded++;
    else if (kind === "aborted") {
      this.#cancelled++; // not an error: the caller stopped it
      kind = undefined;
    } else this.#failed++;
    if (kind) this.#errors[kind] = (this.#errors[kind] ?? 0) + 1;
    this.#last = this.#now();
  }

  /** Adds real token usage. */
  tokens(input: number, output: number): void {
    this.#input += input;
    this.#output += output;
    const b = this.#bucket();
    b.inputTokens += input;
    b.outputTokens += output;
  }

  /**
   * Records the pace found from 429s (amounts per second by key), for the
   * snapshot and the timeline; {@linkcode rateLimitedFetch} calls it.
   *
   * @param perSecond The pace now; `undefined` when there is none.
   */
  pace(perSecond: Record<string, number> | undefined): void {
    this.#pace = perSecond && { ...perSecond };
    if (perSecond) this.#bucket().pace = { ...perSecond };
  }

  /** Adds prompt-cache reads and writes (tokens). */
  cache(read: number, write: number): void {
    this.#cacheRead += read;
    this.#cacheWrite += write;
  }

  /** A plain snapshot; see {@linkcode StatsSnapshot}. */
  toJSON(): StatsSnapshot {
    const elapsed = this.#first < 0 ? 0 : Math.max(0, this.#last - this.#first);
    const perMin = (n: number): number =>
      elapsed > 0 ? (n * 60_000) / elapsed : 0;
    const ended = this.#succeeded + this.#failed;
    return {
      calls: this.#calls,
      succeeded: this.#succeeded,
      failed: this.#failed,
      cancelled: this.#cancelled,
      requests: this.#requests,
      retries: this.#retries,
      rateLimited: this.#rateLimited,
      unexpected429: this.#unexpected429,
      marginWidened: this.#marginWidened,
      errors: { ...this.#errors },
      inputTokens: this.#input,
      outputTokens: this.#output,
      cacheReadTokens: this.#cacheRead,
      cacheWriteTokens: this.#cacheWrite,
      ...(this.#pace ? { pace: { ...this.#pace } } : {}),
      successRate: ended ? this.#succeeded / ended : 1,
      elapsedMs: elapsed,
      requestsPerMinute: perMin(this.#requests),
      tokensPerMinute: perMin(this.#input + this.#output),
      latencyMs: this.#latency.percentiles(),
      queueWaitMs: this.#queue.percentiles(),
      timeline: this.timeline(),
    };
  }

  /**
   * A compact table for humans.
   *
   * @returns Several lines of text.
   */
  report(): string {
    const s = this.toJSON();
    const n = (x: number): string => Math.round(x).toLocaleString("en-US");
    const ms = (p: Percentiles): string =>
      `p50 ${n(p.p50)} · p95 ${n(p.p95)} · p99 ${n(p.p99)} · max ${
        n(p.max)
      } ms`;
    const errors = Object.entries(s.errors).map(([k, v]) => `${k} ${v}`)
      .join(", ") || "none";
    return [
      `calls        ${n(s.calls)} (${n(s.succeeded)} ok, ${n(s.failed)} failed${
        s.cancelled ? `, ${n(s.cancelled)} cancelled` : ""
      }; success ${(s.successRate * 100).toFixed(1)}%)`,
      `requests     ${n(s.requests)} sent, ${n(s.retries)} retries, ${
        n(s.rateLimited)
      } × 429 (${n(s.unexpected429)} unexpected)`,
      `errors       ${errors}`,
      `tokens       ${n(s.inputTokens)} in, ${n(s.outputTokens)} out${
        s.cacheReadTokens + s.cacheWriteTokens
          ? ` (cache: ${n(s.cacheReadTokens)} read, ${
            n(s.cacheWriteTokens)
          } written)`
          : ""
      }`,
      `throughput   ${n(s.requestsPerMinute)} requests/min, ${
        n(s.tokensPerMinute)
      } tokens/min over ${(s.elapsedMs / 1000).toFixed(1)} s`,
      `latency      ${ms(s.latencyMs)}`,
      `queue wait   ${ms(s.queueWaitMs)}`,
      ...(s.pace?.requests !== undefined
        ? [
          `pace found   ${+s.pace.requests.toPrecision(3)} requests/s${
            s.pace.inputTokens
              ? `, ${n(s.pace.inputTokens)} input tokens/s`
              : ""
          } from 429s (no limits were known)`,
        ]
        : []),
    ].join("\n");
  }
}

// =============================================================================
// Providers
// =============================================================================

/**
 * One endpoint of an API family: its path, how a request to it is costed,
 * and what its body cannot do without.
 *
 * @example
 * ```ts
 * import { anthropicProvider } from "./mod.ts";
 *
 * const [messages] = anthropicProvider.endpoints;
 * if (messages?.path !== "/v1/messages" || !messages.streams) throw new Error();
 * ```
 */
export interface ProviderEndpoint {
  /** The path as the provider's batch files name it, e.g. `/v1/chat/completions`. */
  readonly path: string;
  /** The body field a request cannot do without. */
  readonly needs: "messages" | "input" | "prompt" | "contents";
  /** Other body fields the API insists on. */
  readonly requires: readonly string[];
  /** The body fields that cap output tokens, the first one set wins (`a.b`: field `b` of `a`). */
  readonly outputCaps: readonly string[];
  /** Output tokens when no cap is set (the API's own default); 0 for endpoints with no output. */
  readonly defaultOutput: number;
  /** Whether responses can stream (`"stream": true`). */
  readonly streams: boolean;
  /** The estimated input tokens of a request body (see {@linkcode estimateTokens}). */
  inputTokens(body: Record<string, unknown>): number;
  /**
   * The part of a request the provider caches when the request marks it
   * (Anthropic's `cache_control` breakpoints); absent, or `undefined`, when
   * nothing is marked or the provider caches on its own terms and counts
   * cached tokens toward its limits anyway (OpenAI).
   */
  cachePrefix?(body: Record<string, unknown>): CachePrefix | undefined;
}

/**
 * The cacheable prefix of one request, as {@linkcode ProviderEndpoint.cachePrefix}
 * finds it: requests with the same `key` share one cache entry.
 *
 * @example
 * ```ts
 * import { anthropicProvider } from "./mod.ts";
 *
 * const system = [{ type: "text", text: "A long rubric…", cache_control: { type: "ephemeral" } }];
 * const body = { model: "m", max_tokens: 9, system, messages: [{ role: "user", content: "Q1" }] };
 * const prefix = anthropicProvider.endpoints[0]!.cachePrefix?.(body);
 * if (prefix?.ttlMs !== 300_000 || !(prefix.tokens > 0)) throw new Error();
 * ```
 */
export interface CachePrefix {
  /** Identifies the prefix: the model and the content up to the last breakpoint. */
  readonly key: string;
  /** How long the cache keeps it after a write or a read (5 minutes, or 1 hour with `"ttl": "1h"`). */
  readonly ttlMs: number;
  /** Its estimated input tokens (see {@linkcode estimateTokens}). */
  readonly tokens: number;
}

/**
 * What one response says about the prompt cache, in tokens.
 *
 * @example
 * ```ts
 * import { anthropicProvider, type CacheUsage } from "./mod.ts";
 *
 * const u: CacheUsage | undefined = anthropicProvider.cacheUsage({
 *   usage: { input_tokens: 12, cache_creation_input_tokens: 0, cache_read_input_tokens: 6000, output_tokens: 40 },
 * });
 * if (u?.read !== 6000 || u.write !== 0) throw new Error();
 * ```
 */
export interface CacheUsage {
  /** Tokens read from the cache. */
  read: number;
  /** Tokens written to the cache. */
  write: number;
}

/**
 * The response headers that tell one window's limit, what is left of it,
 * and when it resets.
 *
 * @example
 * ```ts
 * import { openaiProvider } from "./mod.ts";
 *
 * const requests = openaiProvider.limitHeaders.find((h) => h.key === "requests");
 * if (requests?.remaining !== "x-ratelimit-remaining-requests") throw new Error();
 * ```
 */
export interface LimitHeaders {
  /** The limiter key they describe: `requests`, `tokens`, `inputTokens` or `outputTokens`. */
  readonly key: string;
  /** The header with the window's limit. */
  readonly limit: string;
  /** The header with what is left of it. */
  readonly remaining: string;
  /** The header with its reset: a time (RFC 3339) or a wait (a Go duration or seconds). */
  readonly reset: string;
  /** How the reset header is written. */
  readonly resetAs: "time" | "wait";
  /** Not learned when any of these headers is present (they describe the same capacity more exactly). */
  readonly unless?: readonly string[];
}

/**
 * Folds the events of one streamed response into the body the same request
 * would have returned whole.
 *
 * @example
 * ```ts
 * import { openaiProvider } from "./mod.ts";
 *
 * const a = openaiProvider.assembler();
 * a.add({ id: "c1", model: "m", choices: [{ delta: { content: "Hi" } }] });
 * a.add("[DONE]");
 * const body = a.result() as { choices: { message: { content: string } }[] };
 * if (!a.complete || body.choices[0]?.message.content !== "Hi") throw new Error();
 * ```
 */
export interface StreamAssembler {
  /**
   * Adds one event's data: parsed JSON, or the raw text when it is not JSON.
   * Throws an {@linkcode HttpError} for an error event.
   */
  add(data: unknown): void;
  /** Whether the stream's end marker arrived (a stream without it was cut short). */
  readonly complete: boolean;
  /** The whole-response body assembled so far. */
  result(): Record<string, unknown>;
}

/**
 * How one batch line format is read and written: the provider's own batch
 * file format (`paceline run` reads it and writes results like the
 * provider's Batch API does).
 *
 * @example
 * ```ts
 * import { anthropicProvider } from "./mod.ts";
 *
 * const line = anthropicProvider.batch.result("q1", 1, { ok: true, status: 200, body: { content: [] } });
 * if ((line as { result: { type: string } }).result.type !== "succeeded") throw new Error();
 * ```
 */
export interface BatchFormat {
  /** The format's name, for messages. */
  readonly name: string;
  /** The line field that holds the request body: `params`, `body` or `request`. */
  readonly bodyField: string;
  /** The line field that names it, and its result: `custom_id`, or Gemini's `key`. */
  readonly idField: string;
  /**
   * The endpoint path a line is for; throws a `RangeError` whose message
   * names the bad field.
   */
  pathOf(line: Record<string, unknown>): string;
  /** The result line for one request's outcome. */
  result(customId: string, line: number, outcome: BatchOutcome): unknown;
}

/**
 * What became of one batch request, for {@linkcode BatchFormat.result}.
 *
 * @example
 * ```ts
 * import type { BatchOutcome } from "./mod.ts";
 *
 * const failed: BatchOutcome = { ok: false, status: 0, errorType: "network_error", message: "reset" };
 * if (failed.ok) throw new Error();
 * ```
 */
export interface BatchOutcome {
  /** Whether it succeeded. */
  ok: boolean;
  /** The HTTP status; 0 when no response came. */
  status?: number;
  /** The response body (parsed JSON, or its text). */
  body?: unknown;
  /** The provider's request id. */
  requestId?: string;
  /** The error type, when there is no response body to carry it. */
  errorType?: string;
  /** A human-readable error message. */
  message?: string;
}

/**
 * One HTTP call to a provider's Batch API, made by whoever drives it (as
 * `paceline run --batch-api` does, with the key, retries and a journal).
 * `path` is a path on the base URL (`/v1/batches`) or a URL the provider
 * gave (a results URL); a string or `Blob` body is JSON, a `FormData` body
 * multipart. Resolves to a 2xx response; rejects otherwise.
 *
 * @example
 * ```ts
 * import type { BatchCall } from "./mod.ts";
 *
 * const call: BatchCall = (method, path, body) =>
 *   fetch(`https://api.openai.com${path}`, { method, body, headers: { authorization: "Bearer sk-..." } });
 * if (typeof call !== "function") throw new Error();
 * ```
 */
export type BatchCall = (
  method: "GET" | "POST",
  path: string,
  body?: string | Blob | FormData,
) => Promise<Response>;

/**
 * Where one batch stands, in words common to every provider (from
 * {@linkcode BatchApi.retrieve} and the like).
 *
 * @example
 * ```ts
 * import type { BatchStatus } from "./mod.ts";
 *
 * const s: BatchStatus = {
 *   id: "batch_1", phase: "running", state: "in_progress", counts: { completed: 5, failed: 0 },
 *   total: 10, finished: 5, createdAt: Date.now(), results: [],
 * };
 * if (s.total - s.finished !== 5) throw new Error();
 * ```
 */
export interface BatchStatus {
  /** The provider's batch id. */
  readonly id: string;
  /** Still going (`running`), done with results to fetch (`ended`), or refused whole (`failed`, e.g. validation). */
  readonly phase: "running" | "ended" | "failed";
  /** The provider's own word for it: `in_progress`, `finalizing`, `ended`, … */
  readonly state: string;
  /** Requests per state, in the provider's words. */
  readonly counts: Readonly<Record<string, number>>;
  /** Requests in the batch. */
  readonly total: number;
  /** Requests the provider has finished, whatever became of them. */
  readonly finished: number;
  /** When it was created, ms since the epoch. */
  readonly createdAt: number;
  /** The tag given at creation, where the provider keeps one (OpenAI's metadata). */
  readonly tag?: string;
  /** Why it failed, in the provider's words. */
  readonly failure?: string;
  /**
   * It failed for room that other batches' ending frees (OpenAI's
   * `token_limit_exceeded`: too many tokens enqueued for a model): the
   * same requests may be submitted again once one of them ends.
   */
  readonly requeue?: boolean;
  /** Once ended: where its results are (paths or URLs of JSONL files). */
  readonly results: readonly string[];
}

/**
 * A provider's Batch API (half the live price; results within 24 hours):
 * its limits per batch, how an upload is laid out, the calls that submit,
 * watch and cancel a batch, and how a result line reads as a
 * {@linkcode BatchOutcome}. The calls go through a {@linkcode BatchCall},
 * so the driver decides on keys, retries and journaling.
 *
 * @example
 * ```ts
 * import { anthropicProvider, openaiProvider } from "./mod.ts";
 *
 * if (openaiProvider.batchApi!.maxRequests !== 50_000) throw new Error();
 * const [open, , close] = anthropicProvider.batchApi!.framing;
 * const body = open + anthropicProvider.batchApi!.entry("q1", "/v1/messages", { model: "m" }) + close;
 * if (JSON.parse(body).requests[0].custom_id !== "q1") throw new Error();
 * ```
 */
export interface BatchApi {
  /** The most requests in one batch (each counted as {@linkcode BatchApi.weight} says). */
  readonly maxRequests: number;
  /** The most bytes in one batch's upload. */
  readonly maxBytes: number;
  /** The limits per batch in words, for plans and messages. */
  readonly limits: string;
  /** The price against live requests: 0.5 is half. */
  readonly priceFactor: number;
  /** An upload is `open`, the entries joined by `separator`, then `close`. */
  readonly framing: readonly [open: string, separator: string, close: string];
  /**
   * What every request of one batch must share, given to
   * {@linkcode BatchApi.create}: the endpoint path (OpenAI, Anthropic) or
   * the model (Gemini). `body` has the model filled in where a line names
   * none.
   */
  target(path: string, body: Record<string, unknown>): string;
  /** One request as an upload carries it. */
  entry(customId: string, path: string, body: Record<string, unknown>): string;
  /** How many of `maxRequests` a request uses; default 1. */
  weight?(path: string, body: Record<string, unknown>): number;
  /** Uploads the requests as a file first, where the provider wants one (OpenAI); resolves to its id. */
  upload?(call: BatchCall, file: Blob, name: string): Promise<string>;
  /**
   * Creates a batch from an upload (or the id {@linkcode BatchApi.upload}
   * gave) for `endpoint` (the batch's {@linkcode BatchApi.target}), tagged
   * with `tag` where the provider keeps tags.
   */
  create(
    call: BatchCall,
    input: Blob | string,
    endpoint: string,
    tag: string,
  ): Promise<BatchStatus>;
  /** Where a batch stands now. */
  retrieve(call: BatchCall, id: string): Promise<BatchStatus>;
  /** Asks the provider to cancel a batch; what finished stays. */
  cancel(call: BatchCall, id: string): Promise<BatchStatus>;
  /** Batches created since `since` (ms since the epoch), newest first: to find one whose creation's answer was lost. */
  list(call: BatchCall, since: number): Promise<BatchStatus[]>;
  /**
   * The result rows of one of {@linkcode BatchStatus.results}' answers;
   * default: its JSONL lines, parsed.
   */
  rows?(response: Response): AsyncIterable<Record<string, unknown>>;
  /** One line of a batch's results as the request's id and its outcome; `undefined` if it is not a result line. */
  outcomeOf(
    row: Record<string, unknown>,
  ): { customId: string; outcome: BatchOutcome } | undefined;
}

/**
 * Everything paceline knows about one API family, in one place:
 * `rateLimitedFetch`, the thin clients and `paceline run` read it, and
 * nothing provider-specific is written anywhere else.
 *
 * @example Which provider and endpoint a URL belongs to
 * ```ts
 * import { providerOf } from "./mod.ts";
 *
 * const found = providerOf("https://relay.example.com/v1/chat/completions");
 * if (found?.provider.name !== "openai" || found.endpoint.needs !== "messages") throw new Error();
 * ```
 */
export interface Provider {
  /** The name `paceline run --provider` takes. */
  readonly name: string;
  /** The environment variable the API key comes from. */
  readonly keyVar: string;
  /** Another one read when `keyVar` is unset (Gemini's SDK reads `GOOGLE_API_KEY`). */
  readonly altKeyVar?: string;
  /** The environment variable a base URL comes from. */
  readonly baseURLVar: string;
  /** The provider's own base URL. */
  readonly baseURL: string;
  /** The endpoints, most specific path first. */
  readonly endpoints: readonly ProviderEndpoint[];
  /**
   * The full URL of an endpoint `path` (as in {@linkcode ProviderEndpoint.path})
   * under `base`; `target` names what else the URL holds (Azure's
   * deployment and API version).
   */
  url(base: string, path: string, target?: UrlTarget): string;
  /**
   * Whether a URL is this provider's whatever its path ends in (Azure's
   * hosts and deployment paths); tried before the endpoints' paths.
   */
  matches?(url: string): boolean;
  /** The model a URL names (Gemini's `models/{model}:…`, Azure's deployment), when it names one. */
  modelOf?(url: string): string | undefined;
  /**
   * Shorter windows the provider also enforces per-minute limits over
   * (Azure evaluates requests per minute over 1 or 10 seconds): each
   * window of one of `keys` is also kept as `limit / d` per `ms / d` for
   * each `d` in `divisors` (when that is at least 1).
   */
  readonly shortWindows?: {
    keys: readonly string[];
    divisors: readonly number[];
  };
  /** The headers of every request: content type, version, and the key's header when a key is given. */
  headers(apiKey: string | undefined): Record<string, string>;
  /** The rate-limit headers its responses carry. */
  readonly limitHeaders: readonly LimitHeaders[];
  /** HTTP status for each error type that can arrive inside a 200 stream. */
  readonly errorStatus: Readonly<Record<string, number>>;
  /** Error codes that mean the account's quota or credit is spent: never retried. */
  readonly quotaCodes: readonly string[];
  /** The real cost in a response body's `usage`, or `undefined` when it has none in this shape. */
  usage(body: unknown, options?: UsageOptions): Cost | undefined;
  /**
   * The cache reads and writes in a response body's `usage` (zeros when it
   * reports none), or `undefined` when the body has no usage in this shape.
   */
  cacheUsage(body: unknown): CacheUsage | undefined;
  /**
   * The event data field holding a body whose usage counts (Anthropic's
   * `message_start` carries `message`, OpenAI's `response.completed`
   * `response`); without it, the event data itself.
   */
  readonly usageInEvent: string;
  /** The body to send for a streamed request (usage included). */
  streamBody(body: Record<string, unknown>): Record<string, unknown>;
  /**
   * Where an endpoint's answer streams from, when that is another path
   * (Gemini: `:streamGenerateContent` for `:generateContent`); otherwise
   * the endpoint streams itself if it streams at all.
   */
  readonly streamPaths?: Readonly<Record<string, string>>;
  /** The body to send for a whole (not streamed) answer. */
  wholeBody(body: Record<string, unknown>): Record<string, unknown>;
  /** The last event of a whole stream (`message_stop`, `[DONE]`): a stream without it was cut short. */
  readonly streamEnd: string;
  /** A new assembler for one streamed response; `headers` go into the errors it throws. */
  assembler(headers?: Headers): StreamAssembler;
  /** The batch file format. */
  readonly batch: BatchFormat;
  /** The provider's Batch API, where paceline can drive it. */
  readonly batchApi?: BatchApi;
}

/**
 * What a provider's URL names besides the endpoint: Azure's deployment
 * and API version.
 *
 * @example
 * ```ts
 * import { azureProvider, type UrlTarget } from "./mod.ts";
 *
 * const target: UrlTarget = { model: "gpt-4o-mini", apiVersion: "2024-10-21" };
 * const url = azureProvider.url("https://r.openai.azure.com", "/v1/chat/completions", target);
 * if (url !== "https://r.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21") {
 *   throw new Error(url);
 * }
 * ```
 */
export interface UrlTarget {
  /** The model, or Azure's deployment (by default the body's `model`). */
  model?: string;
  /** Azure's `api-version` query parameter; default {@linkcode AZURE_API_VERSION}. */
  apiVersion?: string;
}

/**
 * The Azure OpenAI `api-version` paceline sends unless told otherwise: the
 * last dated generally available inference version, "2024-10-21"
 * (learn.microsoft.com/azure/ai-foundry/openai/reference; the newer `v1`
 * API takes none).
 *
 * @example
 * ```ts
 * import { AZURE_API_VERSION } from "./mod.ts";
 *
 * if (!/^\d{4}-\d{2}-\d{2}/.test(AZURE_API_VERSION)) throw new Error();
 * ```
 */
export const AZURE_API_VERSION = "2024-10-21";

/** Tokens charged per image or document part (its bytes are not text). */
const MEDIA_TOKENS = 1600;

function textOfContent(content: unknown, add: (text: string) => void): number {
  if (typeof content === "string") {
    add(content);
    return 0;
  }
  let media = 0;
  if (Array.isArray(content)) {
    for (const part of content) {
      if (typeof part === "string") add(part);
      else if (part && typeof part === "object") {
        const p = part as Record<string, unknown>;
        if (typeof p.text === "string") add(p.text);
        else if (
          p.type === "image" || p.type === "image_url" ||
          p.type === "document" || p.type === "input_image" ||
          p.type === "input_file"
        ) {
          media += MEDIA_TOKENS;
        } else if (p.content !== undefined) {
          const inner = textOfContent(p.content, add);
          media += inner;
        } else if (p.input !== undefined) add(JSON.stringify(p.input));
      }
    }
  }
  return media;
}

/**
 * Counts an embeddings/moderations `input` or a completions `prompt`: a
 * string, a list of strings, a token array, a list of token arrays, or
 * multimodal parts. Returns the tokens, media included.
 */
function textOrTokens(value: unknown): number {
  let n = 0;
  const add = (t: string): void => {
    n += estimateTokens(t);
  };
  if (typeof value === "string") add(value);
  else if (Array.isArray(value)) {
    if (value.length && typeof value[0] === "number") return value.length;
    for (const v of value) {
      if (typeof v === "string") add(v);
      else if (Array.isArray(v)) n += v.length;
      else n += textOfContent([v], add);
    }
  }
  return n;
}

/** Input tokens of a conversation: `system` (or `instructions`), each message (4 each), tools, 4 per request. */
function conversationTokens(
  system: unknown,
  messages: unknown,
  tools: unknown,
): number {
  let n = 4;
  const add = (t: string): void => {
    n += estimateTokens(t);
  };
  let media = textOfContent(system, add);
  if (Array.isArray(messages)) {
    for (const m of messages) {
      n += 4;
      media += textOfContent((m as { content?: unknown } | null)?.content, add);
    }
  }
  n += media;
  if (Array.isArray(tools)) add(JSON.stringify(tools));
  return n;
}

/** A 64-bit hash of a text, as 16 hex digits (two 32-bit FNV-1a lanes with different seeds). */
function hashText(text: string): string {
  let a = 0x811c9dc5;
  let b = 0x01000193 ^ text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x5bd1e995) ^ (b >>> 15);
  }
  return (a >>> 0).toString(16).padStart(8, "0") +
    (b >>> 0).toString(16).padStart(8, "0");
}

/** Anthropic's cache lifetimes: 5 minutes unless a breakpoint says `"ttl": "1h"`. */
function cacheTtlMs(mark: unknown): number {
  return (mark as { ttl?: unknown } | null)?.ttl === "1h" ? 3_600_000 : 300_000;
}

/** The last block of `blocks` with a `cache_control` breakpoint, or -1. */
function lastBreakpoint(blocks: unknown): number {
  if (!Array.isArray(blocks)) return -1;
  for (let i = blocks.length - 1; i >= 0; i--) {
    const block = blocks[i] as { cache_control?: unknown } | null;
    if (block && typeof block === "object" && block.cache_control) return i;
  }
  return -1;
}

/**
 * The cacheable prefix of an Anthropic Messages body: everything up to its
 * last `cache_control` breakpoint, in the order the API caches it (tools,
 * then system, then messages). Prompt caching docs: a breakpoint caches the
 * whole prefix before it; up to 4 breakpoints; default lifetime 5 minutes,
 * refreshed by each read.
 */
function anthropicCachePrefix(
  b: Record<string, unknown>,
): CachePrefix | undefined {
  const tools = Array.isArray(b.tools) ? b.tools : [];
  const messages = Array.isArray(b.messages) ? b.messages : [];
  let prefix: [unknown[], unknown, unknown[]] | undefined;
  let mark: unknown;
  for (let m = messages.length - 1; m >= 0 && !prefix; m--) {
    const msg = messages[m] as { role?: unknown; content?: unknown } | null;
    const at = lastBreakpoint(msg?.content);
    if (at < 0) continue;
    const content = msg!.content as { cache_control?: unknown }[];
    mark = content[at]!.cache_control;
    const last = { role: msg!.role, content: content.slice(0, at + 1) };
    prefix = [tools, b.system, [...messages.slice(0, m), last]];
  }
  const inSystem = prefix ? -1 : lastBreakpoint(b.system);
  if (inSystem >= 0) {
    const system = b.system as { cache_control?: unknown }[];
    mark = system[inSystem]!.cache_control;
    prefix = [tools, system.slice(0, inSystem + 1), []];
  }
  const inTools = prefix ? -1 : lastBreakpoint(tools);
  if (inTools >= 0) {
    mark = (tools[inTools] as { cache_control?: unknown }).cache_control;
    prefix = [tools.slice(0, inTools + 1), undefined, []];
  }
  if (!prefix) return undefined;
  const [t, system, msgs] = prefix;
  return {
    key: hashText(JSON.stringify([b.model, t, system ?? null, msgs])),
    ttlMs: cacheTtlMs(mark),
    tokens: conversationTokens(system, msgs, t.length ? t : undefined),
  };
}

/** Input tokens of a Responses request: `instructions`, then `input` as a string or items. */
function responsesTokens(b: Record<string, unknown>): number {
  let n = 4;
  const add = (t: string): void => {
    n += estimateTokens(t);
  };
  let media = textOfContent(b.instructions, add);
  if (typeof b.input === "string") add(b.input);
  else if (Array.isArray(b.input)) {
    for (const item of b.input) {
      n += 4;
      const it = item as Record<string, unknown> | null;
      if (it?.content !== undefined) media += textOfContent(it.content, add);
      else if (typeof it?.output === "string") add(it.output);
      else if (typeof it?.arguments === "string") add(it.arguments);
    }
  }
  n += media;
  if (Array.isArray(b.tools)) add(JSON.stringify(b.tools));
  return n;
}

/** A finite, non-negative number, else `undefined`. */
function count(v: unknown): number | undefined {
  return typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : undefined;
}

/** The `usage` object of a body, if it has one. */
function usageField(body: unknown): Record<string, unknown> | undefined {
  const u = (body as { usage?: unknown } | null)?.usage;
  return u && typeof u === "object" ? u as Record<string, unknown> : undefined;
}

/** An error event inside a 200 stream, as the error a whole response would have been. */
function streamError(
  provider: Provider,
  error: { type?: string; message?: string } | undefined,
  data: unknown,
  headers: Headers | undefined,
  fallbackType?: string,
): HttpError {
  return new HttpError(provider.errorStatus[error?.type ?? ""] ?? 500, {
    type: error?.type ?? fallbackType,
    message: `${error?.message ?? "error"} (in the stream)`,
    requestId: headers?.get("request-id") ?? headers?.get("x-request-id") ??
      undefined,
    headers,
    body: data,
  });
}

/** An endpoint that takes an `input` and answers with no output tokens. */
function inputOnly(path: string): ProviderEndpoint {
  return {
    path,
    needs: "input",
    requires: [],
    outputCaps: [],
    defaultOutput: 0,
    streams: false,
    inputTokens: (b) => textOrTokens(b.input),
  };
}

/** A stream that ended without its end marker. */
function cutShort(marker: string, headers: Headers | undefined): HttpError {
  return new HttpError(502, {
    type: "incomplete_stream",
    message: `The stream ended before ${marker}`,
    headers,
  });
}

/** Anthropic Messages events folded into the message (the last usage wins: it is cumulative). */
class AnthropicAssembler implements StreamAssembler {
  complete = false;
  #message: Record<string, unknown> = {};
  #blocks: Record<string, unknown>[] = [];
  #usage: Record<string, unknown> = {};
  #headers: Headers | undefined;

  constructor(headers?: Headers) {
    this.#headers = headers;
  }

  add(data: unknown): void {
    const e = data as Record<string, unknown> | null;
    if (!e || typeof e !== "object") return;
    if (e.type === "error") {
      throw streamError(
        anthropicProvider,
        e.error as { type?: string; message?: string },
        e,
        this.#headers,
      );
    } else if (e.type === "message_start") {
      this.#message = { ...(e.message as object) };
      this.#usage = { ...usageField(e.message) };
    } else if (e.type === "content_block_start") {
      this.#blocks[e.index as number] = { ...(e.content_block as object) };
    } else if (e.type === "content_block_delta") {
      const block = this.#blocks[e.index as number];
      const d = e.delta as Record<string, unknown> | undefined;
      for (const k of ["text", "partial_json", "thinking"]) {
        if (block && typeof d?.[k] === "string") {
          block[k] = String(block[k] ?? "") + d[k];
        }
      }
    } else if (e.type === "message_delta") {
      Object.assign(this.#message, e.delta as object);
      Object.assign(this.#usage, e.usage as object);
    } else if (e.type === "message_stop") this.complete = true;
  }

  result(): Record<string, unknown> {
    return { ...this.#message, content: this.#blocks, usage: this.#usage };
  }
}

/** OpenAI chat completion chunks folded into a `chat.completion`. */
class ChatAssembler implements StreamAssembler {
  complete = false;
  #head: Record<string, unknown> | undefined;
  #text = "";
  #finish: unknown = null;
  #usage: unknown;
  #headers: Headers | undefined;

  constructor(headers?: Headers) {
    this.#headers = headers;
  }

  add(data: unknown): void {
    if (data === "[DONE]") {
      this.complete = true;
      return;
    }
    const c = data as Record<string, unknown> | null;
    if (!c || typeof c !== "object") return;
    if (c.error) {
      const error = c.error as { type?: string; message?: string };
      throw streamError(
        openaiProvider,
        error,
        c,
        this.#headers,
        "server_error",
      );
    }
    this.#head ??= {
      id: c.id,
      object: "chat.completion",
      created: c.created,
      model: c.model,
    };
    const choice = (c.choices as {
      delta?: { content?: string };
      finish_reason?: unknown;
    }[] | undefined)?.[0];
    if (choice?.delta?.content) this.#text += choice.delta.content;
    if (choice?.finish_reason) this.#finish = choice.finish_reason;
    if (c.usage) this.#usage = c.usage;
  }

  result(): Record<string, unknown> {
    return {
      ...this.#head,
      choices: [{
        index: 0,
        message: { role: "assistant", content: this.#text },
        finish_reason: this.#finish,
      }],
      usage: this.#usage,
    };
  }
}

/** A failed line's error object from the outcome, when its body carries none. */
function outcomeError(o: BatchOutcome, fallback: string): {
  type: string;
  message: string | undefined;
} {
  return { type: o.errorType ?? fallback, message: o.message };
}

/** Reads a JSON answer of a Batch API call. */
async function batchJson(
  answer: Promise<Response>,
): Promise<Record<string, unknown>> {
  const v = await (await answer).json();
  if (typeof v !== "object" || v === null) {
    throw new TypeError(`a Batch API answer is not a JSON object: ${v}`);
  }
  return v as Record<string, unknown>;
}

/** A number from a count field (JSON int64s may come as strings), else 0. */
function countOf(v: unknown): number {
  const n = typeof v === "string" ? Number(v) : v;
  return typeof n === "number" && Number.isFinite(n) ? n : 0;
}

/** One page of a provider's list of batches: its items, and the cursor of the next page. */
type BatchPage = { items: unknown[]; next?: string };

/** Anthropic's and OpenAI's pages: `data`, `has_more`, `last_id`. */
function dataPage(list: Record<string, unknown>): BatchPage {
  const items = Array.isArray(list.data) ? list.data : [];
  const last = list.last_id ?? (items.at(-1) as { id?: unknown })?.id;
  return {
    items,
    ...(list.has_more === true && last ? { next: String(last) } : {}),
  };
}

/**
 * Pages through a list of batches, newest first, until one older than
 * `since` (at most 20 pages).
 */
async function listSince(
  call: BatchCall,
  path: (after: string | undefined) => string,
  status: (b: Record<string, unknown>) => BatchStatus,
  since: number,
  page: (list: Record<string, unknown>) => BatchPage = dataPage,
): Promise<BatchStatus[]> {
  const out: BatchStatus[] = [];
  let after: string | undefined;
  for (let n = 0; n < 20; n++) {
    const { items, next } = page(await batchJson(call("GET", path(after))));
    for (const b of items) {
      const s = status(b as Record<string, unknown>);
      if (s.createdAt < since) return out;
      out.push(s);
    }
    if (!next || !items.length) return out;
    after = next;
  }
  return out;
}

/**
 * Anthropic's Message Batches (docs.anthropic.com/en/api/creating-message-batches):
 * `POST /v1/messages/batches {requests: [{custom_id, params}]}`, at most
 * 100,000 requests or 256 MB; `processing_status` `in_progress` →
 * `canceling` → `ended`; results as JSONL at `results_url`, in any order,
 * each `succeeded`, `errored`, `canceled` or `expired`.
 */
function anthropicBatchStatus(b: Record<string, unknown>): BatchStatus {
  const counts = (b.request_counts ?? {}) as Record<string, unknown>;
  const byState: Record<string, number> = {};
  let total = 0;
  for (
    const k of ["processing", "succeeded", "errored", "canceled", "expired"]
  ) {
    byState[k] = countOf(counts[k]);
    total += byState[k]!;
  }
  const ended = b.processing_status === "ended";
  return {
    id: String(b.id),
    phase: ended ? "ended" : "running",
    state: String(b.processing_status),
    counts: byState,
    total,
    finished: total - byState.processing!,
    createdAt: Date.parse(String(b.created_at)) || 0,
    results: ended && typeof b.results_url === "string" ? [b.results_url] : [],
  };
}

const anthropicBatchApi: BatchApi = {
  maxRequests: 100_000,
  maxBytes: 256 * 1024 * 1024,
  limits: "at most 100,000 requests or 256 MB per batch",
  priceFactor: 0.5,
  framing: ['{"requests":[', ",", "]}"],
  target: (path) => path,
  entry: (customId, _path, params) =>
    JSON.stringify({ custom_id: customId, params }),
  create: async (call, input) =>
    anthropicBatchStatus(
      await batchJson(call("POST", "/v1/messages/batches", input)),
    ),
  retrieve: async (call, id) =>
    anthropicBatchStatus(
      await batchJson(
        call("GET", `/v1/messages/batches/${encodeURIComponent(id)}`),
      ),
    ),
  cancel: async (call, id) =>
    anthropicBatchStatus(
      await batchJson(
        call("POST", `/v1/messages/batches/${encodeURIComponent(id)}/cancel`),
      ),
    ),
  list: (call, since) =>
    listSince(
      call,
      (after) =>
        `/v1/messages/batches?limit=100${
          after ? `&after_id=${encodeURIComponent(after)}` : ""
        }`,
      anthropicBatchStatus,
      since,
    ),
  outcomeOf(row) {
    const result = row.result as Record<string, unknown> | undefined;
    if (typeof row.custom_id !== "string" || !result) return undefined;
    const type = result.type;
    const outcome: BatchOutcome = type === "succeeded"
      ? { ok: true, status: 200, body: result.message }
      : type === "errored"
      ? { ok: false, body: result.error }
      : {
        ok: false,
        errorType: String(type),
        message: type === "expired"
          ? "the batch expired (24 hours) before this request was processed"
          : type === "canceled"
          ? "the batch was canceled before this request was processed"
          : `the batch gave no result (${JSON.stringify(type)})`,
      };
    return { customId: row.custom_id, outcome };
  },
};

/**
 * OpenAI's Batch API (platform.openai.com/docs/api-reference/batch): upload
 * a JSONL file (`POST /v1/files`, `purpose=batch`; at most 50,000 requests
 * and 200 MB, one endpoint), `POST /v1/batches {input_file_id, endpoint,
 * completion_window: "24h", metadata}`; `status` `validating` →
 * `in_progress` → `finalizing` → `completed` (or `failed`, `expired`,
 * `cancelling` → `cancelled`); successes in `output_file_id`, the rest in
 * `error_file_id` (expired requests as `batch_expired`), in any order.
 */
function openaiBatchStatus(b: Record<string, unknown>): BatchStatus {
  const counts = (b.request_counts ?? {}) as Record<string, unknown>;
  const completed = countOf(counts.completed);
  const failed = countOf(counts.failed);
  const state = String(b.status);
  const phase = state === "failed"
    ? "failed"
    : ["completed", "expired", "cancelled"].includes(state)
    ? "ended"
    : "running";
  const errors = (b.errors as { data?: unknown } | null)?.data;
  const failure = phase === "failed"
    ? (Array.isArray(errors) && errors.length
      ? errors.slice(0, 3).map((e: Record<string, unknown>) =>
        `${
          e.line ? `line ${e.line} of the upload: ` : ""
        }${e.message} (${e.code})`
      ).join("; ")
      : "the batch failed with no reason given")
    : undefined;
  const tag = (b.metadata as Record<string, unknown> | null)?.paceline;
  const requeue = phase === "failed" && Array.isArray(errors) &&
    errors.some((e: Record<string, unknown>) =>
      e?.code === "token_limit_exceeded"
    );
  return {
    id: String(b.id),
    phase,
    state,
    counts: { completed, failed },
    total: countOf(counts.total),
    finished: completed + failed,
    createdAt: countOf(b.created_at) * 1000,
    ...(typeof tag === "string" ? { tag } : {}),
    ...(failure ? { failure } : {}),
    ...(requeue ? { requeue } : {}),
    results: phase === "ended"
      ? [b.output_file_id, b.error_file_id].filter((f) => typeof f === "string")
        .map((f) => `/v1/files/${encodeURIComponent(f as string)}/content`)
      : [],
  };
}

const openaiBatchApi: BatchApi = {
  maxRequests: 50_000,
  maxBytes: 200 * 1024 * 1024,
  limits:
    "at most 50,000 requests (embeddings: inputs) and 200 MB per batch, one endpoint each",
  priceFactor: 0.5,
  framing: ["", "\n", "\n"],
  target: (path) => path,
  entry: (customId, url, body) =>
    JSON.stringify({ custom_id: customId, method: "POST", url, body }),
  // An embeddings batch holds at most 50,000 inputs in all: an array of
  // strings (or of token arrays) counts each.
  weight: (url, body) =>
    url === "/v1/embeddings" && Array.isArray(body.input) &&
      typeof body.input[0] !== "number"
      ? Math.max(1, body.input.length)
      : 1,
  async upload(call, file, name) {
    const form = new FormData();
    form.append("purpose", "batch");
    form.append("file", file, name);
    const f = await batchJson(call("POST", "/v1/files", form));
    if (typeof f.id !== "string") {
      throw new TypeError("the file upload's answer has no id");
    }
    return f.id;
  },
  create: async (call, input, endpoint, tag) =>
    openaiBatchStatus(
      await batchJson(call(
        "POST",
        "/v1/batches",
        JSON.stringify({
          input_file_id: input,
          endpoint,
          completion_window: "24h",
          metadata: { paceline: tag },
        }),
      )),
    ),
  retrieve: async (call, id) =>
    openaiBatchStatus(
      await batchJson(call("GET", `/v1/batches/${encodeURIComponent(id)}`)),
    ),
  cancel: async (call, id) =>
    openaiBatchStatus(
      await batchJson(
        call("POST", `/v1/batches/${encodeURIComponent(id)}/cancel`),
      ),
    ),
  list: (call, since) =>
    listSince(
      call,
      (after) =>
        `/v1/batches?limit=100${
          after ? `&after=${encodeURIComponent(after)}` : ""
        }`,
      openaiBatchStatus,
      since,
    ),
  outcomeOf(row) {
    if (typeof row.custom_id !== "string") return undefined;
    const response = row.response as Record<string, unknown> | null;
    const error = row.error as Record<string, unknown> | null;
    if (response && typeof response.status_code === "number") {
      const status = response.status_code;
      return {
        customId: row.custom_id,
        outcome: {
          ok: status >= 200 && status < 300,
          status,
          body: response.body,
          ...(typeof response.request_id === "string"
            ? { requestId: response.request_id }
            : {}),
        },
      };
    }
    return {
      customId: row.custom_id,
      outcome: {
        ok: false,
        errorType: String(error?.code ?? "batch_error"),
        message: String(error?.message ?? "the batch gave no response"),
      },
    };
  },
};

/**
 * Gemini's Batch API (ai.google.dev/gemini-api/docs/batch-api), with
 * inlined requests (at most 20 MB a batch; one model per batch):
 * `POST /v1beta/models/{model}:batchGenerateContent {batch: {displayName,
 * inputConfig: {requests: {requests: [{request, metadata: {key}}]}}}}`
 * answers an operation `batches/{id}` whose `metadata.state` goes
 * `BATCH_STATE_PENDING` → `RUNNING` → `SUCCEEDED` (or `FAILED`,
 * `CANCELLED`, `EXPIRED`), with `batchStats` and, once done,
 * `output.inlinedResponses.inlinedResponses` (`{response | error,
 * metadata}`, in request order). Cancel: `POST /v1beta/batches/{id}:cancel`.
 */
function geminiBatchStatus(op: Record<string, unknown>): BatchStatus {
  const m = (op.metadata ?? {}) as Record<string, unknown>;
  const stats = (m.batchStats ?? {}) as Record<string, unknown>;
  const succeeded = countOf(stats.successfulRequestCount);
  const failed = countOf(stats.failedRequestCount);
  const state = String(m.state ?? "BATCH_STATE_UNSPECIFIED");
  const phase = state === "BATCH_STATE_FAILED"
    ? "failed"
    : ["BATCH_STATE_SUCCEEDED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"]
        .includes(state)
    ? "ended"
    : "running";
  const name = String(op.name ?? m.name);
  const tag = /^paceline-(.+)$/.exec(String(m.displayName ?? ""))?.[1];
  const error = op.error as { message?: unknown } | undefined;
  return {
    id: name,
    phase,
    state: state.replace(/^BATCH_STATE_/, "").toLowerCase(),
    counts: {
      succeeded,
      failed,
      pending: countOf(stats.pendingRequestCount),
    },
    total: countOf(stats.requestCount),
    finished: succeeded + failed,
    createdAt: Date.parse(String(m.createTime)) || 0,
    ...(tag ? { tag } : {}),
    ...(phase === "failed"
      ? {
        failure: String(
          error?.message ?? "the batch failed with no reason given",
        ),
      }
      : {}),
    results: phase === "ended" ? [`/v1beta/${name}`] : [],
  };
}

const geminiBatchApi: BatchApi = {
  maxRequests: 1_000_000,
  // 20 MB of inlined requests, less the wrapper around them.
  maxBytes: 20 * 1000 * 1000 - 1024,
  limits: "at most 20 MB of inlined requests per batch, one model each",
  priceFactor: 0.5,
  framing: ["", ",", ""],
  target: (_path, body) => String(body.model ?? "").replace(/^models\//, ""),
  entry(key, _path, body) {
    const { model: _, ...request } = body;
    return JSON.stringify({ request, metadata: { key } });
  },
  create: async (call, input, model, tag) =>
    geminiBatchStatus(
      await batchJson(call(
        "POST",
        `/v1beta/models/${encodeURIComponent(model)}:batchGenerateContent`,
        new Blob([
          `{"batch":{"displayName":${
            JSON.stringify(`paceline-${tag}`)
          },"inputConfig":{"requests":{"requests":[`,
          input,
          "]}}}}",
        ]),
      )),
    ),
  retrieve: async (call, id) =>
    geminiBatchStatus(await batchJson(call("GET", `/v1beta/${id}`))),
  cancel: async (call, id) => {
    await call("POST", `/v1beta/${id}:cancel`, "{}");
    return geminiBatchStatus(await batchJson(call("GET", `/v1beta/${id}`)));
  },
  list: (call, since) =>
    listSince(
      call,
      (after) =>
        `/v1beta/batches?pageSize=100${
          after ? `&pageToken=${encodeURIComponent(after)}` : ""
        }`,
      geminiBatchStatus,
      since,
      (list) => ({
        items: Array.isArray(list.operations) ? list.operations : [],
        ...(typeof list.nextPageToken === "string" && list.nextPageToken
          ? { next: list.nextPageToken }
          : {}),
      }),
    ),
  async *rows(response) {
    const op = await response.json() as {
      metadata?: {
        output?: { inlinedResponses?: { inlinedResponses?: unknown } };
      };
      response?: { inlinedResponses?: { inlinedResponses?: unknown } };
    };
    const list = op.metadata?.output?.inlinedResponses?.inlinedResponses ??
      op.response?.inlinedResponses?.inlinedResponses;
    if (Array.isArray(list)) yield* list as Record<string, unknown>[];
  },
  outcomeOf(row) {
    const key = (row.metadata as { key?: unknown } | undefined)?.key;
    if (typeof key !== "string") return undefined;
    const error = row.error as {
      code?: unknown;
      message?: unknown;
      status?: unknown;
    } | undefined;
    return {
      customId: key,
      outcome: error
        ? {
          ok: false,
          status: typeof error.code === "number" ? error.code : 0,
          body: { error },
          errorType: String(error.status ?? "UNKNOWN"),
          message: String(error.message ?? ""),
        }
        : { ok: true, status: 200, body: row.response },
    };
  },
};

/**
 * The Anthropic Messages API. Limits per the `anthropic-ratelimit-*`
 * headers (requests, input and output tokens, and `tokens`, the tighter of
 * the two); cache reads are not charged unless asked (see
 * {@linkcode UsageOptions}); batch lines `{"custom_id", "params"}`, results
 * `{"custom_id", "result": {"type": "succeeded" | "errored", …}}`.
 *
 * @example
 * ```ts
 * import { anthropicProvider } from "./mod.ts";
 *
 * const url = anthropicProvider.url("https://relay.example.com", "/v1/messages");
 * if (url !== "https://relay.example.com/v1/messages") throw new Error(url);
 * if (anthropicProvider.headers("k")["x-api-key"] !== "k") throw new Error();
 * ```
 */
export const anthropicProvider: Provider = {
  name: "anthropic",
  keyVar: "ANTHROPIC_API_KEY",
  baseURLVar: "ANTHROPIC_BASE_URL",
  baseURL: "https://api.anthropic.com",
  endpoints: [{
    path: "/v1/messages",
    needs: "messages",
    requires: ["max_tokens"],
    outputCaps: ["max_tokens", "max_completion_tokens"],
    defaultOutput: 4096,
    streams: true,
    inputTokens: (b) => conversationTokens(b.system, b.messages, b.tools),
    cachePrefix: anthropicCachePrefix,
  }],
  // The base is the host (the SDK's convention); a trailing /v1 is tolerated.
  url: (base, path) =>
    `${base}${/\/v1$/.test(base) ? "" : "/v1"}${path.replace(/^\/v1/, "")}`,
  headers(apiKey) {
    const h: Record<string, string> = {
      "content-type": "application/json",
      "anthropic-version": "2023-06-01",
    };
    if (apiKey !== undefined) h["x-api-key"] = apiKey;
    return h;
  },
  limitHeaders: [
    ["requests", "requests"],
    ["inputTokens", "input-tokens"],
    ["outputTokens", "output-tokens"],
    ["tokens", "tokens"],
  ].map(([key, b]) => ({
    key: key!,
    limit: `anthropic-ratelimit-${b}-limit`,
    remaining: `anthropic-ratelimit-${b}-remaining`,
    reset: `anthropic-ratelimit-${b}-reset`,
    resetAs: "time" as const,
    // "tokens" is the tighter of input and output: learn those instead.
    ...(key === "tokens"
      ? {
        unless: [
          "anthropic-ratelimit-input-tokens-limit",
          "anthropic-ratelimit-output-tokens-limit",
        ],
      }
      : {}),
  })),
  errorStatus: {
    invalid_request_error: 400,
    authentication_error: 401,
    billing_error: 402,
    permission_error: 403,
    not_found_error: 404,
    conflict_error: 409,
    request_too_large: 413,
    rate_limit_error: 429,
    api_error: 500,
    timeout_error: 504,
    overloaded_error: 529,
  },
  quotaCodes: ["enforced_spend_limit_reached"],
  usage(body, options = {}) {
    const u = usageField(body);
    if (!u) return undefined;
    const out: Cost = {};
    const input = count(u.input_tokens);
    if (input !== undefined) {
      out.inputTokens = input + (count(u.cache_creation_input_tokens) ?? 0) +
        (options.cacheReadCounts ? count(u.cache_read_input_tokens) ?? 0 : 0);
    }
    const output = count(u.output_tokens);
    if (output !== undefined) out.outputTokens = output;
    return input === undefined && output === undefined ? undefined : out;
  },
  cacheUsage(body) {
    const u = usageField(body);
    if (!u || count(u.input_tokens) === undefined) return undefined;
    return {
      read: count(u.cache_read_input_tokens) ?? 0,
      write: count(u.cache_creation_input_tokens) ?? 0,
    };
  },
  usageInEvent: "message",
  streamBody: (body) => ({ ...body, stream: true }),
  wholeBody: (body) => ({ ...body, stream: false }),
  streamEnd: "message_stop",
  assembler: (headers) => new AnthropicAssembler(headers),
  batchApi: anthropicBatchApi,
  batch: {
    name: 'Anthropic batch ("params")',
    bodyField: "params",
    idField: "custom_id",
    pathOf: () => "/v1/messages",
    result(customId, _line, o) {
      const body = o.body;
      const result = o.ok ? { type: "succeeded", message: body } : {
        type: "errored",
        error: body && typeof body === "object" && "error" in body
          ? body
          : { type: "error", error: outcomeError(o, "api_error") },
      };
      return { custom_id: customId, result };
    },
  },
};

/**
 * OpenAI and OpenAI-compatible APIs: chat completions, Responses, legacy
 * completions, embeddings and moderations. Limits per the
 * `x-ratelimit-*-requests` / `-tokens` headers; batch lines
 * `{"custom_id", "method", "url", "body"}`, results
 * `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
 *
 * @example
 * ```ts
 * import { openaiProvider } from "./mod.ts";
 *
 * const url = openaiProvider.url("https://api.openai.com/v1", "/v1/embeddings");
 * if (url !== "https://api.openai.com/v1/embeddings") throw new Error(url);
 * ```
 */
export const openaiProvider: Provider = {
  name: "openai",
  keyVar: "OPENAI_API_KEY",
  baseURLVar: "OPENAI_BASE_URL",
  baseURL: "https://api.openai.com/v1",
  endpoints: [
    {
      path: "/v1/chat/completions",
      needs: "messages",
      requires: [],
      outputCaps: ["max_tokens", "max_completion_tokens"],
      defaultOutput: 4096,
      streams: true,
      inputTokens: (b) => conversationTokens(b.system, b.messages, b.tools),
    },
    {
      path: "/v1/responses",
      needs: "input",
      requires: [],
      outputCaps: ["max_output_tokens"],
      defaultOutput: 4096,
      streams: false,
      inputTokens: responsesTokens,
    },
    {
      path: "/v1/completions",
      needs: "prompt",
      requires: [],
      outputCaps: ["max_tokens"],
      defaultOutput: 16, // the API's own default
      streams: false,
      inputTokens: (b) => textOrTokens(b.prompt) + 4,
    },
    inputOnly("/v1/embeddings"),
    inputOnly("/v1/moderations"),
  ],
  // The base ends in /v1 (the SDK's convention).
  url: (base, path) => `${base}${path.replace(/^\/v1/, "")}`,
  headers(apiKey) {
    const h: Record<string, string> = { "content-type": "application/json" };
    if (apiKey !== undefined) h["authorization"] = `Bearer ${apiKey}`;
    return h;
  },
  limitHeaders: ["requests", "tokens"].map((key) => ({
    key,
    limit: `x-ratelimit-limit-${key}`,
    remaining: `x-ratelimit-remaining-${key}`,
    reset: `x-ratelimit-reset-${key}`,
    resetAs: "wait" as const,
  })),
  errorStatus: {
    invalid_request_error: 400,
    rate_limit_error: 429,
    server_error: 500,
  },
  quotaCodes: [
    "insufficient_quota",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
  ],
  usage(body) {
    const u = usageField(body);
    if (!u) return undefined;
    // Chat, completions and embeddings: prompt/completion; Responses: input/output.
    const chat = u.prompt_tokens !== undefined ||
      u.completion_tokens !== undefined;
    const input = count(chat ? u.prompt_tokens : u.input_tokens);
    const output = count(chat ? u.completion_tokens : u.output_tokens);
    if (input === undefined && output === undefined) return undefined;
    const out: Cost = {};
    if (input !== undefined) out.inputTokens = input;
    if (output !== undefined) out.outputTokens = output;
    return out;
  },
  // Automatic prefix caching (prompts of 1,024 tokens or more). Cached
  // tokens still count toward TPM: the rate limiter runs before any cache
  // lookup (developers.openai.com/api/docs/guides/prompt-caching describes
  // no change to rate limits; community.openai.com/t/1138631 "Does prompt
  // caching reduce TPM?" shows it does not). So they are counted for the
  // stats only, never taken off an estimate.
  cacheUsage(body) {
    const u = usageField(body);
    if (!u) return undefined;
    const details = (u.prompt_tokens_details ?? u.input_tokens_details) as
      | { cached_tokens?: unknown }
      | undefined;
    if (count(u.prompt_tokens ?? u.input_tokens) === undefined) {
      return undefined;
    }
    return { read: count(details?.cached_tokens) ?? 0, write: 0 };
  },
  usageInEvent: "response",
  wholeBody: (body) => ({ ...body, stream: false }),
  streamBody: (body) => ({
    ...body,
    stream: true,
    stream_options: {
      include_usage: true,
      ...(body.stream_options as object | undefined),
    },
  }),
  streamEnd: "[DONE]",
  assembler: (headers) => new ChatAssembler(headers),
  batchApi: openaiBatchApi,
  batch: {
    name: 'OpenAI batch ("body")',
    bodyField: "body",
    idField: "custom_id",
    pathOf(line) {
      const paths = openaiProvider.endpoints.map((e) => e.path);
      if (typeof line.url !== "string" || !paths.includes(line.url)) {
        throw new RangeError(
          `"url" must be one of ${paths.join(", ")}: received ${
            JSON.stringify(line.url)
          }`,
        );
      }
      if (line.method !== undefined && line.method !== "POST") {
        throw new RangeError(
          `"method" must be "POST": received ${JSON.stringify(line.method)}`,
        );
      }
      return line.url;
    },
    result: (customId, line, o) => ({
      id: `batch_req_${line}`,
      custom_id: customId,
      response: o.status
        ? {
          status_code: o.status,
          request_id: o.requestId ?? null,
          body: o.body,
        }
        : null,
      error: o.status ? null : {
        code: o.errorType ?? "network_error",
        message: o.message,
      },
    }),
  },
};

/** Azure OpenAI's hosts: `{resource}.openai.azure.com`, `{resource}.cognitiveservices.azure.com`. */
const AZURE_HOST =
  /^https?:\/\/[^/?#]*\.(?:openai\.azure\.com|cognitiveservices\.azure\.com)(?:[:/?#]|$)/i;

/**
 * Azure OpenAI: OpenAI's API (chat completions, completions, embeddings,
 * and the same batch lines) behind a resource's endpoint, as
 * `{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=…`
 * (learn.microsoft.com/azure/ai-foundry/openai/reference). The deployment
 * is the request body's `model` unless given. The key goes in `api-key`.
 * Its responses carry `x-ratelimit-remaining-requests` and `-tokens` but
 * no limit headers, so a limit is learned as at most what is left plus
 * what is in the window; its 429s carry `retry-after-ms` and
 * `x-ms-retry-after-ms`. Requests per minute are "evaluated over a small
 * period of time, typically 1 or 10 seconds": a 600-RPM deployment
 * refuses more than 10 in one second (learn.microsoft.com/azure/ai-foundry/
 * openai/how-to/quota, "Understanding rate limits"), so a requests limit is
 * also kept per tenth and per sixtieth of its window. Tokens per minute
 * are counted at arrival from the prompt plus `max_tokens`, as
 * {@linkcode estimateCost} does.
 *
 * @example
 * ```ts
 * import { azureProvider, providerOf } from "./mod.ts";
 *
 * const url = "https://my-res.openai.azure.com/openai/deployments/d1/embeddings?api-version=2024-10-21";
 * if (providerOf(url)?.provider !== azureProvider) throw new Error();
 * if (azureProvider.headers("k")["api-key"] !== "k") throw new Error();
 * ```
 */
export const azureProvider: Provider = {
  ...openaiProvider,
  name: "azure",
  // Azure's Batch API needs a global-batch deployment and its own paths: not driven yet.
  batchApi: undefined,
  keyVar: "AZURE_OPENAI_API_KEY",
  baseURLVar: "AZURE_OPENAI_ENDPOINT",
  // No default: every resource has its own endpoint.
  baseURL: "",
  endpoints: openaiProvider.endpoints.filter((e) =>
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"].includes(
      e.path,
    )
  ),
  matches: (url) =>
    AZURE_HOST.test(url) || url.includes("/openai/deployments/"),
  modelOf: (url) => {
    const m = /\/openai\/deployments\/([^/?#]+)\//.exec(url);
    return m ? decodeURIComponent(m[1]!) : undefined;
  },
  url(base, path, target = {}) {
    const deployment = target.model;
    if (typeof deployment !== "string" || deployment === "") {
      throw new TypeError(
        `Azure OpenAI needs a deployment for ${path}: the body's "model", or a deployment given: received ${
          JSON.stringify(deployment)
        }`,
      );
    }
    return `${base}/openai/deployments/${encodeURIComponent(deployment)}${
      path.replace(/^\/v1/, "")
    }?api-version=${
      encodeURIComponent(target.apiVersion ?? AZURE_API_VERSION)
    }`;
  },
  headers(apiKey) {
    const h: Record<string, string> = { "content-type": "application/json" };
    if (apiKey !== undefined) h["api-key"] = apiKey;
    return h;
  },
  shortWindows: { keys: ["requests"], divisors: [6, 60] },
};

/** Gemini's text of `contents` (and `systemInstruction`), parts by parts. */
function geminiTokens(b: Record<string, unknown>): number {
  let n = 4;
  const add = (parts: unknown): void => {
    for (const p of Array.isArray(parts) ? parts : []) {
      const part = p as Record<string, unknown>;
      if (typeof part.text === "string") n += estimateTokens(part.text);
      else if (part.inlineData || part.fileData) n += MEDIA_TOKENS;
      else n += estimateTokens(JSON.stringify(part));
    }
  };
  for (const c of Array.isArray(b.contents) ? b.contents : []) {
    add((c as { parts?: unknown })?.parts);
    n += 4;
  }
  add((b.systemInstruction as { parts?: unknown } | undefined)?.parts);
  if (b.tools) n += estimateTokens(JSON.stringify(b.tools));
  return n;
}

/** Gemini's API key variables: `GEMINI_API_KEY`, else `GOOGLE_API_KEY` (as its SDK reads them). */
const GEMINI_HOST =
  /^https?:\/\/generativelanguage\.googleapis\.com(?:[:/?#]|$)/i;

/** Folds Gemini's streamed chunks (each a partial response) into one. */
class GeminiAssembler implements StreamAssembler {
  complete = false;
  #text = "";
  #last: Record<string, unknown> = {};
  #finish: unknown;

  add(data: unknown): void {
    const c = data as Record<string, unknown> | null;
    if (!c || typeof c !== "object") return;
    if (c.error) {
      throw HttpError.from(
        new Response(null, { status: 500 }),
        JSON.stringify(c),
      );
    }
    const cand = (c.candidates as Record<string, unknown>[] | undefined)?.[0];
    const parts = (cand?.content as { parts?: { text?: string }[] })?.parts;
    for (const p of parts ?? []) this.#text += p.text ?? "";
    if (cand?.finishReason) {
      this.#finish = cand.finishReason;
      this.complete = true; // Gemini's stream has no end marker but this
    }
    this.#last = c;
  }

  result(): Record<string, unknown> {
    return {
      ...this.#last,
      candidates: [{
        index: 0,
        content: { role: "model", parts: [{ text: this.#text }] },
        finishReason: this.#finish,
      }],
    };
  }
}

/**
 * Google's Gemini API (generativelanguage.googleapis.com):
 * `POST {base}/models/{model}:generateContent` and
 * `:streamGenerateContent?alt=sse` (ai.google.dev/api/generate-content),
 * the key in `x-goog-api-key`. Usage is `usageMetadata`:
 * `promptTokenCount` in (cached tokens included), `candidatesTokenCount`
 * plus `thoughtsTokenCount` out, `cachedContentTokenCount` read from the
 * cache. The output cap is `generationConfig.maxOutputTokens`. It sends no
 * rate-limit headers; its limits (requests and input tokens per minute,
 * requests per day, per project and model) show in its 429s' bodies:
 * `google.rpc.QuotaFailure` violations and `google.rpc.RetryInfo`'s
 * `retryDelay` (ai.google.dev/gemini-api/docs/rate-limits).
 *
 * @example
 * ```ts
 * import { geminiProvider, providerOf } from "./mod.ts";
 *
 * const url = geminiProvider.url(geminiProvider.baseURL, ":generateContent", { model: "gemini-2.5-flash" });
 * if (url !== "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent") throw new Error(url);
 * if (providerOf(url)?.provider !== geminiProvider) throw new Error();
 * ```
 */
export const geminiProvider: Provider = {
  name: "gemini",
  keyVar: "GEMINI_API_KEY",
  altKeyVar: "GOOGLE_API_KEY",
  baseURLVar: "GEMINI_BASE_URL",
  baseURL: "https://generativelanguage.googleapis.com/v1beta",
  endpoints: [":streamGenerateContent", ":generateContent"].map((path) => ({
    path,
    needs: "contents" as const,
    requires: [],
    outputCaps: ["generationConfig.maxOutputTokens"],
    defaultOutput: 8192,
    streams: path === ":streamGenerateContent",
    inputTokens: geminiTokens,
  })),
  matches: (url) =>
    GEMINI_HOST.test(url) ||
    /\/models\/[^/?#]+:(?:stream)?[gG]enerateContent(?:[?#]|$)/.test(url),
  modelOf: (url) => {
    const m = /\/models\/([^/?#:]+):/.exec(url);
    return m ? decodeURIComponent(m[1]!) : undefined;
  },
  url(base, path, target = {}) {
    const model = target.model;
    if (typeof model !== "string" || model === "") {
      throw new TypeError(
        `Gemini needs a model for ${path}: received ${JSON.stringify(model)}`,
      );
    }
    const name = model.startsWith("models/") ? model.slice(7) : model;
    return `${base}/models/${encodeURIComponent(name)}${path}${
      path === ":streamGenerateContent" ? "?alt=sse" : ""
    }`;
  },
  headers(apiKey) {
    const h: Record<string, string> = { "content-type": "application/json" };
    if (apiKey !== undefined) h["x-goog-api-key"] = apiKey;
    return h;
  },
  limitHeaders: [],
  errorStatus: {
    INVALID_ARGUMENT: 400,
    PERMISSION_DENIED: 403,
    NOT_FOUND: 404,
    RESOURCE_EXHAUSTED: 429,
    INTERNAL: 500,
    UNAVAILABLE: 503,
    DEADLINE_EXCEEDED: 504,
  },
  quotaCodes: [],
  usage(body) {
    const u = (body as { usageMetadata?: Record<string, unknown> } | null)
      ?.usageMetadata;
    if (!u || typeof u !== "object") return undefined;
    const input = count(u.promptTokenCount);
    const output = (count(u.candidatesTokenCount) ?? 0) +
      (count(u.thoughtsTokenCount) ?? 0);
    if (input === undefined) return undefined;
    return { inputTokens: input, outputTokens: output };
  },
  cacheUsage(body) {
    const u = (body as { usageMetadata?: Record<string, unknown> } | null)
      ?.usageMetadata;
    if (!u || count(u.promptTokenCount) === undefined) return undefined;
    return { read: count(u.cachedContentTokenCount) ?? 0, write: 0 };
  },
  usageInEvent: "",
  streamBody: (body) => body,
  streamPaths: { ":generateContent": ":streamGenerateContent" },
  // Streaming is the other URL; the API refuses unknown fields like "stream".
  wholeBody: (body) => body,
  streamEnd: "",
  assembler: () => new GeminiAssembler(),
  batchApi: geminiBatchApi,
  batch: {
    name: 'Gemini batch ("request")',
    bodyField: "request",
    idField: "key",
    pathOf: () => ":generateContent",
    result: (key, _line, o) =>
      o.ok ? { key, response: o.body } : {
        key,
        error: (o.body as { error?: unknown } | undefined)?.error ?? {
          code: o.status ?? 0,
          message: o.message,
          status: o.errorType ?? "UNAVAILABLE",
        },
      },
  },
};

/**
 * Every provider paceline knows, in the order a URL is matched against
 * their endpoints.
 *
 * @example
 * ```ts
 * import { providers } from "./mod.ts";
 *
 * if (providers.map((p) => p.name).join() !== "anthropic,openai,azure,gemini") throw new Error();
 * ```
 */
export const providers: readonly Provider[] = [
  anthropicProvider,
  openaiProvider,
  azureProvider,
  geminiProvider,
];

/** Every provider's limit headers, in order, each once (Azure's are OpenAI's). */
const LIMIT_HEADERS: readonly LimitHeaders[] = [
  ...new Map(
    providers.flatMap((p) => p.limitHeaders).map((h) => [h.remaining, h]),
  ).values(),
];
/** Every provider's event fields that hold a body with usage. */
const USAGE_IN_EVENT: readonly string[] = [
  ...new Set(providers.map((p) => p.usageInEvent)),
];
/** Every provider's quota codes. */
const QUOTA_CODES = new Set(providers.flatMap((p) => p.quotaCodes));

/** The last URL matched, and its match: the SDKs send one URL over and over. */
let lastMatch: [string, ProviderMatch | undefined] = ["", undefined];

/**
 * A provider and the endpoint of one request, as {@linkcode providerOf} finds them.
 *
 * @example
 * ```ts
 * import { type ProviderMatch, providerOf } from "./mod.ts";
 *
 * const m: ProviderMatch | undefined = providerOf("https://api.anthropic.com/v1/messages");
 * if (m?.endpoint.path !== "/v1/messages") throw new Error();
 * ```
 */
export interface ProviderMatch {
  /** The provider. */
  provider: Provider;
  /** The endpoint the URL's path ends in. */
  endpoint: ProviderEndpoint;
}

/**
 * The provider and endpoint a URL is for: the first endpoint (providers in
 * the order of {@linkcode providers}, each most specific path first) that
 * the URL's path ends with, `/v1` aside, so relays under any prefix match;
 * a URL a provider claims as its own ({@linkcode Provider.matches}: Azure's
 * hosts and deployment paths) is matched against that provider only.
 *
 * @param url A request URL.
 * @returns The match, or `undefined` for a URL no provider describes.
 *
 * @example
 * ```ts
 * import { providerOf } from "./mod.ts";
 *
 * if (providerOf("https://relay.example.com/openai/v1/embeddings?x=1")?.endpoint.path !== "/v1/embeddings") {
 *   throw new Error();
 * }
 * if (providerOf("https://example.com/v1/files") !== undefined) throw new Error();
 * ```
 */
export function providerOf(url: string): ProviderMatch | undefined {
  if (lastMatch[0] === url) return lastMatch[1];
  const q = url.indexOf("?");
  const path = q < 0 ? url : url.slice(0, q);
  let found: ProviderMatch | undefined;
  const own = providers.find((p) => p.matches?.(url));
  search: for (const provider of own ? [own] : providers) {
    for (const endpoint of provider.endpoints) {
      if (path.endsWith(endpoint.path.replace(/^\/v1\//, "/"))) { // "/v1" aside
        found = { provider, endpoint };
        break search;
      }
    }
  }
  lastMatch = [url, found];
  return found;
}

/**
 * A conservative token estimate for text, used to charge input tokens before
 * a request is sent (the real count settles the charge afterwards):
 *
 * - each run of ASCII letters and digits: ⌈length / 4⌉ tokens;
 * - each other ASCII symbol: 1 token; whitespace: free;
 * - each non-ASCII character (CJK, kana, Hangul, accented letters, emoji):
 *   **1.5 tokens**. Chinese and Japanese run at about one token per
 *   character or more, so the usual "4 characters per token" rule
 *   under-counts them 3–4× and causes 429s; erring high only holds capacity
 *   until the response settles it.
 *
 * @param text Any text.
 * @returns The estimate, rounded up.
 *
 * @example
 * ```ts
 * import { estimateTokens } from "./mod.ts";
 *
 * if (estimateTokens("hello world") !== 4) throw new Error();
 * if (estimateTokens("你好，世界") !== 8) throw new Error(); // 5 × 1.5, rounded up
 * ```
 */
export function estimateTokens(text: string): number {
  let n = 0;
  let run = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if ((c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122)) {
      run++;
      continue;
    }
    if (run) {
      n += Math.ceil(run / 4);
      run = 0;
    }
    if (c === 32 || (c >= 9 && c <= 13)) continue;
    if (c < 128) n += 1;
    else if (c >= 0xdc00 && c <= 0xdfff) continue; // low surrogate: counted with its pair
    else n += 1.5;
  }
  if (run) n += Math.ceil(run / 4);
  return Math.ceil(n);
}

/**
 * The output tokens a request may produce: its first output cap that is
 * set (a finite number ≥ 0), else the endpoint's default.
 *
 * @param endpoint The endpoint (see {@linkcode providerOf}).
 * @param body The request body.
 * @returns The cap.
 *
 * @example
 * ```ts
 * import { outputCapOf, providerOf } from "./mod.ts";
 *
 * const { endpoint } = providerOf("https://api.openai.com/v1/completions")!;
 * if (outputCapOf(endpoint, { prompt: "x" }) !== 16) throw new Error();
 * ```
 */
export function outputCapOf(
  endpoint: ProviderEndpoint,
  body: Record<string, unknown>,
): number {
  let value: unknown;
  for (const cap of endpoint.outputCaps) {
    const dot = cap.indexOf(".");
    value = dot < 0
      ? body[cap]
      : (body[cap.slice(0, dot)] as Record<string, unknown> | undefined)
        ?.[cap.slice(dot + 1)];
    if (value !== undefined && value !== null) break;
  }
  const max = Number(value ?? endpoint.defaultOutput);
  return Number.isFinite(max) && max >= 0 ? max : endpoint.defaultOutput;
}

/**
 * The default cost estimate of a request, from its URL's path and JSON body:
 *
 * - Anthropic Messages (`…/messages`) and chat completions
 *   (`…/chat/completions`): input tokens are {@linkcode estimateTokens} of
 *   every text (system, messages, tool definitions and tool inputs) plus 4
 *   per message and 4 per request, 1,600 per image or document; output
 *   tokens are `max_tokens` (or `max_completion_tokens`; 4,096 if neither).
 * - OpenAI Responses (`…/responses`): `instructions` and `input` (a string
 *   or a list of items) counted the same way; output `max_output_tokens`
 *   (4,096 if unset).
 * - Legacy completions (`…/completions`): the `prompt` (a string, strings,
 *   or token arrays); output `max_tokens` (16 if unset, the API's default).
 * - Embeddings (`…/embeddings`) and moderations (`…/moderations`): the
 *   `input` (a string, strings, token arrays, or multimodal parts); no
 *   output tokens.
 *
 * The result is `{ requests: 1, inputTokens, outputTokens }`; anything else
 * costs `{ requests: 1 }`.
 *
 * @param url The request URL.
 * @param body The parsed JSON body, if any.
 * @returns The cost to charge the limiter.
 *
 * @example
 * ```ts
 * import { estimateCost } from "./mod.ts";
 *
 * const cost = estimateCost("https://api.anthropic.com/v1/messages", {
 *   model: "claude-sonnet-4-5",
 *   max_tokens: 512,
 *   messages: [{ role: "user", content: "Hello" }],
 * });
 * if (cost.inputTokens !== 2 + 4 + 4 || cost.outputTokens !== 512) throw new Error();
 *
 * const embed = estimateCost("https://api.openai.com/v1/embeddings", {
 *   model: "text-embedding-3-small",
 *   input: ["first document", [101, 2023, 102]], // a string and a token array
 * });
 * if (embed.inputTokens !== 4 + 3 || embed.outputTokens !== 0) throw new Error();
 * ```
 */
export function estimateCost(url: string, body: unknown): Cost {
  const found = providerOf(url);
  if (!found || !body || typeof body !== "object") return { requests: 1 };
  const b = body as Record<string, unknown>;
  return {
    requests: 1,
    inputTokens: found.endpoint.inputTokens(b),
    outputTokens: outputCapOf(found.endpoint, b),
  };
}

/**
 * Options for {@linkcode usageOf}.
 *
 * @example
 * ```ts
 * import { usageOf, type UsageOptions } from "./mod.ts";
 *
 * const body = { usage: { input_tokens: 10, cache_read_input_tokens: 90, output_tokens: 5 } };
 * const options: UsageOptions = { cacheReadCounts: true };
 * if (usageOf(body)?.inputTokens !== 10 || usageOf(body, options)?.inputTokens !== 100) {
 *   throw new Error();
 * }
 * ```
 */
export interface UsageOptions {
  /**
   * Count Anthropic `cache_read_input_tokens` as input tokens. Default
   * `false`: for most current models they do not count against input-token
   * rate limits (`cache_creation_input_tokens` always do).
   */
  cacheReadCounts?: boolean;
}

/**
 * The real cost in a response body's `usage`, for settling a
 * {@linkcode Permit}: Anthropic (`input_tokens` + `cache_creation_input_tokens`
 * [+ `cache_read_input_tokens`], `output_tokens`), OpenAI chat, completions
 * and embeddings (`prompt_tokens`, `completion_tokens`), OpenAI Responses
 * (`input_tokens`, `output_tokens`). `undefined` if the body has no usage.
 *
 * @param body A parsed response body (or an SSE event's data).
 * @param options See {@linkcode UsageOptions}.
 * @returns `{ inputTokens?, outputTokens? }`, or `undefined`.
 *
 * @example
 * ```ts
 * import { usageOf } from "./mod.ts";
 *
 * const u = usageOf({ usage: { input_tokens: 10, cache_creation_input_tokens: 5, output_tokens: 7 } });
 * if (u?.inputTokens !== 15 || u.outputTokens !== 7) throw new Error();
 * ```
 */
export function usageOf(
  body: unknown,
  options: UsageOptions = {},
): Cost | undefined {
  for (const provider of providers) {
    const cost = provider.usage(body, options);
    if (cost) return cost;
  }
  return undefined;
}

// =============================================================================
// Fetch
// =============================================================================

/**
 * One server-sent event.
 *
 * @example
 * ```ts
 * import { SseParser, type SseEvent } from "./mod.ts";
 *
 * const [e]: SseEvent[] = new SseParser().push("event: ping\ndata: {}\n\n");
 * if (e?.event !== "ping" || e.data !== "{}") throw new Error();
 * ```
 */
export interface SseEvent {
  /** The `event:` field; `"message"` when absent. */
  event: string;
  /** The `data:` lines, joined with `\n`. */
  data: string;
}

/**
 * An incremental parser for `text/event-stream`: feed it text as it
 * arrives, get whole events back. Handles `\n`, `\r\n` and `\r` line ends,
 * multi-line `data:`, comments and events split across chunks.
 *
 * @example
 * ```ts
 * import { SseParser } from "./mod.ts";
 *
 * const p = new SseParser();
 * const events = [...p.push("event: ping\ndata: {}\n\nda"), ...p.push("ta: [DONE]\n\n")];
 * if (events.map((e) => e.event + ":" + e.data).join() !== "ping:{},message:[DONE]") throw new Error();
 * ```
 */
export class SseParser {
  #buffer = "";
  #event = "";
  #data: string[] = [];

  /**
   * Adds text; returns the events it completed.
   *
   * @param text The next piece of the stream.
   * @returns Completed events, in order.
   */
  push(text: string): SseEvent[] {
    this.#buffer += text;
    const out: SseEvent[] = [];
    let start = 0;
    for (;;) {
      const nl = this.#buffer.slice(start).search(/\r\n|\r|\n/);
      if (nl < 0) break;
      const end = start + nl;
      if (this.#buffer[end] === "\r" && end + 1 === this.#buffer.length) break; // maybe \r\n split
      const line = this.#buffer.slice(start, end);
      start = end + (this.#buffer.startsWith("\r\n", end) ? 2 : 1);
      this.#line(line, out);
    }
    this.#buffer = this.#buffer.slice(start);
    return out;
  }

  /**
   * Ends the stream; returns a last event not followed by a blank line.
   *
   * @returns The final event, if any.
   */
  end(): SseEvent[] {
    const out: SseEvent[] = [];
    if (this.#buffer) this.#line(this.#buffer, out);
    this.#buffer = "";
    this.#line("", out);
    return out;
  }

  #line(line: string, out: SseEvent[]): void {
    if (line === "") {
      if (this.#data.length) {
        out.push({
          event: this.#event || "message",
          data: this.#data.join("\n"),
        });
      }
      this.#event = "";
      this.#data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.#event = value;
    else if (field === "data") this.#data.push(value);
  }
}

/**
 * Options for {@linkcode rateLimitedFetch}.
 *
 * @example
 * ```ts
 * import { rateLimitedFetch, type RateLimitedFetchOptions } from "./mod.ts";
 *
 * const options: RateLimitedFetchOptions = {
 *   limiter: { rpm: 50 },
 *   concurrency: 4,
 *   retry: { retries: 3 },
 *   learn: false,
 *   fetch: () => Promise.resolve(new Response("ok")),
 * };
 * const f = rateLimitedFetch(options);
 * if ((await (await f("https://example.com/")).text()) !== "ok") throw new Error();
 * ```
 */
export interface RateLimitedFetchOptions {
  /** A limiter to share, or options for a new one. Default: no limits (learned from headers). */
  limiter?: Limiter | RateLimiterOptions;
  /** Most requests in flight at once (a streaming response counts until it ends). Default 16. */
  concurrency?: number;
  /**
   * Retry options, or `false` to send each request once. Default `{}` (see
   * {@linkcode retry}), with one difference: `maxRateLimitedMs` defaults to
   * 15 minutes here, so rate-limit 429s pace a call instead of using up its
   * `retries` (quota 429s still fail at once).
   */
  retry?: Omit<RetryOptions, "signal" | "clock"> | false;
  /** Cost of a request; default {@linkcode estimateCost}. */
  estimate?: (url: string, body: unknown) => Cost;
  /** Real cost from a parsed response body; default {@linkcode usageOf}. */
  usage?: (body: unknown) => Cost | undefined;
  /** Count `cache_read_input_tokens` as input (see {@linkcode UsageOptions}). Default false. */
  cacheReadCounts?: boolean;
  /**
   * Prompt caching as the provider charges it. A request whose marked
   * prefix (Anthropic `cache_control`) a finished request wrote within the
   * cache's lifetime is charged only its uncached input (unless
   * `cacheReadCounts`); the first request with a new prefix goes alone and
   * the others with it wait until its response has begun (one cache write,
   * not one per request in flight); a write larger than an input-token
   * window takes a whole empty window instead of failing. A prefix the
   * response shows was not cached is charged in full, and nothing waits for
   * it again. `false`: every request is charged its whole input and none
   * waits. Default `true`.
   */
  promptCache?: boolean;
  /**
   * Learn limits the user did not set from `anthropic-ratelimit-*-limit` /
   * `x-ratelimit-limit-*` headers, as windows of `windowMs` (default 60,000),
   * and record capacity used by others when `*-remaining` is lower than our
   * own log says. Default `true`.
   */
  learn?: boolean | { windowMs?: number };
  /** Widen the limiter's margins after a 429 it did not expect, narrowing slowly later. Default true. */
  adaptiveMargin?: boolean;
  /**
   * Find the pace from 429s alone while no limits are known: none given
   * in `limiter`, and no limit headers in the responses (a relay that
   * passes on only 429s). Until the first response with limit headers (or
   * the first 429), few requests go at once: one at first, one more every
   * 500 ms (half again from four on). From the first 429 on, requests go evenly spaced at a rate
   * estimated from what was accepted, raised with care while it holds and
   * cut when it draws a 429; it shows in {@linkcode StatsSnapshot.pace}.
   * `false`: without limits, only `concurrency` holds requests back (a
   * server with no rate limits). Default `true`, unless `learn` is `false`.
   */
  findPace?: boolean;
  /** The fetch to wrap; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Time source; default {@linkcode systemClock}. */
  clock?: Clock;
  /** Stats to fill in; default a new {@linkcode Stats}. */
  stats?: Stats;
  /**
   * Keep windows per model (the JSON body's `model`), as providers limit
   * per model. `"learned"` (default): limits learned from headers are kept
   * per model (the headers describe the model that answered) and a 429's
   * wait pauses that model only (with a {@linkcode RedisRateLimiter}: every
   * process on the key); limits you give in `limiter` apply to all
   * requests together. `"all"`: the limits you give apply to each model
   * separately too (`limiter` must then be options, not an instance).
   * `false`: one set of windows for everything, learned ones included —
   * for a relay that limits per key whatever the model.
   */
  perModel?: "learned" | "all" | false;
  /**
   * Most models with windows of their own; default 64. When a new model
   * comes and all are taken, the least recently used idle one (nothing in
   * its windows, nobody waiting) is dropped; if none is idle, the newcomer
   * shares one extra set of windows with the other models past the cap.
   */
  maxModels?: number;
}

/**
 * A `fetch` with rate limiting, retries and accounting; see {@linkcode rateLimitedFetch}.
 *
 * @example
 * ```ts
 * import { type RateLimitedFetch, rateLimitedFetch } from "./mod.ts";
 *
 * const f: RateLimitedFetch = rateLimitedFetch({
 *   limiter: { rpm: 50 },
 *   fetch: () => Promise.resolve(new Response("ok")),
 * });
 * await (await f("https://example.com/")).text();
 * if (f.limiter.usage()[0]!.used !== 1 || f.stats.toJSON().succeeded !== 1) throw new Error();
 * ```
 */
export type RateLimitedFetch =
  & ((input: RequestInfo | URL, init?: RequestInit) => Promise<Response>)
  & {
    /** The limiter every call goes through. */
    readonly limiter: Limiter;
    /** What happened so far. */
    readonly stats: Stats;
    /**
     * Each model's own limiter (see {@linkcode RateLimitedFetchOptions.perModel}),
     * by model name, least recently used first. Read-only.
     */
    readonly models: ReadonlyMap<string, Limiter>;
  };

const FETCH_OPTIONS = new Set([
  "limiter",
  "concurrency",
  "retry",
  "estimate",
  "usage",
  "cacheReadCounts",
  "promptCache",
  "learn",
  "adaptiveMargin",
  "findPace",
  "fetch",
  "clock",
  "stats",
  "perModel",
  "maxModels",
]);

/**
 * Wraps `fetch` so every call waits its turn: at most `concurrency` in
 * flight, within every rate window, retried per {@linkcode retry}. It has
 * `fetch`'s exact signature, so the official SDKs take it as is:
 * `new Anthropic({ fetch: rateLimitedFetch({ … }), maxRetries: 0 })`.
 *
 * Per call: estimate the cost ({@linkcode estimateCost}); take an in-flight
 * slot, *then* the rate permit (a permit taken before the slot would be
 * stamped too early and the server would see a burst); send; on a 429, pause
 * the whole limiter until the server-told time so other callers stop too;
 * retry what is transient (the body is buffered so retries resend it; a
 * `ReadableStream` body is sent once); cancel the bodies of discarded
 * responses; settle the permit with the real `usage` (JSON responses, and
 * SSE streams observed as they pass through to you; a stream you cancel
 * settles with what was seen); learn limits from response headers. The
 * caller's `signal` works at every stage: queued (leaves the queue, no
 * permit used), sleeping before a retry, and in flight.
 *
 * Like `fetch`, it does not throw for HTTP errors: after its retries it
 * returns the last response (a quota 429 at once). It throws what `fetch`
 * throws (after retrying network errors, a {@linkcode RetryError}) and
 * `signal.reason` on abort.
 *
 * @param options Limits, concurrency, retry policy, hooks; see
 *   {@linkcode RateLimitedFetchOptions}.
 * @returns The wrapped fetch, with `.limiter` and `.stats`.
 * @throws {TypeError | RangeError} For invalid options, naming them.
 *
 * @example
 * ```ts
 * import { rateLimitedFetch } from "./mod.ts";
 *
 * const fetch2 = rateLimitedFetch({
 *   limiter: { rpm: 50, itpm: 30_000, otpm: 8_000 },
 *   concurrency: 8,
 *   fetch: () => Promise.resolve(Response.json({ usage: { input_tokens: 12, output_tokens: 3 } })),
 * });
 * const res = await fetch2("https://api.anthropic.com/v1/messages", {
 *   method: "POST",
 *   body: JSON.stringify({ model: "m", max_tokens: 100, messages: [{ role: "user", content: "Hi" }] }),
 * });
 * await res.json();
 * if (fetch2.stats.toJSON().inputTokens !== 12) throw new Error();
 * ```
 */
export function rateLimitedFetch(
  options: RateLimitedFetchOptions = {},
): RateLimitedFetch {
  const settings = fetchSettings(options);
  const path = new RequestPath(settings);
  const wrapped = (
    input: RequestInfo | URL,
    init?: RequestInit,
  ): Promise<Response> => path.call(input, init);
  return Object.assign(wrapped, {
    limiter: settings.limiter,
    stats: settings.stats,
    models: path.lanes.models,
  }) as RateLimitedFetch;
}

/** Whether `limiter` is a limiter (not options for one). */
function isLimiter(limiter: unknown): limiter is Limiter {
  return typeof (limiter as Limiter | undefined)?.acquire === "function";
}

/** {@linkcode RateLimitedFetchOptions}, checked, with every default filled in. */
interface FetchSettings {
  limiter: Limiter;
  stats: Stats;
  clock: Clock;
  concurrency: number;
  /** Checked retry options without a signal; `undefined`: send each request once. */
  retry: CheckedRetryOptions | undefined;
  estimate: (url: string, body: unknown) => Cost;
  usage: (body: unknown) => Cost | undefined;
  /** Whether prompt caching is followed; whether cache reads count as input. */
  promptCache: boolean;
  cacheReadCounts: boolean;
  /** The learned windows' length; `undefined`: learning is off. */
  learnMs: number | undefined;
  adaptiveMargin: boolean;
  /** Whether the pace is found from 429s when no limits are known. */
  findPace: boolean;
  fetch: typeof fetch;
  lanes: LaneOptions;
}

/** Checks the options of {@linkcode rateLimitedFetch}; throws naming the bad one. */
function fetchSettings(options: RateLimitedFetchOptions): FetchSettings {
  const where = "rateLimitedFetch";
  checkOptions(options, FETCH_OPTIONS, where);
  const {
    concurrency = 16,
    retry: retryOptions = {},
    estimate = estimateCost,
    cacheReadCounts = false,
    promptCache = true,
    learn = true,
    adaptiveMargin = true,
    findPace = learn !== false,
    clock = systemClock,
  } = options;
  const usage = options.usage ??
    ((b: unknown) => usageOf(b, { cacheReadCounts }));
  checkCount(concurrency, "concurrency", where);
  for (
    const [name, v] of [
      ["cacheReadCounts", cacheReadCounts],
      ["promptCache", promptCache],
      ["findPace", findPace],
    ] as const
  ) {
    if (typeof v !== "boolean") {
      throw new TypeError(
        `${where} '${name}' must be a boolean: received ${JSON.stringify(v)}`,
      );
    }
  }
  const baseFetch = options.fetch ?? globalThis.fetch;
  if (typeof baseFetch !== "function") {
    throw new TypeError(`${where} 'fetch' must be a function`);
  }
  for (const [name, f] of [["estimate", estimate], ["usage", usage]] as const) {
    if (typeof f !== "function") {
      throw new TypeError(
        `${where} '${name}' must be a function: received ${typeof f}`,
      );
    }
  }
  const stats = options.stats ?? new Stats(clock);
  // Validated once here; each call only adds its signal.
  const retry = retryOptions === false ? undefined : checkRetryOptions({
    maxRateLimitedMs: 15 * 60_000,
    ...retryOptions,
    clock,
    onRetry: (info) => {
      stats.retry();
      retryOptions.onRetry?.(info);
    },
  });
  const learnMs = typeof learn === "object" ? learn.windowMs ?? 60_000 : 60_000;
  checkPositive(learnMs, "learn.windowMs", where);
  const { limiter, lanes } = laneSettings(options, clock);
  return {
    limiter,
    stats,
    clock,
    concurrency,
    retry,
    estimate,
    usage,
    promptCache,
    cacheReadCounts,
    learnMs: learn === false ? undefined : learnMs,
    adaptiveMargin,
    findPace,
    fetch: baseFetch,
    lanes,
  };
}

/** The key's limiter and how model lanes are made, from `limiter`, `perModel` and `maxModels`. */
function laneSettings(
  options: RateLimitedFetchOptions,
  clock: Clock,
): { limiter: Limiter; lanes: LaneOptions } {
  const perModel = options.perModel ?? "learned";
  if (perModel !== "learned" && perModel !== "all" && perModel !== false) {
    throw new TypeError(
      `rateLimitedFetch 'perModel' must be "learned", "all" or false: received ${
        JSON.stringify(perModel)
      }`,
    );
  }
  const maxModels = options.maxModels ?? 64;
  checkCount(maxModels, "maxModels", "rateLimitedFetch");
  const given = options.limiter;
  /** With perModel "all": the given windows, copied for each model. */
  let template: WindowSpec[] = [];
  let limiter: Limiter;
  if (perModel === "all") {
    if (isLimiter(given)) {
      throw new TypeError(
        `rateLimitedFetch 'perModel: "all"' copies the limits in 'limiter' for each model: pass limiter options, not a RateLimiter instance`,
      );
    }
    template = new RateLimiter({ clock, ...given }).usage().map((w) => ({
      key: w.key,
      limit: w.limit,
      ms: w.ms,
      marginMs: w.marginMs,
    }));
    limiter = new RateLimiter({ clock });
  } else {
    limiter = isLimiter(given) ? given : new RateLimiter({ clock, ...given });
  }
  const marginMs = isLimiter(given) ? undefined : given?.marginMs;
  return {
    limiter,
    lanes: {
      perModel,
      maxModels,
      clock,
      // The keys the user gave limits for: never learned.
      userKeys: new Set(
        (perModel === "all" ? template : limiter.usage()).map((w) => w.key),
      ),
      modelLimiter(model) {
        const o: RateLimiterOptions = {
          clock,
          windows: template,
          ...(marginMs === undefined ? {} : { marginMs }),
        };
        // A shared key's models are shared too: same Redis, one name per model.
        return limiter instanceof RedisRateLimiter
          ? limiter.forModel(model, o)
          : new RateLimiter(o);
      },
    },
  };
}

/**
 * Request normalisation: what one call sends on every attempt. The SDKs
 * pass a URL string and a string body: that common case skips building a
 * `Request` and copying the body.
 */
interface OutgoingRequest {
  url: string;
  /** Everything but the signal. */
  init: RequestInit;
  signal: AbortSignal | undefined;
  /** The body parsed as JSON, when it is JSON. */
  json: unknown;
  /** False for a `ReadableStream` body: it can be sent only once. */
  replayable: boolean;
}

async function normalizeRequest(
  input: RequestInfo | URL,
  init: RequestInit | undefined,
): Promise<OutgoingRequest> {
  const signal = init?.signal ??
    (input instanceof Request ? input.signal : undefined) ?? undefined;
  let url: string;
  let sendInit: RequestInit;
  let body: string | ArrayBuffer | ReadableStream<Uint8Array> | undefined;
  let text: string | undefined;
  if (
    (typeof input === "string" || input instanceof URL) &&
    (init?.body === undefined || init?.body === null ||
      typeof init.body === "string")
  ) {
    url = String(input);
    body = init?.body ?? undefined;
    text = body as string | undefined;
    sendInit = { ...init, body };
  } else {
    const request = new Request(input, init);
    const streaming = init?.body instanceof ReadableStream ||
      (init?.body === undefined && input instanceof Request &&
        input.body !== null);
    if (request.body && !streaming) {
      body = await request.arrayBuffer();
      text = new TextDecoder().decode(body);
    } else if (request.body) body = request.body;
    url = request.url;
    sendInit = {
      method: request.method,
      headers: request.headers,
      body,
      redirect: request.redirect,
      ...(body instanceof ReadableStream ? { duplex: "half" } : {}),
    } as RequestInit;
  }
  return {
    url,
    init: sendInit,
    signal,
    json: text === undefined ? undefined : parseJSONBody(text),
    replayable: !(body instanceof ReadableStream),
  };
}

/** The JSON in a text that looks like an object or array; `undefined` if it is not JSON. */
function parseJSONBody(text: string): unknown {
  if (!/^\s*[[{]/.test(text)) return undefined;
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** One set of windows of a {@linkcode rateLimitedFetch}: the key's, or a model's. */
interface Lane {
  limiter: Limiter;
  margins: MarginTuner;
  /** Estimated amounts of requests sent and not yet answered, per key (for learning). */
  inflight: Record<string, number>;
}

/** How {@linkcode ModelLanes} makes a model's lane. */
interface LaneOptions {
  perModel: "learned" | "all" | false;
  maxModels: number;
  clock: Clock;
  /** Keys the user gave limits for: never learned. */
  userKeys: Set<string>;
  /** A new limiter for one model's windows. */
  modelLimiter(model: string): Limiter;
}

/**
 * Model lanes: the key's windows, and each model's own (providers limit
 * per model), at most `maxModels` of them, least recently used dropped
 * first when idle.
 */
class ModelLanes {
  /** The whole key's windows: the given limits (and, without a model, the learned ones). */
  readonly key: Lane;
  /** Each model's limiter, least recently used first. */
  readonly models: Map<string, Limiter> = new Map();
  #lanes = new Map<string, Lane>();
  #overflow: Lane | undefined;
  #options: LaneOptions;

  constructor(key: Limiter, options: LaneOptions) {
    this.#options = options;
    this.key = this.#newLane(key);
  }

  /** The lane a request goes through: its model's (the URL's, else the body's), or the key's. */
  of(json: unknown, urlModel?: string): Lane {
    const model = urlModel ?? (json as { model?: unknown } | undefined)?.model;
    return this.#options.perModel !== false && typeof model === "string" &&
        model
      ? this.#model(model)
      : this.key;
  }

  #newLane(limiter: Limiter): Lane {
    return {
      limiter,
      margins: new MarginTuner(limiter, this.#options.clock),
      inflight: {},
    };
  }

  #model(model: string): Lane {
    let lane = this.#lanes.get(model);
    if (lane) {
      this.#lanes.delete(model); // most recently used goes last
      this.#lanes.set(model, lane);
      return lane;
    }
    if (this.#lanes.size >= this.#options.maxModels) {
      const idle = this.#idle();
      if (idle === undefined) {
        return this.#overflow ??= this.#newLane(
          this.#options.modelLimiter("(other models)"),
        );
      }
      this.#lanes.delete(idle);
      this.models.delete(idle);
    }
    lane = this.#newLane(this.#options.modelLimiter(model));
    this.#lanes.set(model, lane);
    this.models.delete(model);
    this.models.set(model, lane.limiter);
    return lane;
  }

  /** The least recently used model with nothing in its windows and nobody waiting. */
  #idle(): string | undefined {
    for (const [name, l] of this.#lanes) {
      if (
        l.limiter.pending === 0 && l.limiter.usage().every((w) => w.used === 0)
      ) return name;
    }
    return undefined;
  }
}

/**
 * Header learning: limits the user did not give, from the providers'
 * limit headers (every provider's, as relays mix them), as windows of
 * `learnMs`; and capacity used by others sharing the key, when `remaining`
 * is lower than our own log says. Returns `"none"` when no limit header
 * came, `"changed"` when a learned limit changed, else `"seen"`.
 */
function learnLimits(
  h: Headers,
  lane: Lane,
  userKeys: Set<string>,
  learnMs: number,
  cost: Cost,
): Learned {
  const limiter = lane.limiter;
  let seen: Learned = "none";
  let windows: WindowUsage[] | undefined; // read once, refreshed after changes
  const find = (key: string): WindowUsage | undefined => {
    windows ??= limiter.usage();
    return windows.find((u) => u.key === key && u.ms === learnMs) ??
      windows.find((u) => u.key === key);
  };
  for (const header of LIMIT_HEADERS) {
    const v = h.get(header.limit);
    if (v === null) {
      const got = learnFromRemaining(
        h,
        header,
        lane,
        userKeys,
        learnMs,
        cost,
        find,
      );
      if (got === "changed") windows = undefined;
      if (got !== "none" && seen !== "changed") seen = got;
      continue;
    }
    const limit = Number(v);
    if (!(limit > 0) || !Number.isFinite(limit)) continue;
    if (header.unless?.some((name) => h.has(name))) continue;
    if (seen === "none") seen = "seen";
    const key = header.key;
    if (!userKeys.has(key)) {
      const w = find(key);
      const learned = w?.ms === learnMs ? w : undefined;
      if (!learned || learned.limit !== limit) {
        limiter.setLimit(key, limit, learnMs);
        // A new window has not seen the requests still in flight; the
        // server will count them, so charge them now.
        if (!learned && lane.inflight[key]) {
          limiter.record({ [key]: lane.inflight[key] });
        }
        windows = undefined;
        seen = "changed";
      }
    }
    // Others sharing the key: their usage shows as lower remaining.
    const r = h.get(header.remaining);
    const remaining = r === null ? NaN : Number(r);
    if (!(remaining >= 0)) continue;
    const w = find(key);
    if (!w) continue;
    const gap = (w.limit - w.used) - remaining;
    // Anthropic rounds token counts to the nearest thousand.
    const noise = key !== "requests" && remaining % 1000 === 0 ? 500 : 0;
    if (gap > noise) {
      limiter.record({ [key]: gap });
      windows = undefined;
    }
  }
  return seen;
}

/** What a response's headers taught: nothing, limits as known, or a changed limit. */
type Learned = "none" | "seen" | "changed";

/**
 * A Gemini 429's violated per-minute quotas, learned as windows of
 * `learnMs` on the lane (the request's model: quotas are per model): the
 * quota id says which (`…Requests…`, `…InputTokens…`), `quotaValue` the
 * limit; the quota is full at the server, so a new window starts full.
 * Per-day quotas stop the run instead (see `quotaCode`). Returns whether it
 * learned anything.
 */
function learnFromQuota(json: unknown, lane: Lane, s: FetchSettings): boolean {
  let learned = false;
  for (const v of quotaViolations(json)) {
    if (v.value === undefined || !/PerMinute/i.test(v.quotaId)) continue;
    const key = /InputTokens/i.test(v.quotaId)
      ? "inputTokens"
      : /Requests/i.test(v.quotaId)
      ? "requests"
      : undefined;
    if (!key || s.lanes.userKeys.has(key)) continue;
    const w = lane.limiter.usage().find((u) =>
      u.key === key && u.ms === s.learnMs
    );
    if (w?.limit === v.value) continue;
    lane.limiter.setLimit(key, v.value, s.learnMs!);
    // The quota is full at the server now, with sends we never logged and
    // whose times we do not know: a new window starts full (it empties a
    // window from now, when the server's surely has), so the pause's end
    // is not met by a burst the server still counts. One window's wait,
    // once, instead of a 429 for each request in that burst.
    if (!w) lane.limiter.record({ [key]: v.value });
    learned = true;
  }
  return learned;
}

/**
 * A `remaining` header without its `limit` (Azure): the limit is at most
 * what is left plus what the window holds (this request and those in
 * flight, before a window exists), less when others share the key; the
 * least such bound seen is kept. `find` is learnLimits' window lookup.
 */
function learnFromRemaining(
  h: Headers,
  header: LimitHeaders,
  lane: Lane,
  userKeys: Set<string>,
  learnMs: number,
  cost: Cost,
  find: (key: string) => WindowUsage | undefined,
): Learned {
  const r = h.get(header.remaining);
  const remaining = r === null ? NaN : Number(r);
  const key = header.key;
  if (!(remaining >= 0) || !Number.isFinite(remaining) || userKeys.has(key)) {
    return "none";
  }
  const found = find(key);
  const w = found?.ms === learnMs ? found : undefined;
  const own = key === "tokens"
    ? (cost.inputTokens ?? 0) + (cost.outputTokens ?? 0)
    : cost[key] ?? 0;
  const bound = remaining + (w ? w.used : (lane.inflight[key] ?? 0) + own);
  if (w && bound >= w.limit) return "seen";
  lane.limiter.setLimit(key, Math.max(1, bound), learnMs);
  // A new window: the server has counted this request and those in flight.
  if (!w) lane.limiter.record({ [key]: (lane.inflight[key] ?? 0) + own });
  return "changed";
}

/**
 * The load of every window of a {@linkcode rateLimitedFetch}, labelled
 * `key/ms`, a model's prefixed with `model: ` — the labels of
 * {@linkcode TimelinePoint.windows}.
 *
 * @param f The fetch (or its limiter and model limiters).
 * @returns Each window's use and limit, by label.
 *
 * @example
 * ```ts
 * import { rateLimitedFetch, windowLoads } from "./mod.ts";
 *
 * const f = rateLimitedFetch({ limiter: { rpm: 50 }, fetch: () => Promise.resolve(new Response("ok")) });
 * await f("https://example.com/");
 * if (windowLoads(f)["requests/60000"]?.used !== 1) throw new Error();
 * ```
 */
export function windowLoads(
  f: Pick<RateLimitedFetch, "limiter" | "models">,
): Record<string, { used: number; limit: number }> {
  const out: Record<string, { used: number; limit: number }> = {};
  for (const w of f.limiter.usage()) {
    out[`${w.key}/${w.ms}`] = { used: w.used, limit: w.limit };
  }
  for (const [model, l] of f.models) {
    for (const w of l.usage()) {
      out[`${model}: ${w.key}/${w.ms}`] = { used: w.used, limit: w.limit };
    }
  }
  return out;
}

/** Requests waiting for a slot or a permit, and sent: the timeline's gauge. */
class FlightGauge {
  waiting = 0;
  active = 0;
  #windowsSampled = -Infinity;
  #stats: Stats;
  #lanes: ModelLanes;

  constructor(stats: Stats, lanes: ModelLanes) {
    this.#stats = stats;
    this.#lanes = lanes;
  }

  /** Samples the gauge; the windows' load at most every 250 ms. */
  observe(now: number): void {
    if (now - this.#windowsSampled < 250) {
      this.#stats.sample({ inFlight: this.active, queued: this.waiting });
      return;
    }
    this.#windowsSampled = now;
    this.#stats.sample({
      inFlight: this.active,
      queued: this.waiting,
      windows: windowLoads({
        limiter: this.#lanes.key.limiter,
        models: this.#lanes.models,
      }),
    });
  }
}

/** One prefix in a {@linkcode PromptCache}. */
interface CacheEntry {
  state: "writing" | "cached" | "uncacheable";
  /** Settles when the writing request's response says what became of it. */
  written: Promise<void>;
  open: () => void;
  /** Until when the provider keeps it (each read or write pushes it on). */
  expiresAt: number;
  /** Its size in the provider's tokens, from the usage that wrote or read it. */
  tokens: number;
}

/** The most prefixes a {@linkcode PromptCache} remembers; the least recently used go first. */
const MAX_PREFIXES = 1024;

/**
 * Prompt caching as the provider charges it: a part of the request path.
 * Anthropic counts only uncached input (and cache writes) toward input
 * tokens per minute, so a request that reads a cached prefix is charged
 * its uncached rest. A new prefix is written by one request: the others
 * with it wait (without a slot or a permit) until that response has begun
 * and its usage says the cache holds the prefix; then they read. A prefix
 * the usage shows was not cached (below the model's minimum cacheable
 * length, or ignored) is charged in full from then on and nothing waits
 * for it again; a writer that fails gives its turn to the next request.
 */
class PromptCache {
  #clock: Clock;
  #entries = new Map<string, CacheEntry>();

  constructor(clock: Clock) {
    this.#clock = clock;
  }

  /** Prefixes remembered. */
  get size(): number {
    return this.#entries.size;
  }

  /** Waits while another request writes `prefix`; then how this one goes. */
  async claim(
    prefix: CachePrefix,
    signal: AbortSignal | undefined,
  ): Promise<CacheTicket> {
    for (;;) {
      const entry = this.#entries.get(prefix.key);
      if (entry?.state === "writing") {
        await settledOrAborted(entry.written, signal);
        continue;
      }
      if (entry?.state === "uncacheable") {
        return new CacheTicket(this, prefix, entry, "plain");
      }
      if (entry && this.#clock.now() < entry.expiresAt) {
        this.#entries.delete(prefix.key); // most recently used goes last
        this.#entries.set(prefix.key, entry);
        return new CacheTicket(this, prefix, entry, "read");
      }
      let open!: () => void;
      const written = new Promise<void>((resolve) => open = resolve);
      const fresh: CacheEntry = {
        state: "writing",
        written,
        open,
        expiresAt: 0,
        tokens: entry?.tokens ?? 0,
      };
      this.#entries.delete(prefix.key);
      this.#entries.set(prefix.key, fresh);
      this.#trim();
      return new CacheTicket(this, prefix, fresh, "write");
    }
  }

  /** Forgets a prefix whose writer gave up, if it is still that entry. */
  forget(key: string, entry: CacheEntry): void {
    if (this.#entries.get(key) === entry) this.#entries.delete(key);
  }

  #trim(): void {
    if (this.#entries.size <= MAX_PREFIXES) return;
    for (const [key, entry] of this.#entries) {
      if (entry.state === "writing") continue;
      this.#entries.delete(key);
      if (this.#entries.size <= MAX_PREFIXES) return;
    }
  }
}

/** Resolves when `promise` does, or rejects with `signal.reason` first. */
function settledOrAborted(
  promise: Promise<void>,
  signal: AbortSignal | undefined,
): Promise<void> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    });
  });
}

/** One attempt's place in the {@linkcode PromptCache}: what it is charged, and what its response tells. */
class CacheTicket {
  /** `write`: it writes the prefix; `read`: it reads it; `plain`: not cached. */
  readonly role: "write" | "read" | "plain";
  #cache: PromptCache;
  #prefix: CachePrefix;
  #entry: CacheEntry;

  constructor(
    cache: PromptCache,
    prefix: CachePrefix,
    entry: CacheEntry,
    role: "write" | "read" | "plain",
  ) {
    this.#cache = cache;
    this.#prefix = prefix;
    this.#entry = entry;
    this.role = role;
  }

  /**
   * The cost to reserve: a read is charged its uncached rest (unless reads
   * count); a write larger than an input-token window takes that whole
   * window (everything after it reads).
   */
  charge(cost: Cost, readsCount: boolean, limiters: Limiter[]): Cost {
    const input = cost.inputTokens;
    if (input === undefined || this.role === "plain") return cost;
    let charged = input;
    if (this.role === "read" && !readsCount) {
      charged = Math.max(1, input - this.#prefix.tokens);
    }
    if (this.role === "write") {
      for (const w of limiters.flatMap((l) => l.usage())) {
        if (w.key === "inputTokens") charged = Math.min(charged, w.limit);
        if (w.key === "tokens") {
          charged = Math.min(charged, w.limit - (cost.outputTokens ?? 0));
        }
      }
      charged = Math.max(1, charged);
    }
    if (charged === input) return cost;
    const out: Cost = { ...cost, inputTokens: charged };
    if (cost.tokens !== undefined) out.tokens = cost.tokens - input + charged;
    return out;
  }

  /** A response's cache figures: the prefix is cached (until a lifetime after `sentAt`) or not. */
  seen(usage: CacheUsage, sentAt: number): void {
    const entry = this.#entry;
    if (usage.read + usage.write > 0) {
      entry.state = "cached";
      entry.tokens = usage.read + usage.write;
      entry.expiresAt = Math.max(entry.expiresAt, sentAt + this.#prefix.ttlMs);
    } else {
      // An expired prefix is written again (a write shows), so no figures
      // at all mean the provider does not cache it.
      entry.state = "uncacheable";
    }
    entry.open();
  }

  /**
   * The attempt is over. A writer that failed gives its turn to the next
   * request; one that succeeded without saying anything of the cache (a
   * relay that drops the usage) leaves the prefix uncached, so nobody
   * waits on it again.
   */
  end(succeeded: boolean): void {
    const entry = this.#entry;
    if (this.role !== "write" || entry.state !== "writing") return;
    if (succeeded) entry.state = "uncacheable";
    else this.#cache.forget(this.#prefix.key, entry);
    entry.open();
  }
}

/** One request's turn in a {@linkcode PaceFinder}: what it costs, and what was sent before it. */
interface PaceTurn {
  readonly requests: number;
  readonly inputTokens: number;
  /** Requests and input tokens sent before this one, and when it went. */
  before: [number, number];
  sentAt: number;
  /** Sent and not yet answered. */
  inflight: boolean;
  resolve: (() => void) | undefined;
  reject: ((reason: unknown) => void) | undefined;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  cancelled: boolean;
}

/** The pace is kept in requests and input tokens; both move together. */
const PACE_KEYS = ["requests", "inputTokens"] as const;
type PaceKey = typeof PACE_KEYS[number];

/**
 * Which limit a rate-limit 429's body names, if it says: "… 3000 input
 * tokens per minute" (Anthropic), "… on tokens per min (TPM)" or
 * `"type": "tokens"` (OpenAI); "… 50 requests per minute", "RPM".
 */
function limitNamedIn(json: unknown): PaceKey | undefined {
  if (json === undefined) return undefined;
  const text = JSON.stringify(json);
  if (/tokens?\b|\bTPM\b/i.test(text)) return "inputTokens";
  if (/\brequests\b|\bRPM\b/i.test(text)) return "requests";
  return undefined;
}
/** In the start phase, the in-flight cap grows this often while it binds. */
const RAMP_MS = 500;
/** Quiet stretches before a probe, at first; doubled after each failed probe. */
const PATIENCE = 4;
/** How long the start's sends are kept, for a window learned from them. */
const LOG_START_MS = 70_000;

/**
 * Pace finding from 429s alone: a part of the request path, on only while
 * no limits are known (none given, no limit headers seen), as behind a
 * relay that passes on nothing but 429s. Two phases:
 *
 * - **Start**: at most a few requests in flight, one at first, one more
 *   (half again from four on) every 500 ms while the cap binds, so the
 *   first 429 finds few requests already on their way (each would be
 *   refused too). TCP's slow start, in time rather than per answer.
 * - **Pacing**, from the first 429: requests go evenly spaced (a virtual
 *   schedule per key, as GCRA keeps one) at a rate first estimated from
 *   the start: what was accepted, over the time from the first send to
 *   when the 429 said capacity returns. Even spacing keeps any window,
 *   however short, at or below the rate, and ends the herd after a pause:
 *   waiters leave one by one. Then a bracketed search, as
 *   TCP's AIMD and BIC do: `good` is the fastest rate that held a whole
 *   stretch (a window's length, as the start estimated it) while it bound,
 *   `bad` the slowest that drew a 429. Below a known `bad`, it probes
 *   (half way, at least 10 % up) only after some quiet stretches, twice as
 *   many after each failed probe, so an unchanged limit costs a 429 rarely;
 *   a probe that holds is probed past at once, and past an old `bad` the
 *   search climbs by a quarter per stretch, so a raised limit is found
 *   within a few windows. A 429 at `good` (the limit dropped) cuts to 70 %.
 *   The 429s of requests sent before a cut are one signal, not many.
 * - **A whole-second wait** (relays round `retry-after` up) leaves the
 *   server's window anywhere from the start's span less that second to
 *   the span, so the first estimate holds whatever it is, and may be a
 *   third too low. So the first step up (a quarter) is taken at once, not
 *   after a stretch; if it holds, the next is as likely to fail as to hold
 *   (the `ceiling` is the rate of the shortest such window), so it waits
 *   its turn as a probe. A step's 429 that comes within a stretch of the
 *   step holding is the step failing, not the limit dropping: back to the
 *   pace before it, or to 95 % of what the last stretch sent if more.
 * - **A precise wait** (to the ms, or whole seconds on a span of 10 s or
 *   more, as a per-minute limit gives) also says how long the window is,
 *   at most: the span. Then, instead of an even pace, the start's sends
 *   may go again as they leave that window, all of them (what the window
 *   held, it holds again), so a per-minute limit lets its minute's worth
 *   go as the minute refills rather than spread over the next. A 429 at
 *   that pace means the window was wrong (a shorter one hides in it, or
 *   the server refills a bucket): the same rate, evenly, from then on.
 *
 * Estimates of latency-based limiters (Vegas, BBR, Netflix's
 * concurrency-limits) read queueing delay, which a relay's 429s do not
 * show; a rate found per stretch is what the server's windows count.
 */
class PaceFinder {
  #phase: "start" | "pacing" | "off";
  #clock: Clock;
  #stats: Stats;
  #maxCap: number;
  #cap = 1;
  #inflight = 0;
  #grownAt = -Infinity;
  #firstSend = -1;
  /** Requests and input tokens sent. */
  #sent: [number, number] = [0, 0];
  /** Amounts per ms at scale 1; the rate is `base × scale`. */
  #base: [number, number] = [0, 0];
  #scale = 1;
  #good = 1;
  #bad: number | undefined;
  /** The pace `good` held before its last step up, and when that step held. */
  #heldFrom = 1;
  #heldAt = -Infinity;
  /**
   * Until the first step up has held: the fastest pace the start allows if
   * the server's window is no shorter than the start's sends.
   */
  #ceiling = Infinity;
  /** The virtual schedule: the earliest next send per key. */
  #next: [number, number] = [0, 0];
  /**
   * The keys whose schedule holds requests back: those the 429s named,
   * both while none did. (Two strict schedules together are slower than
   * either: a large prompt's wait in tokens is lost to the requests.)
   */
  #paced: [boolean, boolean] = [true, true];
  #named: [boolean, boolean] = [false, false];
  #pausedUntil = 0;
  /** 429s of requests sent before this are part of a signal already taken. */
  #cutAt = -Infinity;
  #stretchMs = 1000;
  #stretchStart = 0;
  #stretchSent: [number, number] = [0, 0];
  #quiet = 0;
  #patience = PATIENCE;
  /**
   * With a precise first wait on a long enough span: the server's window
   * as the start found it, in which a pace's worth goes as soon as the
   * window has room (a burst as the window refills); 0 while the pace is
   * even.
   */
  #windowMs = 0;
  /**
   * Sends of the last stretch (of the last 70 s, in the start), three
   * numbers each: when it went, and the requests and input tokens sent
   * before it.
   */
  #log: number[] = [];
  #logHead = 0;
  #queue: (PaceTurn | undefined)[] = [];
  #head = 0;
  #timer: AbortController | undefined;
  #timerAt = Infinity;

  constructor(clock: Clock, stats: Stats, maxCap: number, on: boolean) {
    this.#clock = clock;
    this.#stats = stats;
    this.#maxCap = maxCap;
    this.#phase = on ? "start" : "off";
  }

  /** Whether requests go through it (no limits known). */
  get active(): boolean {
    return this.#phase !== "off";
  }

  /** The rates found, per second, by key; `undefined` before the first 429. */
  get perSecond(): Record<string, number> | undefined {
    if (this.#phase !== "pacing") return undefined;
    const out: Record<string, number> = {};
    PACE_KEYS.forEach((k, i) => {
      if (this.#base[i]! > 0) out[k] = this.#base[i]! * this.#scale * 1000;
    });
    return out;
  }

  /** Whether a 429's pause began after the turn was taken (it should not go yet). */
  pausedSince(turn: PaceTurn): boolean {
    return this.#phase !== "off" && turn.inflight &&
      this.#pausedUntil > turn.sentAt;
  }

  /** Limits became known (from headers): everyone waiting goes on, and it stays off. */
  off(): void {
    if (this.#phase === "off") return;
    this.#phase = "off";
    this.#disarm();
    this.#pump();
  }

  /** A new turn for a request of `cost`. */
  turn(cost: Cost): PaceTurn {
    return {
      requests: cost.requests ?? 1,
      inputTokens: cost.inputTokens ?? cost.tokens ?? 0,
      before: [0, 0],
      sentAt: 0,
      inflight: false,
      resolve: undefined,
      reject: undefined,
      signal: undefined,
      onAbort: undefined,
      cancelled: false,
    };
  }

  /** Waits for the turn's time; `undefined` when it may go at once (it is sent). */
  wait(
    turn: PaceTurn,
    signal: AbortSignal | undefined,
  ): Promise<void> | undefined {
    const now = this.#clock.now();
    if (this.#head === this.#queue.length && this.#delay(turn, now) <= 0) {
      this.#take(turn, now);
      return undefined;
    }
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<void>((resolve, reject) => {
      turn.resolve = resolve;
      turn.reject = reject;
      if (signal) {
        turn.signal = signal;
        turn.onAbort = () => {
          turn.cancelled = true;
          reject(signal.reason);
          this.#pump();
        };
        signal.addEventListener("abort", turn.onAbort, { once: true });
      }
      this.#queue.push(turn);
      this.#pump();
    });
  }

  /** The turn's request was answered (or failed): its place in flight is free. */
  done(turn: PaceTurn): void {
    if (!turn.inflight) return;
    turn.inflight = false;
    this.#inflight--;
    if (this.#head < this.#queue.length) this.#pump();
  }

  /**
   * The turn's request drew a rate-limit 429, the server saying `told` ms
   * and, perhaps, which key's limit it hit.
   */
  refused(
    turn: PaceTurn,
    told: number | undefined,
    key: PaceKey | undefined,
  ): void {
    if (this.#phase === "off") return;
    const now = this.#clock.now();
    if (key) {
      this.#named[PACE_KEYS.indexOf(key)] = true;
      this.#paced = [...this.#named];
    }
    if (told !== undefined) {
      this.#pausedUntil = Math.max(this.#pausedUntil, now + told);
    }
    if (turn.sentAt <= this.#cutAt) return;
    this.#ceiling = Infinity;
    if (this.#phase === "start") this.#estimate(turn, told);
    else if (this.#scale > this.#good) this.#stepFailed(turn, this.#good);
    else if (this.#windowMs > 0) {
      // A learned window that drew a 429 at its pace was wrong (a shorter
      // one hides in it, or the server refills a bucket): the same pace,
      // evenly spaced from now.
      this.#windowMs = 0;
      this.#next[0] = this.#next[1] = now;
    } else if (now - this.#heldAt < this.#stretchMs) {
      // The pace had held one stretch only: its step's 429 came late.
      this.#stepFailed(turn, this.#heldFrom);
    } else { // at a pace that held: the limit dropped
      this.#bad = this.#scale;
      this.#scale = this.#good = this.#scale * 0.7;
      // Probes that failed against the old limit say nothing of the new.
      this.#patience = PATIENCE;
    }
    this.#cutAt = now;
    this.#quiet = 0;
    this.#newStretch(Math.max(now, this.#pausedUntil));
    this.#stats.pace(this.perSecond);
    this.#pump();
  }

  /**
   * A step up drew a 429: back to the pace that held before it, or to 95 %
   * of what was sent over the last stretch if that is more (the step held
   * most of it); twice the patience before the next probe.
   */
  #stepFailed(turn: PaceTurn, held: number): void {
    const failed = this.#bad = this.#scale;
    const sent = this.#sentOver(turn) * 0.95;
    this.#scale = this.#good = Math.min(Math.max(held, sent), failed * 0.97);
    this.#patience = Math.min(this.#patience * 2, 64);
  }

  /**
   * What was sent over the stretch before the turn, as a scale of the
   * pace: the fastest the server allows if its window is the longest the
   * start allows.
   */
  #sentOver(turn: PaceTurn): number {
    const log = this.#log;
    let i = this.#logHead;
    while (i < log.length && log[i]! <= turn.sentAt - this.#stretchMs) i += 3;
    let scale = Infinity;
    for (let k = 0; k < 2 && i < log.length; k++) {
      if (!this.#paced[k] || !(this.#base[k]! > 0)) continue;
      const sent = turn.before[k]! - log[i + 1 + k]!;
      scale = Math.min(scale, sent / this.#stretchMs / this.#base[k]!);
    }
    return scale === Infinity ? 0 : scale;
  }

  /** The first 429: the rate from what the start saw, and pacing from now. */
  #estimate(turn: PaceTurn, told: number | undefined): void {
    const wait = told ?? 1000;
    const span = Math.max(turn.sentAt + wait - this.#firstSend, 1);
    for (let i = 0; i < 2; i++) {
      // Those sent before it, taken as accepted (any still on their way
      // are refused too, if at all, after this).
      this.#base[i] = Math.max(turn.before[i]!, i === 0 ? 1 : 0) / span;
    }
    // A precise wait says the rate: stay under it. A whole-second one on a
    // short span leaves the window anywhere from the span less that second
    // to the span: the rate found holds whichever it is, so take the first
    // step up at once; the ceiling is where the shortest would put it.
    const precise = told !== undefined &&
      (told % 1000 !== 0 || span >= 10_000);
    // It also says how long the window is, at most: the start's sends
    // (kept for 70 s) may go again as they leave it, all of them (what a
    // window held, it holds again). Without one, evenly at 95 % of it.
    this.#windowMs = precise && span <= LOG_START_MS ? span : 0;
    const held = this.#windowMs > 0 ? 1 : 0.95;
    this.#good = precise ? held : 1;
    this.#scale = precise ? held : 1.25;
    this.#bad = precise ? held * 1.1 : undefined;
    this.#ceiling = precise || span <= wait ? Infinity : span / (span - wait);
    this.#stretchMs = Math.min(Math.max(span, RAMP_MS), 60_000);
    this.#phase = "pacing";
    this.#disarm();
  }

  #newStretch(at: number): void {
    this.#stretchStart = at;
    this.#stretchSent[0] = this.#stretchSent[1] = 0;
  }

  /**
   * A stretch passed without a 429. If the pace bound it (the sends kept up
   * with it), the pace held: climb, or after enough quiet, probe.
   */
  #endStretch(now: number): void {
    const span = now - this.#stretchStart;
    let bound = false;
    for (let i = 0; i < 2; i++) {
      const expected = this.#base[i]! * this.#scale * span;
      if (expected > 0 && this.#stretchSent[i]! >= 0.8 * expected) bound = true;
    }
    this.#newStretch(now);
    if (!bound) return;
    if (this.#scale > this.#good) {
      this.#heldFrom = this.#good;
      this.#heldAt = now;
      this.#good = this.#scale;
      if (this.#bad !== undefined && this.#good >= this.#bad) {
        this.#bad = undefined;
      }
      this.#quiet = this.#patience; // a probe held: probe again now
    }
    // The first step held under the ceiling: the next is as likely to fail
    // as to hold, so it waits its turn as a probe toward the ceiling.
    const ceiling = this.#ceiling;
    this.#ceiling = Infinity;
    if (
      ceiling !== Infinity && this.#bad === undefined && this.#good > 1 &&
      this.#good < ceiling
    ) {
      this.#bad = ceiling;
      this.#quiet = 0;
    }
    const bad = this.#bad;
    if (bad === undefined) this.#scale = this.#good * 1.25;
    else if (++this.#quiet >= this.#patience) {
      this.#scale = Math.max(this.#good * 1.1, (this.#good + bad) / 2);
      this.#quiet = 0;
    } else return;
    this.#stats.pace(this.perSecond);
  }

  /** Ms until a turn may go: 0 now, `Infinity` until a request ends. */
  #delay(turn: PaceTurn, now: number): number {
    if (this.#phase === "off") return 0;
    let at = this.#pausedUntil;
    if (this.#phase === "start") {
      if (this.#inflight >= this.#cap) return Infinity;
    } else if (this.#windowMs > 0) {
      at = Math.max(at, this.#windowRoom(turn));
    } else {
      if (this.#paced[0]) at = Math.max(at, this.#next[0]);
      if (this.#paced[1] && turn.inputTokens > 0) {
        at = Math.max(at, this.#next[1]);
      }
    }
    return at - now;
  }

  /**
   * When the learned window has room for the turn in each key that paces:
   * once the sends before the first one that must stay have left it.
   */
  #windowRoom(turn: PaceTurn): number {
    const log = this.#log;
    const amounts = [turn.requests, turn.inputTokens];
    let at = -Infinity;
    for (let k = 0; k < 2; k++) {
      if (!this.#paced[k] || !(this.#base[k]! > 0) || !amounts[k]) continue;
      const limit = this.#base[k]! * this.#scale * this.#windowMs;
      // The first send that may stay is the first with this much before it.
      const need = this.#sent[k]! + amounts[k]! - limit;
      let lo = this.#logHead / 3;
      let hi = log.length / 3;
      if (lo === hi || log[lo * 3 + 1 + k]! >= need) continue;
      while (lo + 1 < hi) { // log[lo] must leave; find the first that stays
        const mid = (lo + hi) >>> 1;
        if (log[mid * 3 + 1 + k]! >= need) hi = mid;
        else lo = mid;
      }
      at = Math.max(at, log[(hi - 1) * 3]! + this.#windowMs);
    }
    return at;
  }

  /** The turn goes now: count it and move the schedule on. */
  #take(turn: PaceTurn, now: number): void {
    if (this.#phase === "off") return;
    if (this.#firstSend < 0) this.#firstSend = this.#grownAt = now;
    turn.sentAt = now;
    turn.inflight = true;
    turn.before[0] = this.#sent[0];
    turn.before[1] = this.#sent[1];
    this.#sent[0] += turn.requests;
    this.#sent[1] += turn.inputTokens;
    this.#inflight++;
    this.#logSend(turn, now);
    if (this.#phase !== "pacing") return;
    if (now - this.#stretchStart >= this.#stretchMs) this.#endStretch(now);
    this.#stretchSent[0] += turn.requests;
    this.#stretchSent[1] += turn.inputTokens;
    if (this.#windowMs > 0) return;
    const amounts = [turn.requests, turn.inputTokens];
    for (let i = 0; i < 2; i++) {
      const rate = this.#base[i]! * this.#scale;
      if (rate > 0) {
        this.#next[i] = Math.max(this.#next[i]!, now) + amounts[i]! / rate;
      }
    }
  }

  /** Logs the send; drops those older than a stretch (70 s in the start) or the learned window. */
  #logSend(turn: PaceTurn, now: number): void {
    const log = this.#log;
    log.push(now, turn.before[0], turn.before[1]);
    const keep = this.#phase === "pacing"
      ? Math.max(this.#stretchMs, this.#windowMs)
      : LOG_START_MS;
    while (log[this.#logHead]! <= now - keep) this.#logHead += 3;
    if (this.#logHead > 3000 && this.#logHead * 2 > log.length) {
      log.splice(0, this.#logHead);
      this.#logHead = 0;
    }
  }

  /** Lets waiting turns go while they may; else arms a timer for the head. */
  #pump(): void {
    const q = this.#queue;
    const now = this.#clock.now();
    while (this.#head < q.length) {
      const turn = q[this.#head]!;
      if (turn.cancelled) {
        q[this.#head++] = undefined;
        continue;
      }
      const delay = this.#delay(turn, now);
      if (delay > 0) {
        if (delay !== Infinity) this.#arm(now + delay);
        else if (this.#cap < this.#maxCap) {
          this.#arm(Math.max(now, this.#grownAt + RAMP_MS));
        }
        break;
      }
      q[this.#head++] = undefined;
      if (turn.onAbort) turn.signal!.removeEventListener("abort", turn.onAbort);
      this.#take(turn, now);
      turn.resolve!();
    }
    if (this.#head === q.length) {
      q.length = this.#head = 0;
      this.#disarm();
    }
  }

  /** One timer at a time, for the earliest time something may change. */
  #arm(at: number): void {
    if (this.#timer && this.#timerAt <= at) return;
    this.#disarm();
    const timer = new AbortController();
    this.#timer = timer;
    this.#timerAt = at;
    this.#clock.sleep(at - this.#clock.now(), timer.signal).then(() => {
      if (this.#timer !== timer) return;
      this.#timer = undefined;
      this.#timerAt = Infinity;
      const now = this.#clock.now();
      if (
        this.#phase === "start" && this.#inflight >= this.#cap &&
        now - this.#grownAt >= RAMP_MS
      ) {
        const cap = this.#cap;
        this.#cap = Math.min(
          this.#maxCap,
          cap < 4 ? cap + 1 : Math.ceil(cap * 1.5),
        );
        this.#grownAt = now;
      }
      this.#pump();
    }, () => {});
  }

  #disarm(): void {
    this.#timer?.abort();
    this.#timer = undefined;
    this.#timerAt = Infinity;
  }
}

/**
 * Admission: one attempt's hold on capacity: an in-flight slot, then
 * (while no limits are known) its turn in the pace being found, then the
 * model's permit, then the key's, then the model's pause, re-stamped so
 * the windows count from the send. It is the one owner of the slot:
 * {@linkcode Admission.release} returns it once, whatever path ends the
 * attempt.
 */
class Admission {
  /** When the attempt began waiting, and when it was sent. */
  readonly queuedAt: number;
  sentAt = 0;
  #path: RequestPath;
  #lane: Lane;
  #cost: Cost;
  #state: "queued" | "waiting" | "sent" | "done" = "queued";
  #permit: Permit | undefined;
  #modelPermit: Permit | undefined;
  #ticket: CacheTicket | undefined;
  /** Its turn in the pace being found, when no limits are known. */
  turn: PaceTurn | undefined;

  constructor(
    path: RequestPath,
    lane: Lane,
    cost: Cost,
    ticket?: CacheTicket,
  ) {
    this.#path = path;
    this.#lane = lane;
    this.#cost = cost;
    this.#ticket = ticket;
    this.queuedAt = path.clock.now();
  }

  /** Waits for a slot and the permits; an aborted or failed wait holds nothing. */
  async admit(signal: AbortSignal | undefined): Promise<void> {
    const { gauge, clock, lanes } = this.#path;
    gauge.waiting++;
    gauge.observe(this.queuedAt);
    try {
      await this.#path.slots.acquire(signal);
    } catch (error) {
      gauge.waiting--;
      throw error;
    }
    this.#state = "waiting";
    const lane = this.#lane;
    try {
      const pacer = this.#path.pacer;
      if (pacer.active) {
        const turn = this.turn = pacer.turn(this.#cost);
        await pacer.wait(turn, signal);
      }
      if (lane !== lanes.key) {
        this.#modelPermit = await lane.limiter.acquire(this.#cost, { signal });
      }
      this.#permit = await lanes.key.limiter.acquire(this.#cost, { signal });
      // A 429 paused this model while we waited for the key's windows:
      // wait out the pause too, then count from the send.
      const paused = lane.limiter.pausedUntil - clock.now();
      if (lane !== lanes.key && paused > 0) {
        await clock.sleep(paused, signal);
        this.#permit.restamp();
      }
      // Held while the key's windows made us wait: it counts from now.
      if (this.#modelPermit && clock.now() > this.#modelPermit.at) {
        this.#modelPermit.restamp();
      }
      // A pause (a 429 answered meanwhile) held it after its turn: the
      // pace's schedule moved on, so it takes a new turn.
      const turn = this.turn;
      if (turn && pacer.pausedSince(turn)) {
        pacer.done(turn);
        await pacer.wait(this.turn = pacer.turn(this.#cost), signal);
      }

      // Aborted while it waited: never sent, so it uses nothing.
      if (signal?.aborted) throw signal.reason;
    } catch (error) {
      this.settle(zeroOf(this.#cost), false);
      this.release();
      this.#ticket?.end(false);
      throw signal?.aborted ? signal.reason : error;
    }
  }

  /**
   * A response body (or stream event) with usage: its prompt-cache figures
   * go to the stats and, the first time, tell the cache what became of the
   * prefix (waiting requests go on from here).
   */
  cacheSeen(usage: CacheUsage, count = true): void {
    if (count) this.#path.stats.cache(usage.read, usage.write);
    this.#ticket?.seen(usage, this.sentAt);
  }

  /** Marks the request sent: it counts as in flight from now. */
  send(): void {
    const gauge = this.#path.gauge;
    this.sentAt = this.#path.clock.now();
    this.#state = "sent";
    gauge.waiting--;
    gauge.active++;
    gauge.observe(this.sentAt);
  }

  /** Settles the permits to what the request really used. */
  settle(seen: Cost, count = true): void {
    this.#permit?.settle(seen);
    this.#modelPermit?.settle(seen);
    if (count) {
      this.#path.stats.tokens(seen.inputTokens ?? 0, seen.outputTokens ?? 0);
    }
  }

  /** Returns the slot (once). */
  release(): void {
    const state = this.#state;
    if (state === "done" || state === "queued") return;
    if (state === "waiting") this.#path.gauge.waiting--;
    else this.#path.gauge.active--;
    this.#state = "done";
    this.#path.slots.release();
    if (this.turn) this.#path.pacer.done(this.turn);
  }

  /** Records the attempt in the stats; it is over (see {@linkcode CacheTicket.end}). */
  record(status: number, kind?: string): void {
    this.#ticket?.end(status >= 200 && status < 300);
    const now = this.#path.clock.now();
    this.#path.stats.attempt(
      this.sentAt - this.queuedAt,
      now - this.sentAt,
      status,
      kind,
    );
  }
}

/**
 * The wiring of {@linkcode rateLimitedFetch}: normalise the request, pick
 * its lane, admit, send, learn from the headers, read the response, retry.
 */
class RequestPath {
  readonly clock: Clock;
  readonly stats: Stats;
  readonly slots: Semaphore;
  readonly lanes: ModelLanes;
  readonly gauge: FlightGauge;
  readonly cache: PromptCache;
  readonly pacer: PaceFinder;
  /** Per limiter, the windows that are a provider's short copies (`key/ms`). */
  #short = new WeakMap<Limiter, Set<string>>();
  #s: FetchSettings;

  constructor(settings: FetchSettings) {
    this.#s = settings;
    this.clock = settings.clock;
    this.stats = settings.stats;
    this.slots = new Semaphore(settings.concurrency);
    this.lanes = new ModelLanes(settings.limiter, settings.lanes);
    this.gauge = new FlightGauge(this.stats, this.lanes);
    this.cache = new PromptCache(settings.clock);
    this.pacer = new PaceFinder(
      settings.clock,
      settings.stats,
      settings.concurrency,
      settings.findPace && settings.lanes.userKeys.size === 0 &&
        settings.limiter.usage().length === 0,
    );
  }

  /** One call of the wrapped fetch, retries included. */
  async call(
    input: RequestInfo | URL,
    init: RequestInit | undefined,
  ): Promise<Response> {
    const stats = this.stats;
    stats.call();
    let request: OutgoingRequest;
    try {
      request = await normalizeRequest(input, init);
    } catch (error) {
      stats.end(false, "invalid");
      throw error;
    }
    const cost = this.#s.estimate(request.url, request.json);
    const match = providerOf(request.url);
    const lane = this.lanes.of(
      request.json,
      match?.provider.modelOf?.(request.url),
    );
    const prefix = this.#cachePrefix(request, match);
    const provider = match?.provider;
    if (provider?.shortWindows && !this.#short.has(this.lanes.key.limiter)) {
      shortWindows(this.lanes.key.limiter, provider, this.#short);
    }
    const retry = this.#s.retry;
    try {
      const response = retry === undefined || !request.replayable
        ? await this.#attempt(request, lane, cost, prefix, provider)
        : await retryChecked(
          () => this.#attempt(request, lane, cost, prefix, provider),
          { ...retry, signal: request.signal },
        );
      stats.end(response.ok);
      return response;
    } catch (error) {
      if (
        (error instanceof RetryError || error instanceof QuotaError) &&
        error.response
      ) {
        stats.end(false);
        return error.response;
      }
      stats.end(false, request.signal?.aborted ? "aborted" : undefined);
      throw error;
    }
  }

  /** The request's cacheable prefix, when prompt caching is followed. */
  #cachePrefix(
    request: OutgoingRequest,
    match: ProviderMatch | undefined,
  ): CachePrefix | undefined {
    const json = request.json;
    if (!this.#s.promptCache || !json || typeof json !== "object") {
      return undefined;
    }
    return match?.endpoint.cachePrefix?.(json as Record<string, unknown>);
  }

  /** One attempt: its place in the prompt cache, admit, send, and read the response. */
  async #attempt(
    request: OutgoingRequest,
    lane: Lane,
    cost: Cost,
    prefix: CachePrefix | undefined,
    provider: Provider | undefined,
  ): Promise<Response> {
    const signal = request.signal;
    let ticket: CacheTicket | undefined;
    if (prefix) {
      ticket = await this.cache.claim(prefix, signal);
      const key = this.lanes.key.limiter;
      cost = ticket.charge(cost, this.#s.cacheReadCounts, [
        lane.limiter,
        ...(lane.limiter === key ? [] : [key]),
      ]);
    }
    const admission = new Admission(this, lane, cost, ticket);
    await admission.admit(signal);
    admission.send();
    let response: Response;
    track(lane, cost, 1);
    try {
      response = await this.#s.fetch(request.url, { ...request.init, signal });
    } catch (error) {
      track(lane, cost, -1);
      admission.release();
      admission.record(0, signal?.aborted ? "aborted" : "network");
      throw error;
    }
    track(lane, cost, -1);
    const learned = this.#s.learnMs === undefined ? "none" : learnLimits(
      response.headers,
      lane,
      this.#s.lanes.userKeys,
      this.#s.learnMs,
      cost,
    );
    if (learned !== "none") this.pacer.off();
    // Short copies follow a learned limit only when it changed.
    if (learned === "changed" && provider?.shortWindows) {
      shortWindows(lane.limiter, provider, this.#short);
    }
    return readResponse(this, request.url, response, admission, lane);
  }

  /** A success: usage settles the permits, and the margins may narrow. */
  succeeded(admission: Admission, lane: Lane, seen: Cost | undefined): void {
    if (seen) admission.settle(seen);
    lane.margins.ok();
    if (lane !== this.lanes.key) this.lanes.key.margins.ok();
  }

  /** The real cost in a body, by the `usage` option. */
  usage(body: unknown): Cost | undefined {
    return this.#s.usage(body);
  }

  /**
   * A rate-limit 429 the limiter admitted: pause the lane for the
   * server-told wait and widen the margins (our view of the window is off).
   */
  rateLimited(
    response: Response,
    lane: Lane,
    admission: Admission,
    json: unknown,
  ): void {
    const told = parseRetryAfter(response.headers) ?? retryDelayIn(json);
    const key = this.lanes.key;
    if (this.#s.learnMs !== undefined && learnFromQuota(json, lane, this.#s)) {
      this.pacer.off();
    }
    if (admission.turn) {
      this.pacer.refused(admission.turn, told, limitNamedIn(json));
    }
    if (told !== undefined) {
      const until = this.clock.now() + told;
      lane.limiter.pauseUntil(until);
      // Limits shared through Redis: the server's wait holds every
      // process on the key, whatever the model.
      if (key.limiter instanceof RedisRateLimiter && lane !== key) {
        key.limiter.pauseUntil(until);
      }
    }
    let widened = false;
    if (this.#s.adaptiveMargin) {
      widened = lane.margins.widen();
      if (lane !== key) widened = key.margins.widen() || widened;
    }
    this.stats.unexpected429(widened);
  }
}

/**
 * A provider's short windows ({@linkcode Provider.shortWindows}): each
 * window of its keys that is not itself a short copy is also kept as
 * `limit / d` per `ms / d`, its margin scaled alike. Copies follow their
 * window's limit when it changes.
 */
function shortWindows(
  limiter: Limiter,
  provider: Provider,
  done: WeakMap<Limiter, Set<string>>,
): void {
  const short = provider.shortWindows!;
  let made = done.get(limiter);
  if (!made) done.set(limiter, made = new Set());
  for (const w of limiter.usage()) {
    if (!short.keys.includes(w.key) || made.has(`${w.key}/${w.ms}`)) continue;
    for (const d of short.divisors) {
      const limit = Math.floor(w.limit / d);
      if (limit < 1) continue;
      made.add(`${w.key}/${w.ms / d}`);
      limiter.setLimit(w.key, limit, w.ms / d);
      limiter.setMargin(w.key, w.marginMs / d, w.ms / d);
    }
  }
}

/** Adds (or removes) a request's estimate to its lane's in-flight amounts. */
function track(lane: Lane, cost: Cost, sign: 1 | -1): void {
  const inflight = lane.inflight;
  for (const k of Object.keys(cost)) {
    inflight[k] = (inflight[k] ?? 0) + sign * cost[k]!;
  }
  if (cost.tokens === undefined) {
    inflight.tokens = (inflight.tokens ?? 0) +
      sign * ((cost.inputTokens ?? 0) + (cost.outputTokens ?? 0));
  }
}

/**
 * Response reading: an SSE stream passes through, watched for usage; a
 * JSON body is read once, settled from, and handed back as a new
 * `Response`; a 429 pauses and widens unless it is a quota 429.
 */
async function readResponse(
  path: RequestPath,
  url: string,
  response: Response,
  admission: Admission,
  lane: Lane,
): Promise<Response> {
  const type = response.headers.get("content-type") ?? "";
  const provider = providerOf(url)?.provider;
  if (response.ok && type.includes("text/event-stream") && response.body) {
    return observeStream(response, provider, path, admission, (seen) => {
      admission.release();
      admission.record(response.status);
      path.succeeded(admission, lane, seen);
    });
  }
  let text: string | undefined;
  if (type.includes("json") && response.body) {
    try {
      text = await response.text();
    } catch (error) {
      admission.release();
      admission.record(0, "network");
      throw error;
    }
  }
  admission.release();
  const json = text === undefined ? undefined : parseJSON(text);
  let kind: string | undefined;
  if (response.ok) {
    const cached = json === undefined
      ? undefined
      : cacheUsageIn(provider, json);
    if (cached) admission.cacheSeen(cached);
    path.succeeded(
      admission,
      lane,
      json === undefined ? undefined : path.usage(json),
    );
  } else if (response.status === 429) {
    if (quotaCode(json)) kind = "quota";
    else path.rateLimited(response, lane, admission, json);
  }
  admission.record(response.status, kind);
  if (text === undefined) return response;
  return readAgain(response, text, json);
}

/** Property descriptors made configurable, so a later wrapper can redefine them too. */
function redefinable(map: PropertyDescriptorMap): PropertyDescriptorMap {
  for (const key of Object.keys(map)) map[key]!.configurable = true;
  return map;
}

/**
 * The response whose body was read for its usage, readable again by the
 * caller: the same object, its reading methods answering from the text
 * (`json()` hands over the object already parsed, once). A new `Response`
 * would copy every header and build new body machinery — a fifth of the
 * request path's CPU against a local server. Where the object cannot take
 * own properties, a new `Response` it is.
 */
function readAgain(response: Response, text: string, json: unknown): Response {
  let used = false;
  let parsed = json;
  let stream: ReadableStream<Uint8Array> | null | undefined;
  const take = <T>(read: () => T): Promise<T> => {
    if (used) {
      return Promise.reject(new TypeError("Body has already been used"));
    }
    used = true;
    try {
      return Promise.resolve(read());
    } catch (error) {
      return Promise.reject(error);
    }
  };
  const bytes = (): Uint8Array<ArrayBuffer> => new TextEncoder().encode(text);
  try {
    Object.defineProperties(
      response,
      redefinable({
        bodyUsed: { get: () => used },
        body: {
          get: () =>
            stream ??= used ? null : new ReadableStream<Uint8Array>({
              // Pulled only when read (high-water mark 0): then it is used.
              pull(controller) {
                used = true;
                controller.enqueue(bytes());
                controller.close();
              },
            }, { highWaterMark: 0 }),
        },
        text: { value: () => take(() => text) },
        json: {
          value: () =>
            take(() => {
              const out = parsed === undefined ? JSON.parse(text) : parsed;
              parsed = undefined;
              return out;
            }),
        },
        arrayBuffer: { value: () => take(() => bytes().buffer) },
        bytes: { value: () => take(bytes) },
        blob: {
          value: () =>
            take(() =>
              new Blob([text], {
                type: response.headers.get("content-type") ?? "",
              })
            ),
        },
        formData: {
          value: () =>
            take(() =>
              new Response(text, { headers: response.headers }).formData()
            ),
        },
        clone: {
          value: () =>
            new Response(text, {
              status: response.status,
              statusText: response.statusText,
              headers: response.headers,
            }),
        },
      }),
    );
    return response;
  } catch {
    return new Response(text, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  }
}

/** The prompt-cache figures in a body, read by its provider's description (or the first that reads them). */
function cacheUsageIn(
  provider: Provider | undefined,
  body: unknown,
): CacheUsage | undefined {
  if (provider) return provider.cacheUsage(body);
  for (const p of providers) {
    const usage = p.cacheUsage(body);
    if (usage) return usage;
  }
  return undefined;
}

/** `JSON.parse`, or `undefined` for text that is not JSON. */
function parseJSON(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** A cost of the same keys, all zero: settles a permit to nothing. */
function zeroOf(cost: Cost): Cost {
  const zero: Cost = {};
  for (const k of Object.keys(cost)) zero[k] = 0;
  return zero;
}

/**
 * Widens every window's margin after a 429 the limiter did not expect (the
 * server saw our requests closer together than we sent them), and narrows
 * it back slowly after a quiet stretch, so a long run settles at zero 429s.
 */
class MarginTuner {
  #limiter: Limiter;
  #clock: Clock;
  #base = new Map<string, number>();
  #quiet = 0;
  #last = -Infinity;

  constructor(limiter: Limiter, clock: Clock) {
    this.#limiter = limiter;
    this.#clock = clock;
  }

  /**
   * Doubles each margin (at least 50 ms, at most 10 % of the window), at
   * most once per 500 ms: one burst of 429s is one signal, not ten.
   */
  widen(): boolean {
    this.#quiet = 0;
    const now = this.#clock.now();
    if (now - this.#last < 500) return false;
    this.#last = now;
    let changed = false;
    for (const w of this.#limiter.usage()) {
      const id = `${w.key}/${w.ms}`;
      if (!this.#base.has(id)) this.#base.set(id, w.marginMs);
      const next = Math.min(Math.max(w.marginMs * 2, 50), w.ms / 10);
      if (next > w.marginMs) {
        this.#limiter.setMargin(w.key, next, w.ms);
        changed = true;
      }
    }
    return changed;
  }

  /** After 100 quiet successes, takes a quarter of the extra margin back. */
  ok(): void {
    if (this.#base.size === 0 || ++this.#quiet < 100) return;
    this.#quiet = 0;
    for (const w of this.#limiter.usage()) {
      const base = this.#base.get(`${w.key}/${w.ms}`);
      if (base === undefined || w.marginMs <= base) continue;
      this.#limiter.setMargin(w.key, Math.max(base, w.marginMs * 0.75), w.ms);
    }
  }
}

/**
 * Passes an SSE response through to the caller while watching its usage
 * events; calls `done(usage)` once, when the stream ends, fails or is
 * cancelled. The first prompt-cache figures (Anthropic's `message_start`)
 * go to the admission at once: requests waiting for the prefix go on while
 * this one still streams.
 */
function observeStream(
  response: Response,
  provider: Provider | undefined,
  path: RequestPath,
  admission: Admission,
  done: (seen: Cost | undefined) => void,
): Response {
  const fields = provider ? [provider.usageInEvent] : USAGE_IN_EVENT;
  const reader = response.body!.getReader();
  const parser = new SseParser();
  const decoder = new TextDecoder();
  let seen: Cost | undefined;
  let cached: CacheUsage | undefined;
  let finished = false;
  const finish = (): void => {
    if (finished) return;
    finished = true;
    if (cached) admission.cacheSeen(cached);
    done(seen);
  };
  const watch = (events: SseEvent[]): void => {
    for (const e of events) {
      if (!e.data.includes("usage")) continue;
      let data: Record<string, unknown>;
      try {
        data = JSON.parse(e.data);
      } catch {
        continue;
      }
      // Anthropic: message_start holds input usage; message_delta the
      // cumulative output (take the last, do not sum). OpenAI: a final chunk.
      // Responses: response.completed holds the whole response.
      let body: unknown = data;
      for (const f of fields) {
        if (data[f] !== undefined && data[f] !== null) {
          body = data[f];
          break;
        }
      }
      const u = path.usage(body);
      if (u) seen = { ...seen, ...u };
      const c = cacheUsageIn(provider, body);
      if (c && (!cached || c.read + c.write > 0)) {
        if (!cached) admission.cacheSeen(c, false);
        cached = c;
      }
    }
  };
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { value, done: end } = await reader.read();
        if (end) {
          watch(parser.end());
          finish();
          controller.close();
          return;
        }
        watch(parser.push(decoder.decode(value, { stream: true })));
        controller.enqueue(value);
      } catch (error) {
        finish();
        controller.error(error);
      }
    },
    cancel(reason) {
      finish();
      return reader.cancel(reason);
    },
  });
  return new Response(body, {
    status: response.status,
    statusText: response.statusText,
    headers: response.headers,
  });
}

// =============================================================================
// Clients
// =============================================================================

/** Reads an environment variable in Node, Bun or Deno; `undefined` if absent or not permitted. */
function env(name: string): string | undefined {
  try {
    const g = globalThis as {
      process?: { env?: Record<string, string | undefined> };
      Deno?: { env?: { get(n: string): string | undefined } };
    };
    if (g.Deno?.env) return g.Deno.env.get(name) || undefined;
    return g.process?.env?.[name] || undefined;
  } catch {
    return undefined; // e.g. Deno without --allow-env
  }
}

/** A function that POSTs a JSON body to `url` through `f` (headers built once). */
function poster(
  f: RateLimitedFetch,
  url: string,
  headers: Record<string, string>,
): (body: unknown, signal?: AbortSignal) => Promise<Response> {
  return (body, signal) =>
    f(url, { method: "POST", headers, body: JSON.stringify(body), signal });
}

/** The parsed JSON of a successful response; for a failed one, the right error. */
async function okJSON<T>(response: Response): Promise<T> {
  if (!response.ok) return failure(response);
  return await response.json() as T;
}

/** Throws the right error for a failed response: QuotaError or HttpError. */
async function failure(response: Response): Promise<never> {
  const text = await response.text().catch(() => "");
  const error = HttpError.from(response, text);
  const quota = response.status === 429 ? quotaCode(error.body) : undefined;
  if (quota) throw new QuotaError(quota, 1, error);
  throw error;
}

/**
 * Options shared by the thin clients.
 *
 * @example
 * ```ts
 * import { type ClientOptions, openai } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "chatcmpl-1",
 *     choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
 *     usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
 *   }));
 * const options: ClientOptions = { apiKey: "k", baseURL: "https://relay.example.com/v1", limiter: { rpm: 100 }, fetch };
 * const c = await openai(options).chat({ model: "m", messages: [{ role: "user", content: "Hi" }] });
 * if (c.choices[0]?.message.content !== "hi") throw new Error();
 * ```
 */
export interface ClientOptions extends RateLimitedFetchOptions {
  /** The API key. Default: `ANTHROPIC_API_KEY` / `OPENAI_API_KEY` from the environment. */
  apiKey?: string;
  /** The API base URL (relays welcome). Default: `ANTHROPIC_BASE_URL` / `OPENAI_BASE_URL`, else the provider's. */
  baseURL?: string;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
}

/**
 * A content block of an Anthropic message.
 *
 * @example
 * ```ts
 * import { anthropic } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "msg_1", type: "message", role: "assistant", model: "m", stop_reason: "end_turn",
 *     content: [{ type: "text", text: "hello" }],
 *     usage: { input_tokens: 5, output_tokens: 1 },
 *   }));
 * const claude = anthropic({ apiKey: "k", fetch });
 * const msg = await claude.messages({ model: "m", max_tokens: 10, messages: [{ role: "user", content: "Hi" }] });
 * const block = msg.content[0]!;
 * if (block.type !== "text" || block.text !== "hello") throw new Error();
 * ```
 */
export interface AnthropicContentBlock {
  /** `"text"`, `"tool_use"`, `"thinking"` … */
  type: string;
  /** The text of a text block. */
  text?: string;
  /** Other fields, as the API sent them. */
  [field: string]: unknown;
}

/**
 * An Anthropic Messages request body (the fields paceline reads; others pass through).
 *
 * @example
 * ```ts
 * import type { AnthropicRequest } from "./mod.ts";
 *
 * const request: AnthropicRequest = {
 *   model: "claude-sonnet-4-5",
 *   max_tokens: 256,
 *   system: "Answer in one sentence.",
 *   messages: [{ role: "user", content: "你好" }],
 * };
 * if (request.messages.length !== 1) throw new Error();
 * ```
 */
export interface AnthropicRequest {
  /** The model, e.g. `"claude-sonnet-4-5"`. */
  model: string;
  /** The most output tokens; also what the limiter charges for output up front. */
  max_tokens: number;
  /** The conversation so far. */
  messages: {
    role: "user" | "assistant";
    content: string | AnthropicContentBlock[];
  }[];
  /** A system prompt. */
  system?: string | AnthropicContentBlock[];
  /** Any other Messages API field. */
  [field: string]: unknown;
}

/**
 * An Anthropic Messages response.
 *
 * @example
 * ```ts
 * import { anthropic } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "msg_1", type: "message", role: "assistant", model: "m", stop_reason: "end_turn",
 *     content: [{ type: "text", text: "hello" }],
 *     usage: { input_tokens: 5, output_tokens: 1 },
 *   }));
 * const claude = anthropic({ apiKey: "k", fetch });
 * const msg = await claude.messages({ model: "m", max_tokens: 10, messages: [{ role: "user", content: "Hi" }] });
 * if (msg.usage.output_tokens !== 1 || msg.stop_reason !== "end_turn") throw new Error();
 * ```
 */
export interface AnthropicMessage {
  /** `msg_…` */
  id: string;
  /** `"message"` */
  type: string;
  /** `"assistant"` */
  role: string;
  /** The model that answered. */
  model: string;
  /** The answer's blocks. */
  content: AnthropicContentBlock[];
  /** Why it stopped: `"end_turn"`, `"max_tokens"` … */
  stop_reason: string | null;
  /** Token usage. */
  usage: {
    input_tokens: number;
    output_tokens: number;
    cache_creation_input_tokens?: number | null;
    cache_read_input_tokens?: number | null;
    [field: string]: unknown;
  };
  /** Other fields, as the API sent them. */
  [field: string]: unknown;
}

/**
 * One Anthropic streaming event (`message_start`, `content_block_delta`, …).
 *
 * @example
 * ```ts
 * import type { AnthropicStreamEvent } from "./mod.ts";
 *
 * const e: AnthropicStreamEvent = { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: "Hi" } };
 * if (e.type !== "content_block_delta") throw new Error();
 * ```
 */
export interface AnthropicStreamEvent {
  /** The event type. */
  type: string;
  /** Other fields, as the API sent them. */
  [field: string]: unknown;
}

/**
 * A streaming response: iterate its events, or await its text or final message.
 *
 * @example
 * ```ts
 * import { anthropic } from "./mod.ts";
 *
 * const sse = [
 *   ["message_start", { type: "message_start", message: { id: "m1", type: "message", role: "assistant", model: "m", content: [], stop_reason: null, usage: { input_tokens: 3, output_tokens: 1 } } }],
 *   ["content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } }],
 *   ["content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: "Hi!" } }],
 *   ["message_delta", { type: "message_delta", delta: { stop_reason: "end_turn" }, usage: { output_tokens: 2 } }],
 *   ["message_stop", { type: "message_stop" }],
 * ].map(([event, data]) => `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`).join("");
 * const fetch = () => Promise.resolve(new Response(sse, { headers: { "content-type": "text/event-stream" } }));
 * const stream = anthropic({ apiKey: "k", fetch }).stream({ model: "m", max_tokens: 10, messages: [{ role: "user", content: "Hi" }] });
 * const final = await stream.finalMessage();
 * if (final.content[0]?.text !== "Hi!" || final.usage.output_tokens !== 2) throw new Error();
 * ```
 */
export interface AnthropicStream extends AsyncIterable<AnthropicStreamEvent> {
  /** All text deltas, joined (consumes the stream if not yet consumed). */
  text(): Promise<string>;
  /** The message assembled from the events (consumes the stream if not yet consumed). */
  finalMessage(): Promise<AnthropicMessage>;
}

/**
 * A multi-turn conversation; see {@linkcode AnthropicClient.conversation}.
 *
 * @example
 * ```ts
 * import { anthropic } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "msg_1", type: "message", role: "assistant", model: "m", stop_reason: "end_turn",
 *     content: [{ type: "text", text: "hello" }],
 *     usage: { input_tokens: 5, output_tokens: 1 },
 *   }));
 * const claude = anthropic({ apiKey: "k", fetch });
 * const chat = claude.conversation({ model: "m", max_tokens: 10 });
 * await chat.say("Hi");
 * if (chat.history.length !== 2 || chat.history[1]!.role !== "assistant") throw new Error();
 * ```
 */
export interface Conversation {
  /** The messages so far, user and assistant turns alternating. */
  readonly history: AnthropicRequest["messages"];
  /**
   * Sends a user turn with the history; appends both turns once it succeeds.
   *
   * @param content The user's message.
   * @param options `signal` to abort.
   * @returns The assistant's text.
   */
  say(content: string, options?: { signal?: AbortSignal }): Promise<string>;
}

/**
 * The Anthropic client from {@linkcode anthropic}.
 *
 * @example
 * ```ts
 * import { anthropic } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "msg_1", type: "message", role: "assistant", model: "m", stop_reason: "end_turn",
 *     content: [{ type: "text", text: "hello" }],
 *     usage: { input_tokens: 5, output_tokens: 1 },
 *   }));
 * const claude = anthropic({ apiKey: "k", fetch });
 * await claude.messages({ model: "m", max_tokens: 10, messages: [{ role: "user", content: "Hi" }] });
 * if (claude.stats.toJSON().outputTokens !== 1) throw new Error();
 * ```
 */
export interface AnthropicClient {
  /**
   * `POST /v1/messages`, rate limited and retried.
   *
   * @throws {HttpError} For an HTTP error after retries.
   * @throws {QuotaError} When the quota or spend limit is exhausted.
   */
  messages(
    body: AnthropicRequest,
    options?: { signal?: AbortSignal },
  ): Promise<AnthropicMessage>;
  /** `POST /v1/messages` with `stream: true`; the request starts on first use. */
  stream(
    body: AnthropicRequest,
    options?: { signal?: AbortSignal },
  ): AnthropicStream;
  /** A conversation that keeps its history; `defaults` are sent with every turn. */
  conversation(defaults: Omit<AnthropicRequest, "messages">): Conversation;
  /** The rate-limited fetch underneath (usable with the official SDK too). */
  readonly fetch: RateLimitedFetch;
  /** Its stats. */
  readonly stats: Stats;
  /** Its limiter. */
  readonly limiter: Limiter;
}

/**
 * Options for {@linkcode anthropic}.
 *
 * @example
 * ```ts
 * import { anthropic, type AnthropicOptions } from "./mod.ts";
 *
 * const options: AnthropicOptions = {
 *   apiKey: "k",
 *   baseURL: "https://relay.example.com",
 *   auth: "bearer", // some relays want Authorization: Bearer
 *   version: "2023-06-01",
 *   limiter: { rpm: 50 },
 * };
 * if (typeof anthropic(options).messages !== "function") throw new Error();
 * ```
 */
export interface AnthropicOptions extends ClientOptions {
  /** The `anthropic-version` header. Default `"2023-06-01"`. */
  version?: string;
  /** Send the key as `x-api-key` (default, the official API) or `Authorization: Bearer` (some relays). */
  auth?: "x-api-key" | "bearer";
}

function clientSetup(
  options: ClientOptions,
  provider: Provider,
): { key: string | undefined; base: string; fetch: RateLimitedFetch } {
  const { keyVar, baseURLVar: urlVar, baseURL: defaultURL, name: where } =
    provider;
  const { apiKey, baseURL, headers: _h, ...fetchOptions } = options;
  const key = apiKey ?? env(keyVar) ??
    (provider.altKeyVar ? env(provider.altKeyVar) : undefined);
  const base = (baseURL ?? env(urlVar) ?? defaultURL).replace(/\/+$/, "");
  if (key === undefined && base === defaultURL) {
    throw new TypeError(
      `${where}: no API key: pass 'apiKey' or set ${keyVar} (or point 'baseURL' at a relay that needs none)`,
    );
  }
  if (
    key !== undefined &&
    (typeof key !== "string" || !/^[\x21-\x7e]+$/.test(key))
  ) {
    // Never echo the key itself.
    throw new TypeError(
      `${where}: the API key (${typeof key}, ${
        String(key).length
      } characters) is empty or has characters an HTTP header cannot carry (spaces, newlines, non-ASCII such as "…")`,
    );
  }
  for (const k of ["version", "auth"]) {
    delete (fetchOptions as Record<string, unknown>)[k];
  }
  return { key, base, fetch: rateLimitedFetch(fetchOptions) };
}

/**
 * A small typed client for the Anthropic Messages API over
 * {@linkcode rateLimitedFetch}: for scripts with no SDK. Key and base URL
 * from the options or `ANTHROPIC_API_KEY` / `ANTHROPIC_BASE_URL`; any
 * {@linkcode RateLimitedFetchOptions} (limits, concurrency, retry …) too.
 * Errors are {@linkcode HttpError}s (status, provider error type, message,
 * request id — never the key) or {@linkcode QuotaError}s.
 *
 * @param options Key, base URL, version, limits; see {@linkcode AnthropicOptions}.
 * @returns The client.
 * @throws {TypeError} If no key is given or set and no `baseURL` either.
 *
 * @example
 * ```ts ignore
 * import { anthropic } from "./mod.ts";
 *
 * const claude = anthropic({ limiter: { rpm: 50, itpm: 30_000, otpm: 8_000 } });
 * const msg = await claude.messages({
 *   model: "claude-sonnet-4-5",
 *   max_tokens: 256,
 *   messages: [{ role: "user", content: "你好" }],
 * });
 * console.log(msg.content[0]?.text, claude.stats.report());
 * ```
 */
export function anthropic(options: AnthropicOptions = {}): AnthropicClient {
  const { version = "2023-06-01", auth = "x-api-key", headers = {} } = options;
  if (auth !== "x-api-key" && auth !== "bearer") {
    throw new TypeError(
      `anthropic 'auth' must be "x-api-key" or "bearer": received ${
        String(auth)
      }`,
    );
  }
  const p = anthropicProvider;
  const { key, base, fetch: f } = clientSetup(options, p);
  const h: Record<string, string> = {
    ...p.headers(undefined),
    "anthropic-version": version,
  };
  if (key !== undefined) {
    if (auth === "bearer") h["authorization"] = `Bearer ${key}`;
    else h["x-api-key"] = key;
  }
  const send = poster(f, p.url(base, "/v1/messages"), { ...h, ...headers });
  const messages = async (
    body: AnthropicRequest,
    opts: { signal?: AbortSignal } = {},
  ): Promise<AnthropicMessage> =>
    okJSON<AnthropicMessage>(
      await send({ ...body, stream: false }, opts.signal),
    );
  const stream = (
    body: AnthropicRequest,
    opts: { signal?: AbortSignal } = {},
  ): AnthropicStream => {
    const events = new AssembledStream<AnthropicStreamEvent>(
      p,
      () => send(p.streamBody({ ...body }), opts.signal),
    );
    const final = (): AnthropicMessage => ({
      id: "",
      type: "message",
      role: "assistant",
      model: body.model,
      content: [],
      stop_reason: null,
      usage: { input_tokens: 0, output_tokens: 0 },
      ...events.result(),
    } as unknown as AnthropicMessage);
    return {
      [Symbol.asyncIterator]: () => events.iterate("anthropic"),
      async text() {
        await events.drain();
        return final().content.map((b) => b.text ?? "").join("");
      },
      async finalMessage() {
        await events.drain();
        return final();
      },
    };
  };
  return {
    messages,
    stream,
    conversation: (defaults) => conversation(messages, defaults),
    fetch: f,
    stats: f.stats,
    limiter: f.limiter,
  };
}

/** A multi-turn conversation over `messages`, keeping the history. */
function conversation(
  messages: AnthropicClient["messages"],
  defaults: Omit<AnthropicRequest, "messages">,
): Conversation {
  const history: AnthropicRequest["messages"] = [];
  return {
    history,
    async say(content, opts = {}) {
      const turn = { role: "user" as const, content };
      const reply = await messages(
        { ...defaults, messages: [...history, turn] } as AnthropicRequest,
        opts,
      );
      const text = reply.content.map((b) => b.text ?? "").join("");
      history.push(turn, { role: "assistant", content: reply.content });
      return text;
    },
  };
}

/**
 * A streamed response, as the thin clients hand it out: its events to
 * iterate once (each folded into the provider's assembler as it passes),
 * or drained for the assembled result. An error event or a stream cut
 * short throws an {@linkcode HttpError}.
 */
class AssembledStream<E> {
  #provider: Provider;
  #send: () => Promise<Response>;
  #assembler: StreamAssembler | undefined;
  #started: AsyncGenerator<E> | undefined;
  #consumed = false;

  constructor(provider: Provider, send: () => Promise<Response>) {
    this.#provider = provider;
    this.#send = send;
  }

  /** The events, once. */
  iterate(who: string): AsyncGenerator<E> {
    if (this.#consumed) throw new TypeError(`${who} stream: already consumed`);
    this.#consumed = true;
    return this.#started ??= this.#events();
  }

  /** Reads the stream to its end (unless it is being or was iterated). */
  async drain(): Promise<void> {
    if (this.#consumed) return;
    this.#consumed = true;
    this.#started ??= this.#events();
    for await (const _ of this.#started);
  }

  /** What was assembled so far. */
  result(): Record<string, unknown> {
    return this.#assembler?.result() ?? {};
  }

  async *#events(): AsyncGenerator<E> {
    const response = await this.#send();
    if (!response.ok) return failure(response);
    const assembler = this.#assembler = this.#provider.assembler(
      response.headers,
    );
    for await (const e of sseEvents(response)) {
      const data = e.data === "[DONE]" ? e.data : parseJSON(e.data);
      if (data === undefined) continue;
      assembler.add(data);
      if (data === "[DONE]") break;
      yield data as E;
    }
    if (!assembler.complete) {
      throw cutShort(this.#provider.streamEnd, response.headers);
    }
  }
}

/**
 * Reads a streamed (SSE) response to its end and returns the body the
 * same request would have returned whole, per the provider's assembler.
 *
 * @param provider The provider the request went to.
 * @param response A successful streamed response.
 * @returns The assembled body.
 * @throws {HttpError} For an error event in the stream, or a stream cut short.
 *
 * @example
 * ```ts
 * import { assembleStream, openaiProvider } from "./mod.ts";
 *
 * const sse = 'data: {"id":"c1","choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n';
 * const body = await assembleStream(openaiProvider, new Response(sse));
 * if ((body.choices as { message: { content: string } }[])[0]?.message.content !== "Hi") throw new Error();
 * ```
 */
export async function assembleStream(
  provider: Provider,
  response: Response,
): Promise<Record<string, unknown>> {
  const stream = new AssembledStream<unknown>(
    provider,
    () => Promise.resolve(response),
  );
  await stream.drain();
  return stream.result();
}

/** The server-sent events of a response body. */
async function* sseEvents(response: Response): AsyncGenerator<SseEvent> {
  const parser = new SseParser();
  const decoder = new TextDecoder();
  const reader = response.body!.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.end();
  } finally {
    await reader.cancel().catch(() => {});
  }
}

/**
 * An OpenAI-style chat completions request (fields paceline reads; others pass through).
 *
 * @example
 * ```ts
 * import type { ChatRequest } from "./mod.ts";
 *
 * const request: ChatRequest = { model: "gpt-4o-mini", max_completion_tokens: 100, messages: [{ role: "user", content: "Hi" }] };
 * if (request.messages[0]?.role !== "user") throw new Error();
 * ```
 */
export interface ChatRequest {
  /** The model. */
  model: string;
  /** The conversation. */
  messages: {
    role: string;
    content: string | unknown[] | null;
    [field: string]: unknown;
  }[];
  /** The most output tokens (older name). */
  max_tokens?: number;
  /** The most output tokens. */
  max_completion_tokens?: number;
  /** Any other field. */
  [field: string]: unknown;
}

/**
 * An OpenAI-style chat completion.
 *
 * @example
 * ```ts
 * import { type ChatCompletion, openai } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "chatcmpl-1",
 *     choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
 *     usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
 *   }));
 * const c: ChatCompletion = await openai({ apiKey: "k", fetch }).chat({ model: "m", messages: [{ role: "user", content: "Hi" }] });
 * if (c.usage?.total_tokens !== 4) throw new Error();
 * ```
 */
export interface ChatCompletion {
  /** `chatcmpl-…` */
  id: string;
  /** The choices; usually one. */
  choices: {
    index: number;
    message: { role: string; content: string | null; [field: string]: unknown };
    finish_reason: string | null;
  }[];
  /** Token usage. */
  usage?: {
    prompt_tokens: number;
    completion_tokens: number;
    total_tokens: number;
  };
  /** Other fields, as the API sent them. */
  [field: string]: unknown;
}

/**
 * One streamed chat completion chunk.
 *
 * @example
 * ```ts
 * import type { ChatChunk } from "./mod.ts";
 *
 * const chunk: ChatChunk = { choices: [{ index: 0, delta: { content: "Hi" }, finish_reason: null }], usage: null };
 * if (chunk.choices[0]?.delta.content !== "Hi") throw new Error();
 * ```
 */
export interface ChatChunk {
  /** Deltas per choice. */
  choices: {
    index: number;
    delta: { content?: string | null; [field: string]: unknown };
    finish_reason: string | null;
  }[];
  /** Present on the last chunk when `stream_options.include_usage` is set. */
  usage?: {
    prompt_tokens: number;
    completion_tokens: number;
    total_tokens: number;
  } | null;
  /** Other fields. */
  [field: string]: unknown;
}

/**
 * A streaming chat completion: iterate its chunks, or await its text.
 *
 * @example
 * ```ts
 * import { openai } from "./mod.ts";
 *
 * const sse = [
 *   { choices: [{ index: 0, delta: { content: "Hel" }, finish_reason: null }] },
 *   { choices: [{ index: 0, delta: { content: "lo" }, finish_reason: "stop" }] },
 * ].map((c) => `data: ${JSON.stringify(c)}\n\n`).join("") + "data: [DONE]\n\n";
 * const fetch = () => Promise.resolve(new Response(sse, { headers: { "content-type": "text/event-stream" } }));
 * const text = await openai({ apiKey: "k", fetch }).stream({ model: "m", messages: [{ role: "user", content: "Hi" }] }).text();
 * if (text !== "Hello") throw new Error(text);
 * ```
 */
export interface ChatStream extends AsyncIterable<ChatChunk> {
  /** All content deltas of choice 0, joined (consumes the stream if not yet consumed). */
  text(): Promise<string>;
}

/**
 * The OpenAI-compatible client from {@linkcode openai}.
 *
 * @example
 * ```ts
 * import { openai } from "./mod.ts";
 *
 * const fetch = () =>
 *   Promise.resolve(Response.json({
 *     id: "chatcmpl-1",
 *     choices: [{ index: 0, message: { role: "assistant", content: "hi" }, finish_reason: "stop" }],
 *     usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
 *   }));
 * const gpt = openai({ apiKey: "k", fetch });
 * await gpt.chat({ model: "m", messages: [{ role: "user", content: "Hi" }] });
 * if (gpt.stats.toJSON().inputTokens !== 3) throw new Error();
 * ```
 */
export interface OpenAIClient {
  /**
   * `POST {baseURL}/chat/completions`, rate limited and retried.
   *
   * @throws {HttpError} For an HTTP error after retries.
   * @throws {QuotaError} When the quota is exhausted.
   */
  chat(
    body: ChatRequest,
    options?: { signal?: AbortSignal },
  ): Promise<ChatCompletion>;
  /** The same with `stream: true` (usage included); the request starts on first use. */
  stream(body: ChatRequest, options?: { signal?: AbortSignal }): ChatStream;
  /** The rate-limited fetch underneath. */
  readonly fetch: RateLimitedFetch;
  /** Its stats. */
  readonly stats: Stats;
  /** Its limiter. */
  readonly limiter: Limiter;
}

/**
 * A small typed client for OpenAI-compatible chat completions (OpenAI, and
 * the many relays and local servers that speak it) over
 * {@linkcode rateLimitedFetch}. Key and base URL from the options or
 * `OPENAI_API_KEY` / `OPENAI_BASE_URL` (the base URL includes `/v1`, as in
 * the OpenAI SDK).
 *
 * @param options Key, base URL, limits; see {@linkcode ClientOptions}.
 * @returns The client.
 * @throws {TypeError} If no key is given or set and no `baseURL` either.
 *
 * @example
 * ```ts ignore
 * import { openai } from "./mod.ts";
 *
 * const gpt = openai({ baseURL: "https://relay.example.com/v1", limiter: { rpm: 500, tpm: 200_000 } });
 * const c = await gpt.chat({ model: "gpt-4o-mini", messages: [{ role: "user", content: "Hi" }] });
 * console.log(c.choices[0]?.message.content);
 * ```
 */
export function openai(options: ClientOptions = {}): OpenAIClient {
  const { headers = {} } = options;
  const p = openaiProvider;
  const { key, base, fetch: f } = clientSetup(options, p);
  const send = poster(f, p.url(base, "/v1/chat/completions"), {
    ...p.headers(key),
    ...headers,
  });
  const chat = async (
    body: ChatRequest,
    opts: { signal?: AbortSignal } = {},
  ): Promise<ChatCompletion> =>
    okJSON<ChatCompletion>(await send({ ...body, stream: false }, opts.signal));
  const stream = (
    body: ChatRequest,
    opts: { signal?: AbortSignal } = {},
  ): ChatStream => {
    const chunks = new AssembledStream<ChatChunk>(
      p,
      () => send(p.streamBody({ ...body }), opts.signal),
    );
    return {
      [Symbol.asyncIterator]: () => chunks.iterate("openai"),
      async text() {
        await chunks.drain();
        const done = chunks.result() as {
          choices?: { message: { content: string } }[];
        };
        return done.choices?.[0]?.message.content ?? "";
      },
    };
  };
  return { chat, stream, fetch: f, stats: f.stats, limiter: f.limiter };
}

/**
 * A Gemini `generateContent` request body (the fields paceline reads;
 * anything else the API takes passes through).
 *
 * @example
 * ```ts
 * import type { GeminiRequest } from "./mod.ts";
 *
 * const r: GeminiRequest = { contents: [{ role: "user", parts: [{ text: "Hi" }] }], generationConfig: { maxOutputTokens: 64 } };
 * if (r.contents.length !== 1) throw new Error();
 * ```
 */
export interface GeminiRequest {
  /** The conversation: `{role: "user" | "model", parts: [{text}]}` turns. */
  contents: {
    role?: string;
    parts: { text?: string; [k: string]: unknown }[];
  }[];
  /** A system prompt. */
  systemInstruction?: { parts: { text?: string }[] };
  /** `maxOutputTokens` caps (and is charged as) the output. */
  generationConfig?: { maxOutputTokens?: number; [k: string]: unknown };
  /** Anything else the API takes (`tools`, `safetySettings` …), passed through. */
  [k: string]: unknown;
}

/**
 * A Gemini `generateContent` response (or one streamed chunk of it).
 *
 * @example
 * ```ts
 * import type { GeminiResponse } from "./mod.ts";
 *
 * const r: GeminiResponse = { candidates: [{ content: { parts: [{ text: "Hi" }] } }] };
 * if (r.candidates?.[0]?.content?.parts[0]?.text !== "Hi") throw new Error();
 * ```
 */
export interface GeminiResponse {
  /** The answers (one unless `candidateCount` asks for more). */
  candidates?: {
    content?: { role?: string; parts: { text?: string }[] };
    finishReason?: string;
  }[];
  /** Token counts: `promptTokenCount`, `candidatesTokenCount`, `thoughtsTokenCount` … */
  usageMetadata?: Record<string, number>;
  /** Anything else it holds (`modelVersion`, `responseId` …). */
  [k: string]: unknown;
}

/**
 * The thin Gemini client from {@linkcode gemini}.
 *
 * @example
 * ```ts
 * import { gemini, type GeminiClient } from "./mod.ts";
 *
 * const g: GeminiClient = gemini({ apiKey: "k", fetch: () => Promise.resolve(Response.json({})) });
 * if (typeof g.generate !== "function") throw new Error();
 * ```
 */
export interface GeminiClient {
  /**
   * `POST {baseURL}/models/{model}:generateContent`, rate limited and retried.
   *
   * @throws {HttpError} For an HTTP error after retries.
   * @throws {QuotaError} When a per-day quota is spent.
   */
  generate(
    model: string,
    body: GeminiRequest,
    options?: { signal?: AbortSignal },
  ): Promise<GeminiResponse>;
  /** `:streamGenerateContent?alt=sse`: the chunks, and `text()`; the request starts on first use. */
  stream(
    model: string,
    body: GeminiRequest,
    options?: { signal?: AbortSignal },
  ): AsyncIterable<GeminiResponse> & { text(): Promise<string> };
  /** The rate-limited fetch underneath. */
  readonly fetch: RateLimitedFetch;
  /** Its stats. */
  readonly stats: Stats;
  /** Its limiter. */
  readonly limiter: Limiter;
}

/**
 * A small typed client for Google's Gemini API over
 * {@linkcode rateLimitedFetch}. Key and base URL from the options or
 * `GEMINI_API_KEY` (else `GOOGLE_API_KEY`) / `GEMINI_BASE_URL` (the base
 * URL includes `/v1beta`). Gemini sends no limit headers: limits you do not
 * give are learned from its 429s (see {@linkcode geminiProvider}), per
 * model.
 *
 * @param options Key, base URL, limits; see {@linkcode ClientOptions}.
 * @returns The client.
 * @throws {TypeError} If no key is given or set and no `baseURL` either.
 *
 * @example
 * ```ts ignore
 * import { gemini } from "./mod.ts";
 *
 * const g = gemini({ limiter: { rpm: 10, itpm: 250_000 } });
 * const r = await g.generate("gemini-2.5-flash", { contents: [{ role: "user", parts: [{ text: "你好" }] }] });
 * console.log(r.candidates?.[0]?.content?.parts[0]?.text);
 * ```
 */
export function gemini(options: ClientOptions = {}): GeminiClient {
  const { headers = {} } = options;
  const p = geminiProvider;
  const { key, base, fetch: f } = clientSetup(options, p);
  const h = { ...p.headers(key), ...headers };
  const send = (
    model: string,
    path: string,
    body: GeminiRequest,
    signal?: AbortSignal,
  ): Promise<Response> =>
    f(p.url(base, path, { model }), {
      method: "POST",
      headers: h,
      body: JSON.stringify(body),
      signal,
    });
  return {
    async generate(model, body, opts = {}) {
      return okJSON<GeminiResponse>(
        await send(model, ":generateContent", body, opts.signal),
      );
    },
    stream(model, body, opts = {}) {
      const chunks = new AssembledStream<GeminiResponse>(
        p,
        () => send(model, ":streamGenerateContent", body, opts.signal),
      );
      return {
        [Symbol.asyncIterator]: () => chunks.iterate("gemini"),
        async text() {
          await chunks.drain();
          const done = chunks.result() as GeminiResponse;
          return done.candidates?.[0]?.content?.parts[0]?.text ?? "";
        },
      };
    },
    fetch: f,
    stats: f.stats,
    limiter: f.limiter,
  };
}
