// Unit tests for mod.ts. The same file runs under vitest (Node), `bun test`
// and `deno test` (deno.json maps "vitest" to test/deno_vitest.ts).
// Every test uses an injected clock: no real waiting, exact times.
import { describe, expect, it } from "vitest";
import fc from "fast-check";
import {
  backoff,
  type Clock,
  type Cost,
  HttpError,
  ManualClock,
  mapConcurrent,
  mapConcurrentIterable,
  mapConcurrentSettled,
  mapConcurrentUnordered,
  type MapProgress,
  Mutex,
  parseRetryAfter,
  type Permit,
  QuotaError,
  RateLimiter,
  retry,
  RetryError,
  type RetryInfo,
  type RetryOptions,
  systemClock,
  type WindowSpec,
} from "./mod.ts";

/** A signal whose live listener count we can read. */
function countedSignal(): { ctl: AbortController; listeners: () => number } {
  const ctl = new AbortController();
  const live = new Set<unknown>();
  const add = ctl.signal.addEventListener.bind(ctl.signal);
  const remove = ctl.signal.removeEventListener.bind(ctl.signal);
  ctl.signal.addEventListener = ((
    type: string,
    fn: EventListenerOrEventListenerObject,
    opts?: boolean | AddEventListenerOptions,
  ) => {
    live.add(fn);
    const once = typeof opts === "object" && opts?.once;
    if (once) {
      // A once-listener is gone after it fires.
      const wrapped = (e: Event) => {
        live.delete(fn);
        (typeof fn === "function" ? fn : fn.handleEvent.bind(fn))(e);
      };
      wrappers.set(fn, wrapped);
      add(type, wrapped, opts);
    } else add(type, fn, opts);
  }) as typeof ctl.signal.addEventListener;
  const wrappers = new Map<unknown, EventListener>();
  ctl.signal.removeEventListener = ((
    type: string,
    fn: EventListenerOrEventListenerObject,
    opts?: boolean | EventListenerOptions,
  ) => {
    live.delete(fn);
    const w = wrappers.get(fn);
    wrappers.delete(fn);
    remove(type, (w ?? fn) as EventListener, opts);
  }) as typeof ctl.signal.removeEventListener;
  return { ctl, listeners: () => live.size };
}

/** Records when (clock time) a promise settles, and how. */
function track<T>(clock: Clock, p: Promise<T>) {
  const r: {
    at?: number;
    value?: T;
    error?: unknown;
    done: boolean;
  } = { done: false };
  p.then(
    (v) => {
      r.at = clock.now();
      r.value = v;
      r.done = true;
    },
    (e) => {
      r.at = clock.now();
      r.error = e;
      r.done = true;
    },
  );
  return r;
}

// -----------------------------------------------------------------------------
describe("systemClock", () => {
  it("sleeps roughly the asked time and treats NaN and negatives as 0", async () => {
    const t0 = performance.now();
    await systemClock.sleep(NaN);
    await systemClock.sleep(-5);
    await systemClock.sleep(15);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(14);
  });

  it("rejects with the signal's reason, at once when already aborted", async () => {
    const reason = new Error("stop");
    await expect(systemClock.sleep(10, AbortSignal.abort(reason))).rejects
      .toBe(reason);
    const { ctl, listeners } = countedSignal();
    const p = systemClock.sleep(2 ** 31 + 1000, ctl.signal); // chained timers
    expect(listeners()).toBe(1);
    ctl.abort(reason);
    await expect(p).rejects.toBe(reason);
    expect(listeners()).toBe(0);
  });

  it("does not fire a sleep longer than 2^31-1 ms at once", async () => {
    const ctl = new AbortController();
    let fired = false;
    const p = systemClock.sleep(2 ** 31 + 5, ctl.signal).then(() => {
      fired = true;
    }, () => {});
    await systemClock.sleep(30);
    expect(fired).toBe(false);
    ctl.abort();
    await p;
  });

  it("removes its abort listener when it resolves", async () => {
    const { ctl, listeners } = countedSignal();
    await systemClock.sleep(2, ctl.signal);
    expect(listeners()).toBe(0);
  });
});

describe("ManualClock", () => {
  it("fires sleepers in time order and sets now() to each due time", async () => {
    const clock = new ManualClock(100);
    const seen: [string, number][] = [];
    clock.sleep(30).then(() => seen.push(["b", clock.now()]));
    clock.sleep(10).then(() => seen.push(["a", clock.now()]));
    clock.sleep(30).then(() => seen.push(["c", clock.now()]));
    expect(clock.pending).toBe(3);
    expect(clock.nextAt).toBe(110);
    await clock.advance(50);
    expect(seen).toEqual([["a", 110], ["b", 130], ["c", 130]]);
    expect(clock.now()).toBe(150);
    expect(clock.pending).toBe(0);
  });

  it("lets a woken task sleep again before later sleepers fire", async () => {
    const clock = new ManualClock();
    const seen: number[] = [];
    (async () => {
      await clock.sleep(10);
      seen.push(clock.now());
      await clock.sleep(10);
      seen.push(clock.now());
    })();
    clock.sleep(25).then(() => seen.push(clock.now()));
    await clock.advance(100);
    expect(seen).toEqual([10, 20, 25]);
  });

  it("removes aborted sleepers and their listeners", async () => {
    const clock = new ManualClock();
    const { ctl, listeners } = countedSignal();
    const p = clock.sleep(10, ctl.signal);
    expect(clock.pending).toBe(1);
    ctl.abort("why");
    await expect(p).rejects.toBe("why");
    expect(clock.pending).toBe(0);
    expect(listeners()).toBe(0);
    await expect(clock.sleep(5, ctl.signal)).rejects.toBe("why");
  });

  it("validates its arguments", async () => {
    expect(() => new ManualClock(NaN)).toThrow(RangeError);
    const clock = new ManualClock();
    await expect(clock.advance(-1)).rejects.toThrow(/'ms'.*-1/);
    await expect(clock.advance(Infinity)).rejects.toThrow(RangeError);
  });
});

// -----------------------------------------------------------------------------
describe("Mutex", () => {
  it("grants the lock in FIFO order", async () => {
    const m = new Mutex();
    const order: number[] = [];
    const first = await m.lock();
    const waiters = [1, 2, 3].map((n) =>
      m.lock().then((l) => {
        order.push(n);
        l.release();
      })
    );
    expect(m.waiting).toBe(3);
    first.release();
    await Promise.all(waiters);
    expect(order).toEqual([1, 2, 3]);
    expect(m.locked).toBe(false);
  });

  it("release is idempotent and `using` releases", async () => {
    const m = new Mutex();
    {
      using _lock = await m.lock();
      expect(m.locked).toBe(true);
    }
    expect(m.locked).toBe(false);
    const a = await m.lock();
    const bp = m.lock();
    a.release();
    a.release(); // must not release b's lock
    const b = await bp;
    expect(m.locked).toBe(true);
    const c = track(systemClock, m.lock());
    await Promise.resolve();
    expect(c.done).toBe(false);
    b.release();
    await new Promise((r) => setTimeout(r, 0));
    expect(c.done).toBe(true);
    c.value!.release();
  });

  it("an aborted waiter leaves the queue without holding the lock", async () => {
    const m = new Mutex();
    const held = await m.lock();
    const { ctl, listeners } = countedSignal();
    const aborted = m.lock(ctl.signal);
    const next = m.lock();
    expect(m.waiting).toBe(2);
    ctl.abort("gone");
    await expect(aborted).rejects.toBe("gone");
    expect(m.waiting).toBe(1);
    expect(listeners()).toBe(0);
    held.release();
    (await next).release();
    expect(m.locked).toBe(false);
    await expect(m.lock(AbortSignal.abort("pre"))).rejects.toBe("pre");
  });

  it("removes the abort listener of a waiter that got the lock", async () => {
    const m = new Mutex();
    const held = await m.lock();
    const { ctl, listeners } = countedSignal();
    const p = m.lock(ctl.signal);
    expect(listeners()).toBe(1);
    held.release();
    (await p).release();
    expect(listeners()).toBe(0);
  });
});

// -----------------------------------------------------------------------------
// Go-style tables: each step happens at a fixed time and either is admitted
// at once ("ok"), or is refused by tryAcquire with the exact wait.

type Step = { at: number; cost?: Cost; expect: "ok" | number };

function runTable(options: { windows: WindowSpec[] }, steps: Step[]): void {
  let now = 0;
  const clock: Clock = { now: () => now, sleep: () => Promise.resolve() };
  const limiter = new RateLimiter({ ...options, marginMs: 0, clock });
  steps.forEach((s, i) => {
    now = s.at;
    const wait = limiter.timeUntil(s.cost);
    const permit = limiter.tryAcquire(s.cost);
    const got = permit ? "ok" : wait;
    expect({ step: i, at: s.at, got }).toEqual({
      step: i,
      at: s.at,
      got: s.expect,
    });
  });
}

