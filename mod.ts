/**
 * paceline: call rate-limited HTTP APIs (above all LLM APIs) as fast as the
 * provider allows, without 429 storms and with results in input order.
 *
 * One self-contained file with no imports. It holds:
 *
 * - **Time**: the {@linkcode Clock} interface, {@linkcode systemClock} and a
 *   deterministic {@linkcode ManualClock} for tests.
 * - **Mutex**: a FIFO promise {@linkcode Mutex} whose waiters can abort.
 * - **RateLimiter**: an exact sliding-window log over several windows at once
 *   (requests, tokens, input/output tokens; per second, minute or day), with
 *   weighted costs, FIFO waiters and {@linkcode Permit}s that settle to the
 *   real usage.
 *
 * @example Ten requests per second, two at a time
 * ```ts
 * import { RateLimiter } from "./mod.ts";
 *
 * const limiter = new RateLimiter({ windows: [{ key: "requests", limit: 10, ms: 1000 }] });
 * const permit = await limiter.acquire();
 * if (permit.at < 0) throw new Error("unreachable");
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
 */
export interface Lock extends Disposable {
  /** Releases the lock, handing it to the next waiter. Safe to call twice. */
  release(): void;
}

interface MutexWaiter {
  resolve: (lock: Lock) => void;
  reject: (reason: unknown) => void;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  cancelled: boolean;
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
  #locked = false;
  #queue: (MutexWaiter | undefined)[] = [];
  #head = 0;
  #cancelled = 0;

  /** Whether some caller holds the lock. */
  get locked(): boolean {
    return this.#locked;
  }

