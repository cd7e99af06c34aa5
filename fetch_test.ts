// End-to-end tests: rateLimitedFetch, Stats and the thin clients against
// the simulator on loopback, with compressed windows.
import { describe, expect, it } from "vitest";
import { sim } from "./test/sims.ts";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI, { AzureOpenAI } from "openai";
import {
  anthropic,
  estimateCost,
  estimateTokens,
  gemini,
  HttpError,
  ManualClock,
  mapConcurrent,
  mapConcurrentSettled,
  openai,
  QuotaError,
  rateLimitedFetch,
  RateLimiter,
  retry,
  SseParser,
  Stats,
  usageOf,
} from "./mod.ts";
import { inputTokensOf, startSimulator } from "./sim.ts";

const TOPICS = [
  "rate limits",
  "sliding windows",
  "backoff",
  "retry-after",
  "token buckets",
  "queues",
];
function prompts(n: number): string[] {
  return Array.from(
    { length: n },
    (_, i) =>
      i % 5 === 0
        ? `第${i}个问题：请用一句话解释${TOPICS[i % TOPICS.length]}。`
        : `Question ${i}: explain ${
          TOPICS[i % TOPICS.length]
        } in one sentence, please.`,
  );
}
const request = (p: string, id?: string) => ({
  model: "claude-sim",
  max_tokens: 64,
  messages: [{ role: "user" as const, content: p }],
  ...(id ? { metadata: { user_id: id } } : {}),
});

/**
 * Runs a small burst against a throwaway simulator first, so JIT
 * compilation and connection setup (first-request skew of 100 ms and more)
 * do not land inside the measured, compressed windows.
 */
async function warmUp(): Promise<void> {
  const w = await startSimulator();
  const claude = anthropic({
    apiKey: "k",
    baseURL: w.url,
    concurrency: 32,
    learn: false,
  });
  await mapConcurrent(prompts(300), (p) => claude.messages(request(p)), {
    concurrency: 64,
  });
  await w.close();
}

/** Lower bound on the makespan of a batch under a sliding window. */
function theory(total: number, limit: number, windowMs: number): number {
  return Math.max(0, Math.ceil(total / limit) - 1) * windowMs;
}

describe("estimates and parsing", () => {
  it("every OpenAI batch endpoint: input never under the simulator's count; output from its own field; usage read back", () => {
    const cases: [string, Record<string, unknown>, number][] = [
      ["responses", { input: "Tell me about 日本", max_output_tokens: 50 }, 50],
      ["responses", {
        instructions: "Be brief.",
        input: [
          { role: "user", content: [{ type: "input_text", text: "Hi there" }] },
          { type: "function_call_output", output: "42 degrees" },
          { role: "user", content: [{ type: "input_image", image_url: "x" }] },
        ],
      }, 4096],
      ["completions", { prompt: "Once upon a time" }, 16],
      ["completions", { prompt: ["one", "two"], max_tokens: 9 }, 9],
      ["embeddings", { input: "a document" }, 0],
      ["embeddings", { input: ["first", "第二个文档"] }, 0],
      ["embeddings", { input: [101, 2023, 102] }, 0],
      ["embeddings", { input: [[1, 2], [3, 4, 5]] }, 0],
      ["moderations", { input: "some text" }, 0],
      ["moderations", {
        input: [{ type: "text", text: "look" }, {
          type: "image_url",
          image_url: {},
        }],
      }, 0],
    ];
    for (const [kind, body, out] of cases) {
      const c = estimateCost(`https://api.openai.com/v1/${kind}?x=1`, body);
      const sim = inputTokensOf(body, kind as never);
      expect({ kind, body, ok: c.inputTokens! >= sim, out: c.outputTokens })
        .toEqual({ kind, body, ok: true, out });
    }
    // Token arrays count exactly; an image part counts as media.
    expect(estimateCost("http://x/v1/embeddings", { input: [[1, 2], [3]] }))
      .toEqual({ requests: 1, inputTokens: 3, outputTokens: 0 });
    expect(
      estimateCost("http://x/v1/responses", {
        input: [{ role: "user", content: [{ type: "input_image" }] }],
      }).inputTokens,
    ).toBe(4 + 4 + 1600);
    // Usage: Responses' input/output tokens, embeddings' prompt tokens.
    expect(
      usageOf({
        usage: { input_tokens: 12, output_tokens: 5, total_tokens: 17 },
      }),
    )
      .toEqual({ inputTokens: 12, outputTokens: 5 });
    expect(usageOf({ usage: { prompt_tokens: 8, total_tokens: 8 } }))
      .toEqual({ inputTokens: 8 });
  });

  it("never under-estimates the simulator's input tokens, CJK included", () => {
    const all = [
      ...prompts(200),
      "日本語のテキストをたくさん書きます。これはテストです。",
      "한국어 텍스트도 있습니다",
      "!!!???...;;;",
      "a b c d e f g",
      "emoji 🎉🎉🎉 and accents: café, naïve",
    ];
    for (const p of all) {
      const body = request(p);
      const est = estimateCost("http://x/v1/messages", body).inputTokens!;
      expect({ p, ok: est >= inputTokensOf(body) }).toEqual({ p, ok: true });
    }
    // CJK: about one token per character or more, not one per four characters.
    expect(estimateTokens("这是一个中文句子")).toBe(12);
    expect(
      estimateCost("http://x/v1/chat/completions", {
        messages: [],
        max_completion_tokens: 7,
      }),
    )
      .toEqual({ requests: 1, inputTokens: 4, outputTokens: 7 });
    expect(estimateCost("http://x/v1/models", {})).toEqual({ requests: 1 });
  });

  it("reads usage in both providers' shapes", () => {
    expect(
      usageOf({
        usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 },
      }),
    )
      .toEqual({ inputTokens: 3, outputTokens: 4 });
    const a = {
      usage: {
        input_tokens: 10,
        cache_creation_input_tokens: 5,
        cache_read_input_tokens: 100,
        output_tokens: 2,
      },
    };
    expect(usageOf(a)).toEqual({ inputTokens: 15, outputTokens: 2 });
    expect(usageOf(a, { cacheReadCounts: true })).toEqual({
      inputTokens: 115,
      outputTokens: 2,
    });
    expect(usageOf({ usage: { output_tokens: 9 } })).toEqual({
      outputTokens: 9,
    });
    expect(usageOf({})).toBeUndefined();
    expect(usageOf(null)).toBeUndefined();
  });

  it("parses SSE split anywhere, with CRLF and multi-line data", () => {
    const text =
      "event: a\r\ndata: 1\r\ndata: 2\r\n\r\n: comment\n\ndata: x\n\nevent: b\rdata: y\r\r";
    for (let cut = 0; cut < text.length; cut++) {
      const p = new SseParser();
      const got = [
        ...p.push(text.slice(0, cut)),
        ...p.push(text.slice(cut)),
        ...p.end(),
      ];
      expect(got).toEqual([
        { event: "a", data: "1\n2" },
        { event: "message", data: "x" },
        { event: "b", data: "y" },
      ]);
    }
  });
});

