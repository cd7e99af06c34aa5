// RedisRateLimiter against a real Debian redis-server, through the two
// Node clients people use (node-redis and ioredis).
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import { createClient } from "redis";
import { Redis } from "ioredis";
import {
  mapConcurrent,
  rateLimitedFetch,
  RedisLimiterError,
  RedisRateLimiter,
  type RedisRateLimiterOptions,
} from "./mod.ts";
import { type RedisServer, startRedis } from "./test/redis.ts";
import { sim } from "./test/sims.ts";

let server: RedisServer;
let nodeRedis: ReturnType<typeof createClient>;
let ioredis: Redis;
/** The two adapters from the README, one per client. */
let viaNodeRedis: RedisRateLimiterOptions["redis"];
let viaIoredis: RedisRateLimiterOptions["redis"];

beforeAll(async () => {
  server = await startRedis();
  nodeRedis = createClient({ url: server.url });
  await nodeRedis.connect();
  ioredis = new Redis(server.port, "127.0.0.1");
  viaNodeRedis = (s, k, a) => nodeRedis.eval(s, { keys: k, arguments: a });
  viaIoredis = (s, k, a) => ioredis.eval(s, k.length, ...k, ...a);
});
afterAll(async () => {
  await nodeRedis?.quit();
  ioredis?.disconnect();
  await server?.kill();
});

let names = 0;
/** A fresh shared name per test. */
const fresh = () => `test-${process.pid}-${++names}`;
/** Two instances of `name`, one per client, exact windows. */
const pairOf = (name: string, windows: RedisRateLimiterOptions["windows"]) =>
  [viaNodeRedis, viaIoredis].map((redis) =>
    new RedisRateLimiter({ redis, name, windows, marginMs: 0 })
  ) as [RedisRateLimiter, RedisRateLimiter];

/** One caller of a random schedule: who, when, how much, abort and settle. */
const scheduleOp = (maxDelay: number) =>
  fc.record({
    who: fc.integer({ min: 0, max: 2 }),
    delay: fc.integer({ min: 0, max: maxDelay }),
    cost: fc.integer({ min: 1, max: 8 }),
    abortAfter: fc.option(fc.integer({ min: 0, max: 80 }), {
      nil: undefined,
    }),
    settleTo: fc.option(fc.integer({ min: 0, max: 8 }), { nil: undefined }),
  });
type ScheduleOp = {
  who: number;
  delay: number;
  cost: number;
  abortAfter: number | undefined;
  settleTo: number | undefined;
};

/**
 * Runs a schedule on three instances of one name (limit 10 tokens per
 * 150 ms); returns the grants as the model sees them: [time, amount].
 */
async function runSchedule(
  ops: ScheduleOp[],
  name: string,
  t0: number,
): Promise<[number, number][]> {
  const windows = [{ key: "tokens", limit: 10, ms: 150 }];
  const ls = [viaNodeRedis, viaIoredis, viaNodeRedis].map((redis) =>
    new RedisRateLimiter({ redis, name, windows, marginMs: 0 })
  );
  const grants: [number, number][] = [];
  await Promise.all(ops.map(async (op) => {
    await new Promise((r) => setTimeout(r, op.delay));
    const signal = op.abortAfter === undefined
      ? undefined
      : AbortSignal.timeout(op.abortAfter + 1);
    try {
      const p = await ls[op.who]!.acquire({ tokens: op.cost }, { signal });
      const g: [number, number] = [performance.now() - t0, op.cost];
      grants.push(g);
      // Settling down only (usage above the estimate is the server's to
      // refuse, not the limiter's to foresee).
      if (op.settleTo !== undefined && op.settleTo < op.cost) {
        p.settle({ tokens: op.settleTo });
        g[1] = op.settleTo;
      }
    } catch (e) {
      if (!signal?.aborted) throw e;
    }
  }));
  return grants.sort((x, y) => x[0] - y[0]);
}

/**
 * The strict model: the most granted in any 110 ms starting at a grant
 * (150 ms less 40 for timer and round-trip jitter between stamping and our
 * clock) is at most `limitAt(start)`.
 */
