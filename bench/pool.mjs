// @ts-check
// Pool overhead: many trivial tasks through each contender at concurrency 8.
import { mapConcurrent } from "../dist/mod.js";
import pMap from "p-map";
import pLimit from "p-limit";
import PQueue from "p-queue";
import { Sema } from "async-sema";
import { fmt, interleave, table } from "./lib.mjs";

// deno-lint-ignore require-await
const task = async (x) => x + 1;

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