describe("rateLimitedFetch end to end", () => {
  it(
    "known limits: 300 requests, 0 × 429, input order, makespan near theory",
    async () => {
      // A compressed "minute" of 4 s; a 100 ms margin for the send-to-arrival
      // skew of a burst on loopback (20–50 ms warm, more for a first burst).
      // Margin and the time to send a window's burst are absolute, so the
      // window must be long for them to stay within 5 %.
      const windowMs = 4000;
      const ps = prompts(300);
      const trueInput = ps.reduce((s, p) => s + inputTokensOf(request(p)), 0);
      const limits = {
        requests: 100,
        inputTokens: Math.ceil(trueInput / 2),
        outputTokens: 12_000,
        windowMs,
      };
      await warmUp();
      const s = await sim({ limits });
      const claude = anthropic({
        apiKey: "sk-test",
        baseURL: s.url,
        concurrency: 16,
        limiter: {
          windows: [
            { key: "requests", limit: limits.requests, ms: windowMs },
            { key: "inputTokens", limit: limits.inputTokens, ms: windowMs },
            { key: "outputTokens", limit: limits.outputTokens, ms: windowMs },
          ],
          marginMs: 100,
        },
        learn: false,
      });
      const t0 = performance.now();
      const out = await mapConcurrent(ps, async (p, i) => {
        const m = await claude.messages(request(p, `job-${i}`));
        return { i, text: m.content[0]!.text };
      }, { concurrency: 64 });
      expect(out.map((o) => o.i)).toEqual(ps.map((_, i) => i));
      const st = s.stats();
      expect(st.rateLimited).toEqual({
        requests: 0,
        inputTokens: 0,
        outputTokens: 0,
        tokens: 0,
      });
      expect(st.accepted).toBe(300);
      expect(st.acceptedAt.first - t0).toBeLessThan(1000);
      // Makespan: first to last admission at the server, against the bound
      // from the simulator's true counts.
      const makespan = st.acceptedAt.last - st.acceptedAt.first;
      const bound = Math.max(
        theory(300, limits.requests, windowMs),
        theory(trueInput, limits.inputTokens, windowMs),
        theory(st.usage.outputTokens, limits.outputTokens, windowMs),
      );
      expect(bound).toBeGreaterThanOrEqual(8000);
      // The 5 % target is measured by the benchmark (`npm run bench`); on a
      // noisy 2-core machine the test only guards against losing a window.
      expect({ makespan, bound, ok: makespan / bound <= 1.1 }).toMatchObject({
        ok: true,
      });
      // Stats match the simulator's truth.
      const js = claude.stats.toJSON();
      expect(js.inputTokens).toBe(st.usage.inputTokens);
      expect(js.outputTokens).toBe(st.usage.outputTokens);
      expect(js.succeeded).toBe(300);
      expect(js.rateLimited).toBe(0);
    },
    20_000,
  );

  it(
    "unknown limits: learned from headers, ≤ 2 % of attempts 429, all succeed",
    async () => {
      const windowMs = 1000;
      await warmUp();
      // The simulator shares this process's event loop, and the SDKs' first
      // calls are cold (module set-up, JIT): a request stamped at send time
      // can reach the handler 100 ms+ later. This test is about the SDKs
      // working through our fetch, so the margin covers that lag; exactness
      // at the edge is the "known limits" test's job.
      const s = await sim({
        limits: {
          requests: 60,
          inputTokens: 4000,
          outputTokens: 6000,
          windowMs,
        },
        retryAfterMs: true,
      });
      const claude = anthropic({
        apiKey: "k",
        baseURL: s.url,
        concurrency: 16,
        learn: { windowMs },
        limiter: { marginMs: 50 },
      });
      const ps = prompts(200);
      const out = await mapConcurrent(ps, (p) => claude.messages(request(p)), {
        concurrency: 32,
      });
      expect(out.length).toBe(200);
      const st = s.stats();
      const attempts = st.received;
      const refused = Object.values(st.rateLimited).reduce((a, b) => a + b, 0);
      expect(refused / attempts).toBeLessThanOrEqual(0.02);
      expect(st.accepted).toBe(200);
      // Learned per model: the model's own windows; the key's stay empty.
      expect(claude.limiter.usage()).toEqual([]);
      expect([...claude.fetch.models.keys()]).toEqual(["claude-sim"]);
      expect(
        claude.fetch.models.get("claude-sim")!.usage().map((
          w,
        ) => [w.key, w.limit]),
      ).toEqual([
        ["requests", 60],
        ["inputTokens", 4000],
        ["outputTokens", 6000],
      ]);
    },
    20_000,
  );

  it(
    "faults: every logical request succeeds exactly once or fails typed; nothing lost or duplicated",
    async () => {
      const s = await sim({
        faults: {
          overloaded529: 0.1,
          error500: 0.05,
          reset: 0.03,
          // Mid-stream errors hit only the streaming calls (a quarter of
          // them here): 10 % of those, so that a run surely sees some.
          midStreamError: 0.1,
        },
        seed: 3,
      });
      const claude = anthropic({
        apiKey: "k",
        baseURL: s.url,
        retry: { baseMs: 1, maxMs: 5, retries: 8 },
      });
      const ps = prompts(200);
      const results = await mapConcurrentSettled(
        ps,
        (p, i) =>
          retry(async () => {
            const id = `L${i}`;
            if (i % 4 === 0) {
              // Streaming: a mid-stream error is retried as a whole call.
              return { i, text: await claude.stream(request(p, id)).text() };
            }
            return {
              i,
              text: (await claude.messages(request(p, id))).content[0]!.text,
            };
          }, { baseMs: 1, maxMs: 5, retries: 8 }),
        { concurrency: 16 },
      );
      const st = s.stats();
      results.forEach((r, i) => {
        if (r.status === "fulfilled") {
          expect(r.value.i).toBe(i);
          expect(st.perClient[`L${i}`]!.succeeded).toBe(1);
        } else {
          expect(r.reason instanceof HttpError || r.reason instanceof Error)
            .toBe(true);
          expect(st.perClient[`L${i}`]!.succeeded).toBe(0);
        }
      });
      const ok = results.filter((r) => r.status === "fulfilled").length;
      expect(ok).toBeGreaterThanOrEqual(195);
      expect(Object.values(st.perClient).reduce((a, c) => a + c.succeeded, 0))
        .toBe(ok);
      expect(st.faults.overloaded529 + st.faults.error500 + st.faults.reset)
        .toBeGreaterThan(20);
      expect(st.faults.midStreamError).toBeGreaterThan(0);
    },
    20_000,
  );

  it("quota exhausted: each affected request fails once, fast, saying so", async () => {
    const s = await sim({ quotaAfter: 5 });
    const claude = anthropic({ apiKey: "k", baseURL: s.url });
    const t0 = performance.now();
    const results = await mapConcurrentSettled(
      prompts(20),
      (p) => claude.messages(request(p)),
      {
        concurrency: 1,
      },
    );
    expect(performance.now() - t0).toBeLessThan(3000);
    expect(results.filter((r) => r.status === "fulfilled").length).toBe(5);
    for (const r of results.slice(5)) {
      expect(r.status).toBe("rejected");
      const e = (r as PromiseRejectedResult).reason;
      expect(e).toBeInstanceOf(QuotaError);
      expect(e.message).toMatch(
        /Quota exhausted \(enforced_spend_limit_reached\)/,
      );
    }
    expect(s.stats().received).toBe(20); // one attempt each: no retry storm
    expect(claude.stats.toJSON().retries).toBe(0);
  });

  it(
    "official SDKs with our fetch (maxRetries: 0): 0 × 429, streaming settles usage",
    async () => {
      const windowMs = 1000;
      await warmUp();
      const s = await sim({ limits: { requests: 40, windowMs } });
      const f = rateLimitedFetch({
        limiter: {
          windows: [{ key: "requests", limit: 40, ms: windowMs }],
          marginMs: 200,
        },
        concurrency: 8,
        learn: false,
      });
      const client = new Anthropic({
        apiKey: "k",
        baseURL: s.url,
        maxRetries: 0,
        fetch: f,
      });
      const res = await mapConcurrent(prompts(60), async (p, i) => {
        if (i % 3 === 0) {
          return (await client.messages.stream(request(p)).finalMessage())
            .usage;
        }
        return (await client.messages.create(request(p))).usage;
      }, { concurrency: 20 });
      expect(res.length).toBe(60);
      expect(s.stats().rateLimited.requests).toBe(0);
      expect(f.stats.toJSON().outputTokens).toBe(s.stats().usage.outputTokens);
      expect(f.stats.toJSON().inputTokens).toBe(s.stats().usage.inputTokens);

      const s2 = await sim({ limits: { requests: 20, windowMs } });
      const g = rateLimitedFetch({
        limiter: {
          windows: [{ key: "requests", limit: 20, ms: windowMs }],
          marginMs: 200,
        },
      });
      const oa = new OpenAI({
        apiKey: "k",
        baseURL: `${s2.url}/v1`,
        maxRetries: 0,
        fetch: g,
      });
      await mapConcurrent(
        Array.from({ length: 30 }, (_, i) => i),
        async (i) => {
          if (i % 2) {
            const stream = await oa.chat.completions.create({
              model: "m",
              max_tokens: 30,
              messages: [{ role: "user", content: `hi ${i}` }],
              stream: true,
              stream_options: { include_usage: true },
            });
            for await (const _ of stream);
          } else {
            await oa.chat.completions.create({
              model: "m",
              max_tokens: 30,
              messages: [{ role: "user", content: `hi ${i}` }],
            });
          }
        },
        { concurrency: 10 },
      );
      expect(s2.stats().rateLimited.requests).toBe(0);
      expect(g.stats.toJSON().outputTokens).toBe(s2.stats().usage.outputTokens);
    },
    20_000,
  );

  it("a 429 pauses that model's windows for the server-told time (perModel false: all of them)", async () => {
    for (const perModel of ["learned", false] as const) {
      const s = await sim({
        limits: { requests: 2, windowMs: 1000 },
        retryAfterMs: true,
      });
      const f = rateLimitedFetch({
        learn: false,
        retry: { retries: 3 },
        perModel,
      });
      const send = () =>
        f(`${s.url}/v1/messages`, {
          method: "POST",
          body: JSON.stringify(request("x")),
        }).then((r) => r.text());
      await Promise.all([send(), send()]);
      const t0 = performance.now();
      await send(); // 429 → retry-after-ms ≈ 1000 → paused
      const paused = perModel ? f.models.get("claude-sim")! : f.limiter;
      expect(paused.pausedUntil).toBeGreaterThan(0);
      if (perModel) expect(f.limiter.pausedUntil).toBe(-Infinity);
      else expect(f.models.size).toBe(0);
      expect(performance.now() - t0).toBeGreaterThanOrEqual(900);
      expect(f.stats.toJSON().rateLimited).toBe(1);
      expect(f.stats.toJSON().retries).toBe(1);
    }
  });

  it("an unexpected 429 widens the margin", async () => {
    // The server allows 3 per second; we (wrongly) think 5.
    const s = await sim({
      limits: { requests: 3, windowMs: 1000 },
      retryAfterMs: true,
    });
    const f = rateLimitedFetch({
      limiter: {
        windows: [{ key: "requests", limit: 5, ms: 1000 }],
        marginMs: 0,
      },
      learn: false,
    });
    await Promise.all(
      Array.from(
        { length: 5 },
        () =>
          f(`${s.url}/v1/messages`, {
            method: "POST",
            body: JSON.stringify(request("x")),
          }).then((r) => r.text()),
      ),
    );
    expect(f.stats.toJSON().unexpected429).toBeGreaterThan(0);
    expect(f.stats.toJSON().marginWidened).toBe(1);
    expect(f.limiter.usage()[0]!.marginMs).toBe(50);
  });

  it("secrets: the API key appears in no error, report or JSON", async () => {
    const key = "sk-ant-SECRET-do-not-leak-12345";
    const s = await sim({
      apiKey: "another-key",
      limits: { requests: 1, windowMs: 60_000 },
    });
    const claude = anthropic({
      apiKey: key,
      baseURL: s.url,
      retry: { retries: 1, baseMs: 1 },
    });
    const err = await claude.messages(request("hi")).catch((e) => e);
    expect(err).toBeInstanceOf(HttpError);
    expect(err.status).toBe(401);
    const good = anthropic({
      apiKey: "another-key",
      baseURL: s.url,
      // A rate-limit 429 paces a call until maxRateLimitedMs: 1 s here, so
      // the minute-long wait ends it at once with the 429.
      retry: { retries: 0, maxRateLimitedMs: 1000 },
      learn: false,
    });
    await good.messages(request("1"));
    const err429 = await good.messages(request("2")).catch((e) => e);
    expect(err429.status).toBe(429);
    const closed = await startSimulator();
    await closed.close(); // a port where nothing listens
    const net = anthropic({
      apiKey: key,
      baseURL: closed.url,
      retry: { retries: 1, baseMs: 1 },
    });
    const errNet = await net.messages(request("x")).catch((e) => e);
    for (const e of [err, err429, errNet]) {
      const forms = [
        String(e),
        e.message,
        e.stack ?? "",
        JSON.stringify(e),
        JSON.stringify(Object.entries(e)),
        String(e.cause),
        JSON.stringify([...(e.headers?.entries?.() ?? [])]),
      ];
      for (const f of forms) expect(f).not.toContain(key);
    }
    for (const c of [claude, net]) {
      expect(c.stats.report()).not.toContain(key);
      expect(JSON.stringify(c.stats.toJSON())).not.toContain(key);
    }
  });
});