describe("RateLimiter tables", () => {
  it("one window", () => {
    runTable({ windows: [{ key: "requests", limit: 3, ms: 1000 }] }, [
      { at: 0, expect: "ok" },
      { at: 100, expect: "ok" },
      { at: 200, expect: "ok" },
      { at: 300, expect: 700 },
      { at: 999, expect: 1 },
      { at: 1000, expect: "ok" }, // the entry at 0 expires at exactly 1000
      { at: 1000, expect: 100 },
      { at: 1100, expect: "ok" },
      { at: 1200, expect: "ok" },
      { at: 1201, expect: 799 },
    ]);
  });

  it("several windows on one key: 10 per second and 3 per 100 ms", () => {
    runTable({
      windows: [
        { key: "requests", limit: 10, ms: 1000 },
        { key: "requests", limit: 3, ms: 100 },
      ],
    }, [
      { at: 0, expect: "ok" },
      { at: 0, expect: "ok" },
      { at: 0, expect: "ok" },
      { at: 0, expect: 100 },
      { at: 100, expect: "ok" },
      { at: 100, expect: "ok" },
      { at: 100, expect: "ok" },
      { at: 200, expect: "ok" },
      { at: 200, expect: "ok" },
      { at: 200, expect: "ok" },
      { at: 300, expect: "ok" },
      { at: 300, expect: 700 }, // second window full: 10 in [0, 1000)
      { at: 1000, expect: "ok" },
      { at: 1000, expect: "ok" },
      { at: 1000, expect: "ok" },
      { at: 1000, expect: 100 },
    ]);
  });

  it("requests, tokens and input/output tokens together, admitted atomically", () => {
    runTable({
      windows: [
        { key: "requests", limit: 5, ms: 1000 },
        { key: "inputTokens", limit: 1000, ms: 1000 },
        { key: "outputTokens", limit: 300, ms: 1000 },
        { key: "tokens", limit: 1200, ms: 1000 },
      ],
    }, [
      {
        at: 0,
        cost: { requests: 1, inputTokens: 600, outputTokens: 100 },
        expect: "ok",
      },
      // input would be 1100 > 1000: refused, and nothing is charged anywhere
      {
        at: 10,
        cost: { requests: 1, inputTokens: 500, outputTokens: 10 },
        expect: 990,
      },
      {
        at: 20,
        cost: { requests: 1, inputTokens: 400, outputTokens: 100 },
        expect: "ok",
      },
      // tokens derived: 1000 + 200 already; 1 more token does not fit
      {
        at: 30,
        cost: { requests: 1, inputTokens: 0, outputTokens: 1 },
        expect: 970,
      },
      // explicit tokens win over the derived sum
      { at: 30, cost: { requests: 1, tokens: 0 }, expect: "ok" },
      { at: 40, cost: { requests: 1, outputTokens: 100 }, expect: 960 },
      // at 1000 the first request's amounts expire; output 100 + 250 > 300
      { at: 1000, cost: { requests: 1, outputTokens: 250 }, expect: 20 },
      { at: 1020, cost: { requests: 1, outputTokens: 250 }, expect: "ok" },
    ]);
  });

  it("keys without a window are ignored; zero amounts always fit", () => {
    runTable({ windows: [{ key: "requests", limit: 1, ms: 1000 }] }, [
      { at: 0, cost: { requests: 1, inputTokens: 1e9 }, expect: "ok" },
      { at: 1, cost: { requests: 0 }, expect: "ok" },
      { at: 2, cost: { dollars: 5 }, expect: "ok" },
      { at: 3, expect: 997 },
    ]);
  });

  it("marginMs keeps each entry that much longer", () => {
    let now = 0;
    const clock: Clock = { now: () => now, sleep: () => Promise.resolve() };
    const limiter = new RateLimiter({ rpm: 1, marginMs: 250, clock });
    expect(limiter.tryAcquire()).toBeDefined();
    now = 60_000;
    expect(limiter.timeUntil()).toBe(250);
    now = 60_250;
    expect(limiter.tryAcquire()).toBeDefined();
    // default margin: 0.5 % of the window, at most 1000 ms
    expect(new RateLimiter({ rpm: 1 }).usage()[0]!.marginMs).toBe(300);
    expect(new RateLimiter({ rpd: 1 }).usage()[0]!.marginMs).toBe(1000);
    const w = new RateLimiter({
      marginMs: 5,
      windows: [{ key: "x", limit: 1, ms: 10, marginMs: 0 }],
    });
    expect(w.usage()[0]!.marginMs).toBe(0);
  });
});

describe("RateLimiter validation", () => {
  const bad: [string, unknown, typeof TypeError | typeof RangeError, RegExp][] =
    [
      ["rpm 0", { rpm: 0 }, RangeError, /'rpm'.*0/],
      ["rpm negative", { rpm: -5 }, RangeError, /'rpm'.*-5/],
      ["rpm NaN", { rpm: NaN }, RangeError, /'rpm'.*NaN/],
      ["rpm Infinity", { rpm: Infinity }, RangeError, /'rpm'.*Infinity/],
      ["rpm fraction", { rpm: 2.5 }, RangeError, /'rpm'.*integer.*2\.5/],
      ["rpm string", { rpm: "50" }, TypeError, /'rpm'.*string/],
      ["unknown shorthand", { rps: 5 }, TypeError, /Unknown.*'rps'/],
      ["windows not array", { windows: {} }, TypeError, /'windows'/],
      [
        "window key",
        { windows: [{ key: "", limit: 1, ms: 1 }] },
        TypeError,
        /windows\[0\]\.key/,
      ],
      [
        "window limit",
        { windows: [{ key: "a", limit: 0, ms: 1 }] },
        RangeError,
        /windows\[0\]\.limit.*0/,
      ],
      [
        "window ms",
        { windows: [{ key: "a", limit: 1, ms: -1 }] },
        RangeError,
        /windows\[0\]\.ms.*-1/,
      ],
      [
        "window ms Infinity",
        { windows: [{ key: "a", limit: 1, ms: Infinity }] },
        RangeError,
        /windows\[0\]\.ms.*Infinity/,
      ],
      ["marginMs", { marginMs: -1 }, RangeError, /'marginMs'.*-1/],
      ["marginMs NaN", { marginMs: NaN }, RangeError, /'marginMs'.*NaN/],
      ["clock", { clock: {} }, TypeError, /'clock'/],
      [
        "duplicate window",
        { rpm: 5, windows: [{ key: "requests", limit: 9, ms: 60_000 }] },
        RangeError,
        /two windows.*'requests'/,
      ],
    ];
  for (const [name, options, type, message] of bad) {
    it(`rejects ${name}`, () => {
      expect(() => new RateLimiter(options as never)).toThrow(type);
      expect(() => new RateLimiter(options as never)).toThrow(message);
    });
  }

  it("a cost that can never fit fails at once, naming key, amount and limit", async () => {
    const limiter = new RateLimiter({ rpm: 5, itpm: 1000 });
    await expect(limiter.acquire({ requests: 1, inputTokens: 1001 })).rejects
      .toThrow(RangeError);
    await expect(limiter.acquire({ requests: 1, inputTokens: 1001 })).rejects
      .toThrow(/inputTokens 1001 exceeds the window limit 1000/);
    expect(() => limiter.tryAcquire({ requests: 6 })).toThrow(
      /requests 6 exceeds the window limit 5/,
    );
    expect(limiter.usage().map((u) => u.used)).toEqual([0, 0]);
  });

  it("rejects bad amounts by type and range", async () => {
    const limiter = new RateLimiter({ rpm: 5, tpm: 100 });
    await expect(limiter.acquire({ requests: -1 })).rejects.toThrow(
      RangeError,
    );
    await expect(limiter.acquire({ requests: NaN })).rejects.toThrow(
      /'requests'.*NaN/,
    );
    await expect(limiter.acquire({ requests: "1" as never })).rejects.toThrow(
      TypeError,
    );
    await expect(limiter.acquire({ inputTokens: Infinity })).rejects.toThrow(
      /'inputTokens'.*Infinity/,
    );
    await expect(limiter.acquire(null as never)).rejects.toThrow(TypeError);
    const p = await limiter.acquire({ requests: 1, tokens: 5 });
    expect(() => p.settle({ tokens: -3 })).toThrow(RangeError);
  });
});

// -----------------------------------------------------------------------------
describe("RateLimiter waiting", () => {
  it("serves waiters FIFO at the exact times their cost fits", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({
      windows: [{ key: "requests", limit: 2, ms: 1000 }],
      marginMs: 0,
      clock,
    });
    const r = [0, 1, 2, 3, 4].map(() => track(clock, limiter.acquire()));
    await clock.flush();
    expect(limiter.pending).toBe(3);
    await clock.advance(5000);
    expect(r.map((x) => x.at)).toEqual([0, 0, 1000, 1000, 2000]);
    expect(limiter.pending).toBe(0);
    expect(clock.pending).toBe(0);
  });

  it("a big cost at the head is not overtaken by small ones", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({
      windows: [{ key: "t", limit: 10, ms: 100 }],
      marginMs: 0,
      clock,
    });
    await limiter.acquire({ t: 6 });
    await clock.advance(50);
    await limiter.acquire({ t: 3 }); // t=50
    const big = track(clock, limiter.acquire({ t: 10 }));
    const small = track(clock, limiter.acquire({ t: 1 }));
    expect(limiter.tryAcquire({ t: 1 })).toBeUndefined(); // fits, but waiters first
    await clock.advance(200);
    expect(big.at).toBe(150); // both earlier entries gone
    expect(small.at).toBe(250);
  });

  it("settle that frees capacity wakes the head waiter early", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({ itpm: 1000, marginMs: 0, clock });
    const p = await limiter.acquire({ inputTokens: 900 });
    const next = track(clock, limiter.acquire({ inputTokens: 500 }));
    await clock.advance(10);
    expect(next.done).toBe(false);
    p.settle({ inputTokens: 300 });
    await clock.flush();
    expect(next.at).toBe(10);
    expect(limiter.usage()[0]!.used).toBe(800);
    expect(clock.pending).toBe(0);
  });

  it("settle above the estimate charges the original entry", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({
      otpm: 1000,
      rpm: 10,
      tpm: 5000,
      marginMs: 0,
      clock,
    });
    const p = await limiter.acquire({
      requests: 1,
      inputTokens: 100,
      outputTokens: 100,
    });
    expect(limiter.usage().map((u) => u.used)).toEqual([1, 200, 100]);
    p.settle({ outputTokens: 700 });
    expect(limiter.usage().map((u) => u.used)).toEqual([1, 800, 700]);
    expect(p.charged).toEqual([1, 800, 700]);
    await clock.advance(59_999);
    expect(limiter.usage()[2]!.used).toBe(700);
    await clock.advance(1);
    expect(limiter.usage()[2]!.used).toBe(0); // expired with its entry
    // Settling after expiry charges extra usage as a new entry now.
    p.settle({ outputTokens: 750 });
    expect(limiter.usage()[2]!.used).toBe(50);
  });

  it("an aborted waiter is never admitted, consumes nothing and cleans up", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({ rpm: 1, marginMs: 0, clock });
    await limiter.acquire();
    const { ctl: c1, listeners: l1 } = countedSignal();
    const { ctl: c2, listeners: l2 } = countedSignal();
    const head = track(
      clock,
      limiter.acquire(undefined, { signal: c1.signal }),
    );
    const queued = track(
      clock,
      limiter.acquire(undefined, { signal: c2.signal }),
    );
    const last = track(clock, limiter.acquire());
    await clock.flush();
    expect(clock.pending).toBe(1); // only the head sleeps
    c2.abort("queued-abort");
    c1.abort("head-abort");
    await clock.flush();
    expect(head.error).toBe("head-abort");
    expect(queued.error).toBe("queued-abort");
    expect(l1()).toBe(0);
    expect(l2()).toBe(0);
    await clock.advance(60_000);
    expect(last.at).toBe(60_000);
    expect(limiter.usage()[0]!.used).toBe(1);
    expect(clock.pending).toBe(0);
  });

  it("acquire on an aborted signal rejects at once with its reason", async () => {
    const limiter = new RateLimiter({ rpm: 1 });
    const reason = new Error("already");
    await expect(
      limiter.acquire(undefined, { signal: AbortSignal.abort(reason) }),
    ).rejects.toBe(reason);
    expect(limiter.usage()[0]!.used).toBe(0);
  });

  it("pauseUntil holds everyone until then; pause never shortens", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({ rpm: 100, marginMs: 0, clock });
    limiter.pauseUntil(500);
    limiter.pauseUntil(200);
    expect(limiter.pausedUntil).toBe(500);
    expect(limiter.tryAcquire()).toBeUndefined();
    expect(limiter.timeUntil()).toBe(500);
    const a = track(clock, limiter.acquire());
    await clock.advance(1000);
    expect(a.at).toBe(500);
    limiter.pause(100);
    expect(limiter.pausedUntil).toBe(1100);
    expect(() => limiter.pauseUntil(NaN)).toThrow(RangeError);
    expect(() => limiter.pause(-1)).toThrow(RangeError);
  });

  it("setLimit changes a window at runtime and waiters re-check", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({ rpm: 1, marginMs: 0, clock });
    await limiter.acquire();
    const next = track(clock, limiter.acquire());
    await clock.advance(10);
    expect(next.done).toBe(false);
    limiter.setLimit("requests", 2);
    await clock.flush();
    expect(next.at).toBe(10);
    // adding a window with ms
    limiter.setLimit("inputTokens", 100, 60_000);
    expect(limiter.usage().map((u) => u.key)).toEqual([
      "requests",
      "inputTokens",
    ]);
    expect(() => limiter.setLimit("outputTokens", 5)).toThrow(
      /names 0 windows/,
    );
    expect(() => limiter.setLimit("requests", 0)).toThrow(RangeError);
  });

  it("a waiter whose cost no longer fits after setLimit rejects", async () => {
    const clock = new ManualClock();
    const limiter = new RateLimiter({ itpm: 100, marginMs: 0, clock });
    await limiter.acquire({ inputTokens: 100 });
    const w = track(clock, limiter.acquire({ inputTokens: 80 }));
    await clock.flush();
    limiter.setLimit("inputTokens", 50);
    await clock.flush();
    expect(w.error).toBeInstanceOf(RangeError);
    expect(limiter.pending).toBe(0);
    expect(clock.pending).toBe(0);
  });
});

