// @ts-check
// End to end: the same Anthropic batch against a strict ("sliding") simulator
// running in a child process, through paceline and through what users would
// otherwise write. CPU time is this (client) process only.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import Anthropic from "@anthropic-ai/sdk";
import pLimit from "p-limit";
import PQueue from "p-queue";
import pRetry, { AbortError } from "p-retry";
import { mapConcurrent, rateLimitedFetch } from "../dist/mod.js";
import { inputTokensOf } from "../dist/sim.js";
import { median, startSimChild, table } from "./lib.mjs";

/** A full collection now, so a contender's CPU time holds only its own garbage. */
function collectGarbage() {
  setFlagsFromString("--expose-gc");
  runInNewContext("gc")();
}
const cliPath = fileURLToPath(new URL("../dist/cli.js", import.meta.url));

const TOPICS = [
  "rate limits",
  "sliding windows",
  "backoff",
  "token buckets",
  "queues",
];
function batch(n) {
  return Array.from({ length: n }, (_, i) => ({
    model: "claude-sim",
    max_tokens: 64,
    messages: [{
      role: "user",
      content: i % 4 === 0
        ? `第${i}题：请用一句话解释${["限流", "退避", "并发"][i % 3]}。`
        : `Question ${i}: explain ${TOPICS[i % 5]} in one sentence.`,
    }],
  }));
}

/** The batch through the official SDK with paceline's fetch. */
function throughPaceline(url, requests, fetchOptions) {
  const client = new Anthropic({
    apiKey: "k",
    baseURL: url,
    maxRetries: 0,
    fetch: rateLimitedFetch({ concurrency: 16, ...fetchOptions }),
  });
  return mapConcurrent(
    requests,
    (r) => client.messages.create(r).then(() => true, () => false),
    { concurrency: 64 },
  );
}

const theory = (total, limit, ms) =>
  Math.max(0, Math.ceil(total / limit) - 1) * ms;

export async function e2e({ quick }) {
  const a = await limitsTable({ quick });
  const b = await cliVsLibrary({ quick });
  const c = await cachedTable({ quick });
  return {
    markdown: `${a.markdown}\n\n${b.markdown}\n\n${c.markdown}`,
    results: { limits: a.results, cliVsLibrary: b.results, cached: c.results },
  };
}

/**
 * Questions against one long system prompt marked for caching, under a
 * tight input-token limit: paceline charges reads as Anthropic counts them
 * (not at all) and writes the prefix once; a request-rate queue around the
 * SDK sends the first burst together (each one a write).
 */