describe("Azure OpenAI", () => {
  it("AzureOpenAI (openai package) through rateLimitedFetch, --rpm's short windows kept: 120 chats and 40 streamed, ≤ 1 × 429, every call once, usage settled", async () => {
    const windowMs = 2000;
    await warmUp();
    // Azure's rule, compressed: 60 requests per 2 s, and a sixth of that
    // (10) per sixth of the window.
    const azureSim = () =>
      sim({ limits: { requests: 60, windowMs }, apiKey: "az-key" });
    const limiter = {
      windows: [{ key: "requests", limit: 60, ms: windowMs }],
      marginMs: 60,
    };
    const s = await azureSim();
    const f = rateLimitedFetch({ limiter, concurrency: 16 });
    const client = new AzureOpenAI({
      endpoint: s.url,
      apiKey: "az-key",
      apiVersion: "2024-10-21",
      fetch: f,
      maxRetries: 0,
    });
    const ask = (p: string) => ({
      model: "gpt-4o-mini", // the deployment
      max_tokens: 30,
      messages: [{ role: "user" as const, content: p }],
    });
    const out = await mapConcurrent(prompts(160), async (p, i) => {
      if (i % 4 !== 0) {
        return (await client.chat.completions.create(ask(p))).choices[0]!
          .message
          .content;
      }
      let text = "";
      const stream = await client.chat.completions.create({
        ...ask(p),
        stream: true,
        stream_options: { include_usage: true },
      });
      for await (const c of stream) text += c.choices[0]?.delta.content ?? "";
      return text;
    }, { concurrency: 16 });
    expect(out.every((t) => typeof t === "string" && t.length > 0)).toBe(true);
    const st = s.stats();
    expect(st.accepted).toBe(160);
    expect(st.rateLimited.requests).toBeLessThanOrEqual(1);
    expect(st.received).toBe(160 + st.rateLimited.requests);
    expect(f.stats.toJSON().inputTokens).toBe(st.usage.inputTokens);
    expect(f.stats.toJSON().outputTokens).toBe(st.usage.outputTokens);
    // The short windows were kept: a sixth and a sixtieth of the window.
    expect(f.limiter.usage().map((w) => [w.ms, w.limit])).toEqual(
      expect.arrayContaining([[windowMs, 60], [windowMs / 6, 10], [
        windowMs / 60,
        1,
      ]]),
    );
    // Without them (the client sees a plain OpenAI URL; the network takes it
    // to the Azure route), the same burst draws 429s from the short rule.
    const t = await azureSim();
    const plain = rateLimitedFetch({
      limiter,
      concurrency: 16,
      retry: false,
      fetch: (u, i) =>
        fetch(
          String(u).replace(
            "/v1/chat/completions",
            "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
          ),
          i,
        ),
    });
    const bare = new OpenAI({
      apiKey: "az-key",
      baseURL: `${t.url}/v1`,
      fetch: plain,
      maxRetries: 0,
    });
    await mapConcurrentSettled(
      prompts(30),
      (p) => bare.chat.completions.create(ask(p)),
      {
        concurrency: 16,
      },
    );
    expect(t.stats().rateLimited.requests).toBeGreaterThan(1);
  });
});

