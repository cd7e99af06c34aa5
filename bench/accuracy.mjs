// @ts-check
// Accuracy in real time: limit L per W ms. We record the real start time of
// every admitted call and replay them against a strict sliding-window server.
import { RateLimiter } from "../dist/mod.js";
import { RateLimiter as LimiterRL } from "limiter";
import PQueue from "p-queue";
import Bottleneck from "bottleneck";
import { RateLimit } from "async-sema";
import { table } from "./lib.mjs";

/** Most starts in any window [t, t + ms). */
function maxInWindow(starts, ms) {
  let best = 0;
  let lo = 0;
  for (let hi = 0; hi < starts.length; hi++) {
    while (starts[hi] - starts[lo] >= ms) lo++;
    best = Math.max(best, hi - lo + 1);
  }
  return best;
}

/** How many starts a strict sliding-window server would refuse. */
function refused(starts, limit, ms) {
  const accepted = [];
  let lo = 0;
  let n = 0;
  for (const t of starts) {
    while (lo < accepted.length && t - accepted[lo] >= ms) lo++;
    if (accepted.length - lo >= limit) n++;
    else accepted.push(t);
  }
  return n;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Scenarios: groups of calls fired at offsets from t0. `theory` is the
 * earliest possible time of the last start under an exact sliding window.
 */
function scenarios(limit, ms) {
  return [
    {
      name: `${limit * 6} at once`,
      groups: [[0, limit * 6]],
      theory: 5 * ms,
    },
    {
      name: `${limit} at 0.9 W + ${limit} at 1.0 W`,
      groups: [[0.9 * ms, limit], [ms, limit]],
      theory: 1.9 * ms,
    },
    {
      name: `1 at 0, then ${limit} at 0.9 W + ${limit} at 1.0 W`,
      groups: [[0, 1], [0.9 * ms, limit], [ms, limit]],
      theory: 2 * ms,
    },
  ];
}

function contenders(limit, ms) {
  return [
    {
      name: "paceline (`marginMs: 0`)",
      make: () => {
        const l = new RateLimiter({
          windows: [{ key: "requests", limit, ms }],
          marginMs: 0,
        });
        return () => l.acquire();
      },
    },
    {
      name: "paceline (default margin)",
      make: () => {
        const l = new RateLimiter({
          windows: [{ key: "requests", limit, ms }],
        });
        return () => l.acquire();
      },
    },
    {
      name: "limiter `removeTokens`",
      make: () => {
        const l = new LimiterRL({ tokensPerInterval: limit, interval: ms });
        return () => l.removeTokens(1);
      },
    },
    {
      name: "p-queue `intervalCap`",
      make: () => {
        const q = new PQueue({ intervalCap: limit, interval: ms });
        return () => q.add(() => {});
      },
    },
    {
      name: "p-queue `intervalCap` + `strict`",
      make: () => {
        const q = new PQueue({
          intervalCap: limit,
          interval: ms,
          strict: true,
        });
        return () => q.add(() => {});
      },
    },
    {
      name: "bottleneck reservoir",
      make: () => {
        const b = new Bottleneck({
          reservoir: limit,
          reservoirRefreshAmount: limit,
          reservoirRefreshInterval: ms,
        });
        return () => b.schedule(() => Promise.resolve());
      },
    },
    {
      name: "bottleneck `minTime`",
      make: () => {
        const b = new Bottleneck({ minTime: ms / limit });
        return () => b.schedule(() => Promise.resolve());
      },
    },
    {
      name: "async-sema `RateLimit`",
      make: () => RateLimit(limit, { timeUnit: ms }),
    },
  ];
}

async function runScenario(acquire, scenario) {
  const t0 = performance.now();
  const starts = [];
  const all = [];
  for (const [at, count] of scenario.groups) {
    const wait = t0 + at - performance.now();
    if (wait > 0) await sleep(wait);
    for (let i = 0; i < count; i++) {
      all.push(acquire().then(() => starts.push(performance.now() - t0)));
    }
  }
  await Promise.all(all);
  starts.sort((a, b) => a - b);
  return starts;
}

export async function accuracy({ quick }) {
  const limit = 50;
  const ms = quick ? 200 : 1000;
  const rows = [];
  const results = [];
  for (const scenario of scenarios(limit, ms)) {
    for (const c of contenders(limit, ms)) {
      const starts = await runScenario(c.make(), scenario);
      const last = starts[starts.length - 1];
      const r = {
        scenario: scenario.name,
        contender: c.name,
        max: maxInWindow(starts, ms),
        refused: refused(starts, limit, ms),
        utilization: scenario.theory / last,
        makespan: last / scenario.theory,
      };
      results.push(r);
      rows.push([
        r.scenario,
        r.contender,
        String(r.max),
        String(r.refused),
        r.makespan.toFixed(3),
      ]);
    }
  }
  return {
    markdown: [
      `### Accuracy: limit ${limit} per ${ms} ms, real time`,
      "",
      "Most starts in any sliding window (must be ≤ 50), calls a strict sliding-window server would refuse, and makespan ÷ the theoretical minimum (below 1 means it started calls too early).",
      "",
      table([
        "scenario",
        "contender",
        "max in window",
        "refused",
        "makespan ÷ theory",
      ], rows),
    ].join("\n"),
    results,
  };
}