async function cachedTable({ quick }) {
  const n = quick ? 20 : 60;
  const windowMs = quick ? 1000 : 2000;
  const limits = {
    requests: quick ? 10 : 20,
    inputTokens: 8000,
    outputTokens: 1e9,
  };
  const latencyMs = quick ? 200 : 500;
  // ~6,000 tokens by the simulator's count.
  const rubric = Array.from({ length: 3000 }, (_, i) => `rule${i % 10}`)
    .join(" ");
  const requests = Array.from({ length: n }, (_, i) => ({
    model: "claude-sim",
    max_tokens: 64,
    system: [{
      type: "text",
      text: rubric,
      cache_control: { type: "ephemeral" },
    }],
    messages: [{ role: "user", content: `Question ${i}: grade this answer.` }],
  }));
  const windows = [
    { key: "requests", limit: limits.requests, ms: windowMs },
    { key: "inputTokens", limit: limits.inputTokens, ms: windowMs },
  ];
  const contenders = [
    {
      name: "paceline, limits given",
      run: (url) =>
        throughPaceline(url, requests, {
          concurrency: 32,
          limiter: { windows, marginMs: 60 },
          learn: false,
        }),
    },
    {
      name: "paceline, promptCache: false",
      run: (url) =>
        throughPaceline(url, requests, {
          concurrency: 32,
          limiter: { windows, marginMs: 60 },
          learn: false,
          promptCache: false,
        }),
    },
    {
      name: "p-queue `intervalCap` + official SDK (default retries)",
      run: (url) => {
        const client = new Anthropic({ apiKey: "k", baseURL: url });
        const q = new PQueue({
          concurrency: 32,
          intervalCap: limits.requests,
          interval: windowMs,
        });
        return Promise.all(
          requests.map((r) =>
            q.add(() => client.messages.create(r)).then(() => true, () => false)
          ),
        );
      },
    },
  ];
  const rows = [];
  const results = [];
  for (const c of contenders) {
    const sim = await startSimChild(limits, windowMs, [
      "--latency-ms",
      String(latencyMs),
    ]);
    try {
      const ok = await c.run(sim.url);
      const st = await sim.stats();
      const refused = Object.values(st.rateLimited).reduce((a, b) => a + b, 0);
      const makespan = st.acceptedAt.last - st.acceptedAt.first;
      const minimum = theory(n, limits.requests, windowMs);
      const r = {
        contender: c.name,
        succeeded: ok.filter(Boolean).length,
        ratio: makespan / minimum,
        refused,
        writes: st.cache.writes,
        reads: st.cache.reads,
      };
      results.push(r);
      rows.push([
        r.contender,
        `${r.succeeded}/${n}`,
        r.ratio.toFixed(2),
        String(r.writes),
        String(r.reads),
        String(r.refused),
      ]);
    } finally {
      await sim.close();
    }
  }
  return {
    markdown: [
      `### Prompt caching: ${n} questions on one ~6,000-token cached system prompt (${limits.requests} requests and ${limits.inputTokens} input tokens per ${windowMs} ms, ${latencyMs} ms latency, concurrency 32)`,
      "",
      "Makespan: first to last request accepted, ÷ the minimum once the prefix is cached (requests bind). Cache writes and reads as the simulator counted them (writes are priced above normal input, reads far below).",
      "",
      table(
        [
          "contender",
          "succeeded",
          "makespan ÷ minimum",
          "cache writes",
          "cache reads",
          "429s",
        ],
        rows,
      ),
    ].join("\n"),
    results,
  };
}

/**
 * The batch CLI against the library it is built on, on the same requests
 * with 5 % 529s: a line sleeping in backoff must not hold the rest back.
 */
