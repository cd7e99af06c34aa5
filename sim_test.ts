// Tests of the simulator: real HTTP on loopback, short windows, real clients.
import { describe, expect, it } from "vitest";
import { sim } from "./test/sims.ts";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI, { toFile } from "openai";
import { GoogleGenAI } from "@google/genai";
import { parseRetryAfter } from "./mod.ts";
import { countTokens, goDuration, inputTokensOf, parseSimArgs } from "./sim.ts";

const ask = (content: string, extra: Record<string, unknown> = {}) => ({
  model: "claude-sim",
  max_tokens: 100,
  messages: [{ role: "user" as const, content }],
  ...extra,
});

function post(
  url: string,
  path: string,
  body: unknown,
  headers: Record<string, string> = {},
) {
  return fetch(`${url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
}

describe("simulator token rule", () => {
  it("counts ASCII runs by 4, CJK and symbols by 1, whitespace free", () => {
    expect(countTokens("")).toBe(0);
    expect(countTokens("abcd")).toBe(1);
    expect(countTokens("abcde fg")).toBe(3);
    expect(countTokens("你好，世界")).toBe(5);
    expect(countTokens("日本語のテキスト")).toBe(8);
    expect(countTokens("hi!")).toBe(2);
    expect(inputTokensOf(ask("abcd"))).toBe(1 + 3 + 1);
    expect(
      inputTokensOf({
        system: "be brief",
        messages: [{ role: "user", content: [{ type: "text", text: "你好" }] }],
      }),
    )
      .toBe(1 + 3 + 3 + 2); // "be" 1 + "brief" 2; "你好" 2
  });

  it("writes Go durations that parse back", () => {
    for (
      const ms of [
        0,
        2,
        90,
        1000,
        1500,
        59_999,
        60_000,
        86_400,
        360_000,
        1_185_394,
        3_888_000,
      ]
    ) {
      const back = parseRetryAfter({
        "x-ratelimit-reset-requests": goDuration(ms),
      });
      expect(Math.abs(back! - ms)).toBeLessThanOrEqual(1);
    }
  });
});

describe("simulator limits (sliding)", () => {
  it("10 requests per 500 ms: 11 concurrent → exactly 10 accepted, 1 refused with a correct retry-after", async () => {
    const s = await sim({
      limits: { requests: 10, windowMs: 500 },
      retryAfterMs: true,
    });
    const t0 = performance.now();
    const rs = await Promise.all(
      Array.from(
        { length: 11 },
        (_, i) => post(s.url, "/v1/messages", ask(`q${i}`)),
      ),
    );
    const statuses = rs.map((r) => r.status).sort();
    expect(statuses.filter((x) => x === 200).length).toBe(10);
    expect(statuses.filter((x) => x === 429).length).toBe(1);
    const refused = rs.find((r) => r.status === 429)!;
    expect(refused.headers.get("retry-after")).toBe("1");
    const ms = Number(refused.headers.get("retry-after-ms"));
    expect(ms).toBeGreaterThan(0);
    expect(ms).toBeLessThanOrEqual(500 - (performance.now() - t0) + 5 + 500); // within the window
    const body = await refused.json();
    expect(body.type).toBe("error");
    expect(body.error.type).toBe("rate_limit_error");
    expect(s.stats().rateLimited.requests).toBe(1);
    expect(s.stats().maxInWindow.requests).toBe(10);
    // After the window, room again.
    await new Promise((r) => setTimeout(r, ms + 5));
    expect((await post(s.url, "/v1/messages", ask("later"))).status).toBe(200);
  });

  it("input-token and output-token windows are exact too", async () => {
    const one = ask("the same question each time");
    const input = inputTokensOf(one);
    const probe = await sim();
    const out = (await (await post(probe.url, "/v1/messages", one)).json())
      .usage.output_tokens as number;
    for (
      const [limits, dim] of [
        [{ inputTokens: input * 10, windowMs: 500 }, "inputTokens"],
        [{ outputTokens: out * 10, windowMs: 500 }, "outputTokens"],
        [{ tokens: (input + out) * 10, windowMs: 500 }, "tokens"],
      ] as const
    ) {
      const s = await sim({ limits });
      const rs = await Promise.all(
        Array.from({ length: 11 }, () => post(s.url, "/v1/messages", one)),
      );
      expect(rs.filter((r) => r.status === 200).length).toBe(10);
      expect(rs.filter((r) => r.status === 429).length).toBe(1);
      expect(s.stats().rateLimited[dim]).toBe(1);
      await Promise.all(rs.map((r) => r.body?.cancel()));
    }
  });

  it("max_tokens counting reserves max_tokens at admission (OpenAI style)", async () => {
    const s = await sim({
      limits: { outputTokens: 1000, windowMs: 500 },
      outputCounting: "max_tokens",
    });
    const rs = await Promise.all(
      Array.from(
        { length: 3 },
        (_, i) =>
          post(s.url, "/v1/messages", ask(`x${i}`, { max_tokens: 400 })),
      ),
    );
    expect(rs.map((r) => r.status).sort()).toEqual([200, 200, 429]);
  });

  it("refuses at once a request larger than a limit, without retry-after", async () => {
    const s = await sim({ limits: { inputTokens: 10 } });
    const r = await post(
      s.url,
      "/v1/messages",
      ask("a long prompt that has more than ten tokens in it, surely"),
    );
    expect(r.status).toBe(429);
    expect(r.headers.get("retry-after")).toBeNull();
  });

  it("sends rate-limit headers that parse back to the simulator's values", async () => {
    const s = await sim({
      limits: { requests: 5, tokens: 10_000, windowMs: 60_000 },
    });
    await post(s.url, "/v1/messages", ask("one"));
    const r = await post(s.url, "/v1/chat/completions", ask("two"));
    const h = r.headers;
    expect(h.get("request-id")).toMatch(/^req_/);
    expect(h.get("x-request-id")).toBe(h.get("request-id"));
    expect(h.get("anthropic-ratelimit-requests-limit")).toBe("5");
    expect(h.get("anthropic-ratelimit-requests-remaining")).toBe("3");
    expect(h.get("x-ratelimit-limit-requests")).toBe("5");
    expect(h.get("x-ratelimit-remaining-requests")).toBe("3");
    expect(h.get("anthropic-ratelimit-requests-reset")).toMatch(
      /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/,
    );
    const rfc = parseRetryAfter({
      "anthropic-ratelimit-requests-reset": h.get(
        "anthropic-ratelimit-requests-reset",
      )!,
    });
    expect(rfc).toBeGreaterThan(58_000);
    expect(rfc).toBeLessThanOrEqual(61_000);
    const go = parseRetryAfter({
      "x-ratelimit-reset-requests": h.get("x-ratelimit-reset-requests")!,
    });
    expect(go).toBeGreaterThan(59_000);
    expect(go).toBeLessThanOrEqual(60_000);
    expect(h.get("x-ratelimit-reset-requests")).toMatch(
      /^\d+(\.\d+)?s$|^1m0s$|^\d+s$/,
    );
  });
});

describe("simulator limits (bucket)", () => {
  it("refills continuously at limit / window", async () => {
    const s = await sim({
      limits: { requests: 10, windowMs: 1000 },
      mode: "bucket",
    });
    const rs = await Promise.all(
      Array.from(
        { length: 11 },
        (_, i) => post(s.url, "/v1/messages", ask(`b${i}`)),
      ),
    );
    expect(rs.filter((r) => r.status === 429).length).toBe(1);
    await new Promise((r) => setTimeout(r, 130)); // one request refills every 100 ms
    expect((await post(s.url, "/v1/messages", ask("refilled"))).status).toBe(
      200,
    );
    expect((await post(s.url, "/v1/messages", ask("too soon"))).status).toBe(
      429,
    );
  });
});

describe("simulator auth, shapes and modes", () => {
  it("checks the key in x-api-key or Authorization: Bearer, never echoing it", async () => {
    const key = "sk-sim-secret-123";
    const s = await sim({ apiKey: key });
    const bad = await post(s.url, "/v1/messages", ask("hi"), {
      "x-api-key": "wrong-key",
    });
    expect(bad.status).toBe(401);
    const text = await bad.text();
    expect(JSON.parse(text).error.type).toBe("authentication_error");
    expect(text).not.toContain("wrong-key");
    expect(
      (await post(s.url, "/v1/messages", ask("hi"), { "x-api-key": key }))
        .status,
    ).toBe(200);
    expect(
      (await post(s.url, "/v1/messages", ask("hi"), {
        authorization: `Bearer ${key}`,
      })).status,
    ).toBe(200);
    const oa = await post(s.url, "/v1/chat/completions", ask("hi"));
    expect((await oa.json()).error.code).toBe("invalid_api_key");
    expect(s.stats().rejected.auth).toBe(2);
  });

  it("serves every OpenAI batch endpoint to the official SDK, with usage and per-model limits", async () => {
    const s = await sim({
      limits: { requests: 100, windowMs: 60_000 },
      modelLimits: { "emb-slow": { requests: 2 } },
    });
    const client = new OpenAI({
      apiKey: "k",
      baseURL: `${s.url}/v1`,
      maxRetries: 0,
    });
    const r = await client.responses.create({
      model: "gpt-sim",
      instructions: "Be brief.",
      input: "Tell me about rate limits",
      max_output_tokens: 20,
    });
    expect(r.output_text.length).toBeGreaterThan(0);
    expect(r.usage!.input_tokens).toBe(
      inputTokensOf({
        instructions: "Be brief.",
        input: "Tell me about rate limits",
      }, "responses"),
    );
    expect(r.usage!.output_tokens).toBeLessThanOrEqual(20);
    const c = await client.completions.create({
      model: "gpt-sim-instruct",
      prompt: "Once upon a time",
      max_tokens: 12,
    });
    expect(c.choices[0]!.text.length).toBeGreaterThan(0);
    expect(c.usage!.prompt_tokens).toBe(1 + countTokens("Once upon a time"));
    const e = await client.embeddings.create({
      model: "emb-slow",
      input: ["first document", "second"],
    });
    expect(e.data.map((d) => d.index)).toEqual([0, 1]);
    expect(e.data[0]!.embedding.length).toBe(8);
    expect(e.usage.prompt_tokens).toBe(
      countTokens("first document") + countTokens("second"),
    );
    const m = await client.moderations.create({ input: "some text" });
    expect(m.results[0]!.flagged).toBe(false);
    // emb-slow has its own 2 requests: its headers say so, and the third is refused.
    const h = await post(s.url, "/v1/embeddings", {
      model: "emb-slow",
      input: "x",
    });
    expect(h.headers.get("x-ratelimit-limit-requests")).toBe("2");
    expect(h.headers.get("x-ratelimit-remaining-requests")).toBe("0");
    const third = await post(s.url, "/v1/embeddings", {
      model: "emb-slow",
      input: "y",
    });
    expect(third.status).toBe(429);
    expect((await third.json()).error.code).toBe("rate_limit_exceeded");
    // Other models share the key's 100 (4 used: responses, completions, moderations, this).
    const other = await post(s.url, "/v1/embeddings", {
      model: "emb-fast",
      input: "z",
    });
    expect(other.status).toBe(200);
    expect(other.headers.get("x-ratelimit-limit-requests")).toBe("100");
    expect(other.headers.get("x-ratelimit-remaining-requests")).toBe("96");
    // Bodies without the endpoint's field are 400s, naming it.
    for (
      const [path, body, field] of [
        ["/v1/embeddings", { model: "e" }, "input"],
        ["/v1/responses", { model: "m", messages: [] }, "input"],
        ["/v1/completions", { model: "m", prompt: "" }, "prompt"],
        ["/v1/moderations", { input: [] }, "input"],
      ] as const
    ) {
      const bad = await post(s.url, path, body);
      expect(bad.status).toBe(400);
      expect((await bad.json()).error.message).toBe(`${field}: field required`);
    }
    // Moderations report no usage, so the simulator counts none for them.
    expect(s.stats().usage.inputTokens).toBe(
      r.usage!.input_tokens + c.usage!.prompt_tokens + e.usage.prompt_tokens +
        countTokens("x") + countTokens("z"),
    );
  });

  it("--model-limit parses, model names with colons included", () => {
    expect(
      parseSimArgs(["--model-limit", "ft:gpt-4o:org:x:rpm=8,itpm=1000"])
        .modelLimits,
    ).toEqual({ "ft:gpt-4o:org:x": { requests: 8, inputTokens: 1000 } });
    expect(() => parseSimArgs(["--model-limit", "m:rps=1"])).toThrow(
      /unknown limit "rps"/,
    );
    expect(() => parseSimArgs(["--model-limit", "nolimits"])).toThrow(
      /MODEL:rpm=N/,
    );
  });

  it("answers count_tokens, 400 for bad bodies, 404 elsewhere", async () => {
    const s = await sim();
    const c = await post(s.url, "/v1/messages/count_tokens", ask("你好"));
    expect(await c.json()).toEqual({ input_tokens: 1 + 3 + 2 });
    const bad = await post(s.url, "/v1/messages", { model: "x" });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error.type).toBe("invalid_request_error");
    const noMax = await post(s.url, "/v1/messages", {
      model: "x",
      messages: [],
    });
    expect(noMax.status).toBe(400);
    expect((await post(s.url, "/v1/nothing", {})).status).toBe(404);
  });

  it("quota mode: after N accepted, the non-retryable spend-limit 429 without retry-after", async () => {
    const s = await sim({ quotaAfter: 2 });
    const statuses = [];
    for (let i = 0; i < 4; i++) {
      statuses.push((await post(s.url, "/v1/messages", ask(`q${i}`))).status);
    }
    expect(statuses).toEqual([200, 200, 429, 429]);
    const r = await post(s.url, "/v1/messages", ask("again"));
    expect(r.headers.get("retry-after")).toBeNull();
    expect((await r.json()).error.details.error_code).toBe(
      "enforced_spend_limit_reached",
    );
    const o = await post(s.url, "/v1/chat/completions", ask("again"));
    expect((await o.json()).error.code).toBe("insufficient_quota");
  });

  it("counts attempts and successes per client request id", async () => {
    const s = await sim();
    await post(s.url, "/v1/messages", ask("a"), {
      "x-client-request-id": "job-1",
    });
    await post(
      s.url,
      "/v1/messages",
      ask("a", { metadata: { user_id: "job-2" } }),
    );
    await post(s.url, "/v1/chat/completions", ask("a", { user: "job-3" }));
    expect(s.stats().perClient).toEqual({
      "job-1": { attempts: 1, succeeded: 1 },
      "job-2": { attempts: 1, succeeded: 1 },
      "job-3": { attempts: 1, succeeded: 1 },
    });
    s.reset();
    expect(s.stats().received).toBe(0);
  });
});

describe("simulator with the official SDKs", () => {
  it("@anthropic-ai/sdk: create, stream with final usage, RateLimitError with headers", async () => {
    const key = "sk-ant-sim";
    const s = await sim({
      apiKey: key,
      limits: { requests: 3, windowMs: 60_000 },
    });
    const client = new Anthropic({
      apiKey: key,
      baseURL: s.url,
      maxRetries: 0,
    });
    const m = await client.messages.create(ask("Hello there"));
    expect(m.type).toBe("message");
    expect(m.content[0]!.type).toBe("text");
    expect(m.usage.input_tokens).toBe(inputTokensOf(ask("Hello there")));
    const stream = client.messages.stream(ask("Stream this please"));
    let text = "";
    stream.on("text", (t) => (text += t));
    const final = await stream.finalMessage();
    expect(final.usage.output_tokens).toBeGreaterThanOrEqual(8);
    expect(countTokens(text)).toBe(final.usage.output_tokens);
    expect(s.stats().usage.outputTokens).toBe(
      m.usage.output_tokens + final.usage.output_tokens,
    );
    await client.messages.create(ask("third"));
    const err = await client.messages.create(ask("fourth")).catch((e) => e);
    expect(err).toBeInstanceOf(Anthropic.RateLimitError);
    expect(err.status).toBe(429);
    expect(Number(err.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(err.error.error.type).toBe("rate_limit_error");
  });

  it("@anthropic-ai/sdk raw stream: events in the documented order", async () => {
    const s = await sim();
    const client = new Anthropic({
      apiKey: "k",
      baseURL: s.url,
      maxRetries: 0,
    });
    const events: string[] = [];
    const stream = await client.messages.create({
      ...ask("order please"),
      stream: true,
    });
    for await (const e of stream) events.push(e.type);
    expect(events[0]).toBe("message_start");
    expect(events[1]).toBe("content_block_start");
    expect(events.filter((e) => e === "content_block_delta").length)
      .toBeGreaterThanOrEqual(8);
    expect(events.slice(-3)).toEqual([
      "content_block_stop",
      "message_delta",
      "message_stop",
    ]);
  });

  it("openai: create, stream with include_usage, RateLimitError", async () => {
    const s = await sim({ limits: { requests: 3, windowMs: 60_000 } });
    const client = new OpenAI({
      apiKey: "sk-sim",
      baseURL: `${s.url}/v1`,
      maxRetries: 0,
    });
    const c = await client.chat.completions.create({
      model: "gpt-sim",
      max_completion_tokens: 50,
      messages: [{ role: "user", content: "Hi" }],
    });
    expect(c.choices[0]!.message.content).toBeTruthy();
    expect(c.usage!.prompt_tokens).toBe(1 + 3 + 1);
    const stream = await client.chat.completions.create({
      model: "gpt-sim",
      max_completion_tokens: 50,
      messages: [{ role: "user", content: "Stream" }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let usage: { completion_tokens: number } | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    expect(usage!.completion_tokens).toBe(countTokens(text));
    await client.chat.completions.create({
      model: "m",
      max_tokens: 5,
      messages: [{ role: "user", content: "3" }],
    });
    const err = await client.chat.completions.create({
      model: "m",
      max_tokens: 5,
      messages: [{ role: "user", content: "4" }],
    }).catch((e) => e);
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    expect(err.code).toBe("rate_limit_exceeded");
    expect(err.headers.get("retry-after")).toBeTruthy();
  });
});

describe("simulator prompt caching", () => {
  const doc = Array.from({ length: 700 }, (_, i) => `para${i % 7}`).join(" ");
  const marked = (q: string, ttl?: string) =>
    ask(q, {
      system: [{
        type: "text",
        text: doc,
        cache_control: { type: "ephemeral", ...(ttl ? { ttl } : {}) },
      }],
    });

  it("Anthropic: the first request writes the marked prefix, later ones read it; reads leave the input window, writes do not", async () => {
    const s = await sim({ limits: { inputTokens: 3000, windowMs: 60_000 } });
    const use = async (body: unknown) =>
      (await (await post(s.url, "/v1/messages", body)).json()).usage;
    const w = await use(marked("first"));
    expect(w.cache_creation_input_tokens).toBeGreaterThan(1024);
    expect(w.cache_read_input_tokens).toBe(0);
    const r = await use(marked("second"));
    expect(r.cache_read_input_tokens).toBe(w.cache_creation_input_tokens);
    expect(r.cache_creation_input_tokens).toBe(0);
    expect(r.input_tokens).toBeLessThan(20);
    // 1,400 written + two small reads: still far inside 3,000.
    for (let i = 0; i < 5; i++) await use(marked(`more ${i}`));
    const st = s.stats();
    expect(st.rateLimited.inputTokens).toBe(0);
    expect(st.cache).toMatchObject({ writes: 1, reads: 6 });
    expect(Object.values(st.cache.prefixes)).toEqual([
      { writes: 1, reads: 6, tokens: w.cache_creation_input_tokens },
    ]);
    expect(st.maxInWindow.inputTokens).toBeLessThan(
      w.cache_creation_input_tokens + 7 * 20,
    );
    // Another model, or a 1-hour lifetime on another text, is another prefix.
    await use({ ...marked("x"), model: "other" });
    expect(s.stats().cache.writes).toBe(2);
  });

  it("Anthropic: below minTokens nothing is cached; requests sent before the writer's answer begins write too", async () => {
    const s = await sim({ promptCache: { minTokens: 5000 } });
    const u =
      (await (await post(s.url, "/v1/messages", marked("q"))).json()).usage;
    expect([u.cache_creation_input_tokens, u.cache_read_input_tokens]).toEqual([
      0,
      0,
    ]);
    expect(s.stats().cache.writes).toBe(0);
    const t = await sim({ latency: { baseMs: 200 } });
    const both = await Promise.all(
      ["a", "b"].map(async (q) =>
        (await (await post(t.url, "/v1/messages", marked(q))).json()).usage
      ),
    );
    expect(both.map((x) => x.cache_creation_input_tokens > 0)).toEqual([
      true,
      true,
    ]);
    expect(t.stats().cache.writes).toBe(2);
  });

  it("OpenAI: a long prompt's earlier messages are cached by themselves; cached_tokens in 128-token steps; they still count toward the limits", async () => {
    const s = await sim({ limits: { tokens: 100_000, windowMs: 60_000 } });
    const chat = (q: string) => ({
      model: "gpt-sim",
      max_tokens: 10,
      messages: [
        { role: "system", content: doc },
        { role: "user", content: q },
      ],
    });
    const use = async (q: string) =>
      (await (await post(s.url, "/v1/chat/completions", chat(q))).json()).usage;
    const first = await use("one");
    expect(first.prompt_tokens_details.cached_tokens).toBe(0);
    const second = await use("two");
    expect(second.prompt_tokens_details.cached_tokens % 128).toBe(0);
    expect(second.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(
      1024,
    );
    expect(second.prompt_tokens).toBe(first.prompt_tokens);
    expect(s.stats().usage.inputTokens).toBe(2 * first.prompt_tokens);
    expect(s.stats().cache).toMatchObject({ writes: 1, reads: 1 });
    // promptCache: false: never cached.
    const off = await sim({ promptCache: false });
    for (const q of ["a", "b"]) {
      await post(off.url, "/v1/messages", marked(q));
    }
    expect(off.stats().cache).toMatchObject({ writes: 0, reads: 0 });
  });
});

describe("simulator faults", () => {
  const faults = {
    error500: 0.1,
    overloaded529: 0.1,
    unavailable503: 0.05,
    reset: 0.05,
  };

  async function runSequential(seed: number, n: number) {
    const s = await sim({ faults, seed });
    for (let i = 0; i < n; i++) {
      await post(s.url, "/v1/messages", ask(`f${i}`)).then(
        (r) => r.body?.cancel(),
        () => {},
      );
    }
    return s.stats();
  }

  it("match the configured probabilities and the same seed gives the same sequence", async () => {
    const n = 400;
    const a = await runSequential(7, n);
    const b = await runSequential(7, n);
    const c = await runSequential(8, n);
    expect(a.log).toEqual(b.log);
    expect(a.log).not.toEqual(c.log);
    expect(a.log.length).toBe(n);
    // Expected counts (faults are drawn in order: reset, 500, 529, 503).
    const tol = (p: number) => 4 * Math.sqrt(n * p * (1 - p)) + 2;
    const expected = {
      reset: n * 0.05,
      error500: n * 0.95 * 0.1,
      overloaded529: n * 0.95 * 0.9 * 0.1,
      unavailable503: n * 0.95 * 0.9 * 0.9 * 0.05,
    };
    for (const [k, e] of Object.entries(expected)) {
      const got = a.faults[k as keyof typeof a.faults];
      expect({ k, ok: Math.abs(got - e) <= tol(e / n) }).toEqual({
        k,
        ok: true,
      });
    }
  });

  it("mid-stream errors and truncated streams break the stream after some deltas", async () => {
    const s = await sim({ faults: { midStreamError: 1 } });
    const client = new Anthropic({
      apiKey: "k",
      baseURL: s.url,
      maxRetries: 0,
    });
    const err = await client.messages.stream(ask("boom")).finalMessage().catch((
      e,
    ) => e);
    expect(String(err?.message ?? err)).toMatch(/Overloaded|overloaded/);
    const t = await sim({ faults: { truncatedStream: 1 } });
    const r = await post(t.url, "/v1/messages", ask("cut", { stream: true }));
    expect(r.status).toBe(200);
    const read = await r.text().catch((e) => e);
    expect(read instanceof Error || !String(read).includes("message_stop"))
      .toBe(true);
    expect(t.stats().faults.truncatedStream).toBe(1);
  });

  it("slow headers delay the response", async () => {
    const s = await sim({ faults: { slowHeaders: 1, slowHeadersMs: 120 } });
    const t0 = performance.now();
    await (await post(s.url, "/v1/messages", ask("slow"))).text();
    expect(performance.now() - t0).toBeGreaterThanOrEqual(110);
  });
});

describe("simulator CLI flags", () => {
  it("parses flags and rejects bad ones by name", () => {
    expect(
      parseSimArgs([
        "--port",
        "0",
        "--rpm",
        "50",
        "--itpm",
        "30000",
        "--fault-529",
        "0.1",
      ]),
    ).toMatchObject({
      port: 0,
      limits: { requests: 50, inputTokens: 30000 },
      faults: { overloaded529: 0.1 },
    });
    expect(() => parseSimArgs(["--rpm", "fifty"])).toThrow(
      /--rpm needs a number: received "fifty"/,
    );
    expect(() => parseSimArgs(["--nope"])).toThrow(/Unknown flag "--nope"/);
    expect(
      parseSimArgs(["--no-limit-headers", "--cache-min-tokens", "2048"]),
    ).toMatchObject({ limitHeaders: false, promptCache: { minTokens: 2048 } });
    expect(parseSimArgs(["--retry-after-ms"])).toMatchObject({
      retryAfterMs: true,
    });
    expect(parseSimArgs(["--no-prompt-cache"])).toMatchObject({
      promptCache: false,
    });
  });

  it("a silent relay: no rate-limit headers, only 429s with a whole-second retry-after", async () => {
    const s = await sim({
      limits: { requests: 2, windowMs: 200 },
      limitHeaders: false,
    });
    const answers = await Promise.all(
      [1, 2, 3].map(() => post(s.url, "/v1/messages", ask("hi"))),
    );
    expect(answers.map((r) => r.status).sort()).toEqual([200, 200, 429]);
    for (const r of answers) {
      const names = [...r.headers.keys()];
      expect(names.filter((n) => /ratelimit/.test(n))).toEqual([]);
      if (r.status === 429) expect(r.headers.get("retry-after")).toBe("1");
      await r.text();
    }
  });
});

describe("simulator: Azure OpenAI routes", () => {
  it("deployments need an api-version and the key in api-key; a sixth of the requests limit per sixth of the window; only remaining headers; 429s in milliseconds too", async () => {
    const s = await sim({
      limits: { requests: 60, windowMs: 6000 },
      apiKey: "az",
    });
    const path = "/openai/deployments/gpt-4o-mini/chat/completions";
    const body = { messages: [{ role: "user", content: "hi" }], max_tokens: 5 };
    const noVersion = await post(s.url, path, body, { "api-key": "az" });
    expect(noVersion.status).toBe(400);
    expect(await noVersion.text()).toMatch(/api-version/);
    const q = `${path}?api-version=2024-10-21`;
    expect((await post(s.url, q, body, { "api-key": "nope" })).status)
      .toBe(401);
    const ok = await post(s.url, q, body, { "api-key": "az" });
    expect(ok.status).toBe(200);
    const j = await ok.json();
    expect(j.model).toBe("gpt-4o-mini"); // the deployment names the model
    expect(ok.headers.get("x-ratelimit-remaining-requests")).toBe("59");
    expect(ok.headers.get("x-ratelimit-limit-requests")).toBeNull();
    // 10 per second (a sixth of 60 per 6 s): 9 more pass, the 11th is refused.
    const more = await Promise.all(
      Array.from(
        { length: 10 },
        () => post(s.url, q, body, { "api-key": "az" }),
      ),
    );
    const refused = more.filter((r) => r.status === 429);
    expect(refused).toHaveLength(1);
    const h = refused[0]!.headers;
    const ms = Number(h.get("x-ms-retry-after-ms"));
    expect(ms).toBeGreaterThan(0);
    expect(ms).toBeLessThanOrEqual(1000);
    expect(h.get("retry-after-ms")).toBe(String(ms));
    expect(h.get("retry-after")).toBe("1");
    await Promise.all(more.map((r) => r.text()));
    // The plain OpenAI route has no short window.
    const t = await sim({ limits: { requests: 60, windowMs: 6000 } });
    const plain = await Promise.all(
      Array.from(
        { length: 20 },
        () => post(t.url, "/v1/chat/completions", body),
      ),
    );
    expect(plain.every((r) => r.status === 200)).toBe(true);
  });
});

describe("simulator: Anthropic Message Batches", () => {
  it("create, poll until ended, results (every request once, not in request order), cancel; invalid batches refused", async () => {
    const s = await sim({
      batchMs: 300,
      limits: { requests: 1, windowMs: 60_000 },
    });
    const requests = Array.from({ length: 6 }, (_, i) => ({
      custom_id: `b-${i}`,
      params: ask(`Question ${i}`),
    }));
    const created = await post(s.url, "/v1/messages/batches", { requests });
    expect(created.status).toBe(200);
    const b = await created.json();
    expect(b).toMatchObject({
      type: "message_batch",
      processing_status: "in_progress",
      request_counts: { processing: 6, succeeded: 0 },
      results_url: null,
    });
    const early = await fetch(`${s.url}/v1/messages/batches/${b.id}/results`);
    expect(early.status).toBe(400);
    await early.text();
    await new Promise((r) => setTimeout(r, 350));
    const ended = await (await fetch(`${s.url}/v1/messages/batches/${b.id}`))
      .json();
    expect(ended).toMatchObject({
      processing_status: "ended",
      request_counts: { processing: 0, succeeded: 6 },
    });
    const lines = (await (await fetch(ended.results_url)).text()).trim()
      .split("\n").map((l) => JSON.parse(l));
    const ids = lines.map((l) => l.custom_id);
    expect([...ids].sort()).toEqual(requests.map((r) => r.custom_id).sort());
    expect(ids).not.toEqual(requests.map((r) => r.custom_id)); // not in order
    expect(lines[0].result.type).toBe("succeeded");
    expect(lines[0].result.message.usage.output_tokens).toBeGreaterThan(0);
    // Outside the live limits (1 request per minute here): none refused.
    expect(s.stats().rateLimited.requests).toBe(0);
    expect(s.stats().batches).toEqual({
      created: 1,
      requests: 6,
      canceled: 0,
      failed: 0,
      files: 0,
    });
    // Cancel: canceling, then ended within a moment, some requests canceled.
    const t = await (await post(s.url, "/v1/messages/batches", { requests }))
      .json();
    const canceling =
      await (await post(s.url, `/v1/messages/batches/${t.id}/cancel`, {}))
        .json();
    expect(canceling.processing_status).toBe("canceling");
    await new Promise((r) => setTimeout(r, 60));
    const c = await (await fetch(`${s.url}/v1/messages/batches/${t.id}`))
      .json();
    expect(c.processing_status).toBe("ended");
    // Listed newest first.
    const list = await (await fetch(`${s.url}/v1/messages/batches`)).json();
    expect(list.data.map((x: { id: string }) => x.id)).toEqual([t.id, b.id]);
    expect(c.cancel_initiated_at).not.toBeNull();
    expect(c.request_counts.canceled).toBeGreaterThan(0);
    // Refused: duplicate ids, a body without messages.
    const dup = await post(s.url, "/v1/messages/batches", {
      requests: [requests[0], requests[0]],
    });
    expect(dup.status).toBe(400);
    expect((await dup.json()).error.message).toMatch(/requests\.1\.custom_id/);
    const bad = await post(s.url, "/v1/messages/batches", {
      requests: [{ custom_id: "x", params: { model: "m", max_tokens: 5 } }],
    });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error.type).toBe("invalid_request_error");
    const missing = await fetch(`${s.url}/v1/messages/batches/msgbatch_nope`);
    expect(missing.status).toBe(404);
    await missing.text();
  });

  it("the official SDK's messages.batches: create, retrieve, results", async () => {
    const s = await sim({ batchMs: 100 });
    const client = new Anthropic({
      apiKey: "k",
      baseURL: s.url,
      maxRetries: 0,
    });
    const b = await client.messages.batches.create({
      requests: [0, 1, 2].map((i) => ({
        custom_id: `sdk-${i}`,
        params: ask(`Q${i}`),
      })),
    });
    let status = b.processing_status;
    while (status !== "ended") {
      await new Promise((r) => setTimeout(r, 50));
      status = (await client.messages.batches.retrieve(b.id)).processing_status;
    }
    const seen: string[] = [];
    for await (const r of await client.messages.batches.results(b.id)) {
      expect(r.result.type).toBe("succeeded");
      seen.push(r.custom_id);
    }
    expect(seen.sort()).toEqual(["sdk-0", "sdk-1", "sdk-2"]);
  });
});

/** Waits until an OpenAI batch leaves validating / in_progress / finalizing / cancelling. */
async function settled(client: OpenAI, id: string) {
  for (;;) {
    const b = await client.batches.retrieve(id);
    if (
      !["validating", "in_progress", "finalizing", "cancelling"].includes(
        b.status,
      )
    ) {
      return b;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe("simulator: OpenAI Files and Batches", () => {
  const line = (i: number, url = "/v1/chat/completions", model = "gpt-sim") =>
    JSON.stringify({
      custom_id: `o-${i}`,
      method: "POST",
      url,
      body: url === "/v1/embeddings"
        ? { model, input: `text ${i}` }
        : { model, messages: [{ role: "user", content: `Question ${i}` }] },
    });

  it("the official SDK: files.create, batches.create / retrieve / list / cancel, files.content; results out of order, some expired or errored", async () => {
    const s = await sim({
      batchMs: 200,
      batchFaults: { expired: 0.1, errored: 0.1 },
      limits: { requests: 1, windowMs: 60_000 },
    });
    const client = new OpenAI({
      apiKey: "k",
      baseURL: `${s.url}/v1`,
      maxRetries: 0,
    });
    const n = 40;
    const file = await client.files.create({
      file: await toFile(
        new Blob([Array.from({ length: n }, (_, i) => line(i)).join("\n")]),
        "in.jsonl",
      ),
      purpose: "batch",
    });
    expect(file).toMatchObject({ object: "file", purpose: "batch" });
    const created = await client.batches.create({
      input_file_id: file.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
      metadata: { tag: "t1" },
    });
    expect(created.status).toBe("validating");
    const done = await settled(client, created.id);
    expect(done.status).toBe("expired"); // some requests expired
    expect(done.metadata).toEqual({ tag: "t1" });
    expect(done.request_counts!.total).toBe(n);
    const rows = async (id: string | null | undefined) =>
      id
        ? (await (await client.files.content(id)).text()).trim().split("\n")
          .map((l) => JSON.parse(l))
        : [];
    const output = await rows(done.output_file_id);
    const errors = await rows(done.error_file_id);
    expect(output.length + errors.length).toBe(n);
    expect(done.request_counts!.completed).toBe(output.length);
    expect(output.every((r) => r.response.status_code === 200)).toBe(true);
    expect(output[0].response.body.choices[0].message.content).toBeTruthy();
    const codes = errors.map((r) => r.error?.code ?? r.response.status_code);
    expect(codes).toContain("batch_expired");
    expect(codes).toContain(500);
    const ids = [...output, ...errors].map((r) => r.custom_id);
    expect([...ids].sort()).toEqual(
      Array.from({ length: n }, (_, i) => `o-${i}`).sort(),
    );
    expect(output.map((r) => r.custom_id)).not.toEqual(
      [...output.map((r) => r.custom_id)].sort(),
    );
    // Outside the live limits (1 request per minute here): none refused.
    expect(s.stats().rateLimited.requests).toBe(0);
    // Cancel: cancelling, then cancelled; listed newest first.
    const again = await client.batches.create({
      input_file_id: file.id,
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    });
    await new Promise((r) => setTimeout(r, 30)); // past validating
    const cancelling = await client.batches.cancel(again.id);
    expect(cancelling.status).toBe("cancelling");
    expect((await settled(client, again.id)).status).toBe("cancelled");
    const listed = [];
    for await (const b of client.batches.list()) listed.push(b.id);
    expect(listed).toEqual([again.id, created.id]);
    expect(s.stats().batches).toMatchObject({
      created: 2,
      files: 1,
      canceled: 1,
    });
  });

  it("fails validation as OpenAI does: a line for another endpoint, more enqueued tokens than allowed; refuses a bad create", async () => {
    const s = await sim({ batchMs: 300, batchEnqueuedTokens: 200 });
    const client = new OpenAI({
      apiKey: "k",
      baseURL: `${s.url}/v1`,
      maxRetries: 0,
    });
    const upload = async (lines: string[]) =>
      (await client.files.create({
        file: await toFile(new Blob([lines.join("\n")]), "in.jsonl"),
        purpose: "batch",
      })).id;
    const create = async (id: string, endpoint = "/v1/chat/completions") =>
      await client.batches.create({
        input_file_id: id,
        endpoint: endpoint as "/v1/chat/completions",
        completion_window: "24h",
      });
    const mixed = await create(
      await upload([line(0), line(1, "/v1/embeddings")]),
    );
    const failed = await settled(client, mixed.id);
    expect(failed.status).toBe("failed");
    expect(failed.errors!.data![0]).toMatchObject({ line: 2 });
    expect(failed.errors!.data![0]!.message).toMatch(
      /not this batch's endpoint/,
    );
    // 200 enqueued tokens per model: 10 lines fit, 40 more do not while they run.
    const small = await create(
      await upload(Array.from({ length: 10 }, (_, i) => line(i))),
    );
    const big = await create(
      await upload(Array.from({ length: 40 }, (_, i) => line(100 + i))),
    );
    expect((await settled(client, big.id)).errors!.data![0]).toMatchObject({
      code: "token_limit_exceeded",
    });
    expect((await settled(client, small.id)).status).toBe("completed");
    expect(s.stats().batches).toMatchObject({
      created: 3,
      failed: 2,
      files: 3,
    });
    // Refused at once: an unknown file, a wrong window.
    await expect(create("file-nope")).rejects.toMatchObject({ status: 400 });
    const f = await upload([line(0)]);
    await expect(
      client.batches.create({
        input_file_id: f,
        endpoint: "/v1/chat/completions",
        completion_window: "1h" as "24h",
      }),
    ).rejects.toMatchObject({ status: 400 });
  });
});

describe("simulator: Gemini Batch API (inlined requests)", () => {
  it("@google/genai batches.create / get / list / cancel: responses in request order with their keys, some errored", async () => {
    const s = await sim({
      batchMs: 200,
      batchFaults: { errored: 0.2 },
      limits: { requests: 1, windowMs: 60_000 },
    });
    const ai = new GoogleGenAI({
      apiKey: "k",
      httpOptions: { baseUrl: s.url },
    });
    const n = 20;
    const job = await ai.batches.create({
      model: "gemini-sim",
      src: Array.from({ length: n }, (_, i) => ({
        contents: [{ role: "user", parts: [{ text: `Question ${i}` }] }],
        metadata: { key: `g-${i}` },
      })),
      config: { displayName: "sdk-test" },
    });
    expect(job.name).toMatch(/^batches\//);
    let done = await ai.batches.get({ name: job.name! });
    while (
      !["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"].includes(String(done.state))
    ) {
      await new Promise((r) => setTimeout(r, 25));
      done = await ai.batches.get({ name: job.name! });
    }
    expect(done.state).toBe("JOB_STATE_SUCCEEDED");
    expect(done.displayName).toBe("sdk-test");
    const out = done.dest!.inlinedResponses!;
    expect(out.map((r) => r.metadata?.key)).toEqual(
      Array.from({ length: n }, (_, i) => `g-${i}`),
    );
    const ok = out.filter((r) => r.response);
    expect(ok[0]!.response!.candidates![0]!.content!.parts![0]!.text)
      .toBeTruthy();
    expect(out.some((r) => r.error)).toBe(true);
    expect(s.stats().rateLimited.requests).toBe(0);
    const again = await ai.batches.create({
      model: "gemini-sim",
      src: [{ contents: [{ role: "user", parts: [{ text: "x" }] }] }],
      config: { displayName: "to-cancel" },
    });
    await ai.batches.cancel({ name: again.name! });
    const listed: string[] = [];
    for await (const b of await ai.batches.list()) listed.push(b.name!);
    expect(listed).toEqual([again.name, job.name]);
    await new Promise((r) => setTimeout(r, 60));
    expect((await ai.batches.get({ name: again.name! })).state).toBe(
      "JOB_STATE_CANCELLED",
    );
    expect(s.stats().batches).toMatchObject({ created: 2, canceled: 1 });
  });
});
