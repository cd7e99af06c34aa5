// Unit tests for the provider descriptions and for each named part of
// rateLimitedFetch's request path (normalisation, model lanes, header
// learning, admission, response reading), through the public API with an
// injected clock and a fake network: no real waiting.
import { describe, expect, it } from "vitest";
import {
  anthropicProvider,
  assembleStream,
  estimateCost,
  HttpError,
  ManualClock,
  openaiProvider,
  outputCapOf,
  parseRetryAfter,
  providerOf,
  providers,
  rateLimitedFetch,
  usageOf,
  windowLoads,
} from "./mod.ts";

const ANTHROPIC = "https://api.anthropic.com/v1/messages";
const usage = (input: number, output: number) =>
  Response.json({ usage: { input_tokens: input, output_tokens: output } });
const post = (body: unknown) => ({
  method: "POST",
  body: JSON.stringify(body),
});
const ask = (model = "m", max_tokens = 100) => ({
  model,
  max_tokens,
  messages: [{ role: "user", content: "hello there" }],
});
const sse = (events: unknown[]) =>
  events.map((e) =>
    typeof e === "string" ? `data: ${e}\n\n` : `data: ${JSON.stringify(e)}\n\n`
  ).join("");

describe("providers: each described once", () => {
  it("a URL finds its provider and most specific endpoint, under any prefix", () => {
    const path = (url: string) => providerOf(url)?.endpoint.path;
    expect(path("https://x.example/v1/chat/completions")).toBe(
      "/v1/chat/completions",
    );
    expect(path("https://x.example/v1/completions?a=1")).toBe(
      "/v1/completions",
    );
    expect(path("https://relay.example/anthropic/v1/messages")).toBe(
      "/v1/messages",
    );
    expect(providerOf("https://x.example/v1/files")).toBeUndefined();
    expect(providers.map((p) => p.name)).toEqual(["anthropic", "openai"]);
  });

  it("the estimate is the endpoint's input estimate and its output cap", () => {
    for (const p of providers) {
      for (const e of p.endpoints) {
        const body: Record<string, unknown> = {
          [e.needs]: e.needs === "messages"
            ? [{ role: "user", content: "one two three" }]
            : "one two three",
          max_tokens: 77,
        };
        const cost = estimateCost(`https://h${e.path}`, body);
        expect({ path: e.path, cost }).toEqual({
          path: e.path,
          cost: {
            requests: 1,
            inputTokens: e.inputTokens(body),
            outputTokens: outputCapOf(e, body),
          },
        });
      }
    }
    const { endpoint } = providerOf("https://h/v1/embeddings")!;
    expect(outputCapOf(endpoint, { input: "x", max_tokens: 5 })).toBe(0);
  });

  it("usage is read in each provider's shape", () => {
    expect(
      anthropicProvider.usage({
        usage: {
          input_tokens: 10,
          cache_creation_input_tokens: 5,
          cache_read_input_tokens: 100,
          output_tokens: 3,
        },
      }),
    ).toEqual({ inputTokens: 15, outputTokens: 3 });
    expect(openaiProvider.usage({ usage: { prompt_tokens: 7 } })).toEqual({
      inputTokens: 7,
    });
    expect(usageOf({ usage: { prompt_tokens: 7, completion_tokens: 2 } }))
      .toEqual({ inputTokens: 7, outputTokens: 2 });
    expect(usageOf({ usage: {} })).toBeUndefined();
  });

  it("a stream assembles into the whole response; an error event is the provider's status; a cut stream is a 502", async () => {
    const events = [
      {
        type: "message_start",
        message: { id: "m1", model: "m", usage: { input_tokens: 9 } },
      },
      {
        type: "content_block_start",
        index: 0,
        content_block: { type: "text", text: "" },
      },
      {
        type: "content_block_delta",
        index: 0,
        delta: { type: "text_delta", text: "Hi" },
      },
      {
        type: "content_block_delta",
        index: 0,
        delta: { type: "text_delta", text: " you" },
      },
      {
        type: "message_delta",
        delta: { stop_reason: "end_turn" },
        usage: { output_tokens: 2 },
      },
      { type: "message_stop" },
    ];
    const whole = await assembleStream(
      anthropicProvider,
      new Response(sse(events)),
    );
    expect(whole).toMatchObject({
      id: "m1",
      stop_reason: "end_turn",
      content: [{ type: "text", text: "Hi you" }],
      usage: { input_tokens: 9, output_tokens: 2 },
    });
    const broken = sse([
      ...events.slice(0, 3),
      { type: "error", error: { type: "overloaded_error", message: "busy" } },
    ]);
    const e1 = await assembleStream(anthropicProvider, new Response(broken))
      .catch((e) => e);
    expect(e1).toBeInstanceOf(HttpError);
    expect(e1.status).toBe(529);
    const e2 = await assembleStream(
      anthropicProvider,
      new Response(sse(events.slice(0, 3))),
    ).catch((e) => e);
    expect([e2.status, e2.type]).toEqual([502, "incomplete_stream"]);
    const chat = await assembleStream(
      openaiProvider,
      new Response(
        sse([
          { id: "c", choices: [{ delta: { content: "a" } }] },
          {
            id: "c",
            choices: [{ delta: { content: "b" }, finish_reason: "stop" }],
          },
          { id: "c", choices: [], usage: { prompt_tokens: 1 } },
          "[DONE]",
        ]),
      ),
    );
    expect(chat).toMatchObject({
      object: "chat.completion",
      choices: [{ message: { content: "ab" }, finish_reason: "stop" }],
      usage: { prompt_tokens: 1 },
    });
  });

  it("batch result lines in each provider's format", () => {
    expect(
      anthropicProvider.batch.result("a", 3, {
        ok: false,
        status: 0,
        errorType: "network_error",
        message: "reset",
      }),
    ).toEqual({
      custom_id: "a",
      result: {
        type: "errored",
        error: {
          type: "error",
          error: { type: "network_error", message: "reset" },
        },
      },
    });
    expect(
      openaiProvider.batch.result("b", 4, {
        ok: true,
        status: 200,
        body: { x: 1 },
        requestId: "r",
      }),
    ).toEqual({
      id: "batch_req_4",
      custom_id: "b",
      response: { status_code: 200, request_id: "r", body: { x: 1 } },
      error: null,
    });
    expect(() => openaiProvider.batch.pathOf({ url: "/v1/files" })).toThrow(
      /"url" must be one of/,
    );
  });

  it("server-told waits read every provider's reset headers", () => {
    const now = Date.parse("2026-01-01T00:00:00Z");
    expect(
      parseRetryAfter({
        "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:07Z",
        "anthropic-ratelimit-requests-remaining": "0",
      }, now),
    ).toBe(7000);
    expect(
      parseRetryAfter({
        "x-ratelimit-reset-tokens": "1m0.5s",
        "x-ratelimit-remaining-tokens": "0",
      }, now),
    ).toBe(60_500);
  });
});

