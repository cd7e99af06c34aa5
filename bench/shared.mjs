// @ts-check
// Limits shared through one Redis: paceline's RedisRateLimiter beside
// bottleneck's clustering (datastore "ioredis"), in the same run, on a
// throwaway Debian redis-server.
// - throughput: permits per second through one Redis, 1 and 4 processes,
//   limits that never bind;
// - accuracy: 4 processes sharing "50 per 2 s": the most that started in
//   any 2 s, and the makespan over the minimum ((jobs / 50 - 1) × 2 s);
// - cost of one acquire with the window empty and with 50,000 entries.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { createClient } from "redis";
import { RedisRateLimiter } from "../dist/mod.js";
import { fmt, table } from "./lib.mjs";
import { startRedis } from "../test/redis_server.mjs";

const worker = fileURLToPath(new URL("./shared_worker.mjs", import.meta.url));

let names = 0;

/** Runs `processes` workers together; returns every job's start time. */
async function together(processes, job) {
  const name = `bench-${process.pid}-${++names}`;
  const at = Date.now() + 1500; // all connected and ready by then
  const outs = await Promise.all(
    Array.from({ length: processes }, () =>
      new Promise((resolve, reject) => {
        const child = spawn(process.execPath, [
          worker,
          JSON.stringify({ ...job, name }),
          JSON.stringify({ at }),
        ], { stdio: ["ignore", "pipe", "pipe"] });
        let out = "";
        let err = "";
        child.stdout.on("data", (d) => (out += d));
        child.stderr.on("data", (d) => (err += d));
        child.on("exit", (code) =>
          code === 0
            ? resolve(JSON.parse(out.trim().split("\n").pop() ?? "[]"))
            : reject(new Error(`worker exited ${code}: ${err}`)));
      })),
  );
  return { starts: outs.flat().sort((a, b) => a - b), at };
}

/** The most starts inside any span of `ms`. */
function maxInWindow(starts, ms) {
  let best = 0;
  for (let i = 0, j = 0; i < starts.length; i++) {
    while (starts[i] - starts[j] >= ms) j++;
    best = Math.max(best, i - j + 1);
  }
  return best;
}

export async function shared({ quick }) {
  const redis = await startRedis();
  try {
    const rows = [];
    const results = {};
    // Throughput: limits that never bind.
    const perProcess = quick ? 300 : 3000;
    for (const mode of ["paceline", "bottleneck"]) {
      for (const processes of [1, 4]) {
        const { starts, at } = await together(processes, {
          mode,
          url: redis.url,
          port: redis.port,
          n: perProcess,
          concurrency: 16,
          limit: 1e12,
          windowMs: 60_000,
        });
        const secs = (starts[starts.length - 1] - at) / 1000;
        results[`${mode} ${processes}`] = starts.length / secs;
      }
    }
    rows.push(
      ...["paceline", "bottleneck"].map((mode) => [
        mode === "paceline"
          ? "paceline `RedisRateLimiter` (node-redis)"
          : "bottleneck clustering (ioredis)",
        `${fmt(results[`${mode} 1`])}/s`,
        `${fmt(results[`${mode} 4`])}/s`,
      ]),
    );
    const ratio1 = results["paceline 1"] / results["bottleneck 1"];
    const ratio4 = results["paceline 4"] / results["bottleneck 4"];
    const throughput = table(
      ["permits through one Redis", "1 process", "4 processes"],
      [...rows, [
        "paceline ÷ bottleneck",
        `${ratio1.toFixed(1)} ×`,
        `${ratio4.toFixed(1)} ×`,
      ]],
    );

    // Accuracy: 4 processes sharing 50 per 2 s.
    const jobs = quick ? 120 : 200;
    const windowMs = 2000;
    const minimum = (Math.ceil(jobs / 50) - 1) * windowMs;
    const acc = [];
    for (const mode of ["paceline", "bottleneck"]) {
      const { starts, at } = await together(4, {
        mode,
        url: redis.url,
        port: redis.port,
        n: jobs / 4,
        concurrency: 16,
        limit: 50,
        windowMs,
      });
      const makespan = starts[starts.length - 1] - at;
      const most = maxInWindow(starts, windowMs);
      results[`${mode} accuracy`] = { most, makespan, minimum };
      acc.push([
        mode === "paceline"
          ? "paceline `RedisRateLimiter`"
          : "bottleneck (reservoir 50, refreshed every 2 s)",
        String(most),
        `${(makespan / 1000).toFixed(2)} s`,
        `${(makespan / minimum).toFixed(3)} ×`,
      ]);
    }
    const accuracy = table(
      [
        `4 processes, ${jobs} jobs, 50 per 2 s`,
        "most started in any 2 s",
        "makespan",
        `÷ minimum (${minimum / 1000} s)`,
      ],
      acc,
    );

    // Cost of one acquire: empty window vs 50,000 entries in it.
    const client = createClient({ url: redis.url });
    await client.connect();
    const evalFn = (s, k, a) => client.eval(s, { keys: k, arguments: a });
    const n = quick ? 500 : 3000;
    const filled = quick ? 5000 : 50_000;
    const cost = {};
    for (const entries of [0, filled]) {
      const name = `bench-fill-${process.pid}-${entries}`;
      const limiter = new RedisRateLimiter({
        redis: evalFn,
        name,
        windows: [{ key: "requests", limit: 1e12, ms: 3_600_000 }],
      });
      await limiter.acquire(); // creates the window
      if (entries) {
        // Entries one ms apart inside the hour, written directly (taking
        // them one by one would merge those stamped in the same ms).
        const key = `paceline:{${name}}`;
        const id = "requests|3600000";
        const t0 = Date.now() - entries;
        const fields = {};
        for (let i = 1; i <= entries; i++) fields[`${id}|${i}`] = `${t0 + i},1`;
        await client.hSet(key, fields);
        await client.hSet(key, {
          [`${id}|n`]: String(entries + 1),
          [`${id}|hs`]: String(entries + 1),
          [`${id}|ts`]: String(entries + 1),
          last: String(Date.now()),
        });
      }
      const t0 = performance.now();
      for (let i = 0; i < n; i++) await limiter.acquire();
      cost[entries] = (performance.now() - t0) / n;
      const [w] = await limiter.refresh();
      results[`cost ${entries}`] = { ms: cost[entries], used: w?.used };
    }
    await client.quit();
    const costTable = table(
      ["one `acquire()` (sequential, one process)", "time"],
      [
        ["window empty", `${(cost[0] * 1000).toFixed(0)} µs`],
        [
          `window holding ${fmt(filled)} entries`,
          `${(cost[filled] * 1000).toFixed(0)} µs`,
        ],
        ["ratio", `${(cost[filled] / cost[0]).toFixed(2)} ×`],
      ],
    );
    const markdown = [
      "### Shared limits through one Redis (redis-server 7, loopback)",
      "",
      throughput,
      "",
      accuracy,
      "",
      costTable,
    ].join("\n");
    return { markdown, results };
  } finally {
    await redis.kill();
  }
}