// -----------------------------------------------------------------------------
// Property: random arrivals, costs, aborts and settles, replayed against an
// independent model of a strict server that counts the same windows.

interface Piece {
  at: number;
  amount: number;
}
/** Per admission and key, the log entries it owns (the last one is current). */
type Admission = Map<string, Piece[]>;

const PROP_WINDOWS: WindowSpec[] = [
  { key: "requests", limit: 4, ms: 1000 },
  { key: "requests", limit: 2, ms: 200 },
  { key: "inputTokens", limit: 1000, ms: 1000 },
  { key: "outputTokens", limit: 500, ms: 700 },
  { key: "tokens", limit: 1200, ms: 1000 },
];

function amountsOf(cost: Cost): Map<string, number> {
  const m = new Map<string, number>();
  m.set("requests", cost.requests ?? 0);
  m.set("inputTokens", cost.inputTokens ?? 0);
  m.set("outputTokens", cost.outputTokens ?? 0);
  m.set("tokens", (cost.inputTokens ?? 0) + (cost.outputTokens ?? 0));
  return m;
}

type Op =
  | { kind: "acquire"; dt: number; input: number; output: number }
  | { kind: "abort"; dt: number; pick: number }
  | { kind: "settle"; dt: number; pick: number; input: number; output: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc.record({
      kind: fc.constant("acquire" as const),
      dt: fc.integer({ min: 0, max: 300 }),
      input: fc.integer({ min: 0, max: 700 }),
      output: fc.integer({ min: 0, max: 400 }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("abort" as const),
      dt: fc.integer({ min: 0, max: 300 }),
      pick: fc.nat(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("settle" as const),
      dt: fc.integer({ min: 0, max: 300 }),
      pick: fc.nat(),
      input: fc.integer({ min: 0, max: 900 }),
      output: fc.integer({ min: 0, max: 600 }),
    }),
  },
);

describe("RateLimiter property", () => {
  it(
    "never exceeds any window, keeps FIFO, aborted waiters take nothing",
    async () => {
      await fc.assert(
        fc.asyncProperty(
          fc.array(opArb, { minLength: 1, maxLength: 60 }),
          async (ops) => {
            const clock = new ManualClock();
            const limiter = new RateLimiter({
              windows: PROP_WINDOWS,
              marginMs: 0,
              clock,
            });
            const admissions: Admission[] = [];
            const admittedOrder: number[] = [];
            const calls: {
              id: number;
              ctl: AbortController;
              listeners: () => number;
              state: "waiting" | "admitted" | "aborted";
              permit?: Permit;
              charged?: Map<string, number>;
              reason?: unknown;
            }[] = [];
            const windowMs = new Map(PROP_WINDOWS.map((w) => [w.key, w.ms]));

            const modelUsed = (
              key: string,
              ms: number,
              now: number,
            ): number => {
              let sum = 0;
              for (const a of admissions) {
                if (!a) continue;
                for (const p of a.get(key)!) {
                  if (p.at + ms > now) {
                    sum += p.amount;
                  }
                }
              }
              return sum;
            };

            const onAdmit = (id: number, permit: Permit) => {
              const call = calls[id]!;
              call.state = "admitted";
              call.permit = permit;
              admittedOrder.push(id);
              const amounts = amountsOf(permit.cost);
              call.charged = new Map(amounts);
              // The strict server's check at admission time.
              for (const w of PROP_WINDOWS) {
                const used = modelUsed(w.key, w.ms, permit.at);
                const add = amounts.get(w.key)!;
                if (add > 0 && used + add > w.limit) {
                  throw new Error(
                    `over limit: ${w.key}/${w.ms} used ${used} + ${add} > ${w.limit} at ${permit.at}`,
                  );
                }
              }
              const a: Admission = new Map();
              for (const [k, v] of amounts) {
                a.set(k, [{
                  at: permit.at,
                  amount: v,
                }]);
              }
              admissions[id] = a;
            };

            const check = () => {
              const now = clock.now();
              const usage = limiter.usage();
              PROP_WINDOWS.forEach((w, i) => {
                expect({ w: i, used: usage[i]!.used }).toEqual({
                  w: i,
                  used: modelUsed(w.key, w.ms, now),
                });
              });
            };

            for (const op of ops) {
              await clock.advance(op.dt);
              check();
              if (op.kind === "acquire") {
                const id = calls.length;
                const { ctl, listeners } = countedSignal();
                calls.push({ id, ctl, listeners, state: "waiting" });
                limiter
                  .acquire(
                    {
                      requests: 1,
                      inputTokens: op.input,
                      outputTokens: op.output,
                    },
                    { signal: ctl.signal },
                  )
                  .then(
                    (p) => onAdmit(id, p),
                    (e) => {
                      calls[id]!.state = "aborted";
                      calls[id]!.reason = e;
                    },
                  );
              } else if (op.kind === "abort") {
                const waiting = calls.filter((c) => c.state === "waiting");
                if (waiting.length) {
                  const c = waiting[op.pick % waiting.length]!;
                  c.ctl.abort(`abort-${c.id}`);
                }
              } else {
                const admitted = calls.filter((c) => c.state === "admitted");
                if (admitted.length) {
                  const c = admitted[op.pick % admitted.length]!;
                  const a = admissions[c.id]!;
                  const now = clock.now();
                  const next = amountsOf({
                    requests: 1,
                    inputTokens: op.input,
                    outputTokens: op.output,
                  });
                  // Mirror the limiter: change the current entry while it is in
                  // its window; charge extra usage after expiry as a new entry.
                  for (const key of ["inputTokens", "outputTokens", "tokens"]) {
                    const pieces = a.get(key)!;
                    const charged = c.charged!.get(key)!;
                    const delta = next.get(key)! - charged;
                    const cur = pieces[pieces.length - 1]!;
                    if (cur.at + windowMs.get(key)! > now) {
                      cur.amount = Math.max(0, cur.amount + delta);
                    } else if (delta > 0) {
                      pieces.push({
                        at: now,
                        amount: delta,
                      });
                    }
                    c.charged!.set(key, next.get(key)!);
                  }
                  c.permit!.settle({
                    inputTokens: op.input,
                    outputTokens: op.output,
                  });
                }
              }
              await clock.flush();
              check();
            }
            // Drain: let every waiter through.
            for (
              let i = 0;
              i < 1000 && calls.some((c) => c.state === "waiting");
              i++
            ) {
              await clock.advance(100);
              check();
            }
            expect(calls.filter((c) => c.state === "waiting")).toEqual([]);
            // FIFO: admitted in call order.
            expect(admittedOrder).toEqual(
              [...admittedOrder].sort((a, b) => a - b),
            );
            for (const c of calls) {
              if (c.state === "aborted") expect(c.reason).toBe(`abort-${c.id}`);
              expect(c.listeners()).toBe(0);
            }
            expect(limiter.pending).toBe(0);
            expect(clock.pending).toBe(0);
          },
        ),
        {
          numRuns: 150,
          examples: [[[
            // Found by this test: two permits' entries merged at one time, and
            // settling one took back more than it had put in.
            { kind: "acquire", dt: 0, input: 0, output: 0 },
            { kind: "settle", dt: 0, pick: 0, input: 0, output: 203 },
            { kind: "acquire", dt: 4, input: 176, output: 298 },
            { kind: "settle", dt: 240, pick: 0, input: 0, output: 203 },
            { kind: "acquire", dt: 220, input: 0, output: 0 },
            { kind: "settle", dt: 221, pick: 0, input: 540, output: 187 },
            { kind: "settle", dt: 15, pick: 0, input: 0, output: 188 },
            { kind: "settle", dt: 0, pick: 0, input: 0, output: 0 },
          ]]],
        },
      );
    },
    60_000,
  );
});

// -----------------------------------------------------------------------------
describe("RateLimiter memory", () => {
  it("1,000,000 admissions through a 1-day window keep at most 1025 entries", () => {
    let now = 0;
    const clock: Clock = { now: () => now, sleep: () => Promise.resolve() };
    const limiter = new RateLimiter({
      rpd: 1_000_000,
      windows: [{ key: "tokens", limit: 1e12, ms: 86_400_000 }],
      clock,
    });
    let maxEntries = 0;
    for (let i = 0; i < 1_000_000; i++) {
      now = i * 86.4; // spread over one day
      const p = limiter.tryAcquire({ requests: 1, tokens: 10 });
      if (!p) throw new Error(`refused at ${i}`);
      if ((i & 1023) === 0) {
        for (const u of limiter.usage()) {
          maxEntries = Math.max(maxEntries, u.entries);
        }
      }
    }
    const [tokens, requests] = limiter.usage();
    expect(requests!.used).toBe(1_000_000);
    expect(tokens!.used).toBe(10_000_000);
    expect(maxEntries).toBeLessThanOrEqual(1025);
    expect(requests!.entries).toBeLessThanOrEqual(1025);
    // The day-old entries expire (with the 1000 ms default margin).
    now = 86_400_000 * 2 + 86_400_000 / 1024 + 1001;
    expect(limiter.usage().map((u) => [u.used, u.entries])).toEqual([
      [0, 0],
      [0, 0],
    ]);
  });

  it("caps entries of a short window fed with zero-cost... and tiny costs", () => {
    let now = 0;
    const clock: Clock = { now: () => now, sleep: () => Promise.resolve() };
    const limiter = new RateLimiter({
      windows: [{ key: "dollars", limit: 1000, ms: 60_000 }],
      marginMs: 0,
      clock,
    });
    for (let i = 0; i < 100_000; i++) {
      now = i * 0.5;
      limiter.tryAcquire({ dollars: 0.001 });
    }
    expect(limiter.usage()[0]!.entries).toBeLessThanOrEqual(8192);
    expect(limiter.usage()[0]!.used).toBeCloseTo(100, 6);
  });
});

// -----------------------------------------------------------------------------
// Retry
// -----------------------------------------------------------------------------

const NOW = Date.UTC(2025, 1, 24, 22, 25, 0); // Mon, 24 Feb 2025 22:25:00 GMT

describe("backoff", () => {
  it("grows exponentially up to the cap, jittered as asked", () => {
    const none = [1, 2, 3, 4, 5, 6].map((n) =>
      backoff(n, { baseMs: 100, maxMs: 1000, factor: 3, jitter: "none" })
    );
    expect(none).toEqual([100, 300, 900, 1000, 1000, 1000]);
    expect(backoff(3, { baseMs: 100, jitter: "full" }, () => 0.25)).toBe(100);
    expect(backoff(3, { baseMs: 100, jitter: "equal" }, () => 0)).toBe(200);
    expect(backoff(3, { baseMs: 100 }, () => 0.5)).toBe(300); // equal by default
    expect(backoff(1)).toBeGreaterThanOrEqual(250);
    expect(backoff(100, { jitter: "none" })).toBe(20_000); // default cap
  });

  it("validates its arguments", () => {
    expect(() => backoff(0)).toThrow(/'attempt'.*0/);
    expect(() => backoff(1.5)).toThrow(RangeError);
    expect(() => backoff(1, { baseMs: -1 })).toThrow(/'baseMs'.*-1/);
    expect(() => backoff(1, { maxMs: NaN })).toThrow(/'maxMs'.*NaN/);
    expect(() => backoff(1, { factor: 0.5 })).toThrow(/'factor'.*0\.5/);
    expect(() => backoff(1, { jitter: "half" as never })).toThrow(
      /'jitter'.*half/,
    );
    expect(() => backoff(1, {}, () => 1)).toThrow(/'random'.*1/);
  });
});

describe("parseRetryAfter", () => {
  const HOUR = 3_600_000;
  const cases: [
    string,
    Record<string, string | string[]>,
    number | undefined,
  ][] = [
    ["no headers", {}, undefined],
    ["empty", { "retry-after": "" }, undefined],
    ["blank", { "retry-after": " " }, undefined],
    ["negative", { "retry-after": "-3" }, undefined],
    ["minus one", { "retry-after": "-1" }, undefined],
    ["exponent", { "retry-after": "1e3" }, undefined],
    ["hex", { "retry-after": "0x10" }, undefined],
    ["NaN", { "retry-after": "NaN" }, undefined],
    ["Infinity", { "retry-after": "Infinity" }, undefined],
    ["trailing junk", { "retry-after": "10abc" }, undefined],
    ["huge", { "retry-after": "99999999999999999999" }, undefined],
    ["seconds", { "retry-after": "2" }, 2000],
    ["zero", { "retry-after": "0" }, 0],
    ["decimal seconds", { "retry-after": "1.5" }, 1500],
    ["padded", { "retry-after": " 3 " }, 3000],
    ["one day", { "retry-after": "86400" }, 86_400_000],
    ["over a day", { "retry-after": "86401" }, undefined],
    ["IMF-fixdate", { "retry-after": "Mon, 24 Feb 2025 22:25:30 GMT" }, 30_000],
    ["RFC 850", { "retry-after": "Monday, 24-Feb-25 22:26:00 GMT" }, 60_000],
    ["asctime", { "retry-after": "Mon Feb 24 22:25:10 2025" }, 10_000],
    [
      "asctime in the past",
      { "retry-after": "Sun Nov  6 08:49:37 1994" },
      undefined,
    ],
    [
      "date far in the past",
      { "retry-after": "Wed, 21 Oct 2015 07:28:00 GMT" },
      undefined,
    ],
    [
      "date 30 years ahead",
      { "retry-after": "Sat, 24 Feb 2055 22:25:00 GMT" },
      undefined,
    ],
    [
      "date without zone",
      { "retry-after": "Wed, 21 Oct 2015 07:28:00" },
      undefined,
    ],
    [
      "date with other zone",
      { "retry-after": "Mon, 24 Feb 2025 22:25:30 PST" },
      undefined,
    ],
    [
      "lowercase date",
      { "retry-after": "mon, 24 feb 2025 22:25:30 gmt" },
      30_000,
    ],
    ["extra spaces in date", {
      "retry-after": "Mon,  24 Feb 2025   22:25:30 GMT",
    }, 30_000],
    [
      "impossible date",
      { "retry-after": "Mon, 31 Feb 2025 22:25:30 GMT" },
      undefined,
    ],
    ["bad hour", { "retry-after": "Mon, 24 Feb 2025 25:25:30 GMT" }, undefined],
    ["retry-after-ms decimal", { "retry-after-ms": "1500.5" }, 1500.5],
    [
      "retry-after-ms wins",
      { "retry-after-ms": "250", "retry-after": "10" },
      250,
    ],
    ["bad retry-after-ms falls through", {
      "retry-after-ms": "abc",
      "retry-after": "3",
    }, 3000],
    ["negative retry-after-ms", { "retry-after-ms": "-5" }, undefined],
    [
      "Azure x-ms-retry-after-ms wins over whole seconds",
      { "x-ms-retry-after-ms": "1234", "retry-after": "2" },
      1234,
    ],
    ["duplicated values", { "retry-after": "5, 10" }, 10_000],
    ["array values", { "retry-after": ["5", "10"] }, 10_000],
    ["duplicated dates", {
      "retry-after":
        "Mon, 24 Feb 2025 22:25:30 GMT, Mon, 24 Feb 2025 22:25:40 GMT",
    }, 40_000],
    ["one bad value in a list", { "retry-after": "5, soon" }, undefined],
    ["mixed-case name", { "Retry-After": "7" }, 7000],
    ["Go 1m26.4s", { "x-ratelimit-reset-requests": "1m26.4s" }, 86_400],
    ["Go 2ms", { "x-ratelimit-reset-requests": "2ms" }, 2],
    ["Go -1", { "x-ratelimit-reset-requests": "-1" }, undefined],
    ["Go 0s", { "x-ratelimit-reset-requests": "0s" }, 0],
    ["Go 6m0s", { "x-ratelimit-reset-tokens": "6m0s" }, 360_000],
    ["Go 19m45.394s", { "x-ratelimit-reset-tokens": "19m45.394s" }, 1_185_394],
    ["Go 1h4m48s", { "x-ratelimit-reset-tokens": "1h4m48s" }, 3_888_000],
    ["Go 90ms", { "x-ratelimit-reset-tokens": "90ms" }, 90],
    ["Go 1.5h", { "x-ratelimit-reset-tokens": "1.5h" }, 1.5 * HOUR],
    ["Go garbage", { "x-ratelimit-reset-tokens": "6 minutes" }, undefined],
    ["Azure seconds", { "x-ratelimit-reset-requests": "10" }, 10_000],
    ["Anthropic RFC 3339", {
      "anthropic-ratelimit-requests-reset": "2025-02-24T22:25:32Z",
    }, 32_000],
    ["RFC 3339 +08:00", {
      "anthropic-ratelimit-tokens-reset": "2025-02-25T06:26:00+08:00",
    }, 60_000],
    ["RFC 3339 fraction", {
      "anthropic-ratelimit-tokens-reset": "2025-02-24T22:25:01.5Z",
    }, 1500],
    ["RFC 3339 in the past", {
      "anthropic-ratelimit-tokens-reset": "2025-02-24T22:20:00Z",
    }, 0],
    ["RFC 3339 garbage", {
      "anthropic-ratelimit-tokens-reset": "2025-02-24 soon",
    }, undefined],
    ["exhausted bucket preferred", {
      "x-ratelimit-reset-requests": "1s",
      "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "6m0s",
      "x-ratelimit-remaining-tokens": "5000",
    }, 1000],
    ["no exhausted bucket: the longest", {
      "anthropic-ratelimit-requests-reset": "2025-02-24T22:25:01Z",
      "anthropic-ratelimit-requests-remaining": "3",
      "anthropic-ratelimit-input-tokens-reset": "2025-02-24T22:25:20Z",
      "anthropic-ratelimit-input-tokens-remaining": "100",
    }, 20_000],
    ["retry-after beats reset headers", {
      "retry-after": "3",
      "anthropic-ratelimit-requests-reset": "2025-02-24T22:25:40Z",
    }, 3000],
    ["IETF RateLimit t=", { ratelimit: '"default";r=0;t=30' }, 30_000],
    ["IETF RateLimit-Reset", { "ratelimit-reset": "12" }, 12_000],
    [
      "GitHub epoch reset",
      { "x-ratelimit-reset": String(NOW / 1000 + 45) },
      45_000,
    ],
  ];

  for (const [name, headers, want] of cases) {
    it(name, () => {
      const got = parseRetryAfter(headers, NOW);
      expect(got).toBe(want);
      // The same through a Headers object.
      const h = new Headers();
      for (const [k, v] of Object.entries(headers)) {
        for (const x of Array.isArray(v) ? v : [v]) h.append(k, x);
      }
      expect(parseRetryAfter(h, NOW)).toBe(want);
    });
  }

  it("has at least 40 cases and never yields NaN, negatives or over a day", () => {
    expect(cases.length).toBeGreaterThanOrEqual(40);
    for (const [, headers] of cases) {
      const got = parseRetryAfter(headers, NOW);
      if (got !== undefined) {
        expect(got).toBeGreaterThanOrEqual(0);
        expect(got).toBeLessThanOrEqual(86_400_000);
      }
    }
  });

  it("fuzz: no input yields NaN, a negative or more than a day", () => {
    fc.assert(
      fc.property(
        fc.constantFrom(
          "retry-after",
          "retry-after-ms",
          "x-ratelimit-reset-tokens",
          "anthropic-ratelimit-tokens-reset",
          "ratelimit",
          "x-ratelimit-reset",
        ),
        fc.oneof(
          fc.string(),
          fc.double().map(String),
          fc.integer().map(String),
          fc.date({ noInvalidDate: true }).map((d) => d.toUTCString()),
          fc.date({ noInvalidDate: true }).map((d) => d.toISOString()),
        ),
        (name, value) => {
          const got = parseRetryAfter({ [name]: value }, NOW);
          return got === undefined ||
            (got >= 0 && got <= 86_400_000 && !Number.isNaN(got));
        },
      ),
      { numRuns: 2000 },
    );
  });

  it("asctime with a space-padded day", () => {
    const now = Date.UTC(2025, 2, 1, 22, 24, 0);
    expect(parseRetryAfter({ "retry-after": "Sat Mar  1 22:25:00 2025" }, now))
      .toBe(60_000);
  });

  it("reads reset headers only when asked", () => {
    const h = { "x-ratelimit-reset-requests": "2s" };
    expect(parseRetryAfter(h, NOW, { resetHeaders: false })).toBeUndefined();
    expect(parseRetryAfter(undefined)).toBeUndefined();
  });
});

/** A retry harness: fn's outcomes in order, and the sleeps retry made. */
function scripted(outcomes: (() => unknown)[]) {
  let calls = 0;
  const fn = () => {
    const f = outcomes[Math.min(calls, outcomes.length - 1)]!;
    calls++;
    return f();
  };
  return { fn, calls: () => calls };
}

const resp =
  (status: number, headers: Record<string, string> = {}, body = "") => () =>
    new Response(body || null, { status, headers });
const thrown = (status: number, extra: Record<string, unknown> = {}) => () => {
  throw Object.assign(new Error(`HTTP ${status}`), { status, ...extra });
};

async function runRetry<T>(
  fn: () => T,
  options: RetryOptions = {},
): Promise<
  {
    sleeps: number[];
    result: { value?: unknown; error?: unknown };
    clock: ManualClock;
  }
> {
  const clock = new ManualClock();
  const sleeps: number[] = [];
  const result: { value?: unknown; error?: unknown } = {};
  let done = false;
  retry(fn, {
    clock,
    random: () => 0.5,
    dateNow: () => NOW + clock.now(),
    onRetry: (i) => sleeps.push(i.delayMs),
    ...options,
  }).then((v) => {
    result.value = v;
    done = true;
  }, (e) => {
    result.error = e;
    done = true;
  });
  for (let i = 0; i < 100 && !done; i++) {
    const next = clock.nextAt;
    await (next === undefined
      ? clock.flush()
      : clock.advance(next - clock.now()));
  }
  expect(done).toBe(true);
  expect(clock.pending).toBe(0); // no sleep left behind (none after the last attempt)
  return { sleeps, result, clock };
}

describe("retry", () => {
  it("maxRateLimitedMs: rate-limit 429s pace without using up retries, until that long after the first; errors and quota 429s as before", async () => {
    const limited = resp(429, { "retry-after": "10" });
    // Twelve 429s, two retries allowed: all waited out, then success.
    const many = scripted([...Array(12).fill(limited), resp(200, {}, "ok")]);
    const ok = await runRetry(many.fn, {
      retries: 2,
      maxRateLimitedMs: 600_000,
    });
    expect(many.calls()).toBe(13);
    expect(ok.sleeps).toEqual(Array(12).fill(10_000));
    expect(await (ok.result.value as Response).text()).toBe("ok");
    // A server that never lets it through: the budget ends it, saying so.
    const never = scripted([limited]);
    const gave = await runRetry(never.fn, {
      retries: 2,
      maxRateLimitedMs: 60_000,
    });
    expect(never.calls()).toBe(7); // at 0, 10, …, 60 s; a wait from 60 s would end past it
    expect((gave.result.error as Error).message).toMatch(
      /Gave up after 7 attempts: waiting 10 s more would pass maxRateLimitedMs \(60 s\); last failure: HTTP 429/,
    );
    // Other failures still use up retries, 429s in between or not.
    const mixed = scripted([resp(503), limited, resp(503), limited, resp(503)]);
    const m = await runRetry(mixed.fn, {
      retries: 2,
      maxRateLimitedMs: 600_000,
    });
    expect(mixed.calls()).toBe(5);
    expect((m.result.error as RetryError).response?.status).toBe(503);
    // Without it (the default), 429s count like any failure.
    const counted = scripted([limited]);
    await runRetry(counted.fn, { retries: 2 });
    expect(counted.calls()).toBe(3);
    // A quota 429 is never retried.
    const quota = scripted([
      resp(
        429,
        {},
        JSON.stringify({
          error: { type: "insufficient_quota", code: "insufficient_quota" },
        }),
      ),
    ]);
    const q = await runRetry(quota.fn, { maxRateLimitedMs: 600_000 });
    expect(quota.calls()).toBe(1);
    expect(q.result.error).toBeInstanceOf(QuotaError);
    await expect(retry(() => 1, { maxRateLimitedMs: 0 })).rejects.toThrow(
      /retry 'maxRateLimitedMs' must be a number > 0 or Infinity: received 0/,
    );
  });

  it("429 with retry-after: 2 waits exactly 2000 ms, no jitter", async () => {
    const s = scripted([
      resp(429, { "retry-after": "2" }),
      resp(200, {}, "ok"),
    ]);
    const { sleeps, result, clock } = await runRetry(s.fn);
    expect(sleeps).toEqual([2000]);
    expect(s.calls()).toBe(2);
    expect(await (result.value as Response).text()).toBe("ok");
    expect(clock.now()).toBe(2000);
  });

  it("503 without headers backs off exponentially and never sleeps after the last attempt", async () => {
    const s = scripted([resp(503)]);
    const { sleeps, result, clock } = await runRetry(s.fn, { retries: 3 });
    // equal jitter with random 0.5: d/2 + d/4 = 0.75 d, d = 500, 1000, 2000
    expect(sleeps).toEqual([375, 750, 1500]);
    expect(s.calls()).toBe(4);
    expect(result.error).toBeInstanceOf(RetryError);
    const e = result.error as RetryError;
    expect(e.attempts).toBe(4);
    expect(e.name).toBe("RetryError");
    expect(e.message).toMatch(/Gave up after 4 attempts.*HTTP 503/);
    expect(e.cause).toBeInstanceOf(HttpError);
    expect(e.response?.status).toBe(503);
    expect(clock.now()).toBe(2625);
  });

  it("a mix: 503, 429 retry-after-ms, 500, 529 then success", async () => {
    const s = scripted([
      resp(503),
      resp(429, { "retry-after-ms": "1200" }),
      thrown(500),
      thrown(529, { headers: new Headers({ "retry-after": "3" }) }),
      () => "done",
    ]);
    const { sleeps, result } = await runRetry(s.fn);
    expect(sleeps).toEqual([375, 1200, 1500, 3000]);
    expect(result.value).toBe("done");
    expect(s.calls()).toBe(5);
  });

  it("retries 408, 409 and network errors; not 400/401/403/404/413", async () => {
    for (const f of [thrown(408), thrown(409), resp(408)]) {
      const s = scripted([f, () => 1]);
      expect((await runRetry(s.fn)).result.value).toBe(1);
    }
    const net = [
      () => {
        throw new TypeError("fetch failed", {
          cause: Object.assign(new Error("other side closed"), {
            code: "UND_ERR_SOCKET",
          }),
        });
      },
      () => {
        throw Object.assign(new Error("socket hang up"), {
          code: "ECONNRESET",
        });
      },
      () => {
        throw Object.assign(new Error("Connection error."), {
          name: "APIConnectionError",
        });
      },
    ];
    for (const f of net) {
      const s = scripted([f, () => 1]);
      expect((await runRetry(s.fn)).result.value).toBe(1);
    }
    for (const status of [400, 401, 403, 404, 413]) {
      const err = thrown(status);
      const s = scripted([err]);
      const { result, sleeps } = await runRetry(s.fn);
      expect((result.error as { status: number }).status).toBe(status); // rethrown as is
      expect(s.calls()).toBe(1);
      expect(sleeps).toEqual([]);
      const r = scripted([resp(status)]);
      const out = await runRetry(r.fn);
      expect((out.result.value as Response).status).toBe(status); // returned as is
      expect(r.calls()).toBe(1);
    }
    const plain = scripted([() => {
      throw new Error("a bug in user code");
    }]);
    expect(((await runRetry(plain.fn)).result.error as Error).message).toBe(
      "a bug in user code",
    );
    expect(plain.calls()).toBe(1);
  });

  it("x-should-retry overrides the status", async () => {
    const no = scripted([resp(503, { "x-should-retry": "false" })]);
    expect(((await runRetry(no.fn)).result.value as Response).status).toBe(503);
    expect(no.calls()).toBe(1);
    const noThrown = scripted([
      thrown(503, { headers: { "X-Should-Retry": "false" } }),
    ]);
    await runRetry(noThrown.fn);
    expect(noThrown.calls()).toBe(1);
    const yes = scripted([resp(400, { "x-should-retry": "true" }), () => "ok"]);
    expect((await runRetry(yes.fn)).result.value).toBe("ok");
    expect(yes.calls()).toBe(2);
    const yesThrown = scripted([
      thrown(400, {
        response: { headers: new Headers({ "x-should-retry": "true" }) },
      }),
      () => "ok",
    ]);
    expect((await runRetry(yesThrown.fn)).result.value).toBe("ok");
  });

  it("a server-told wait over maxRetryAfterMs fails at once, saying how long", async () => {
    const s = scripted([resp(429, { "retry-after": "300" })]);
    const { result, sleeps } = await runRetry(s.fn);
    expect(sleeps).toEqual([]);
    expect(s.calls()).toBe(1);
    expect(result.error).toBeInstanceOf(RetryError);
    expect((result.error as Error).message).toMatch(
      /asked to wait 5 min, longer than maxRetryAfterMs \(2 min\)/,
    );
    const ok = scripted([resp(429, { "retry-after": "300" }), () => "ok"]);
    expect((await runRetry(ok.fn, { maxRetryAfterMs: 300_000 })).sleeps)
      .toEqual([300_000]);
  });

  it("an absurd server-told wait (30 years) is obeyed: one attempt, no sleep, the duration in the error", async () => {
    const thirtyYears = new Date(Date.now() + 30 * 365.25 * 86_400_000)
      .toUTCString();
    for (
      const [headers, said] of [
        [
          { "retry-after": "946080000" },
          /asked to wait 30 years, longer than maxRetryAfterMs/,
        ],
        [{ "retry-after": thirtyYears }, /asked to wait \d\d(\.\d)? years/],
        [{ "retry-after-ms": "90000000" }, /asked to wait 25 h/],
      ] as const
    ) {
      const s = scripted([resp(429, headers), () => "never"]);
      const { result, sleeps } = await runRetry(s.fn, {
        maxRetryAfterMs: Infinity, // even then: over a day is never slept
      });
      expect(s.calls()).toBe(1);
      expect(sleeps).toEqual([]);
      expect(result.error).toBeInstanceOf(RetryError);
      expect((result.error as Error).message).toMatch(said);
      expect((result.error as RetryError).response?.status).toBe(429);
    }
    // Garbage is not a wait: backoff as before.
    const soon = scripted([resp(429, { "retry-after": "soon" }), () => "ok"]);
    const r = await runRetry(soon.fn);
    expect(r.sleeps).toEqual([375]);
    expect(r.result.value).toBe("ok");
    // parseRetryAfter itself still never returns a wait over maxMs.
    expect(parseRetryAfter({ "retry-after": "946080000" })).toBeUndefined();
    expect(
      parseRetryAfter({ "retry-after": "946080000" }, Date.now(), {
        maxMs: Infinity,
      }),
    ).toBe(946_080_000_000);
  });

  it("maxElapsedMs stops a retry whose wait would pass the budget", async () => {
    const s = scripted([resp(503)]);
    const { result, sleeps, clock } = await runRetry(s.fn, {
      maxElapsedMs: 1500,
    });
    expect(sleeps).toEqual([375, 750]); // the next (1500) would end at 2625 > 1500
    expect(s.calls()).toBe(3);
    expect((result.error as Error).message).toMatch(/maxElapsedMs/);
    expect(clock.now()).toBe(1125);
  });

  it("abort during a wait rejects at once with the reason and clears the timer", async () => {
    const clock = new ManualClock();
    const ctl = new AbortController();
    const p = retry(() => {
      throw Object.assign(new Error("busy"), { status: 503 });
    }, { clock, signal: ctl.signal });
    const r = track(clock, p);
    await clock.flush();
    expect(clock.pending).toBe(1);
    ctl.abort("user stop");
    await clock.flush();
    expect(r.error).toBe("user stop");
    expect(clock.pending).toBe(0);
    await expect(retry(() => 1, { signal: AbortSignal.abort("pre") })).rejects
      .toBe("pre");
  });

  it("an abort during an attempt is not retried", async () => {
    const ctl = new AbortController();
    let calls = 0;
    const p = retry((_, signal) => {
      calls++;
      ctl.abort(new Error("stop"));
      throw signal?.reason;
    }, { signal: ctl.signal, clock: new ManualClock() });
    await expect(p).rejects.toThrow("stop");
    expect(calls).toBe(1);
  });

  const quotaBodies: [string, unknown][] = [
    ["enforced_spend_limit_reached", {
      type: "error",
      error: {
        type: "rate_limit_error",
        message: "You have reached your specified workspace API usage limits.",
        details: { error_code: "enforced_spend_limit_reached" },
      },
    }],
    ...[
      "insufficient_quota",
      "credit_balance_exhausted",
      "organization_spend_limit_exceeded",
      "project_spend_limit_exceeded",
      "organization_usage_limit_exceeded",
    ].map((code): [string, unknown] => [code, {
      error: {
        message: "You exceeded your current quota.",
        type: code,
        param: null,
        code,
      },
    }]),
    ["insufficient_quota (type only)", {
      error: {
        message: "quota",
        type: "insufficient_quota",
        param: null,
        code: null,
      },
    }],
  ];
  for (const [name, body] of quotaBodies) {
    for (const withRetryAfter of [false, true]) {
      it(`quota 429 ${name}${withRetryAfter ? " with retry-after" : ""} is attempted once`, async () => {
        const headers: Record<string, string> = withRetryAfter
          ? { "retry-after": "1" }
          : {};
        const code = name.split(" ")[0]!;
        const r = scripted([resp(429, headers, JSON.stringify(body))]);
        const out = await runRetry(r.fn);
        expect(r.calls()).toBe(1);
        expect(out.sleeps).toEqual([]);
        expect(out.result.error).toBeInstanceOf(QuotaError);
        const qe = out.result.error as QuotaError;
        expect(qe.code).toBe(code);
        expect(qe.message).toMatch(/Quota exhausted/);
        expect(await qe.response!.json()).toEqual(body); // body still readable
        // The same as a thrown SDK-style error.
        const t = scripted([
          thrown(429, { headers: new Headers(headers), error: body }),
        ]);
        const out2 = await runRetry(t.fn);
        expect(t.calls()).toBe(1);
        expect((out2.result.error as QuotaError).code).toBe(code);
      });
    }
  }

  it("an ordinary rate-limit 429 body is retried", async () => {
    const body = JSON.stringify({
      error: {
        message: "Rate limit reached for gpt-4o. Please try again in 1.146s.",
        type: "tokens",
        param: null,
        code: "rate_limit_exceeded",
      },
    });
    const s = scripted([
      resp(429, { "retry-after-ms": "1146" }, body),
      () => "ok",
    ]);
    const out = await runRetry(s.fn);
    expect(out.sleeps).toEqual([1146]);
    expect(out.result.value).toBe("ok");
  });

  it("reset headers count for 429s only", async () => {
    const s = scripted([
      resp(429, {
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-requests": "0",
      }),
      resp(503, { "x-ratelimit-reset-requests": "7s" }),
      () => "ok",
    ]);
    expect((await runRetry(s.fn)).sleeps).toEqual([2000, 750]);
  });

  it("cancels the bodies of discarded responses", async () => {
    let cancelled = 0;
    const body = () =>
      new ReadableStream({
        pull(c) {
          c.enqueue(new TextEncoder().encode("x"));
        },
        cancel() {
          cancelled++;
        },
      });
    const s = scripted([
      () => new Response(body(), { status: 503 }),
      () => new Response(body(), { status: 500 }),
      () => "ok",
    ]);
    await runRetry(s.fn);
    expect(cancelled).toBe(2);
  });

  it("shouldRetry overrides the default; onRetry sees attempt, error and delay", async () => {
    const infos: RetryInfo[] = [];
    const s = scripted([thrown(400), thrown(503), () => "ok"]);
    const out = await runRetry(s.fn, {
      shouldRetry: (e) =>
        (e as { status: number }).status === 400 ? true : undefined,
      onRetry: (i) => infos.push(i),
    });
    expect(out.result.value).toBe("ok");
    expect(
      infos.map((
        i,
      ) => [i.attempt, (i.error as { status: number }).status, i.delayMs]),
    )
      .toEqual([[1, 400, 375], [2, 503, 750]]);
    const never = scripted([thrown(503)]);
    await runRetry(never.fn, { shouldRetry: () => false });
    expect(never.calls()).toBe(1);
  });

  it("validates its options", async () => {
    const f = () => 1;
    await expect(retry(f, { retries: -1 })).rejects.toThrow(/'retries'.*-1/);
    await expect(retry(f, { retries: 1.5 })).rejects.toThrow(RangeError);
    await expect(retry(f, { retries: "3" as never })).rejects.toThrow(
      TypeError,
    );
    await expect(retry(f, { maxElapsedMs: 0 })).rejects.toThrow(
      /'maxElapsedMs'.*0/,
    );
    await expect(retry(f, { maxRetryAfterMs: NaN })).rejects.toThrow(
      /'maxRetryAfterMs'/,
    );
    await expect(retry(f, { baseMs: -5 })).rejects.toThrow(
      /retry 'baseMs'.*-5/,
    );
    await expect(retry(f, { jitter: "x" as never })).rejects.toThrow(
      /'jitter'/,
    );
    await expect(retry(f, { onRetry: 5 as never })).rejects.toThrow(
      /'onRetry'/,
    );
    await expect(retry(f, { retires: 3 } as never)).rejects.toThrow(
      /Unknown retry option 'retires'/,
    );
    await expect(retry(5 as never)).rejects.toThrow(/'fn'/);
    expect(await retry(f, { retries: Infinity })).toBe(1);
  });
});

describe("retry with @anthropic-ai/sdk errors from a real HTTP server", () => {
  it("classifies the SDK's RateLimitError and honours its retry-after", async () => {
    const { createServer } = await import("node:http");
    const { default: Anthropic } = await import("@anthropic-ai/sdk");
    let hits = 0;
    const server = createServer((req, res) => {
      hits++;
      req.resume();
      req.on("end", () => {
        if (hits === 1) {
          res.writeHead(429, {
            "content-type": "application/json",
            "retry-after": "1",
            "request-id": "req_test_1",
          });
          res.end(JSON.stringify({
            type: "error",
            error: {
              type: "rate_limit_error",
              message:
                "Number of request tokens has exceeded your per-minute rate limit",
            },
          }));
          return;
        }
        res.writeHead(200, {
          "content-type": "application/json",
          "request-id": "req_test_2",
        });
        res.end(JSON.stringify({
          id: "msg_1",
          type: "message",
          role: "assistant",
          model: "claude-test",
          content: [{ type: "text", text: "hello" }],
          stop_reason: "end_turn",
          stop_sequence: null,
          usage: { input_tokens: 5, output_tokens: 1 },
        }));
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const { port } = server.address() as { port: number };
    try {
      const client = new Anthropic({
        apiKey: "sk-test-not-a-key",
        baseURL: `http://127.0.0.1:${port}`,
        maxRetries: 0,
      });
      const clock = new ManualClock();
      const infos: RetryInfo[] = [];
      const p = retry(
        () =>
          client.messages.create({
            model: "claude-test",
            max_tokens: 10,
            messages: [{ role: "user", content: "hi" }],
          }),
        { clock, onRetry: (i) => infos.push(i) },
      );
      // Wait (in real time) for the first attempt to fail and the retry to sleep.
      for (let i = 0; i < 200 && clock.pending === 0; i++) {
        await new Promise((r) => setTimeout(r, 5));
      }
      expect(clock.pending).toBe(1);
      expect(infos).toHaveLength(1);
      expect(infos[0]!.delayMs).toBe(1000);
      expect(infos[0]!.serverTold).toBe(true);
      expect((infos[0]!.error as { name: string }).name).toBe("RateLimitError");
      await clock.advance(1000);
      const message = await p;
      expect(message.content[0]).toEqual({ type: "text", text: "hello" });
      expect(hits).toBe(2);
    } finally {
      await new Promise((r) => server.close(r));
    }
  });
});

// -----------------------------------------------------------------------------
// Concurrency
// -----------------------------------------------------------------------------

/** Collects unhandled rejections while `body` runs (Node, Bun and Deno). */
async function noUnhandled(body: () => Promise<void>): Promise<void> {
  const seen: unknown[] = [];
  const proc = (globalThis as {
    process?: {
      on(e: string, f: (r: unknown) => void): void;
      off(e: string, f: (r: unknown) => void): void;
    };
  }).process;
  const onNode = (r: unknown) => seen.push(r);
  const onWeb = (e: Event) => {
    e.preventDefault();
    seen.push((e as PromiseRejectionEvent).reason);
  };
  const web = typeof globalThis.addEventListener === "function" && !proc;
  if (proc) proc.on("unhandledRejection", onNode);
  if (web) globalThis.addEventListener("unhandledrejection", onWeb);
  try {
    await body();
    await new Promise((r) => setTimeout(r, 10)); // let stragglers surface
  } finally {
    if (proc) proc.off("unhandledRejection", onNode);
    if (web) globalThis.removeEventListener("unhandledrejection", onWeb);
  }
  expect(seen).toEqual([]);
}

/** Runs the clock until `p` settles; returns how it settled. */
async function settle<T>(clock: ManualClock, p: Promise<T>) {
  const r = track(clock, p);
  for (let i = 0; i < 10_000 && !r.done; i++) {
    const next = clock.nextAt;
    await (next === undefined
      ? clock.flush()
      : clock.advance(next - clock.now()));
  }
  expect(r.done).toBe(true);
  return r;
}

/** An instrumented fn: sleeps `delays[i]` on the clock, tracks concurrency. */
function sleepy(clock: ManualClock, delays: (i: number) => number) {
  const stats = { running: 0, peak: 0, calls: 0, finished: 0 };
  const fn = async (item: number, i: number, signal: AbortSignal) => {
    stats.calls++;
    stats.peak = Math.max(stats.peak, ++stats.running);
    try {
      await clock.sleep(delays(i), signal);
      return item * 2;
    } finally {
      stats.running--;
      stats.finished++;
    }
  };
  return { fn, stats };
}

function* counting(
  log: { pulled: number; returned: boolean },
  limit = Infinity,
) {
  try {
    for (let i = 0; i < limit; i++) {
      log.pulled++;
      yield i;
    }
  } finally {
    log.returned = true;
  }
}

describe("mapConcurrent", () => {
  it("keeps input order with random completion times; never exceeds and fills concurrency", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const delays = Array.from(
        { length: 200 },
        (_, i) => ((i * 7919) % 97) + 1,
      );
      const { fn, stats } = sleepy(clock, (i) => delays[i]!);
      const input = Array.from({ length: 200 }, (_, i) => i);
      const r = await settle(
        clock,
        mapConcurrent(input, fn, { concurrency: 7 }),
      );
      expect(r.value).toEqual(input.map((x) => x * 2));
      expect(stats.peak).toBe(7);
      expect(stats.calls).toBe(200);
    });
  });

  it("pulls lazily: never more than concurrency items ahead of completion", async () => {
    const clock = new ManualClock();
    const log = { pulled: 0, returned: false };
    let maxAhead = 0;
    const { fn, stats } = sleepy(clock, () => 10);
    const wrapped = (x: number, i: number, s: AbortSignal) => {
      maxAhead = Math.max(maxAhead, log.pulled - stats.finished);
      return fn(x, i, s);
    };
    const r = await settle(
      clock,
      mapConcurrent(counting(log, 50), wrapped, { concurrency: 4 }),
    );
    expect((r.value as number[]).length).toBe(50);
    expect(maxAhead).toBeLessThanOrEqual(4);
    expect(stats.peak).toBe(4);
  });

  it("an infinite generator stops at the first error and is closed", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      const boom = new Error("item 25 failed");
      const { fn, stats } = sleepy(clock, () => 5);
      const r = await settle(
        clock,
        mapConcurrent(counting(log), (x, i, s) => {
          if (i === 25) throw boom;
          return fn(x, i, s);
        }, { concurrency: 3 }),
      );
      expect(r.error).toBe(boom);
      expect(log.returned).toBe(true);
      expect(log.pulled).toBeLessThanOrEqual(28);
      expect(stats.running).toBe(0); // structured: nothing still running
    });
  });

  it("aborts running fns with the error and rejects only after they settle", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const boom = new Error("boom");
      const reasons: unknown[] = [];
      let running = 0;
      const p = mapConcurrent([0, 1, 2, 3], async (x, _i, signal) => {
        running++;
        try {
          if (x === 1) {
            await clock.sleep(5);
            throw boom;
          }
          // Ignores the abort for a while, like a slow cleanup.
          await clock.sleep(100).then(() => signal.throwIfAborted());
          return x;
        } catch (e) {
          reasons.push(e);
          throw e;
        } finally {
          running--;
        }
      }, { concurrency: 3 });
      const r = track(clock, p);
      await clock.advance(50);
      expect(r.done).toBe(false); // items 0 and 2 still running
      await clock.advance(100);
      expect(r.error).toBe(boom);
      expect(running).toBe(0);
      expect(reasons).toEqual([boom, boom, boom]); // 0 and 2 saw the abort reason
    });
  });

  it("accepts async iterables", async () => {
    const clock = new ManualClock();
    async function* gen() {
      for (let i = 0; i < 20; i++) {
        await clock.sleep(1);
        yield i;
      }
    }
    const { fn, stats } = sleepy(clock, (i) => 20 - i);
    const r = await settle(clock, mapConcurrent(gen(), fn, { concurrency: 5 }));
    expect(r.value).toEqual(Array.from({ length: 20 }, (_, i) => i * 2));
    expect(stats.peak).toBeLessThanOrEqual(5);
  });

  it("reports a throwing iterator as the error and stops", async () => {
    await noUnhandled(async () => {
      const bad = new Error("input broke");
      function* gen() {
        yield 1;
        yield 2;
        throw bad;
      }
      await expect(mapConcurrent(gen(), (x) => x)).rejects.toBe(bad);
      const asyncBad = {
        [Symbol.asyncIterator]() {
          let n = 0;
          return {
            next: () =>
              n++ < 2
                ? Promise.resolve({ value: n, done: false })
                : Promise.reject(bad),
          };
        },
      };
      await expect(mapConcurrent(asyncBad, (x) => x)).rejects.toBe(bad);
    });
  });

  it("sync throws, non-Error throws, sync values", async () => {
    await noUnhandled(async () => {
      await expect(mapConcurrent([1, 2], () => {
        throw new TypeError("sync");
      })).rejects.toThrow("sync");
      await expect(mapConcurrent([1, 2], () => {
        throw "a string";
      })).rejects.toBe("a string");
      await expect(mapConcurrent([1, 2], () => Promise.reject(undefined)))
        .rejects.toBe(undefined);
      expect(await mapConcurrent(new Set([1, 2, 3]), (x) => x + 1)).toEqual([
        2,
        3,
        4,
      ]);
      expect(await mapConcurrent("abc", (c, i) => c + i)).toEqual([
        "a0",
        "b1",
        "c2",
      ]);
    });
  });

  it("concurrency Infinity starts everything; empty input resolves to []", async () => {
    const clock = new ManualClock();
    const { fn, stats } = sleepy(clock, () => 10);
    const r = await settle(
      clock,
      mapConcurrent(Array.from({ length: 100 }, (_, i) => i), fn, {
        concurrency: Infinity,
      }),
    );
    expect((r.value as number[]).length).toBe(100);
    expect(stats.peak).toBe(100);
    const log = { pulled: 0, returned: false };
    const s2 = sleepy(clock, () => 10);
    await settle(
      clock,
      mapConcurrent(counting(log, 30), s2.fn, { concurrency: Infinity }),
    );
    expect(s2.stats.peak).toBe(30);
    expect(await mapConcurrent([], () => 1)).toEqual([]);
    expect(await mapConcurrent((function* () {})(), () => 1)).toEqual([]);
  });

  it("a signal aborted before the start rejects at once; fn is never called", async () => {
    let calls = 0;
    const log = { pulled: 0, returned: false };
    await expect(
      mapConcurrent(counting(log), () => calls++, {
        signal: AbortSignal.abort("early"),
      }),
    ).rejects.toBe("early");
    expect(calls).toBe(0);
    expect(log.pulled).toBe(0);
  });

  it("aborting the outer signal stops, aborts running fns, closes the input, cleans up", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const { ctl, listeners } = countedSignal();
      const log = { pulled: 0, returned: false };
      const { fn, stats } = sleepy(clock, () => 100);
      const r = track(
        clock,
        mapConcurrent(counting(log), fn, {
          concurrency: 4,
          signal: ctl.signal,
        }),
      );
      await clock.advance(250);
      expect(listeners()).toBe(1);
      ctl.abort("stop now");
      await clock.flush();
      expect(r.error).toBe("stop now");
      expect(stats.running).toBe(0);
      expect(log.returned).toBe(true);
      expect(listeners()).toBe(0);
      expect(clock.pending).toBe(0);
    });
  });

  it("removes its abort listener after a normal finish", async () => {
    const { ctl, listeners } = countedSignal();
    await mapConcurrent([1, 2, 3], (x) => x, { signal: ctl.signal });
    expect(listeners()).toBe(0);
    await mapConcurrent([1, 2, 3], () => {
      throw new Error("x");
    }, { signal: ctl.signal }).catch(() => {});
    expect(listeners()).toBe(0);
  });

  it("stopOnError: false runs everything and rejects with all errors in input order", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const errs = new Map([[7, new Error("e7")], [2, new Error("e2")], [
        11,
        new Error("e11"),
      ]]);
      const { fn, stats } = sleepy(clock, (i) => 50 - i * 3);
      const r = await settle(
        clock,
        mapConcurrent(
          Array.from({ length: 15 }, (_, i) => i),
          async (x, i, s) => {
            const v = await fn(x, i, s);
            if (errs.has(i)) throw errs.get(i);
            return v;
          },
          { concurrency: 4, stopOnError: false },
        ),
      );
      expect(stats.calls).toBe(15);
      expect(r.error).toBeInstanceOf(AggregateError);
      expect((r.error as AggregateError).errors).toEqual([
        errs.get(2),
        errs.get(7),
        errs.get(11),
      ]);
      expect((r.error as AggregateError).message).toBe("3 of 15 items failed");
    });
  });

  it("onProgress: once per settled item, with total for sized inputs", async () => {
    const seen: MapProgress[] = [];
    await mapConcurrent([1, 2, 3, 4], (x) => {
      if (x === 3) throw new Error("3");
      return x;
    }, { stopOnError: false, concurrency: 2, onProgress: (p) => seen.push(p) })
      .catch(() => {});
    expect(seen.length).toBe(4);
    expect(seen.at(-1)).toEqual({ done: 4, failed: 1, running: 0, total: 4 });
    const gen: MapProgress[] = [];
    await mapConcurrent(
      (function* () {
        yield 1;
        yield 2;
      })(),
      (x) => x,
      { onProgress: (p) => gen.push(p) },
    );
    expect(gen.at(-1)).toEqual({
      done: 2,
      failed: 0,
      running: 0,
      total: undefined,
    });
  });

  it("validates its arguments", async () => {
    await expect(mapConcurrent(5 as never, (x) => x)).rejects.toThrow(
      /'input'.*number/,
    );
    await expect(mapConcurrent(null as never, (x) => x)).rejects.toThrow(
      TypeError,
    );
    await expect(mapConcurrent([1], "f" as never)).rejects.toThrow(/'fn'/);
    for (const c of [0, -1, 1.5, NaN]) {
      await expect(mapConcurrent([1], (x) => x, { concurrency: c })).rejects
        .toThrow(
          RangeError,
        );
    }
    await expect(mapConcurrent([1], (x) => x, { concurrency: 0 })).rejects
      .toThrow(
        /'concurrency'.*0/,
      );
    await expect(mapConcurrent([1], (x) => x, { concurrency: "2" as never }))
      .rejects
      .toThrow(TypeError);
    expect(() => mapConcurrentIterable([1], (x) => x, { buffer: 0 })).toThrow(
      /'buffer'.*0/,
    );
  });
});