  /** The number of callers waiting for the lock (aborted ones excluded). */
  get waiting(): number {
    return this.#queue.length - this.#head - this.#cancelled;
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
    if (!this.#locked) {
      this.#locked = true;
      return Promise.resolve(this.#newLock());
    }
    return new Promise<Lock>((resolve, reject) => {
      const waiter: MutexWaiter = {
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

  #newLock(): Lock {
    let held = true;
    const release = (): void => {
      if (!held) return;
      held = false;
      this.#handOff();
    };
    return { release, [Symbol.dispose]: release };
  }

  #handOff(): void {
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
      w.resolve(this.#newLock());
      return;
    }
    this.#compact();
    this.#locked = false;
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

// =============================================================================
// RateLimiter
// =============================================================================

/**
 * One sliding window of a {@linkcode RateLimiter}: at most `limit` units of
 * `key` in any `ms` milliseconds.
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
 */
export type Cost = Record<string, number>;

/** Options for {@linkcode RateLimiter}. All limits are optional. */
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

/** A snapshot of one window, from {@linkcode RateLimiter.usage}. */
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

/** Options for {@linkcode RateLimiter.acquire}. */
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
 * A permission to send one request, from {@linkcode RateLimiter.acquire}. It
 * is charged to every window already; call {@linkcode Permit.settle} when
 * the real cost is known (e.g. token usage from the response).
 */
export class Permit {
  /** The clock time at which the permit was granted. */
  readonly at: number;
  /** The cost charged, as requested. */
  readonly cost: Readonly<Cost>;
  #limiter: RateLimiter;
  #charged: number[]; // may be shared with other permits until settled
  #own: number[] | undefined; // what this permit put into each entry
  #seqs: number[];

  /** @internal Created by {@linkcode RateLimiter} only. */
  constructor(
    limiter: RateLimiter,
    at: number,
    cost: Readonly<Cost>,
    charged: number[],
    seqs: number[],
  ) {
    this.#limiter = limiter;
    this.at = at;
    this.cost = cost;
    this.#charged = charged;
    this.#own = undefined;
    this.#seqs = seqs;
  }

  /** The amount currently charged to each window, in the limiter's window order. */
  get charged(): readonly number[] {
    return this.#charged.slice();
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
    if (!this.#own) {
      this.#charged = this.#charged.slice();
      this.#own = this.#charged.slice();
    }
    settlePermit(this.#limiter, merged, this.#charged, this.#own, this.#seqs);
  }
}

let settlePermit: (
  limiter: RateLimiter,
  cost: Cost,
  charged: number[],
  own: number[],
  seqs: number[],
) => void;

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
export class RateLimiter {
  #clock: Clock;
  #windows: SlidingWindow[] = [];
  #defaultMargin: number | undefined;
  #mutex = new Mutex();
  #pausedUntil = -Infinity;
  #wake: AbortController | undefined;
  #hasTokens = false;
  #defaultAmounts: number[] | undefined;

  static {
    settlePermit = (limiter, cost, charged, own, seqs) =>
      limiter.#settle(cost, charged, own, seqs);
  }

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
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `RateLimiter options must be an object: received ${String(options)}`,
      );
    }
    for (const k of Object.keys(options)) {
      if (!LIMITER_OPTIONS.has(k)) {
        throw new TypeError(
          `Unknown RateLimiter option '${k}': expected one of ${
            [...LIMITER_OPTIONS].join(", ")
          }`,
        );
      }
    }
    const { windows = [], marginMs, clock = systemClock } = options;
    if (
      typeof clock !== "object" || clock === null ||
      typeof clock.now !== "function" || typeof clock.sleep !== "function"
    ) {
      throw new TypeError(
        "RateLimiter 'clock' must have now() and sleep(ms, signal) methods",
      );
    }
    this.#clock = clock;
    if (marginMs !== undefined) checkMargin(marginMs, "marginMs");
    this.#defaultMargin = marginMs;
    if (!Array.isArray(windows)) {
      throw new TypeError(
        `RateLimiter 'windows' must be an array: received ${typeof windows}`,
      );
    }
    windows.forEach((w, i) => {
      if (typeof w !== "object" || w === null) {
        throw new TypeError(
          `RateLimiter 'windows[${i}]' must be an object: received ${
            String(w)
          }`,
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
      this.#addWindow(w.key, w.limit, w.ms, w.marginMs);
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
      this.#addWindow(key, limit as number, ms, undefined);
    }
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
    if (typeof key !== "string" || key === "") {
      throw new TypeError(
        `RateLimiter.setLimit 'key' must be a non-empty string: received ${
          String(key)
        }`,
      );
    }
    checkLimit(limit, "limit");
    let target: SlidingWindow | undefined;
    if (ms === undefined) {
      const matches = this.#windows.filter((w) => w.key === key);
      if (matches.length !== 1) {
        throw new RangeError(
          `RateLimiter.setLimit: key '${key}' names ${matches.length} windows; pass 'ms' to pick or add one`,
        );
      }
      target = matches[0];
    } else {
      checkMs(ms, "ms");
      target = this.#windows.find((w) => w.key === key && w.ms === ms);
    }
    if (target) target.limit = limit;
    else this.#addWindow(key, limit, ms!, undefined);
    this.#defaultAmounts = undefined;
    this.#wakeHead();
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
    const m = margin ?? this.#defaultMargin ?? Math.min(ms / 200, 1000);
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
    return new Permit(this, now, cost, amounts, seqs);
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
    if (freed) this.#wakeHead();
  }
}

/**
 * The log of one window: a ring buffer of `(time, amount)` entries with a
 * running sum. Entries are addressed by a sequence number that keeps growing,
 * so a {@linkcode Permit} can find its entry until it expires.
 */
class SlidingWindow {
  key: string;
  limit: number;
  readonly ms: number;
  readonly margin: number;
  /** Entry lifetime: an entry at time t counts while now < t + life. */
  readonly life: number;
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

function checkLimit(value: unknown, name: string): void {
  if (typeof value !== "number") {
    throw new TypeError(
      `RateLimiter '${name}' must be a number: received ${typeof value} ${
        String(value)
      }`,
    );
  }
  if (!(value > 0) || value === Infinity) {
    throw new RangeError(
      `RateLimiter '${name}' must be a positive finite number: received ${value}`,
    );
  }
}

function checkMs(value: unknown, name: string): void {
  if (typeof value !== "number") {
    throw new TypeError(
      `RateLimiter '${name}' must be a number of milliseconds: received ${typeof value} ${
        String(value)
      }`,
    );
  }
  if (!(value > 0) || value === Infinity) {
    throw new RangeError(
      `RateLimiter '${name}' must be a positive finite number of milliseconds: received ${value}`,
    );
  }
}

function checkMargin(value: unknown, name: string): void {
  if (typeof value !== "number") {
    throw new TypeError(
      `RateLimiter '${name}' must be a number: received ${typeof value} ${
        String(value)
      }`,
    );
  }
  if (!(value >= 0) || value === Infinity) {
    throw new RangeError(
      `RateLimiter '${name}' must be a finite number >= 0: received ${value}`,
    );
  }
}

function checkAmount(value: unknown, key: string, where: string): number {
  if (typeof value !== "number") {
    throw new TypeError(
      `RateLimiter ${where} '${key}' must be a number: received ${typeof value} ${
        String(value)
      }`,
    );
  }
  if (!(value >= 0) || value === Infinity) {
    throw new RangeError(
      `RateLimiter ${where} '${key}' must be a finite number >= 0: received ${value}`,
    );
  }
  return value;
}
