// `paceline run --redis URL --shard K/N`: processes on one key share its
// limits through a real redis-server, each runs its share of the file.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { type RedisServer, startRedis } from "./test/redis.ts";
import { sim } from "./test/sims.ts";

let server: RedisServer;
let redis: Redis;
beforeAll(async () => {
  server = await startRedis();
  redis = new Redis(server.port, "127.0.0.1");
});
afterAll(async () => {
  redis?.disconnect();
  await server?.kill();
});

const KEY = "sk-test-secret-key-123456";

function lines(n: number): string[] {
  return Array.from({ length: n }, (_, i) =>
    JSON.stringify({
      custom_id: `r${i}`,
      params: {
        model: "claude-sim",
        max_tokens: 20,
        messages: [{ role: "user", content: `Question ${i}` }],
        metadata: { user_id: `r${i}` },
      },
    }));
}

/** Runs `node dist/cli.js` (a separate process, as on another machine). */
function cli(args: string[], env: Record<string, string> = {}) {
  const js = join(import.meta.dirname, "dist", "cli.js");
  expect(existsSync(js)).toBe(true); // npm test builds first
  const child = spawn(process.execPath, [js, ...args], {
    env: {
      ...process.env,
      ANTHROPIC_API_KEY: "",
      OPENAI_API_KEY: "",
      ANTHROPIC_BASE_URL: "",
      OPENAI_BASE_URL: "",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (c) => (err += c));
  const exited = new Promise<number | null>((r) =>
    child.on("exit", (c) => r(c))
  );
  return { child, exited, err: () => err };
}

const ids = (path: string) =>
  readFileSync(path, "utf8").trim().split("\n").map((l) =>
    JSON.parse(l).custom_id as string
  );

/**
 * The shared-limit runs' flags: 20 requests per 1-s "minute" through Redis.
 * Two cold CLI processes on a busy 2-core machine: a request can reach the
 * simulator 100+ ms after Redis stamped it (a real minute's default margin
 * is 300 ms), hence the margin.
 */
const sharedArgs = (simURL: string, redisURL: string): string[] => [
  "--base-url",
  simURL,
  "--redis",
  redisURL,
  "--rpm",
  "20",
  "--window-ms",
  "1000",
  "--margin-ms",
  "200",
  "--concurrency",
  "8",
  "--quiet",
];

describe("paceline run --redis --shard", () => {
  it("two processes, two shards, one key: every line once, each shard in order, the key's limit held between them (0 × 429)", async () => {
    const s = await sim({
      apiKey: KEY,
      limits: { requests: 20, windowMs: 1000 },
    });
    const d = mkdtempSync(join(tmpdir(), "paceline-shard-"));
    const input = join(d, "in.jsonl");
    writeFileSync(input, lines(80).join("\n") + "\n");
    const common = sharedArgs(s.url, server.url);
    const runs = [1, 2].map((k) =>
      cli(["run", input, "--shard", `${k}/2`, ...common], {
        ANTHROPIC_API_KEY: KEY,
      })
    );
    const codes = await Promise.all(runs.map((r) => r.exited));
    expect({ codes, err: runs.map((r) => r.err()) }).toEqual({
      codes: [0, 0],
      err: ["", ""],
    });
    const one = ids(join(d, "in.shard-1-of-2.results.jsonl"));
    const two = ids(join(d, "in.shard-2-of-2.results.jsonl"));
    expect(one).toEqual(
      lines(80).map((_, i) => `r${i}`).filter((_, i) => i % 2 === 0),
    );
    expect(two).toEqual(
      lines(80).map((_, i) => `r${i}`).filter((_, i) => i % 2 === 1),
    );
    const st = s.stats();
    expect(st.accepted).toBe(80);
    expect(st.rateLimited.requests).toBe(0);
    expect(st.maxInWindow.requests).toBeLessThanOrEqual(20);
    // The default name is the provider, host and a hash: never the key.
    const keys = await redis.keys("paceline:*");
    expect(keys.length).toBeGreaterThan(0);
    for (const k of keys) expect(k).not.toContain(KEY);
    const dump = JSON.stringify(
      await Promise.all(keys.map((k) => redis.hgetall(k))),
    );
    expect(dump).not.toContain(KEY);
  });

  it("a shard killed mid-run resumes alone: its lines once, in order", async () => {
    const s = await sim({ latency: { baseMs: 20 } });
    const d = mkdtempSync(join(tmpdir(), "paceline-shard-"));
    const input = join(d, "in.jsonl");
    writeFileSync(input, lines(300).join("\n") + "\n");
    const args = [
      "run",
      input,
      "--shard",
      "2/3",
      "--base-url",
      s.url,
      "--redis",
      server.url,
      "--limiter-name",
      "resume-test",
      "--rpm",
      "6000",
      "--concurrency",
      "4",
      "--quiet",
    ];
    const first = cli(args);
    const out = join(d, "in.shard-2-of-3.results.jsonl");
    for (let i = 0; i < 200; i++) {
      if (
        existsSync(out) && readFileSync(out, "utf8").split("\n").length > 20
      ) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    first.child.kill("SIGKILL");
    await first.exited;
    const again = cli(args);
    expect(await again.exited).toBe(0);
    const mine = lines(300).map((_, i) => `r${i}`).filter((_, i) =>
      i % 3 === 1
    );
    expect(ids(out)).toEqual(mine);
    // Only shard 2's lines were ever sent, each at most twice (in flight at the kill).
    const per = s.stats().perClient;
    expect(Object.keys(per).sort()).toEqual([...mine].sort());
    const redone = Object.values(per).filter((c) => c.succeeded > 1).length;
    expect(redone).toBeLessThanOrEqual(4 * 2);
  });

  it("clear errors: bad --shard, --limiter-name without --redis, an unreachable Redis (exit 2, nothing sent)", async () => {
    const s = await sim();
    const d = mkdtempSync(join(tmpdir(), "paceline-shard-"));
    const input = join(d, "in.jsonl");
    writeFileSync(input, lines(3).join("\n") + "\n");
    const base = ["run", input, "--base-url", s.url];
    const bad = cli([...base, "--shard", "3/2"]);
    expect(await bad.exited).toBe(2);
    expect(bad.err()).toMatch(
      /--shard needs K\/N with 1 <= K <= N .*received "3\/2"/,
    );
    const name = cli([...base, "--limiter-name", "x"]);
    expect(await name.exited).toBe(2);
    expect(name.err()).toMatch(/--limiter-name .* give --redis URL too/);
    const empty = cli([...base, "--shard", "4/4"]);
    expect(await empty.exited).toBe(2);
    expect(empty.err()).toMatch(/this shard has no lines \(the file has 3\)/);
    const down = cli([
      ...base,
      "--redis",
      "redis://user:hunter2@127.0.0.1:1",
    ]);
    expect(await down.exited).toBe(2);
    expect(down.err()).toMatch(
      /--redis redis:\/\/\*\*\*@127\.0\.0\.1:1: cannot connect/,
    );
    expect(down.err()).not.toContain("hunter2");
    expect(s.stats().received).toBe(0);
  });

  it("Redis going away mid-run stops the run (exit 3): nothing admitted without it, nothing recorded wrongly; a rerun finishes", async () => {
    // ~9 s of work (600 lines, 30 ms each, 2 at a time): Redis dies early in it.
    const s = await sim({ latency: { baseMs: 30 } });
    const doomed = await startRedis();
    const d = mkdtempSync(join(tmpdir(), "paceline-shard-"));
    const input = join(d, "in.jsonl");
    const output = join(d, "out.jsonl");
    writeFileSync(input, lines(600).join("\n") + "\n");
    const args = (url: string, concurrency = "2") => [
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--redis",
      url,
      "--rpm",
      "100000",
      "--concurrency",
      concurrency,
      "--quiet",
    ];
    const run = cli(args(doomed.url));
    for (let i = 0; i < 200; i++) {
      if (existsSync(output) && readFileSync(output, "utf8").length > 0) break;
      await new Promise((r) => setTimeout(r, 25));
    }
    await doomed.kill();
    const code = await run.exited;
    expect({ code, err: run.err() }).toMatchObject({ code: 3 });
    expect(run.err()).toMatch(/Redis failed, so nothing could be admitted/);
    expect(run.err()).toMatch(
      /Bring Redis back, then run the same command again/,
    );
    // Every recorded line succeeded: a Redis failure is not a result.
    const text = readFileSync(output, "utf8");
    expect(text).not.toContain("errored");
    const again = cli(args(server.url, "16"));
    expect(await again.exited).toBe(0);
    expect(ids(output)).toEqual(lines(600).map((_, i) => `r${i}`));
  });

  for (const fault of ["flushall", "restart"] as const) {
    it(
      `Redis ${
        fault === "flushall"
          ? "loses its state (FLUSHALL)"
          : "restarts empty within timeoutMs"
      } under two shards: both finish (exit 0), every line succeeded, at most one window's worth of 429s`,
      async () => {
        const own = await startRedis();
        let again: RedisServer | undefined;
        try {
          const s = await sim({
            apiKey: KEY,
            limits: { requests: 20, windowMs: 1000 },
          });
          const d = mkdtempSync(join(tmpdir(), "paceline-shard-"));
          const input = join(d, "in.jsonl");
          writeFileSync(input, lines(100).join("\n") + "\n");
          const common = sharedArgs(s.url, own.url);
          const runs = [1, 2].map((k) =>
            cli(["run", input, "--shard", `${k}/2`, ...common], {
              ANTHROPIC_API_KEY: KEY,
            })
          );
          // The fault, 1.5 s into the run.
          await new Promise((r) => setTimeout(r, 1500));
          if (fault === "flushall") {
            const c = new Redis(own.port, "127.0.0.1");
            await c.flushall();
            c.disconnect();
          } else {
            await own.kill();
            await new Promise((r) => setTimeout(r, 500));
            again = await startRedis(own.port);
          }
          const codes = await Promise.all(runs.map((r) => r.exited));
          expect({ codes, err: runs.map((r) => r.err()) }).toEqual({
            codes: [0, 0],
            err: ["", ""],
          });
          for (const k of [1, 2]) {
            const text = readFileSync(
              join(d, `in.shard-${k}-of-2.results.jsonl`),
              "utf8",
            );
            expect(text).not.toContain("errored");
            expect(text.trim().split("\n")).toHaveLength(50);
          }
          const st = s.stats();
          expect(st.accepted).toBe(100);
          expect(st.rateLimited.requests).toBeLessThanOrEqual(20);
        } finally {
          await again?.kill();
          await own.kill();
        }
      },
      30_000,
    );
  }
});