describe("mapConcurrentSettled", () => {
  it("returns every outcome in order and never rejects because of fn", async () => {
    await noUnhandled(async () => {
      const out = await mapConcurrentSettled([1, 2, 3, 4], async (x) => {
        await Promise.resolve();
        if (x % 2 === 0) throw new Error(`bad ${x}`);
        return x * 10;
      }, { concurrency: 2 });
      expect(
        out.map((r) =>
          r.status === "fulfilled" ? r.value : (r.reason as Error).message
        ),
      )
        .toEqual([10, "bad 2", 30, "bad 4"]);
    });
  });
});

describe("mapConcurrentIterable", () => {
  it("yields in order; with item 0 slow, at most `buffer` results wait", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      let finishedUnyielded = 0;
      let maxWaiting = 0;
      const out: number[] = [];
      const it = mapConcurrentIterable(counting(log, 100), async (x, i, s) => {
        await clock.sleep(i === 0 ? 1000 : 1, s);
        finishedUnyielded++;
        maxWaiting = Math.max(maxWaiting, finishedUnyielded);
        return x;
      }, { concurrency: 3, buffer: 8 });
      const consumer = (async () => {
        for await (const v of it) {
          finishedUnyielded--;
          out.push(v);
        }
      })();
      await clock.advance(500);
      expect(out).toEqual([]);
      expect(log.pulled).toBeLessThanOrEqual(8); // input not pulled past the buffer
      expect(maxWaiting).toBeLessThanOrEqual(8);
      await settle(clock, consumer);
      expect(out).toEqual(Array.from({ length: 100 }, (_, i) => i));
      expect(maxWaiting).toBeLessThanOrEqual(8);
    });
  });

  it("break aborts running work and closes the input iterator", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      const { fn, stats } = sleepy(clock, (i) => (i === 1 ? 10_000 : 5));
      const aborted: unknown[] = [];
      const got: number[] = [];
      const consumer = (async () => {
        for await (
          const v of mapConcurrentIterable(counting(log), async (x, i, s) => {
            s.addEventListener("abort", () => aborted.push(s.reason), {
              once: true,
            });
            return await fn(x, i, s);
          }, { concurrency: 4 })
        ) {
          got.push(v);
          if (got.length === 1) break;
        }
      })();
      await settle(clock, consumer);
      expect(got).toEqual([0]);
      expect(log.returned).toBe(true);
      expect(stats.running).toBe(0);
      expect(aborted.length).toBeGreaterThan(0);
      expect((aborted[0] as DOMException).name).toBe("AbortError");
      expect(clock.pending).toBe(0);
    });
  });

  it("throws the first error after running work settles", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const { fn, stats } = sleepy(clock, () => 10);
      const got: number[] = [];
      const boom = new Error("item 5");
      const r = await settle(
        clock,
        (async () => {
          for await (
            const v of mapConcurrentIterable(
              Array.from({ length: 50 }, (_, i) => i),
              (x, i, s) => {
                if (i === 5) throw boom;
                return fn(x, i, s);
              },
              { concurrency: 3 },
            )
          ) got.push(v);
        })(),
      );
      expect(r.error).toBe(boom);
      // Items 3 and 4 were running when item 5 threw: they were aborted.
      expect(got).toEqual([0, 2, 4]);
      expect(stats.running).toBe(0);
    });
  });

  it("default buffer: behind an item that never finishes, pulls until max(16 × concurrency, 256) wait, no further", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      const out: number[] = [];
      const consumer = (async () => {
        for await (
          const v of mapConcurrentIterable(
            counting(log, 2000),
            async (x, i, s) => {
              if (i === 0) await held;
              else await clock.sleep(1, s);
              return x;
            },
            { concurrency: 4 },
          )
        ) out.push(v);
      })();
      for (let t = 0; t < 600; t++) await clock.advance(1);
      expect(out).toEqual([]);
      expect(log.pulled).toBe(256); // 16 × 4 = 64 < 256: the floor applies
      release();
      await settle(clock, consumer);
      expect(out).toEqual(Array.from({ length: 2000 }, (_, i) => i));
    });
    const log = { pulled: 0, returned: false };
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const it = mapConcurrentIterable(counting(log, 5000), async (x, i) => {
      if (i === 0) await held;
      return x;
    }, { concurrency: 32 });
    const first = it.next();
    await new Promise((r) => setTimeout(r, 20));
    expect(log.pulled).toBe(512); // 16 × 32
    release();
    expect((await first).value).toBe(0);
    await it.return!();
  });

  it("does nothing before the first next()", async () => {
    let calls = 0;
    const log = { pulled: 0, returned: false };
    mapConcurrentIterable(counting(log), () => calls++);
    await new Promise((r) => setTimeout(r, 5));
    expect(calls).toBe(0);
    expect(log.pulled).toBe(0);
  });
});