describe("rateLimitedFetch learning", () => {
  it("learns a limit without a remaining header and charges nothing extra", async () => {
    const headers = {
      "content-type": "application/json",
      "x-ratelimit-limit-requests": "10",
    };
    const f = rateLimitedFetch({
      fetch: () => Promise.resolve(new Response("{}", { headers })),
    });
    await (await f("http://x/v1/chat/completions", {
      method: "POST",
      body: "{}",
    })).text();
    await (await f("http://x/v1/chat/completions", {
      method: "POST",
      body: "{}",
    })).text();
    const [w] = f.limiter.usage();
    expect([w!.key, w!.limit, w!.ms, w!.used]).toEqual([
      "requests",
      10,
      60_000,
      1,
    ]);
  });

  it("charges what others used when remaining is lower than our log", async () => {
    let remaining = 10;
    const f = rateLimitedFetch({
      fetch: () =>
        Promise.resolve(
          new Response("{}", {
            headers: {
              "content-type": "application/json",
              "anthropic-ratelimit-requests-limit": "10",
              "anthropic-ratelimit-requests-remaining": String(--remaining - 3),
            },
          }),
        ),
    });
    await (await f("http://x/v1/messages", { method: "POST", body: "{}" }))
      .text();
    // The server says 6 left after our first request: 3 were someone else's.
    expect(f.limiter.usage()[0]!.used).toBe(4);
  });
});

