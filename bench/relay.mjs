// @ts-check
// Through a relay that sends no limits (issue #25): `paceline run` with no
// limits given, against the simulator's silent mode (429s with a
// whole-second `retry-after`, no limit headers), for a limit in requests
// per 2 s, one per 200 ms, one in input tokens per 2 s and one per 12 s
// (long enough for the window to be learned); then the same run with the
// limits given, and the least makespan any client could reach.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { fmt, startSimChild, table } from "./lib.mjs";

const cliPath = fileURLToPath(new URL("../dist/cli.js", import.meta.url));
const LATENCY_MS = 100;
const WORDS = ["pace", "rate", "limit", "window", "token", "relay", "server"];

/** `n` Anthropic batch lines of 28 to 57 words. */
function lines(n) {
  return Array.from({ length: n }, (_, i) => {
    const words = Array.from(
      { length: 28 + (i * 7) % 30 },
      (_, k) => WORDS[(i + k) % WORDS.length],
    );
    return JSON.stringify({
      custom_id: `r${i}`,
      params: {
        model: "claude-sim",
        max_tokens: 20,
        messages: [{ role: "user", content: `Q${i}: ${words.join(" ")}` }],
      },
    });
  }).join("\n") + "\n";
}

/**
 * The least makespan of `sizes` sent in order against a strict sliding
 * window (counted at arrival) by a client that knows the limit: each as
 * soon as the window has room, then its answer.
 */
export function leastMakespan(sizes, limit, windowMs, latencyMs) {
  const log = [];
  let head = 0;
  let used = 0;
  let t = 0;
  for (const amount of sizes) {
    for (;;) {
      while (head < log.length && log[head].t + windowMs <= t) {
        used -= log[head++].amount;
      }
      if (used + amount <= limit) break;
      t = log[head].t + windowMs;
    }
    log.push({ t, amount });
    used += amount;
  }
  return t + latencyMs;
}

/** One `paceline run` against a fresh silent simulator. */
async function runOnce(dir, c, n, given) {
  const sim = await startSimChild(null, c.windowMs, [
    ...c.flags,
    "--window-ms",
    String(c.windowMs),
    "--no-limit-headers",
    "--latency-ms",
    String(LATENCY_MS),
  ]);
  const input = join(dir, "in.jsonl");
  const output = join(dir, `out-${Math.random().toString(36).slice(2)}.jsonl`);
  writeFileSync(input, lines(n));
  const started = performance.now();
  const run = spawnSync(process.execPath, [
    cliPath,
    "run",
    input,
    "-o",
    output,
    "--base-url",
    sim.url,
    "--concurrency",
    "8",
    "--window-ms",
    String(c.windowMs),
    "--quiet",
    ...(given ? c.flags : []),
  ], { env: { ...process.env, ANTHROPIC_API_KEY: "sk-bench" } });
  const wallMs = performance.now() - started;
  if (run.status !== 0) {
    await sim.close();
    throw new Error(`paceline run exited ${run.status}: ${run.stderr}`);
  }
  const st = await sim.stats();
  await sim.close();
  const rows = readFileSync(output, "utf8").trim().split("\n").map((l) =>
    JSON.parse(l)
  );
  const sizes = rows.map((r) =>
    c.key === "requests" ? 1 : r.result.message.usage.input_tokens
  );
  return {
    refused: Object.values(st.rateLimited).reduce((a, b) => a + b, 0),
    writtenOff: rows.filter((r) => r.result.type !== "succeeded").length,
    wallMs,
    spanMs: st.acceptedAt.last - st.acceptedAt.first + LATENCY_MS,
    leastMs: leastMakespan(sizes, c.limit, c.windowMs, LATENCY_MS),
    inputTokens: st.usage.inputTokens,
  };
}

export async function relay({ quick }) {
  const n = quick ? 60 : 200;
  const cases = [
    {
      name: "20 requests per 2 s",
      flags: ["--rpm", "20"],
      windowMs: 2000,
      limit: 20,
      key: "requests",
    },
    {
      name: "5 requests per 200 ms",
      flags: ["--rpm", "5"],
      windowMs: 200,
      limit: 5,
      key: "requests",
    },
    {
      name: "3,000 input tokens per 2 s",
      flags: ["--itpm", "3000"],
      windowMs: 2000,
      limit: 3000,
      key: "inputTokens",
    },
    {
      // A "minute" long enough (a span of 10 s or more) for the window to
      // be learned: the start's requests go again as they leave it.
      name: "100 requests per 12 s",
      flags: ["--rpm", "100"],
      windowMs: 12_000,
      limit: 100,
      key: "requests",
    },
  ].slice(quick ? 1 : 0, quick ? 2 : 4);
  const dir = mkdtempSync(join(tmpdir(), "paceline-relay-"));
  const results = [];
  try {
    for (const c of cases) {
      const found = await runOnce(dir, c, n, false);
      const given = await runOnce(dir, c, n, true);
      results.push({ case: c.name, lines: n, found, given });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const s = (ms) => `${fmt(ms / 1000)} s`;
  const markdown =
    `### Through a relay that sends no limits (${n} lines, concurrency 8, ${LATENCY_MS} ms latency)\n\n` +
    table(
      [
        "relay's limit",
        "429s",
        "written off",
        "run (wall)",
        "requests (first send to last answer)",
        "least makespan",
        "÷ least",
        "limits given: 429s, wall",
      ],
      results.map(({ case: name, found: f, given: g }) => [
        name,
        String(f.refused),
        String(f.writtenOff),
        s(f.wallMs),
        s(f.spanMs),
        s(f.leastMs),
        fmt(f.spanMs / f.leastMs),
        `${g.refused}, ${s(g.wallMs)}`,
      ]),
    ) +
    "\n\nThe least makespan sends each line as soon as the server's window has room (known exactly), in order. A run's wall time also holds ~0.4 s of process start and exit.";
  return { markdown, results };
}