describe("mapConcurrentUnordered", () => {
  it("keeps going behind an item that never finishes; indexes and values right", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      let release!: () => void;
      const held = new Promise<void>((r) => (release = r));
      const got: { index: number; value: number }[] = [];
      let running = 0;
      let peak = 0;
      const consumer = (async () => {
        for await (
          const r of mapConcurrentUnordered(
            counting(log, 1000),
            async (x, i, s) => {
              peak = Math.max(peak, ++running);
              try {
                if (i === 0) await held;
                else await clock.sleep(1 + (i % 3), s);
                return x * 3;
              } finally {
                running--;
              }
            },
            { concurrency: 4 },
          )
        ) got.push(r);
      })();
      for (let t = 0; t < 2000 && got.length < 999; t++) await clock.advance(1);
      expect(got.length).toBe(999); // everything but the held item
      expect(log.pulled).toBe(1000);
      expect(got.some((r) => r.index === 0)).toBe(false);
      release();
      await settle(clock, consumer);
      expect(got.length).toBe(1000);
      expect(got.at(-1)).toEqual({ index: 0, value: 0 });
      const byIndex = [...got].sort((a, b) => a.index - b.index);
      expect(byIndex).toEqual(
        Array.from({ length: 1000 }, (_, i) => ({ index: i, value: i * 3 })),
      );
      expect(peak).toBe(4);
    });
  });

  it("a slow consumer bounds memory: running + waiting results ≤ buffer", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      let finishedUntaken = 0;
      let maxHeld = 0;
      let running = 0;
      const it = mapConcurrentUnordered(
        counting(log, 300),
        async (x, _i, s) => {
          running++;
          maxHeld = Math.max(maxHeld, running + finishedUntaken);
          await clock.sleep(1, s);
          running--;
          finishedUntaken++;
          maxHeld = Math.max(maxHeld, running + finishedUntaken);
          return x;
        },
        { concurrency: 3 },
      );
      const consumer = (async () => {
        let n = 0;
        for await (const _ of it) {
          finishedUntaken--;
          n++;
          await clock.sleep(5); // slower than the pool
        }
        return n;
      })();
      const r = await settle(clock, consumer);
      expect(r.value).toBe(300);
      // Default buffer 2 × 3, plus the one result in the consumer's hands
      // (taken, not yet counted off by the loop body).
      expect(maxHeld).toBeLessThanOrEqual(7);
      expect(maxHeld).toBeGreaterThanOrEqual(3);
    });
  });

  it("break aborts running work and closes the input; the first error is thrown after running work settles", async () => {
    await noUnhandled(async () => {
      const clock = new ManualClock();
      const log = { pulled: 0, returned: false };
      const { fn, stats } = sleepy(clock, (i) => (i === 1 ? 10_000 : 5));
      const got: number[] = [];
      await settle(
        clock,
        (async () => {
          for await (
            const r of mapConcurrentUnordered(counting(log), fn, {
              concurrency: 4,
            })
          ) {
            got.push(r.index);
            if (got.length === 3) break;
          }
        })(),
      );
      expect(got.length).toBe(3);
      expect(got).not.toContain(1);
      expect(log.returned).toBe(true);
      expect(stats.running).toBe(0);
      expect(clock.pending).toBe(0);

      const boom = new Error("item 5");
      const { fn: fn2, stats: stats2 } = sleepy(clock, () => 10);
      const r = await settle(
        clock,
        (async () => {
          for await (
            const _ of mapConcurrentUnordered(
              Array.from({ length: 50 }, (_, i) => i),
              (x, i, s) => {
                if (i === 5) throw boom;
                return fn2(x, i, s);
              },
              { concurrency: 3 },
            )
          );
        })(),
      );
      expect(r.error).toBe(boom);
      expect(stats2.running).toBe(0);
    });
  });

  it("an aborted signal stops it with the reason; bad options throw at once, naming them", async () => {
    const ctl = new AbortController();
    const reason = new Error("stop");
    const clock = new ManualClock();
    const { fn, stats } = sleepy(clock, () => 100);
    const r = track(
      clock,
      (async () => {
        for await (
          const _ of mapConcurrentUnordered([1, 2, 3, 4], fn, {
            concurrency: 2,
            signal: ctl.signal,
          })
        );
      })(),
    );
    await clock.advance(10);
    ctl.abort(reason);
    await new Promise((res) => setTimeout(res, 5));
    expect(r.error).toBe(reason);
    expect(stats.running).toBe(0);
    expect(() => mapConcurrentUnordered([1], (x) => x, { buffer: 0 }))
      .toThrow(/mapConcurrentUnordered 'buffer'.*0/);
    expect(() => mapConcurrentUnordered([1], (x) => x, { concurrency: -1 }))
      .toThrow(RangeError);
  });
});

