// @ts-check
// Memory, each figure from a fresh child process.
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { fmt, table } from "./lib.mjs";

const child = fileURLToPath(new URL("./memory_child.mjs", import.meta.url));

function measure(which, n) {
  const out = execFileSync(process.execPath, [
    "--expose-gc",
    child,
    which,
    String(n),
  ], {
    encoding: "utf8",
  });
  return Object.assign({}, ...out.trim().split("\n").map((l) => JSON.parse(l)));
}

export function memory({ quick }) {
  const n = quick ? 200_000 : 2_000_000;
  const stream = ["empty", "paceline", "p-map"].map((w) => ({
    which: w,
    ...measure(w, n),
  }));
  const lim = quick ? 100_000 : 1_000_000;
  const ours = measure("limiter-paceline", lim);
  const theirs = measure("limiter-limiter", lim);
  const name = {
    empty: "no pool (plain loop)",
    paceline: "paceline `mapConcurrentIterable`",
    "p-map": "p-map `pMapIterable`",
  };
  return {
    markdown: [
      `### Memory: ${
        fmt(n)
      }-item lazy generator, concurrency 8 (peak retained heap above baseline at ~20 checkpoints, each after a full GC; fresh process each)`,
      "",
      table(
        ["contender", "peak heap"],
        stream.map((s) => [name[s.which], `${s.peakMB.toFixed(1)} MB`]),
      ),
      "",
      `### Memory: limiter state after ${
        fmt(lim)
      } admissions spread over a 1-day window (after GC)`,
      "",
      table(["contender", "retained heap", "stored entries"], [
        [
          "paceline `RateLimiter` (sliding log, bucketed)",
          `${ours.retainedMB.toFixed(2)} MB`,
          String(ours.entries),
        ],
        [
          "limiter `RateLimiter` (token bucket, no log)",
          `${theirs.retainedMB.toFixed(2)} MB`,
          "–",
        ],
      ]),
    ].join("\n"),
    results: { stream, limiter: { paceline: ours, limiter: theirs } },
  };
}
