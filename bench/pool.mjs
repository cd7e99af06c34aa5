// @ts-check
// Pool overhead: many trivial tasks through each contender at concurrency 8.
import {
  mapConcurrent,
  mapConcurrentIterable,
  mapConcurrentUnordered,
} from "../dist/mod.js";
import pMap, { pMapIterable } from "p-map";
import pLimit from "p-limit";
import PQueue from "p-queue";
import { Sema } from "async-sema";
import { fmt, interleave, median, table } from "./lib.mjs";

// deno-lint-ignore require-await
const task = async (x) => x + 1;

export async function pool({ quick }) {
  const a = await poolOverhead({ quick });
  const b = await poolStragglers({ quick });
  return {
    markdown: `${a.markdown}\n\n${b.markdown}`,
    results: { overhead: a.results, stragglers: b.results },
  };
}

/**
 * Streaming behind stragglers: 5 % of the items take 20 × as long (a request
 * sleeping in backoff looks like this). Timer-bound, so one round per
 * contender in rotating order is enough; the array version is the baseline.
 */
export async function poolStragglers({ quick }) {
  const n = quick ? 200 : 2000;
  const fastMs = quick ? 2 : 20;
  const slowMs = fastMs * 20;
  const C = 16;
  const rounds = quick ? 1 : 2;
  const input = Array.from({ length: n }, (_, i) => i);
  // Every 20th item is slow, starting at a pseudo-random offset per block.
  const slow = new Set(input.filter((i) => (i * 7) % 20 === 3));
  const task = (i) =>
    new Promise((r) => setTimeout(() => r(i), slow.has(i) ? slowMs : fastMs));
  const timed = async (consume) => {
    const t0 = performance.now();
    const got = await consume();
    if (got !== n) throw new Error(`got ${got} results of ${n}`);
    return (performance.now() - t0) / 1000;
  };
  const count = async (iterable) => {
    let k = 0;
    for await (const _ of iterable) k++;
    return k;
  };
  const contenders = [
    {
      name: "paceline `mapConcurrent` (array)",
      run: () =>
        timed(async () =>
          (await mapConcurrent(input, task, { concurrency: C })).length
        ),
    },
    {
      name: "paceline `mapConcurrentIterable`, default buffer",
      run: () =>
        timed(() =>
          count(mapConcurrentIterable(input, task, { concurrency: C }))
        ),
    },
    {
      name:
        "paceline `mapConcurrentIterable`, `buffer: 2 × concurrency` (old default)",
      run: () =>
        timed(() =>
          count(
            mapConcurrentIterable(input, task, {
              concurrency: C,
              buffer: 2 * C,
            }),
          )
        ),
    },
    {
      name: "paceline `mapConcurrentUnordered`",
      run: () =>
        timed(() =>
          count(mapConcurrentUnordered(input, task, { concurrency: C }))
        ),
    },
    {
      name: "p-map `pMapIterable` (default backpressure)",
      run: () =>
        timed(() => count(pMapIterable(input, task, { concurrency: C }))),
    },
  ];
  const times = new Map(contenders.map((c) => [c.name, []]));
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < contenders.length; i++) {
      const c = contenders[(i + r) % contenders.length];
      times.get(c.name).push(await c.run());
    }
  }
  const base = median(times.get(contenders[0].name));
  const results = contenders.map((c) => ({
    name: c.name,
    seconds: median(times.get(c.name)),
    ratio: median(times.get(c.name)) / base,
  }));
  return {
    markdown: [
      `### Streaming behind stragglers: ${
        fmt(n)
      } items, concurrency ${C}, 5 % take ${slowMs} ms and the rest ${fastMs} ms (${rounds} rotating round${
        rounds > 1 ? "s" : ""
      }, median)`,
      "",
      table(
        ["contender", "time", "vs `mapConcurrent` (array)"],
        results.map((r) => [
          r.name,
          `${r.seconds.toFixed(2)} s`,
          `${r.ratio.toFixed(2)}×`,
        ]),
      ),
      "",
      "Targets: ordered at defaults ≤ 1.10×, unordered ≤ 1.05×.",
    ].join("\n"),
    results,
  };
}

export async function poolOverhead({ quick }) {
  const n = quick ? 20_000 : 200_000;
  const rounds = quick ? 3 : 7;
  const input = Array.from({ length: n }, (_, i) => i);
  const C = 8;
  const tasksPerSec = async (run) => {
    const t0 = performance.now();
    const out = await run();
    const dt = performance.now() - t0;
    if (out.length !== n || out[n - 1] !== n) throw new Error("wrong result");
    return n / (dt / 1000);
  };
  const contenders = [
    {
      name: "paceline `mapConcurrent`",
      run: () =>
        tasksPerSec(() => mapConcurrent(input, task, { concurrency: C })),
    },
    {
      name: "p-map",
      run: () => tasksPerSec(() => pMap(input, task, { concurrency: C })),
    },
    {
      name: "p-limit",
      run: () =>
        tasksPerSec(() => {
          const limit = pLimit(C);
          return Promise.all(input.map((x) => limit(task, x)));
        }),
    },
    {
      name: "p-queue",
      run: () =>
        tasksPerSec(() => {
          const q = new PQueue({ concurrency: C });
          return Promise.all(input.map((x) => q.add(() => task(x))));
        }),
    },
    {
      name: "async-sema",
      run: () =>
        tasksPerSec(() => {
          const sema = new Sema(C);
          return Promise.all(input.map(async (x) => {
            await sema.acquire();
            try {
              return await task(x);
            } finally {
              sema.release();
            }
          }));
        }),
    },
    {
      name: "`Promise.all` (unbounded)",
      run: () => tasksPerSec(() => Promise.all(input.map(task))),
    },
  ];
  const results = await interleave(contenders, rounds, "p-map");
  return {
    markdown: [
      `### Pool overhead: ${
        fmt(n)
      } trivial async tasks, concurrency 8 (${rounds} interleaved rounds)`,
      "",
      table(
        ["contender", "median tasks/s", "min–max", "vs p-map"],
        results.map((
          r,
        ) => [
          r.name,
          fmt(r.median),
          `${fmt(r.min)}–${fmt(r.max)}`,
          `${r.ratio.toFixed(2)}×`,
        ]),
      ),
    ].join("\n"),
    results,
  };
}