function withinModel(
  grants: [number, number][],
  limitAt: (start: number) => number,
): boolean {
  for (const [start] of grants) {
    let sum = 0;
    for (const [t, a] of grants) if (t >= start && t < start + 110) sum += a;
    if (sum > limitAt(start)) return false;
  }
  return true;
}

describe("RedisRateLimiter", () => {
  it("instances with one name (node-redis and ioredis) share a window: 10 per 400 ms between the four of them", async () => {
    const name = fresh();
    const make = (i: number) =>
      new RedisRateLimiter({
        redis: i % 2 ? viaIoredis : viaNodeRedis,
        name,
        windows: [{ key: "requests", limit: 10, ms: 400 }],
        marginMs: 0,
      });
    const limiters = [0, 1, 2, 3].map(make);
    const order: number[] = [];
    const t0 = performance.now();
    const at: number[] = [];
    await Promise.all(
      Array.from({ length: 40 }, async (_, i) => {
        await limiters[i % 4]!.acquire();
        order.push(i);
        at.push(performance.now() - t0);
      }),
    );
    // 40 at 10 per 400 ms: four waves, each a window after the one before
    // (less the timers' and round trips' jitter).
    at.sort((x, y) => x - y);
    for (let i = 0; i + 10 < at.length; i++) {
      expect(at[i + 10]! - at[i]!).toBeGreaterThanOrEqual(300);
    }
    expect(at[39]!).toBeGreaterThanOrEqual(3 * 400 - 50);
    const usage = await limiters[2]!.refresh();
    expect(usage.map((w) => [w.key, w.limit, w.ms])).toEqual([[
      "requests",
      10,
      400,
    ]]);
  });

  it("two instances, one name, limit 10 per window: exactly 10 granted between them", async () => {
    const name = fresh();
    const windows = [{ key: "requests", limit: 10, ms: 60_000 }];
    const a = new RedisRateLimiter({ redis: viaNodeRedis, name, windows });
    const b = new RedisRateLimiter({ redis: viaIoredis, name, windows });
    const ctl = new AbortController();
    let granted = 0;
    const all = Array.from(
      { length: 16 },
      (_, i) =>
        (i % 2 ? a : b).acquire(undefined, { signal: ctl.signal }).then(
          () => granted++,
          () => {},
        ),
    );
    await new Promise((r) => setTimeout(r, 400));
    expect(granted).toBe(10);
    expect(a.pending + b.pending).toBe(6);
    ctl.abort();
    await Promise.all(all);
    await new Promise((r) => setTimeout(r, 50));
    expect((await a.refresh())[0]!.used).toBe(10); // the six gave their places back
  });

  it("property: 3 instances, random arrivals, costs, aborts and settles: no window ever over its limit", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(scheduleOp(60), { minLength: 5, maxLength: 25 }),
        async (ops) => {
          const grants = await runSchedule(ops, fresh(), performance.now());
          return withinModel(grants, () => 10);
        },
      ),
      { numRuns: 15 },
    );
  });

  it("no starvation: a cost of 90 (limit 100 per second) gets through within about a window while another process keeps taking 5s", async () => {
    const name = fresh();
    const windows = [{ key: "tokens", limit: 100, ms: 1000 }];
    const small = new RedisRateLimiter({
      redis: viaNodeRedis,
      name,
      windows,
      marginMs: 0,
    });
    const big = new RedisRateLimiter({
      redis: viaIoredis,
      name,
      windows,
      marginMs: 0,
    });
    let stop = false;
    let smalls = 0;
    const stream = (async () => {
      // 5 every 25 ms: 200 a second wanted, twice the limit, forever
      while (!stop) {
        void small.acquire({ tokens: 5 }).then(() => smalls++);
        await new Promise((r) => setTimeout(r, 25));
      }
    })();
    await new Promise((r) => setTimeout(r, 1500)); // the stream owns the window
    const t0 = performance.now();
    await big.acquire({ tokens: 90 });
    const waited = performance.now() - t0;
    stop = true;
    await stream;
    // Behind it: only the smalls queued before it (at most a window's worth
    // of them), then its own turn.
    expect(waited).toBeLessThan(2_500);
    expect(smalls).toBeGreaterThan(0);
  });

  it("a pause from one instance holds every instance, including a waiter already given a later place", async () => {
    const name = fresh();
    const windows = [{ key: "requests", limit: 1, ms: 300 }];
    const [a, b] = pairOf(name, windows);
    await a.acquire(); // the window is full for 300 ms
    const t0 = performance.now();
    const waiting = b.acquire().then(() => performance.now() - t0); // placed at ~300 ms
    await new Promise((r) => setTimeout(r, 50));
    a.pause(800); // a 429 told A to wait 800 ms
    expect(await waiting).toBeGreaterThanOrEqual(800);
    const fresh2 = await b.acquire().then(() => performance.now() - t0);
    expect(fresh2).toBeGreaterThanOrEqual(800);
    expect(b.pausedUntil).toBe(-Infinity); // over by now
  });

  it("setLimit (e.g. learned from headers) is seen by every instance", async () => {
    const name = fresh();
    const a = new RedisRateLimiter({ redis: viaNodeRedis, name });
    const b = new RedisRateLimiter({ redis: viaIoredis, name });
    a.setLimit("requests", 2, 60_000);
    await a.acquire(); // the write goes before this
    const [w] = await b.refresh();
    expect([w!.key, w!.limit, w!.ms]).toEqual(["requests", 2, 60_000]);
    await b.acquire();
    const ctl = new AbortController();
    const third = b.acquire(undefined, { signal: ctl.signal });
    await new Promise((r) => setTimeout(r, 100));
    expect(b.pending).toBe(1);
    ctl.abort(new Error("gave up"));
    await expect(third).rejects.toThrow("gave up");
    // The aborted waiter's reservation was given back: still 2 of 2, not 3.
    await new Promise((r) => setTimeout(r, 50));
    expect((await a.refresh())[0]!.used).toBe(2);
  });

  it("settle corrects the shared log; freed capacity goes to the next caller", async () => {
    const name = fresh();
    const windows = [{ key: "outputTokens", limit: 1000, ms: 60_000 }];
    const a = new RedisRateLimiter({ redis: viaNodeRedis, name, windows });
    const b = new RedisRateLimiter({ redis: viaIoredis, name, windows });
    const p = await a.acquire({ outputTokens: 900 }); // max_tokens
    p.settle({ outputTokens: 100 }); // what the response used
    const t0 = performance.now();
    await b.acquire({ outputTokens: 800 }); // fits only because of the settle
    expect(performance.now() - t0).toBeLessThan(5_000);
    expect((await b.refresh())[0]!.used).toBe(900);
  });

  it("a cost that can never fit is a RangeError, at once", async () => {
    const l = new RedisRateLimiter({
      redis: viaNodeRedis,
      name: fresh(),
      rpm: 5,
    });
    await expect(l.acquire({ requests: 6 })).rejects.toThrow(
      /Cost can never fit: requests 6 exceeds the window limit 5 per 60000 ms/,
    );
    expect(() => l.timeUntil({ requests: 6 })).toThrow(RangeError);
    expect(() => l.tryAcquire()).toThrow(/use acquire/);
  });

  it("state stays bounded and expires: 3,000 admissions keep a few hundred fields; the key has a TTL", async () => {
    const name = fresh();
    const l = new RedisRateLimiter({
      redis: viaIoredis,
      name,
      windows: [{ key: "requests", limit: 100, ms: 100 }],
      marginMs: 0,
    });
    await mapConcurrent(Array.from({ length: 3000 }), () => l.acquire(), {
      concurrency: 32,
    });
    const fields = await ioredis.hlen(`paceline:{${name}}`);
    expect(fields).toBeLessThan(300);
    const ttl = await ioredis.pttl(`paceline:{${name}}`);
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(60_000 + 60_000 + 1000);
  });

  it("fails closed: a Redis that never answers or refuses rejects with an error naming Redis; abort works meanwhile", async () => {
    const silent = new RedisRateLimiter({
      redis: () => new Promise(() => {}),
      name: fresh(),
      rpm: 10,
      timeoutMs: 150,
    });
    const e = await silent.acquire().catch((x) => x);
    expect(e).toBeInstanceOf(RedisLimiterError);
    expect(e.message).toMatch(
      /Redis did not answer within 150 ms; nothing was admitted/,
    );
    const ctl = new AbortController();
    const p = silent.acquire(undefined, { signal: ctl.signal });
    ctl.abort(new Error("stop"));
    await expect(p).rejects.toThrow("stop");
    // A real outage: the server goes away.
    const doomed = await startRedis();
    const client = new Redis(doomed.port, "127.0.0.1", {
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
    });
    const l = new RedisRateLimiter({
      redis: (s, k, a) => client.eval(s, k.length, ...k, ...a),
      name: fresh(),
      rpm: 10,
      timeoutMs: 1000,
    });
    await l.acquire();
    await doomed.kill();
    const down = await l.acquire().catch((x) => x);
    expect(down).toBeInstanceOf(RedisLimiterError);
    expect(down.message).toMatch(/Redis/);
    client.disconnect();
    // Options are checked by name.
    expect(() => new RedisRateLimiter({ redis: viaIoredis, name: "" })).toThrow(
      /'name' must be a non-empty string/,
    );
    expect(() => new RedisRateLimiter({ redis: "x" as never, name: "n" }))
      .toThrow(/'redis' must be a function/);
    expect(() =>
      new RedisRateLimiter({ redis: viaIoredis, name: "n", rpm: -1 })
    ).toThrow(/'rpm'/);
  });

  it("rateLimitedFetch on a shared limiter: two 'processes' share the key's limits against a strict server, 0 × 429", async () => {
    const s = await sim({ limits: { requests: 10, windowMs: 1000 } });
    const name = fresh();
    const make = (redis: RedisRateLimiterOptions["redis"]) =>
      rateLimitedFetch({
        limiter: new RedisRateLimiter({
          redis,
          name,
          windows: [{ key: "requests", limit: 10, ms: 1000 }],
          // A compressed window: on a busy 2-core machine the request can
          // reach the in-process simulator 100+ ms after Redis stamped it
          // (a real minute's default margin is 300 ms).
          marginMs: 200,
        }),
        learn: false,
      });
    const fetches = [make(viaNodeRedis), make(viaIoredis)];
    const body = (i: number) =>
      JSON.stringify({
        model: "claude-sim",
        max_tokens: 16,
        messages: [{ role: "user", content: `q${i}` }],
      });
    await mapConcurrent(Array.from({ length: 40 }, (_, i) => i), async (i) => {
      const r = await fetches[i % 2]!(`${s.url}/v1/messages`, {
        method: "POST",
        body: body(i),
      });
      await r.text();
      expect(r.status).toBe(200);
    }, { concurrency: 16 });
    const st = s.stats();
    expect(st.accepted).toBe(40);
    expect(st.rateLimited.requests).toBe(0);
    expect(st.maxInWindow.requests).toBeLessThanOrEqual(10);
  });

  it("4 processes × 10 requests against a server allowing 10 per 1000 ms: each once, 0 × 429; one 429's retry-after pauses all four", async () => {
    const s = await sim({
      limits: { requests: 10, windowMs: 1000 },
      perClientFaults: { "p1-5": { status: 429, retryAfter: "1", times: 1 } },
    });
    const worker = join(import.meta.dirname, "test", "fetch_worker.mjs");
    expect(existsSync(join(import.meta.dirname, "dist", "mod.js"))).toBe(true);
    const name = fresh();
    const at = Date.now() + 2000; // all four booted and connected by then
    const codes = await Promise.all(
      [0, 1, 2, 3].map((id) =>
        new Promise<string>((resolve) => {
          const child = spawn(process.execPath, [
            worker,
            JSON.stringify({
              redis: server.url,
              sim: s.url,
              name,
              n: 10,
              id: `p${id}`,
              at,
              limit: 10,
              windowMs: 1000,
              // Four cold processes open their first connections inside the
              // first compressed window, on a busy machine: those requests can
              // arrive 150+ ms after Redis stamped them (a real minute gets 300 ms).
              marginMs: 300,
            }),
          ], { stdio: ["ignore", "pipe", "pipe"] });
          let out = "";
          child.stdout.on("data", (d) => (out += d));
          child.stderr.on("data", (d) => (out += d));
          child.on("exit", (c) => resolve(`${c} ${out.trim()}`));
        })
      ),
    );
    expect(codes).toEqual(["0 ok", "0 ok", "0 ok", "0 ok"]);
    const st = s.stats();
    expect(st.accepted).toBe(40);
    expect(Object.values(st.perClient).every((c) => c.succeeded === 1)).toBe(
      true,
    );
    // (On failure, when each non-200 came, ms after the first request.)
    expect({
      refused: st.rateLimited.requests,
      when: st.log.flatMap((x, i) =>
        x === "200" ? [] : [`${x}@${Math.round(st.logAt[i]! - st.logAt[0]!)}`]
      ),
    }).toEqual({ refused: 0, when: [expect.stringMatching(/^429@/)] });
    expect(st.maxInWindow.requests).toBeLessThanOrEqual(10);
    // The scripted 429 (retry-after: 1 s): nothing from any process arrived
    // during the pause, after the requests already on their way.
    const i429 = st.log.indexOf("429");
    expect(i429).toBeGreaterThanOrEqual(0);
    const t429 = st.logAt[i429]!;
    const during = st.logAt.filter((t) => t > t429 + 60 && t < t429 + 940);
    expect(during).toEqual([]);
  });

  it("rateLimitedFetch on a shared limiter: limits learned per model and a 429's pause are shared", async () => {
    const s = await sim({
      limits: { requests: 6, windowMs: 1000 },
      retryAfterMs: true,
    });
    const name = fresh();
    const make = (redis: RedisRateLimiterOptions["redis"]) =>
      rateLimitedFetch({
        limiter: new RedisRateLimiter({ redis, name, marginMs: 100 }),
        learn: { windowMs: 1000 },
      });
    const [f1, f2] = [make(viaNodeRedis), make(viaIoredis)];
    const send = (f: typeof f1, i: number) =>
      f(`${s.url}/v1/messages`, {
        method: "POST",
        body: JSON.stringify({
          model: "claude-sim",
          max_tokens: 16,
          messages: [{ role: "user", content: `x${i}` }],
        }),
      }).then((r) => r.text());
    await send(f1, 0); // f1 learns the model's 6 per second
    const m2 = f2.models; // f2 never saw a header yet
    expect(m2.size).toBe(0);
    await send(f2, 1);
    const learned = await (f2.models.get("claude-sim") as RedisRateLimiter)
      .refresh();
    expect(learned.map((w) => [w.key, w.limit])).toEqual([["requests", 6]]);
    // 30 more between them: the shared windows keep both under the limit.
    await Promise.all(
      Array.from({ length: 30 }, (_, i) => send(i % 2 ? f1 : f2, i + 2)),
    );
    const st = s.stats();
    expect(st.accepted).toBe(32);
    expect(st.maxInWindow.requests).toBeLessThanOrEqual(6);
    expect(Object.values(st.rateLimited).reduce((a, b) => a + b))
      .toBeLessThanOrEqual(1);
  });
});

