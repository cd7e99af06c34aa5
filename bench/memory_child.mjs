// @ts-check
// Run in a fresh process by bench/memory.mjs: `node --expose-gc memory_child.mjs <case> <n>`.
// Prints one JSON line: {peakMB, baselineMB, ...}.
import { mapConcurrentIterable, RateLimiter } from "../dist/mod.js";
import { pMapIterable } from "p-map";
import { RateLimiter as LimiterRL } from "limiter";

const [which, nArg] = process.argv.slice(2);
const n = Number(nArg);
const gc = /** @type {() => void} */ (globalThis.gc);
gc();
const baseline = process.memoryUsage().heapUsed;
let peak = baseline;
let samples = 0;
const every = Math.max(1, Math.round(n / 10_000 / 20)); // ~20 checkpoints
// Each checkpoint runs a full GC first, so the peak is what is retained while
// the run is in flight (a growing buffer would show), not uncollected garbage.
const sample = () => {
  if (++samples % every !== 0) return;
  gc();
  const h = process.memoryUsage().heapUsed;
  if (h > peak) peak = h;
};

function* lazy() {
  for (let i = 0; i < n; i++) yield { id: i, prompt: `prompt number ${i}` };
}
// deno-lint-ignore require-await
const fn = async (x) => ({ id: x.id, answer: x.prompt.length });

let count = 0;
if (which === "empty") {
  for (const x of lazy()) {
    await fn(x);
    if (++count % 10_000 === 0) sample();
  }
} else if (which === "paceline") {
  for await (const _ of mapConcurrentIterable(lazy(), fn, { concurrency: 8 })) {
    if (++count % 10_000 === 0) sample();
  }
} else if (which === "p-map") {
  for await (const _ of pMapIterable(lazy(), fn, { concurrency: 8 })) {
    if (++count % 10_000 === 0) sample();
  }
} else if (which === "limiter-paceline") {
  // A clock that spreads the admissions evenly over one day.
  let t = 0;
  const clock = { now: () => t, sleep: () => Promise.resolve() };
  const l = new RateLimiter({ rpd: n, clock });
  for (let i = 0; i < n; i++) {
    t = (i * 86_400_000) / n;
    if (!l.tryAcquire()) throw new Error("refused");
    if (i % 10_000 === 0) sample();
  }
  gc();
  sample();
  count = n;
  process.stdout.write(
    JSON.stringify({
      entries: l.usage()[0].entries,
      retainedMB: (process.memoryUsage().heapUsed - baseline) / 2 ** 20,
    }) + "\n",
  );
} else if (which === "limiter-limiter") {
  const l = new LimiterRL({ tokensPerInterval: n, interval: "day" });
  for (let i = 0; i < n; i++) {
    if (!l.tryRemoveTokens(1)) throw new Error("refused");
    if (i % 10_000 === 0) sample();
  }
  gc();
  sample();
  count = n;
  process.stdout.write(
    JSON.stringify({
      retainedMB: (process.memoryUsage().heapUsed - baseline) / 2 ** 20,
    }) + "\n",
  );
} else throw new Error(`unknown case ${which}`);
if (count !== n) throw new Error(`processed ${count} of ${n}`);
gc();
const retained = process.memoryUsage().heapUsed;
process.stdout.write(
  JSON.stringify({
    peakMB: (peak - baseline) / 2 ** 20,
    endMB: (retained - baseline) / 2 ** 20,
  }) + "\n",
);