describe("rateLimitedFetch per model", () => {
  const body = (model: string) =>
    JSON.stringify({
      model,
      max_tokens: 10,
      messages: [{ role: "user", content: "hi" }],
    });
  /** A server that says each model's request limit in its headers and logs when each was sent. */
  const server = (clock: ManualClock, limits: Record<string, number>) => {
    const sentAt: Record<string, number[]> = {};
    const fetch = (_url: unknown, init?: RequestInit): Promise<Response> => {
      const model = JSON.parse(String(init!.body)).model as string;
      (sentAt[model] ??= []).push(clock.now());
      const headers: Record<string, string> = {
        "content-type": "application/json",
      };
      if (limits[model]) {
        headers["x-ratelimit-limit-requests"] = String(limits[model]);
      }
      return Promise.resolve(new Response("{}", { headers }));
    };
    return { sentAt, fetch: fetch as typeof globalThis.fetch };
  };
  const call = (f: typeof fetch, model: string) =>
    f("http://x/v1/chat/completions", { method: "POST", body: body(model) })
      .then((r) => r.text());
  /** Runs the manual clock until every call has settled. */
  const drive = async (clock: ManualClock, all: Promise<unknown>) => {
    let done = false;
    void all.then(() => done = true);
    for (let i = 0; i < 1000 && !done; i++) {
      await clock.flush();
      if (!done && clock.nextAt !== undefined) {
        await clock.advance(clock.nextAt - clock.now());
      }
    }
    await all;
  };

  it("learns each model's limits from its own headers; a slow model does not hold back a fast one", async () => {
    const clock = new ManualClock();
    const srv = server(clock, { fast: 40, slow: 2 });
    const f = rateLimitedFetch({
      clock,
      fetch: srv.fetch,
      learn: { windowMs: 1000 },
      limiter: { marginMs: 0 },
    });
    await call(f, "slow");
    await call(f, "fast"); // both learned now
    await clock.advance(1000); // the learning calls have left the windows
    const all = Promise.all(
      Array.from({ length: 10 }, (_, i) => call(f, i % 2 ? "fast" : "slow")),
    );
    await drive(clock, all);
    expect(f.limiter.usage()).toEqual([]);
    expect(
      [...f.models].map(([m, l]) => [m, l.usage().map((w) => w.limit)]),
    ).toEqual([["slow", [2]], ["fast", [40]]]);
    expect(srv.sentAt.fast!.slice(1)).toEqual([1000, 1000, 1000, 1000, 1000]);
    expect(srv.sentAt.slow!.slice(1)).toEqual([1000, 1000, 2000, 2000, 3000]);
  });

  it("perModel false: one set of windows flips between the models' headers (the old behaviour)", async () => {
    const clock = new ManualClock();
    const srv = server(clock, { fast: 40, slow: 2 });
    const f = rateLimitedFetch({
      clock,
      fetch: srv.fetch,
      learn: { windowMs: 1000 },
      perModel: false,
    });
    await call(f, "slow");
    expect(f.limiter.usage()[0]!.limit).toBe(2);
    await call(f, "fast");
    expect(f.limiter.usage()[0]!.limit).toBe(40);
    expect(f.models.size).toBe(0);
  });

  it("given limits apply to the whole key by default, to each model with perModel 'all'", async () => {
    for (const perModel of ["learned", "all"] as const) {
      const clock = new ManualClock();
      const srv = server(clock, {});
      const f = rateLimitedFetch({
        clock,
        fetch: srv.fetch,
        limiter: {
          windows: [{ key: "requests", limit: 2, ms: 1000 }],
          marginMs: 0,
        },
        perModel,
      });
      const all = Promise.all(
        ["a", "a", "a", "b", "b", "b"].map((m) => call(f, m)),
      );
      await drive(clock, all);
      if (perModel === "learned") {
        // 2 per second for the key: a a | a b | b b
        expect(srv.sentAt).toEqual({ a: [0, 0, 1000], b: [1000, 2000, 2000] });
      } else {
        expect(srv.sentAt).toEqual({ a: [0, 0, 1000], b: [0, 0, 1000] });
        expect(f.limiter.usage()).toEqual([]);
        expect(f.models.get("b")!.usage()[0]!.limit).toBe(2);
      }
    }
    expect(() =>
      rateLimitedFetch({ perModel: "all", limiter: new RateLimiter() })
    ).toThrow(/perModel: "all".*limiter options/);
    expect(() => rateLimitedFetch({ perModel: "yes" as never })).toThrow(
      /'perModel' must be "learned", "all" or false: received "yes"/,
    );
    expect(() => rateLimitedFetch({ maxModels: 0 })).toThrow(/'maxModels'.*0/);
  });

  it("a model's permit held while the key's windows made it wait counts from when it is sent", async () => {
    const clock = new ManualClock();
    const srv = server(clock, { a: 5 });
    const f = rateLimitedFetch({
      clock,
      fetch: srv.fetch,
      learn: { windowMs: 10_000 },
      // The key: 10 input tokens a second, one call's worth (4 + 4 + 1).
      limiter: {
        windows: [{ key: "inputTokens", limit: 10, ms: 1000 }],
        marginMs: 0,
      },
    });
    await call(f, "a"); // t=0: learns a's 5 per 10 s (this call is not in it)
    await drive(clock, call(f, "a")); // a's permit at 0, the key's at 1000
    expect(srv.sentAt.a).toEqual([0, 1000]);
    await clock.advance(10_500 - clock.now());
    // Stamped at 1000 (when sent), so still inside a's 10 s window.
    expect(f.models.get("a")!.usage()[0]!.used).toBe(1);
    await clock.advance(500);
    expect(f.models.get("a")!.usage()[0]!.used).toBe(0);
  });

  it("bounded: 10,000 models keep at most maxModels limiters; busy ones are never dropped", async () => {
    const clock = new ManualClock();
    const limits: Record<string, number> = {};
    for (let i = 0; i < 10_000; i++) limits[`m${i}`] = 100;
    const srv = server(clock, limits);
    const f = rateLimitedFetch({
      clock,
      fetch: srv.fetch,
      learn: { windowMs: 1000 },
      maxModels: 8,
    });
    for (let i = 0; i < 10_000; i++) {
      await call(f, `m${i}`);
      if (i % 100 === 99) await clock.advance(2000); // older windows go idle
    }
    expect(f.models.size).toBeLessThanOrEqual(8);
    expect(clock.pending).toBe(0);
    // Eight busy models fill the table; a ninth shares the overflow windows.
    const g = rateLimitedFetch({
      clock,
      fetch: server(clock, { a: 1, b: 1, c: 1 }).fetch,
      limiter: { marginMs: 0 },
      learn: { windowMs: 1000 },
      maxModels: 2,
    });
    await call(g, "a");
    await call(g, "b");
    await call(g, "a"); // a's window now holds a request
    await call(g, "b");
    await call(g, "c");
    expect([...g.models.keys()]).toEqual(["a", "b"]);
  });
});