async function cliVsLibrary({ quick }) {
  const n = quick ? 300 : 3000;
  const concurrency = 32;
  const extra = ["--latency-ms", "50", "--fault-529", "0.05", "--seed", "3"];
  const requests = batch(n);
  const dir = mkdtempSync(join(tmpdir(), "paceline-bench-"));
  const input = join(dir, "in.jsonl");
  writeFileSync(
    input,
    requests.map((params, i) => JSON.stringify({ custom_id: `b${i}`, params }))
      .join("\n") + "\n",
  );
  const contenders = [
    {
      name: "library: `rateLimitedFetch` + `mapConcurrent`",
      run: async (url) => {
        const f = rateLimitedFetch({ concurrency });
        const ok = await mapConcurrent(requests, async (r) => {
          const res = await f(`${url}/v1/messages`, {
            method: "POST",
            headers: {
              "content-type": "application/json",
              "x-api-key": "k",
              "anthropic-version": "2023-06-01",
            },
            body: JSON.stringify(r),
          });
          await res.text();
          return res.ok;
        }, { concurrency: concurrency * 2 });
        return ok.filter(Boolean).length;
      },
    },
    {
      name: "CLI: `paceline run` (journal, ordered output)",
      run: async (url) => {
        const output = join(dir, "out.jsonl");
        rmSync(output, { force: true });
        const code = await new Promise((resolve) => {
          const child = spawn(process.execPath, [
            cliPath,
            "run",
            input,
            "-o",
            output,
            "--base-url",
            url,
            "--concurrency",
            String(concurrency),
            "--quiet",
          ], { stdio: ["ignore", "ignore", "inherit"] });
          child.on("exit", resolve);
        });
        if (code !== 0 && code !== 1) throw new Error(`CLI exited ${code}`);
        return readFileSync(output, "utf8").split("\n").filter((l) =>
          l.includes('"succeeded"')
        ).length;
      },
    },
  ];
  const rounds = quick ? 1 : 2;
  const times = new Map(contenders.map((c) => [c.name, []]));
  const oks = new Map();
  try {
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < contenders.length; i++) {
        const c = contenders[(i + r) % contenders.length];
        const sim = await startSimChild(undefined, 0, extra);
        try {
          const t0 = performance.now();
          oks.set(c.name, await c.run(sim.url));
          times.get(c.name).push(performance.now() - t0);
        } finally {
          await sim.close();
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const med = median;
  const base = med(times.get(contenders[0].name));
  const results = contenders.map((c) => ({
    name: c.name,
    succeeded: oks.get(c.name),
    wallMs: med(times.get(c.name)),
    ratio: med(times.get(c.name)) / base,
  }));
  return {
    markdown: [
      `### CLI vs library, 5 % 529s: ${n} Anthropic requests, 50 ms latency, concurrency ${concurrency}, no rate limits (${rounds} rotating round${
        rounds > 1 ? "s" : ""
      }, median)`,
      "",
      table(
        ["contender", "succeeded", "wall", "vs library"],
        results.map((r) => [
          r.name,
          `${r.succeeded}/${n}`,
          `${(r.wallMs / 1000).toFixed(2)} s`,
          `${r.ratio.toFixed(2)}×`,
        ]),
      ),
      "",
      "Target: CLI ≤ 1.10 × the library (the CLI's time includes starting Node).",
    ].join("\n"),
    results,
  };
}

async function limitsTable({ quick }) {
  const n = quick ? 100 : 500;
  const windowMs = quick ? 500 : 2000;
  const requests = batch(n);
  const trueInput = requests.reduce((s, r) => s + inputTokensOf(r), 0);
  const limits = {
    requests: quick ? 40 : 100,
    inputTokens: Math.ceil(trueInput / (quick ? 2 : 4)),
    outputTokens: quick ? 3000 : 8000,
  };
  const margin = 50; // the loopback skew; with real one-minute windows the default (300 ms) covers it
  const contenders = [
    {
      name: "paceline, limits given",
      run: (url) =>
        throughPaceline(url, requests, {
          limiter: {
            windows: [
              { key: "requests", limit: limits.requests, ms: windowMs },
              { key: "inputTokens", limit: limits.inputTokens, ms: windowMs },
              { key: "outputTokens", limit: limits.outputTokens, ms: windowMs },
            ],
            marginMs: margin,
          },
          learn: false,
        }),
    },
    {
      name: "paceline, limits learned from headers",
      run: (url) =>
        throughPaceline(url, requests, {
          limiter: { marginMs: margin },
          learn: { windowMs },
        }),
    },
    {
      name: "p-queue `intervalCap` + p-retry around fetch",
      run: (url) => {
        const q = new PQueue({
          concurrency: 16,
          intervalCap: limits.requests,
          interval: windowMs,
        });
        return Promise.all(requests.map((r) =>
          pRetry(async () => {
            const res = await q.add(() =>
              fetch(`${url}/v1/messages`, {
                method: "POST",
                headers: {
                  "content-type": "application/json",
                  "x-api-key": "k",
                },
                body: JSON.stringify(r),
              })
            );
            const text = await res.text();
            if (res.status === 429 || res.status >= 500) {
              throw new Error(`HTTP ${res.status}`);
            }
            if (!res.ok) throw new AbortError(text);
            return true;
          }, { retries: 5, minTimeout: 500, factor: 2 }).catch(() => false)
        ));
      },
    },
    {
      name: "official SDK alone (default retries) + p-limit(16)",
      run: (url) => {
        const client = new Anthropic({ apiKey: "k", baseURL: url });
        const limit = pLimit(16);
        return Promise.all(
          requests.map((r) =>
            limit(() => client.messages.create(r).then(() => true, () => false))
          ),
        );
      },
    },
  ];
  const rows = [];
  const results = [];
  {
    // Warm-up, not measured: JIT and first connections skew the first burst
    // by 100 ms and more, which would land on whoever runs first.
    const sim = await startSimChild({
      requests: 1e6,
      inputTokens: 1e9,
      outputTokens: 1e9,
    }, windowMs);
    const f = rateLimitedFetch({ concurrency: 16, learn: false });
    const client = new Anthropic({
      apiKey: "k",
      baseURL: sim.url,
      maxRetries: 0,
      fetch: f,
    });
    await mapConcurrent(batch(300), (r) => client.messages.create(r), {
      concurrency: 64,
    });
    // Every contender's path warmed alike, so client CPU compares the
    // work each does, not which one ran first.
    const sdk = new Anthropic({ apiKey: "k", baseURL: sim.url });
    const limit = pLimit(16);
    await Promise.all(
      batch(300).map((r) => limit(() => sdk.messages.create(r))),
    );
    await Promise.all(
      batch(300).map((r) =>
        limit(async () =>
          (await fetch(`${sim.url}/v1/messages`, {
            method: "POST",
            headers: { "content-type": "application/json", "x-api-key": "k" },
            body: JSON.stringify(r),
          })).text()
        )
      ),
    );
    await sim.close();
  }
  for (const c of contenders) {
    const sim = await startSimChild(limits, windowMs);
    try {
      collectGarbage(); // no one pays for the garbage of the one before
      const cpu0 = process.cpuUsage();
      const t0 = performance.now();
      const ok = await c.run(sim.url);
      const wall = performance.now() - t0;
      const cpu = process.cpuUsage(cpu0);
      const st = await sim.stats();
      const refused = Object.values(st.rateLimited).reduce((a, b) => a + b, 0);
      if (process.env.BENCH_DEBUG) {
        console.error(c.name, JSON.stringify(st.rateLimited));
      }
      const bound = Math.max(
        theory(n, limits.requests, windowMs),
        theory(trueInput, limits.inputTokens, windowMs),
        theory(st.usage.outputTokens, limits.outputTokens, windowMs),
      );
      const makespan = st.acceptedAt.last - st.acceptedAt.first;
      const r = {
        contender: c.name,
        succeeded: ok.filter(Boolean).length,
        ratio: makespan / bound,
        wallMs: wall,
        refused,
        attempts: st.received,
        cpuMs: (cpu.user + cpu.system) / 1000,
      };
      results.push(r);
      rows.push([
        r.contender,
        `${r.succeeded}/${n}`,
        r.ratio.toFixed(3),
        String(r.refused),
        `${(r.refused / r.attempts * 100).toFixed(1)} %`,
        String(r.attempts),
        `${(r.wallMs / 1000).toFixed(1)} s`,
        `${Math.round(r.cpuMs)} ms`,
      ]);
    } finally {
      await sim.close();
    }
  }
  return {
    markdown: [
      `### End to end: ${n} Anthropic requests against the simulator ("sliding" mode, window ${windowMs} ms: ${limits.requests} requests, ${limits.inputTokens} input tokens, ${limits.outputTokens} output tokens)`,
      "",
      `Makespan: first to last request accepted by the server, ÷ the minimum the limits allow (from the simulator's true token counts). paceline runs with a ${margin} ms margin for loopback skew.`,
      "",
      table([
        "contender",
        "succeeded",
        "makespan ÷ theory",
        "429s",
        "429 share",
        "attempts",
        "wall",
        "client CPU",
      ], rows),
    ].join("\n"),
    results,
  };
}