describe("RedisRateLimiter when Redis loses its state", () => {
  /** The hash that holds a name's state. */
  const keyOf = (name: string) => `paceline:{${name}}`;

  it("state wiped (FLUSHALL, eviction): never unlimited; each instance puts its grants back; exact again after", async () => {
    const name = fresh();
    const windows = [{ key: "requests", limit: 10, ms: 1500 }];
    const [a, b] = pairOf(name, windows);
    const t0 = performance.now();
    for (let i = 0; i < 6; i++) await a.acquire();
    for (let i = 0; i < 4; i++) await b.acquire();
    await ioredis.flushall();
    expect(await ioredis.exists(keyOf(name))).toBe(0);
    // Each instance's first call after the loss puts back what it was
    // granted (and the first one installs the windows again). Once both
    // have called, the window is full as the server sees it: nobody may be
    // admitted before it ends, though Redis held nothing.
    expect((await b.refresh())[0]!.used).toBe(4);
    expect((await a.refresh())[0]!.used).toBe(10);
    const times: number[] = [];
    await Promise.all([a, b, a, b].map(async (l) => {
      await l.acquire();
      times.push(performance.now() - t0);
    }));
    for (const t of times) expect(t).toBeGreaterThanOrEqual(1500 - 40);
    // The windows came back with it, and the counts are exact again.
    expect(await ioredis.hget(keyOf(name), "cfg")).toBe("requests|1500|10|0");
    const used = (await a.refresh())[0]!.used;
    expect(used).toBe(4);
  });

  it("state wiped, only one instance calling: it is never unlimited; only the other's lost share can be over until it calls", async () => {
    const name = fresh();
    const [a, b] = pairOf(name, [{ key: "requests", limit: 10, ms: 1500 }]);
    for (let i = 0; i < 6; i++) await a.acquire();
    for (let i = 0; i < 4; i++) await b.acquire();
    await ioredis.flushall();
    let admitted = 0;
    const ctl = new AbortController();
    const tries = Array.from(
      { length: 10 },
      () =>
        a.acquire(undefined, { signal: ctl.signal }).then(
          () => admitted++,
          () => {},
        ),
    );
    await new Promise((r) => setTimeout(r, 500));
    // a knows its own 6: 4 more at most (b's 4 are the share it cannot
    // know until b calls). Before, all 10 went at once.
    expect(admitted).toBe(4);
    ctl.abort();
    await Promise.all(tries);
  });

  it("property: state wiped at a random point of 3 instances' random schedule: at most one window's worth over, and only in the window after the wipe", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(scheduleOp(200), { minLength: 5, maxLength: 25 }),
        fc.integer({ min: 0, max: 200 }),
        async (ops, wipeAt) => {
          const name = fresh();
          const t0 = performance.now();
          const wipe = new Promise((r) => setTimeout(r, wipeAt)).then(
            async () => {
              await ioredis.del(keyOf(name));
              return performance.now() - t0;
            },
          );
          const grants = await runSchedule(ops, name, t0);
          const wipedAt = await wipe;
          // At most 10 in any window, but at most 20 (never unlimited) in
          // those that overlap the one window after the wipe.
          return withinModel(
            grants,
            (start) => start + 110 > wipedAt && start < wipedAt + 150 ? 20 : 10,
          );
        },
      ),
      { numRuns: 15 },
    );
  });

  it(
    "Redis restarted empty within timeoutMs: a waiting acquire goes on, no error; limits hold after; gone longer: RedisLimiterError",
    async () => {
      const own = await startRedis();
      const client = createClient({
        url: own.url,
        socket: {
          reconnectStrategy: (n: number) => Math.min(50 * (n + 1), 200),
        },
      });
      client.on("error", () => {});
      await client.connect();
      const redis: RedisRateLimiterOptions["redis"] = (s, k, a) =>
        client.eval(s, { keys: k, arguments: a });
      const name = fresh();
      const limiter = new RedisRateLimiter({
        redis,
        name,
        windows: [{ key: "requests", limit: 5, ms: 3000 }],
        marginMs: 0,
        timeoutMs: 2500,
      });
      let again: Awaited<ReturnType<typeof startRedis>> | undefined;
      try {
        const t0 = performance.now();
        for (let i = 0; i < 5; i++) await limiter.acquire();
        await own.kill();
        // Asked while Redis is gone; it comes back empty 600 ms later.
        const waiting = limiter.acquire();
        await new Promise((r) => setTimeout(r, 600));
        again = await startRedis(own.port);
        await waiting; // no RedisLimiterError: a blip
        // Redis was empty, yet the window still held the 5 granted before.
        expect(performance.now() - t0).toBeGreaterThanOrEqual(3000 - 40);
        expect((await limiter.refresh())[0]!.limit).toBe(5);
        // Gone for longer than timeoutMs: an outage, fails closed.
        await again.kill();
        const e = await limiter.acquire().catch((x) => x);
        expect(e).toBeInstanceOf(RedisLimiterError);
        expect(e.message).toMatch(
          /Redis (failed .* did not come back|did not answer) within 2500 ms; nothing was admitted/,
        );
      } finally {
        if (client.isOpen) client.destroy();
        await again?.kill();
        await own.kill();
      }
    },
    20_000,
  );
});