describe("rateLimitedFetch abort", () => {
  it("queued, sleeping and in-flight calls reject promptly with the reason and release", async () => {
    const s = await sim({ latency: { baseMs: 2000 } });
    const f = rateLimitedFetch({
      concurrency: 1,
      learn: false,
      limiter: { rpm: 1000 },
    });
    const body = JSON.stringify(request("slow"));
    // In flight: the only slot.
    const c1 = new AbortController();
    const inflight = f(`${s.url}/v1/messages`, {
      method: "POST",
      body,
      signal: c1.signal,
    });
    await new Promise((r) => setTimeout(r, 50));
    // Queued behind it.
    const c2 = new AbortController();
    const queued = f(`${s.url}/v1/messages`, {
      method: "POST",
      body,
      signal: c2.signal,
    });
    await new Promise((r) => setTimeout(r, 20));
    const t0 = performance.now();
    c2.abort(new Error("queued-abort"));
    await expect(queued).rejects.toThrow("queued-abort");
    c1.abort(new Error("inflight-abort"));
    await expect(inflight).rejects.toThrow("inflight-abort");
    expect(performance.now() - t0).toBeLessThan(500);
    // The slot is free again and no permit was used by the queued call.
    expect(f.limiter.usage()[0]!.used).toBe(1);
    const fast = await sim();
    const r = await f(`${fast.url}/v1/messages`, { method: "POST", body });
    expect(r.status).toBe(200);
    await r.text();
    expect(f.stats.toJSON().errors.aborted).toBeGreaterThanOrEqual(1);
  });

  it("a sleeping retry wakes at once on abort and leaves no timer behind", async () => {
    const clock = new ManualClock();
    let calls = 0;
    const f = rateLimitedFetch({
      clock,
      learn: false,
      fetch: () => {
        calls++;
        return Promise.resolve(
          new Response("busy", {
            status: 503,
            headers: { "retry-after": "30" },
          }),
        );
      },
    });
    const ctl = new AbortController();
    const p = f("http://x/v1/messages", {
      method: "POST",
      body: "{}",
      signal: ctl.signal,
    });
    const settled = p.then(() => "resolved", (e) => e);
    for (let i = 0; i < 20 && clock.pending === 0; i++) await clock.flush();
    expect(clock.pending).toBe(1);
    ctl.abort("stop");
    expect(await settled).toBe("stop");
    expect(clock.pending).toBe(0);
    expect(calls).toBe(1);
  });

  it("a call aborted while it waits is cancelled, not failed: never sent, no permit used, no error counted", async () => {
    const clock = new ManualClock();
    let sent = 0;
    const f = rateLimitedFetch({
      clock,
      learn: false,
      limiter: { rpm: 1, marginMs: 0 },
      fetch: () => {
        sent++;
        return Promise.resolve(new Response("{}", { status: 200 }));
      },
    });
    const body = JSON.stringify({ max_tokens: 1, messages: [] });
    await (await f("http://x/v1/messages", { method: "POST", body })).text();
    const ctl = new AbortController();
    const waiting = f("http://x/v1/messages", {
      method: "POST",
      body,
      signal: ctl.signal,
    }).then(() => "resolved", (e) => e);
    for (let i = 0; i < 20 && clock.pending === 0; i++) await clock.flush();
    ctl.abort("stop");
    expect(await waiting).toBe("stop");
    expect(sent).toBe(1);
    const s = f.stats.toJSON();
    expect([s.calls, s.succeeded, s.failed, s.cancelled, s.requests]).toEqual(
      [2, 1, 0, 1, 1],
    );
    expect(s.errors).toEqual({});
    expect(f.stats.report()).toMatch(/\(1 ok, 0 failed, 1 cancelled;/);
    expect(f.limiter.usage()[0]!.used).toBe(1);
  });

  it("validates options by name", () => {
    expect(() => rateLimitedFetch({ concurrency: 0 })).toThrow(
      /'concurrency'.*0/,
    );
    expect(() => rateLimitedFetch({ retry: { retries: -1 } })).toThrow(
      /'retries'/,
    );
    expect(() => rateLimitedFetch({ limiter: { rpm: -1 } })).toThrow(/'rpm'/);
    expect(() => rateLimitedFetch({ nope: 1 } as never)).toThrow(
      /Unknown rateLimitedFetch option 'nope'/,
    );
    expect(() => anthropic({ apiKey: undefined, baseURL: undefined })).toThrow(
      /ANTHROPIC_API_KEY|apiKey/,
    );
    expect(() => anthropic({ apiKey: "sk-ant-secret…", baseURL: "http://x" }))
      .toThrow(/HTTP header/);
    try {
      anthropic({ apiKey: "sk-ant-secret…", baseURL: "http://x" });
    } catch (e) {
      expect(String(e)).not.toContain("secret");
    }
  });
});

describe("prompt caching end to end", () => {
  // ~6,000 tokens by the simulator's count (two per word), marked for caching.
  const rubric = Array.from({ length: 3000 }, (_, i) => `rule${i % 10}`)
    .join(" ");
  const cachedAsk = (question: string, system = rubric) => ({
    model: "claude-sim",
    max_tokens: 64,
    system: [{
      type: "text",
      text: system,
      cache_control: { type: "ephemeral" },
    }],
    messages: [{ role: "user" as const, content: question }],
  });
  const windows = (requests: number, inputTokens: number, ms: number) => [
    { key: "requests", limit: requests, ms },
    { key: "inputTokens", limit: inputTokens, ms },
  ];
  async function batch(
    url: string,
    f: (u: string, init: RequestInit) => Promise<Response>,
    bodies: unknown[],
  ): Promise<void> {
    const out = await mapConcurrent(bodies, async (b) => {
      const res = await f(`${url}/v1/messages`, {
        method: "POST",
        body: JSON.stringify(b),
      });
      expect(res.status).toBe(200);
      return (await res.json()).usage;
    }, { concurrency: bodies.length });
    expect(out.length).toBe(bodies.length);
  }

  it(
    "60 questions on a 6k-token cached prefix, 20 requests and 8,000 input tokens per 2 s: one write, 0 × 429, ≤ 1.25 × the minimum",
    async () => {
      await warmUp();
      const s = await sim({
        limits: { requests: 20, inputTokens: 8000, windowMs: 2000 },
        latency: { baseMs: 500 },
      });
      const f = rateLimitedFetch({
        concurrency: 32,
        // The simulator shares this event loop: on a loaded 2-core machine a
        // send can reach it 60 ms+ after it was stamped (one 429 in a
        // fresh-clone CI run at 60 ms).
        limiter: { windows: windows(20, 8000, 2000), marginMs: 100 },
        learn: false,
      });
      const bodies = Array.from(
        { length: 60 },
        (_, i) => cachedAsk(`Question ${i}: grade this answer.`),
      );
      await batch(s.url, f, bodies);
      const st = s.stats();
      expect(st.rateLimited).toEqual({
        requests: 0,
        inputTokens: 0,
        outputTokens: 0,
        tokens: 0,
      });
      expect(st.cache.writes).toBe(1);
      expect(st.cache.reads).toBe(59);
      const [prefix] = Object.values(st.cache.prefixes);
      expect(prefix!.tokens).toBeGreaterThan(6000);
      // Once the prefix is cached, requests bind: (60 / 20 - 1) windows.
      const makespan = st.acceptedAt.last - st.acceptedAt.first;
      const minimum = theory(60, 20, 2000);
      expect({ makespan, minimum, ok: makespan / minimum <= 1.25 })
        .toMatchObject({ ok: true });
      const js = f.stats.toJSON();
      expect(js.inputTokens).toBe(st.usage.inputTokens);
      expect(js.cacheWriteTokens).toBe(prefix!.tokens);
      expect(js.cacheReadTokens).toBe(59 * prefix!.tokens);
    },
    20_000,
  );

  it("three prefixes interleaved in one batch: three writes, every other request reads", async () => {
    const s = await sim({
      limits: { requests: 30, inputTokens: 20_000, windowMs: 1000 },
    });
    const f = rateLimitedFetch({
      concurrency: 16,
      limiter: { windows: windows(30, 20_000, 1000), marginMs: 100 },
      learn: false,
    });
    const systems = ["alpha", "beta", "gamma"].map((w) => `${w} ${rubric}`);
    const bodies = Array.from(
      { length: 30 },
      (_, i) => cachedAsk(`Question ${i}`, systems[i % 3]),
    );
    await batch(s.url, f, bodies);
    const st = s.stats();
    expect(st.cache.writes).toBe(3);
    expect(st.cache.reads).toBe(27);
    expect(Object.values(st.cache.prefixes).map((p) => p.writes)).toEqual([
      1,
      1,
      1,
    ]);
    expect(st.rateLimited.inputTokens + st.rateLimited.requests).toBe(0);
  });

  it("a prefix below the minimum cacheable length: nothing waits past the first response, full input charged, 0 × 429", async () => {
    const s = await sim({
      limits: { requests: 50, inputTokens: 20_000, windowMs: 1000 },
      latency: { baseMs: 300 },
      promptCache: { minTokens: 10_000 },
    });
    const sent: number[] = [];
    const f = rateLimitedFetch({
      concurrency: 16,
      limiter: { windows: windows(50, 20_000, 1000), marginMs: 100 },
      learn: false,
      fetch: (u, init) => {
        sent.push(performance.now());
        return fetch(u, init);
      },
    });
    const bodies = Array.from({ length: 6 }, (_, i) => cachedAsk(`Q${i}`));
    await batch(s.url, f, bodies);
    const st = s.stats();
    expect(st.cache.writes + st.cache.reads).toBe(0);
    expect(st.rateLimited.inputTokens).toBe(0);
    // The second request went when the first answered (no second warm-up).
    expect(sent[1]! - sent[0]!).toBeGreaterThanOrEqual(250);
    expect(sent[1]! - sent[0]!).toBeLessThan(300 + 250);
    const js = f.stats.toJSON();
    expect(js.inputTokens).toBe(st.usage.inputTokens);
    expect(js.cacheWriteTokens + js.cacheReadTokens).toBe(0);
  });

  it("through the official SDK with our fetch: one write, the rest read", async () => {
    const s = await sim({ latency: { baseMs: 100 } });
    const f = rateLimitedFetch({ limiter: { itpm: 1_000_000 }, learn: false });
    const client = new Anthropic({
      apiKey: "k",
      baseURL: s.url,
      maxRetries: 0,
      fetch: f,
    });
    const out = await Promise.all(
      ["a", "b", "c", "d", "e"].map((q) =>
        client.messages.create(
          cachedAsk(
            `Question ${q}`,
          ) as Anthropic.MessageCreateParamsNonStreaming,
        )
      ),
    );
    expect(out.map((m) => m.usage.cache_read_input_tokens! > 0).sort())
      .toEqual([false, true, true, true, true]);
    expect(s.stats().cache).toMatchObject({ writes: 1, reads: 4 });
    expect(f.stats.toJSON().cacheReadTokens).toBe(
      4 *
        out.find((m) => m.usage.cache_creation_input_tokens)!.usage
          .cache_creation_input_tokens!,
    );
  });

  it("streamed: the waiting requests go as soon as the writer's message_start arrives", async () => {
    const s = await sim({
      latency: { baseMs: 0, perOutputTokenMs: 40 },
      perClientFaults: { writer: { delayMs: 300 } }, // its headers come late
    });
    const claude = anthropic({ apiKey: "k", baseURL: s.url, learn: false });
    const t0 = performance.now();
    const first = claude.stream({
      ...cachedAsk("first"),
      metadata: { user_id: "writer" },
    }).text();
    await new Promise((r) => setTimeout(r, 20)); // the stream is the writer
    const rest = Array.from(
      { length: 4 },
      (_, i) => claude.messages(cachedAsk(`Q${i}`)),
    );
    const text = await first;
    const writerDone = performance.now();
    await Promise.all(rest);
    expect(text).not.toBe("");
    const st = s.stats();
    expect(st.cache.writes).toBe(1);
    expect(st.cache.reads).toBe(4);
    // The readers waited for the writer's answer to begin, and were
    // admitted while it still streamed.
    expect(st.acceptedAt.last - t0).toBeGreaterThan(250);
    expect(st.acceptedAt.last).toBeLessThan(writerDone - 100);
  });
});

describe("thin clients", () => {
  it("gemini(): generate and stream against the simulator's Gemini routes; usage settled; a per-day quota is a QuotaError naming it", async () => {
    const s = await sim({ quotaAfter: 3 });
    const g = gemini({ apiKey: "k", baseURL: `${s.url}/v1beta` });
    const body = {
      contents: [{ role: "user", parts: [{ text: "What is a window?" }] }],
      generationConfig: { maxOutputTokens: 20 },
    };
    const r = await g.generate("gemini-sim", body);
    expect(r.candidates?.[0]?.content?.parts[0]?.text).toMatch(/\w/);
    const stream = g.stream("gemini-sim", body);
    let chunks = 0;
    for await (const c of stream) chunks += c.candidates ? 1 : 0;
    expect(chunks).toBeGreaterThan(1);
    expect(await g.stream("gemini-sim", body).text()).toMatch(/\w/);
    const st = s.stats();
    expect(g.stats.toJSON().inputTokens).toBe(st.usage.inputTokens);
    expect(g.stats.toJSON().outputTokens).toBe(st.usage.outputTokens);
    const spent = await g.generate("gemini-sim", body).catch((e) => e);
    expect(spent).toBeInstanceOf(QuotaError);
    expect(String(spent.message)).toMatch(
      /GenerateRequestsPerDayPerProjectPerModel/,
    );
    expect(s.stats().received).toBe(4); // not retried
  });
  it("anthropic: stream text and final message; conversation keeps history", async () => {
    const s = await sim();
    const claude = anthropic({ apiKey: "k", baseURL: s.url });
    const st = claude.stream(request("stream me"));
    const types: string[] = [];
    for await (const e of st) types.push(e.type);
    expect(types[0]).toBe("message_start");
    expect(types.at(-1)).toBe("message_stop");
    const final = await st.finalMessage();
    expect(final.usage.output_tokens).toBeGreaterThan(0);
    expect((await st.text()).length).toBeGreaterThan(0);
    const chat = claude.conversation({ model: "m", max_tokens: 50 });
    const a = await chat.say("Hello");
    const b = await chat.say("And again");
    expect(a.length && b.length).toBeTruthy();
    expect(chat.history.map((m) => m.role)).toEqual([
      "user",
      "assistant",
      "user",
      "assistant",
    ]);
    expect(s.stats().received).toBe(3);
  });

  it("openai: chat and stream (usage included)", async () => {
    const s = await sim();
    const gpt = openai({ apiKey: "k", baseURL: `${s.url}/v1` });
    const c = await gpt.chat({
      model: "m",
      max_tokens: 20,
      messages: [{ role: "user", content: "hi" }],
    });
    expect(c.usage!.prompt_tokens).toBe(5);
    const text = await gpt.stream({
      model: "m",
      max_tokens: 20,
      messages: [{ role: "user", content: "yo" }],
    }).text();
    expect(text.length).toBeGreaterThan(0);
    expect(gpt.stats.toJSON().outputTokens).toBe(s.stats().usage.outputTokens);
  });

  it("stats report reads like the seed's APIStats", () => {
    const st = new Stats();
    st.call();
    st.attempt(5, 100, 429);
    st.retry();
    st.attempt(1, 120, 200);
    st.end(true);
    st.tokens(10, 20);
    const r = st.report();
    expect(r).toMatch(/calls\s+1 \(1 ok, 0 failed; success 100\.0%\)/);
    expect(r).toMatch(/1 × 429/);
    expect(st.toJSON().errors).toEqual({ http_429: 1 });
  });
});