describe("request path: normalisation", () => {
  it("a bytes body is decoded, estimated and resent whole on a retry; a stream body is sent once", async () => {
    const clock = new ManualClock();
    const bodies: string[] = [];
    let status = 500;
    const f = rateLimitedFetch({
      clock,
      limiter: { itpm: 100_000 },
      retry: { retries: 1, baseMs: 0, maxMs: 0, jitter: "none" },
      fetch: async (_u, init) => {
        bodies.push(await new Response(init?.body).text());
        const r = new Response("{}", {
          status,
          headers: { "content-type": "application/json" },
        });
        status = 200;
        return r;
      },
    });
    const body = JSON.stringify(ask());
    const res = await f(ANTHROPIC, {
      method: "POST",
      body: new TextEncoder().encode(body),
    });
    expect(res.status).toBe(200);
    expect(bodies).toEqual([body, body]);
    // Both attempts charged the estimate (no usage in the answers).
    const estimate = estimateCost(ANTHROPIC, ask()).inputTokens!;
    expect(f.limiter.usage()[0]!.used).toBe(2 * estimate);
    status = 500;
    bodies.length = 0;
    const stream = new Blob([body]).stream();
    const once = await f(ANTHROPIC, {
      method: "POST",
      body: stream,
      duplex: "half",
    } as RequestInit);
    expect([once.status, bodies.length]).toEqual([500, 1]);
  });
});

