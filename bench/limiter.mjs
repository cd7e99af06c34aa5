// @ts-check
// Limiter overhead when never throttled: how many acquisitions per second.
import { RateLimiter } from "../dist/mod.js";
import { RateLimiter as LimiterRL } from "limiter";
import PQueue from "p-queue";
import { RateLimit } from "async-sema";
import { fmt, interleave, table } from "./lib.mjs";

const HUGE = 1e12;

/** ops/s of `n` sequential awaited calls of `op`. */
async function opsPerSecAsync(n, op) {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) await op();
  return n / ((performance.now() - t0) / 1000);
}

function opsPerSecSync(n, op) {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) if (!op()) throw new Error("refused");
  return n / ((performance.now() - t0) / 1000);
}

export async function limiterOverhead({ quick }) {
  const n = quick ? 20_000 : 200_000;
  const rounds = quick ? 3 : 7;
  const ours = () =>
    new RateLimiter({
      windows: [{ key: "requests", limit: HUGE, ms: 60_000 }],
    });
  const asyncContenders = [
    {
      name: "paceline `acquire()`",
      run: () => {
        const l = ours();
        return opsPerSecAsync(n, () => l.acquire());
      },
    },
    {
      name: "limiter `removeTokens(1)`",
      run: () => {
        const l = new LimiterRL({
          tokensPerInterval: HUGE,
          interval: "minute",
        });
        return opsPerSecAsync(n, () => l.removeTokens(1));
      },
    },
    {
      name: "async-sema `RateLimit()`",
      run: () => {
        // async-sema keeps a token per unit of the limit and a timer per
        // call: a huge limit would not fit in memory. 1 M per second is
        // never reached by one round.
        const wait = RateLimit(1_000_000, { timeUnit: 1000 });
        return opsPerSecAsync(n, wait);
      },
    },
    {
      name: "p-queue `add()` with `intervalCap`",
      run: () => {
        const q = new PQueue({ intervalCap: HUGE, interval: 60_000 });
        return opsPerSecAsync(n, () => q.add(() => {}));
      },
    },
  ];
  const syncContenders = [
    {
      name: "paceline `tryAcquire()`",
      run: () => {
        const l = ours();
        return opsPerSecSync(n * 5, () => l.tryAcquire());
      },
    },
    {
      name: "limiter `tryRemoveTokens(1)`",
      run: () => {
        const l = new LimiterRL({
          tokensPerInterval: HUGE,
          interval: "minute",
        });
        return opsPerSecSync(n * 5, () => l.tryRemoveTokens(1));
      },
    },
  ];
  const a = await interleave(
    asyncContenders,
    rounds,
    "limiter `removeTokens(1)`",
  );
  const s = await interleave(
    syncContenders,
    rounds,
    "limiter `tryRemoveTokens(1)`",
  );
  const row = (r) => [
    r.name,
    `${fmt(r.median)}/s`,
    `${fmt(r.min)}–${fmt(r.max)}`,
    `${r.ratio.toFixed(2)}×`,
  ];
  return {
    markdown: [
      `### Limiter overhead, never throttled (${
        fmt(n)
      } awaited calls per round; ${rounds} interleaved rounds)`,
      "",
      table(
        ["contender", "median", "min–max", "vs limiter"],
        [...a, ...s].map(row),
      ),
    ].join("\n"),
    results: { async: a, sync: s },
  };
}