describe("promises in the input (p-map semantics)", () => {
  it("awaits promise elements before fn; a rejected one is that item's error", async () => {
    await noUnhandled(async () => {
      const input = [Promise.resolve([10, 300]), [20, 200]];
      const sums = await mapConcurrent(input, ([a, b]) => a! + b!);
      expect(sums).toEqual([310, 220]);

      const bad = new Error("element 1");
      const failing = () => [1, Promise.reject(bad), 3];
      await expect(mapConcurrent(failing(), (x) => x * 2)).rejects.toBe(bad);
      const agg = await mapConcurrent(failing(), (x) => x * 2, {
        stopOnError: false,
      }).catch((e) => e);
      expect(agg).toBeInstanceOf(AggregateError);
      expect(agg.errors).toEqual([bad]);
      const settled = await mapConcurrentSettled(failing(), (x) => x * 2);
      expect(settled.map((r) => r.status)).toEqual([
        "fulfilled",
        "rejected",
        "fulfilled",
      ]);
      const streamed: number[] = [];
      function* lazy() {
        yield Promise.resolve(1);
        yield 2;
        yield new Promise<number>((r) => setTimeout(() => r(3), 5));
      }
      for await (const v of mapConcurrentIterable(lazy(), (x) => x)) {
        streamed.push(v);
      }
      expect(streamed).toEqual([1, 2, 3]);
    });
  });

  it("a pending element holds a slot: the concurrency bound counts it", async () => {
    let running = 0;
    let peak = 0;
    const slow = new Promise<number>((r) => setTimeout(() => r(0), 20));
    const out = await mapConcurrent([slow, 1, 2, 3], async (x) => {
      peak = Math.max(peak, ++running);
      await new Promise((r) => setTimeout(r, 5));
      running--;
      return x;
    }, { concurrency: 2 });
    expect(out).toEqual([0, 1, 2, 3]);
    expect(peak).toBeLessThanOrEqual(2);
  });
});

describe("HttpError", () => {
  it("reads both providers' error shapes and names a quota 429", () => {
    const quota = HttpError.from(
      new Response(null, { status: 429 }),
      JSON.stringify({
        type: "error",
        error: {
          type: "rate_limit_error",
          message: "usage limits",
          details: { error_code: "enforced_spend_limit_reached" },
        },
      }),
    );
    expect(quota.type).toBe("rate_limit_error");
    expect(quota.quota).toBe("enforced_spend_limit_reached");
    const openai = HttpError.from(
      new Response(null, { status: 429 }),
      JSON.stringify({
        error: { message: "quota", type: "insufficient_quota", code: null },
      }),
    );
    expect(openai.quota).toBe("insufficient_quota");
    const plain = HttpError.from(
      new Response(null, { status: 429 }),
      JSON.stringify({ error: { type: "rate_limit_error", message: "slow" } }),
    );
    expect(plain.quota).toBeUndefined();
    const notFound = new HttpError(404, {
      body: { error: { code: "insufficient_quota" } },
    });
    expect(notFound.quota).toBeUndefined(); // only a 429 is a quota refusal
  });
});