describe("request path: model lanes", () => {
  it("each model gets its own windows; past maxModels the least recently used idle one goes", async () => {
    const f = rateLimitedFetch({
      clock: new ManualClock(),
      maxModels: 2,
      fetch: () => Promise.resolve(new Response("ok")),
    });
    for (const m of ["a", "b", "a", "c"]) await f(ANTHROPIC, post(ask(m)));
    expect([...f.models.keys()]).toEqual(["a", "c"]);
    const flat = rateLimitedFetch({
      clock: new ManualClock(),
      perModel: false,
      fetch: () => Promise.resolve(new Response("ok")),
    });
    await flat(ANTHROPIC, post(ask("a")));
    expect(flat.models.size).toBe(0);
  });
});

describe("request path: header learning", () => {
  it("learns limits the user did not give, per model, and others' use from remaining", async () => {
    const f = rateLimitedFetch({
      clock: new ManualClock(),
      limiter: { rpm: 1000 },
      learn: { windowMs: 2000 },
      fetch: () =>
        Promise.resolve(
          new Response("{}", {
            headers: {
              "content-type": "application/json",
              "anthropic-ratelimit-requests-limit": "50",
              "anthropic-ratelimit-input-tokens-limit": "4000",
              "anthropic-ratelimit-input-tokens-remaining": "1000",
              "anthropic-ratelimit-tokens-limit": "9000",
            },
          }),
        ),
    });
    await (await f(ANTHROPIC, post(ask("m")))).text();
    const loads = windowLoads(f);
    // The given requests limit is the key's and never learned; the
    // model's learned input window holds what others used (4000 - 1000
    // remaining, less our own estimate already in it); "tokens" is not
    // learned beside input and output limits.
    expect(loads["requests/60000"]).toEqual({ used: 1, limit: 1000 });
    expect(loads["m: requests/2000"]).toBeUndefined();
    expect(loads["m: inputTokens/2000"]).toEqual({ used: 3000, limit: 4000 });
    expect(loads["m: tokens/2000"]).toBeUndefined();
  });
});

describe("request path: admission", () => {
  it("a caller aborted while it waits for a slot or a permit holds nothing afterwards", async () => {
    const clock = new ManualClock();
    let release!: () => void;
    const f = rateLimitedFetch({
      clock,
      concurrency: 1,
      limiter: { rpm: 2 },
      fetch: () =>
        new Promise<Response>((r) => release = () => r(new Response("ok"))),
    });
    const first = f(ANTHROPIC, post(ask()));
    await clock.flush();
    const ac = new AbortController();
    const second = f(ANTHROPIC, { ...post(ask()), signal: ac.signal });
    await clock.flush();
    ac.abort(new Error("gave up"));
    await expect(second).rejects.toThrow("gave up");
    release();
    await (await first).text();
    expect(f.limiter.usage()[0]!.used).toBe(1);
    // The slot came back: a third call goes through at once.
    const third = f(ANTHROPIC, post(ask()));
    await clock.flush();
    release();
    expect((await third).status).toBe(200);
    expect(f.stats.toJSON().cancelled).toBe(1);
  });

  it("a model permit held while the key's windows make it wait is given back when aborted there", async () => {
    const clock = new ManualClock();
    const f = rateLimitedFetch({
      clock,
      limiter: { rpm: 1 },
      retry: false,
      fetch: () => Promise.resolve(new Response("ok")),
    });
    await f(ANTHROPIC, post(ask("m")));
    const ac = new AbortController();
    const waiting = f(ANTHROPIC, { ...post(ask("m")), signal: ac.signal });
    await clock.flush();
    ac.abort(new Error("stop"));
    await expect(waiting).rejects.toThrow("stop");
    expect(f.limiter.usage()[0]!.used).toBe(1);
    expect(f.models.get("m")!.usage()).toEqual([]);
  });
});

describe("request path: response reading", () => {
  it("a JSON body settles the permits from its usage and stays readable", async () => {
    const f = rateLimitedFetch({
      clock: new ManualClock(),
      limiter: { itpm: 10_000 },
      fetch: () => Promise.resolve(usage(42, 7)),
    });
    const res = await f(ANTHROPIC, post(ask()));
    expect((await res.json()).usage.input_tokens).toBe(42);
    expect(f.limiter.usage()[0]!.used).toBe(42);
    expect(f.stats.toJSON()).toMatchObject({
      inputTokens: 42,
      outputTokens: 7,
    });
  });

  it("an SSE stream holds its slot until it ends, then settles from its events", async () => {
    const clock = new ManualClock();
    let sent = 0;
    const f = rateLimitedFetch({
      clock,
      concurrency: 1,
      limiter: { otpm: 10_000 },
      fetch: () => {
        sent++;
        return Promise.resolve(
          new Response(
            sse([
              {
                type: "message_start",
                message: { usage: { input_tokens: 3 } },
              },
              { type: "message_delta", usage: { output_tokens: 11 } },
            ]),
            { headers: { "content-type": "text/event-stream" } },
          ),
        );
      },
    });
    const first = await f(ANTHROPIC, post(ask()));
    const second = f(ANTHROPIC, post(ask()));
    await clock.flush();
    expect(sent).toBe(1);
    expect(f.limiter.usage()[0]!.used).toBe(100); // max_tokens until settled
    await first.text();
    await (await second).text();
    expect(sent).toBe(2);
    expect(f.limiter.usage()[0]!.used).toBe(22);
  });

  it("a rate 429 pauses its model for the server-told wait; a quota 429 pauses nothing", async () => {
    const clock = new ManualClock(1000);
    const bodies = [
      { type: "error", error: { type: "rate_limit_error", message: "slow" } },
      {
        error: {
          type: "insufficient_quota",
          code: "insufficient_quota",
          message: "no credit",
        },
      },
    ];
    let i = 0;
    const f = rateLimitedFetch({
      clock,
      retry: false,
      fetch: () =>
        Promise.resolve(
          Response.json(bodies[i++], {
            status: 429,
            headers: { "retry-after": "5" },
          }),
        ),
    });
    await (await f(ANTHROPIC, post(ask("m")))).text();
    expect(f.models.get("m")!.pausedUntil).toBe(6000);
    await (await f(ANTHROPIC, post(ask("q")))).text();
    expect(f.models.get("q")!.pausedUntil).toBe(-Infinity);
    expect(f.stats.toJSON().rateLimited).toBe(2);
  });
});

describe("mod.ts opens with an index of every export", () => {
  it("names each export in the module doc", async () => {
    const { readFileSync } = await import("node:fs");
    const text = readFileSync(new URL("./mod.ts", import.meta.url), "utf8");
    const doc = text.slice(0, text.indexOf("@module"));
    const exported = [
      ...text.matchAll(
        /^export (?:async )?(?:function|class|interface|type|const) (\w+)/gm,
      ),
    ].map((m) => m[1]!);
    expect(exported.length).toBeGreaterThan(80);
    expect(exported.filter((name) => !doc.includes(`{@linkcode ${name}}`)))
      .toEqual([]);
  });
});
