// Unit tests for the provider descriptions and for each named part of
// rateLimitedFetch's request path (normalisation, model lanes, header
// learning, admission, response reading), through the public API with an
// injected clock and a fake network: no real waiting.
import { describe, expect, it } from "vitest";
import {
  anthropicProvider,
  assembleStream,
  azureProvider,
  estimateCost,
  geminiProvider,
  HttpError,
  ManualClock,
  mapConcurrent,
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
    expect(providers.map((p) => p.name)).toEqual([
      "anthropic",
      "openai",
      "azure",
      "gemini",
    ]);
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

  it("the JSON body read for its usage reads again as a Response would: once, by any method, clone and stream included", async () => {
    const f = rateLimitedFetch({
      clock: new ManualClock(),
      fetch: () =>
        Promise.resolve(
          Response.json({ usage: { input_tokens: 4, output_tokens: 2 } }, {
            status: 201,
            headers: { "request-id": "r1" },
          }),
        ),
    });
    const text = JSON.stringify({
      usage: { input_tokens: 4, output_tokens: 2 },
    });
    const a = await f(ANTHROPIC, post(ask()));
    expect([a.status, a.headers.get("request-id"), a.bodyUsed]).toEqual([
      201,
      "r1",
      false,
    ]);
    const copy = a.clone();
    expect(await a.json()).toEqual(JSON.parse(text));
    expect(a.bodyUsed).toBe(true);
    await expect(a.text()).rejects.toThrow(TypeError);
    expect(await copy.text()).toBe(text);
    const b = await f(ANTHROPIC, post(ask()));
    expect(new TextDecoder().decode(await b.arrayBuffer())).toBe(text);
    const c = await f(ANTHROPIC, post(ask()));
    expect(await new Response(c.body).text()).toBe(text);
    expect(c.bodyUsed).toBe(true);
    await expect(c.json()).rejects.toThrow(TypeError);
    const d = await f(ANTHROPIC, post(ask()));
    expect(await (await d.blob()).text()).toBe(text);
    // The official SDKs look at `body` (to watch it) before reading json().
    const e = await f(ANTHROPIC, post(ask()));
    expect(e.body).not.toBeNull();
    expect(e.bodyUsed).toBe(false);
    expect(await e.json()).toEqual(JSON.parse(text));
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
      findPace: false, // per model, as limits learned from headers are
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

describe("request path: prompt cache", () => {
  const rubric = "rubric ".repeat(4000); // ~4,000 estimated tokens
  const cached = (question: string, ttl?: "1h") => ({
    model: "m",
    max_tokens: 10,
    system: [{
      type: "text",
      text: rubric,
      cache_control: { type: "ephemeral", ...(ttl ? { ttl } : {}) },
    }],
    messages: [{ role: "user", content: question }],
  });
  const anthropicUsage = (read: number, write: number, input = 12) =>
    Response.json({
      usage: {
        input_tokens: input,
        cache_creation_input_tokens: write,
        cache_read_input_tokens: read,
        output_tokens: 5,
      },
    });
  /** A network whose answers the test gives, one at a time, in order. */
  function network() {
    const pending: ((r: Response) => void)[] = [];
    const bodies: Record<string, unknown>[] = [];
    return {
      pending,
      bodies,
      fetch: (_url: string | URL | Request, init?: RequestInit) => {
        bodies.push(JSON.parse(String(init?.body)));
        return new Promise<Response>((r) => pending.push(r));
      },
    };
  }

  /** rateLimitedFetch on a ManualClock and a network the test answers. */
  function cachedFetch(options: Parameters<typeof rateLimitedFetch>[0]) {
    const clock = new ManualClock();
    const net = network();
    const f = rateLimitedFetch({ ...options, clock, fetch: net.fetch });
    return { clock, net, f };
  }

  it("the prefix is everything up to the last breakpoint: tools, then system, then messages", () => {
    const prefixOf = anthropicProvider.endpoints[0]!.cachePrefix!;
    const a = prefixOf(cached("first question"))!;
    const b = prefixOf(cached("another question"))!;
    expect(a.key).toBe(b.key);
    expect(a.ttlMs).toBe(300_000);
    expect(prefixOf(cached("q", "1h"))!.ttlMs).toBe(3_600_000);
    expect(a.tokens).toBeGreaterThan(3000);
    expect(a.tokens).toBeLessThan(
      estimateCost(ANTHROPIC, cached("q")).inputTokens!,
    );
    const other = { ...cached("q"), model: "n" };
    expect(prefixOf(other)!.key).not.toBe(a.key);
    expect(prefixOf(ask())).toBeUndefined();
    // A breakpoint in a message: the prefix runs through that block.
    const turns = {
      ...ask(),
      messages: [
        {
          role: "user",
          content: [{
            type: "text",
            text: "doc",
            cache_control: { type: "ephemeral" },
          }, { type: "text", text: "q1" }],
        },
      ],
    };
    const t1 = prefixOf(turns)!;
    const t2 = prefixOf({
      ...turns,
      messages: [{
        ...turns.messages[0]!,
        content: [turns.messages[0]!.content[0]!, { type: "text", text: "q2" }],
      }],
    })!;
    expect(t1.key).toBe(t2.key);
    const tools = {
      ...ask(),
      tools: [{
        name: "t",
        input_schema: {},
        cache_control: { type: "ephemeral" },
      }],
    };
    expect(prefixOf(tools)!.tokens).toBeGreaterThan(4);
  });

  it("cache figures are read in each provider's shape", () => {
    expect(
      anthropicProvider.cacheUsage({
        usage: { input_tokens: 3, cache_read_input_tokens: 90 },
      }),
    ).toEqual({ read: 90, write: 0 });
    expect(
      openaiProvider.cacheUsage({
        usage: {
          prompt_tokens: 2000,
          completion_tokens: 1,
          prompt_tokens_details: { cached_tokens: 1920 },
        },
      }),
    ).toEqual({ read: 1920, write: 0 });
    expect(
      openaiProvider.cacheUsage({
        usage: {
          input_tokens: 2000,
          output_tokens: 1,
          input_tokens_details: { cached_tokens: 1024 },
        },
      }),
    ).toEqual({ read: 1024, write: 0 });
    expect(anthropicProvider.cacheUsage({ nothing: true })).toBeUndefined();
  });

  it("one request writes a new prefix; the others wait for it, then are charged their uncached rest", async () => {
    const { clock, net, f } = cachedFetch({
      limiter: { itpm: 100_000 },
    });
    const calls = ["a", "b", "c", "d"].map((q) =>
      f(ANTHROPIC, post(cached(q)))
    );
    await clock.flush();
    expect(net.pending.length).toBe(1); // the writer alone
    const full = estimateCost(ANTHROPIC, cached("a")).inputTokens!;
    expect(f.limiter.usage()[0]!.used).toBe(full);
    net.pending[0]!(anthropicUsage(0, 4000));
    await clock.flush();
    expect(net.pending.length).toBe(4); // the readers, together
    // Settled: the write counted 12 + 4000; each reader reserves only a few tokens.
    const used = f.limiter.usage()[0]!.used;
    expect(used - 4012).toBeGreaterThan(0);
    expect(used - 4012).toBeLessThan(3 * 20);
    for (const r of net.pending.slice(1)) r(anthropicUsage(4000, 0));
    await Promise.all(calls.map(async (c) => (await c).text()));
    expect(f.stats.toJSON()).toMatchObject({
      cacheWriteTokens: 4000,
      cacheReadTokens: 12_000,
      inputTokens: 4012 + 36,
    });
  });

  it("a prefix the response shows was not cached frees the others at once, charged in full, and nothing waits for it again", async () => {
    const { clock, net, f } = cachedFetch({
      limiter: { itpm: 1_000_000 },
    });
    const calls = ["a", "b", "c"].map((q) => f(ANTHROPIC, post(cached(q))));
    await clock.flush();
    expect(net.pending.length).toBe(1);
    net.pending[0]!(anthropicUsage(0, 0, 4100));
    await clock.flush();
    expect(net.pending.length).toBe(3);
    const full = estimateCost(ANTHROPIC, cached("b")).inputTokens!;
    expect(f.limiter.usage()[0]!.used).toBe(4100 + 2 * full);
    const later = f(ANTHROPIC, post(cached("z")));
    await clock.flush();
    expect(net.pending.length).toBe(4); // went at once
    for (const r of net.pending.slice(1)) r(anthropicUsage(0, 0, 4100));
    await Promise.all([...calls, later].map(async (c) => (await c).text()));
  });

  it("a writer answered without any usage (a relay that drops it) frees the others at once; nothing waits on that prefix again", async () => {
    const { clock, net, f } = cachedFetch({
      limiter: { itpm: 1_000_000 },
    });
    const calls = ["a", "b", "c"].map((q) => f(ANTHROPIC, post(cached(q))));
    await clock.flush();
    expect(net.pending.length).toBe(1);
    net.pending[0]!(Response.json({ content: [] }));
    await clock.flush();
    expect(net.pending.length).toBe(3); // not one writer after another
    const later = f(ANTHROPIC, post(cached("d")));
    await clock.flush();
    expect(net.pending.length).toBe(4);
    for (const r of net.pending.slice(1)) r(Response.json({ content: [] }));
    await Promise.all([...calls, later].map(async (c) => (await c).text()));
  });

  it("a writer that fails hands the write to the next request; an aborted waiter holds nothing", async () => {
    const { clock, net, f } = cachedFetch({
      retry: false,
      limiter: { itpm: 1_000_000 },
    });
    const ac = new AbortController();
    const first = f(ANTHROPIC, post(cached("a")));
    const aborted = f(ANTHROPIC, { ...post(cached("b")), signal: ac.signal });
    const third = f(ANTHROPIC, post(cached("c")));
    const fourth = f(ANTHROPIC, post(cached("d")));
    await clock.flush();
    ac.abort(new Error("gave up"));
    await expect(aborted).rejects.toThrow("gave up");
    net.pending[0]!(
      Response.json({ type: "error", error: { type: "api_error" } }, {
        status: 500,
      }),
    );
    expect((await first).status).toBe(500);
    await clock.flush();
    expect(net.pending.length).toBe(2); // the next one writes, alone
    net.pending[1]!(anthropicUsage(0, 4000));
    await clock.flush();
    expect(net.pending.length).toBe(3);
    net.pending[2]!(anthropicUsage(4000, 0));
    await Promise.all([third, fourth].map(async (c) => (await c).text()));
    expect(net.bodies.length).toBe(3);
  });

  it("after the cache's lifetime a prefix is charged in full and written again; each read extends it", async () => {
    const { clock, net, f } = cachedFetch({
      limiter: { itpm: 1_000_000, marginMs: 0 },
    });
    const go = async (q: string, read: boolean) => {
      const call = f(ANTHROPIC, post(cached(q)));
      await clock.flush();
      const before = f.limiter.usage()[0]!.used;
      net.pending.at(-1)!(
        read ? anthropicUsage(4000, 0) : anthropicUsage(0, 4000),
      );
      await (await call).text();
      return before;
    };
    // Earlier requests have left the 1-minute window: `used` is this one's reservation.
    const full = estimateCost(ANTHROPIC, cached("q")).inputTokens!;
    expect(await go("a", false)).toBe(full); // write at 0
    await clock.advance(240_000);
    expect(await go("b", true)).toBeLessThan(50); // read at 4 min: kept to 9 min
    await clock.advance(240_000);
    expect(await go("c", true)).toBeLessThan(50); // 8 min: still cached, kept to 13
    await clock.advance(300_001); // past 13 min
    expect(await go("d", false)).toBe(full); // written again
    expect(f.stats.toJSON().cacheWriteTokens).toBe(8000);
  });

  it("a write larger than the input-token window takes the whole empty window instead of failing", async () => {
    const { clock, net, f } = cachedFetch({
      limiter: { itpm: 3000, marginMs: 0 },
    });
    const first = f(ANTHROPIC, post(cached("a")));
    const second = f(ANTHROPIC, post(cached("b")));
    await clock.flush();
    expect(f.limiter.usage()[0]!.used).toBe(3000);
    net.pending[0]!(anthropicUsage(0, 2900, 40));
    await (await first).text();
    await clock.flush();
    expect(net.pending.length).toBe(2); // a read of ~10 tokens fits at once
    net.pending[1]!(anthropicUsage(2900, 0, 10));
    await (await second).text();
    // Not cached: a request over the window still fails as before.
    const g = rateLimitedFetch({
      clock,
      limiter: { itpm: 3000 },
      promptCache: false,
      fetch: net.fetch,
    });
    await expect(g(ANTHROPIC, post(cached("c")))).rejects.toThrow(
      /can never fit/,
    );
  });

  it("promptCache: false sends every request at once, charged in full; a bad value is named", async () => {
    const { clock, net, f } = cachedFetch({
      promptCache: false,
      limiter: { itpm: 1_000_000 },
    });
    const calls = ["a", "b", "c"].map((q) => f(ANTHROPIC, post(cached(q))));
    await clock.flush();
    expect(net.pending.length).toBe(3);
    for (const r of net.pending) r(anthropicUsage(0, 4000));
    await Promise.all(calls.map(async (c) => (await c).text()));
    expect(() => rateLimitedFetch({ promptCache: "yes" as unknown as boolean }))
      .toThrow(/'promptCache' must be a boolean: received "yes"/);
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

/**
 * A relay that says nothing but 429s, on a manual clock: a sliding window
 * of `limit` (requests, or input tokens with `tokens`) per `windowMs`,
 * counted at arrival, half the latency after the send; a 429 carries a
 * whole-second `retry-after` (rounded up), and no limit headers.
 */
function silentRelay(
  clock: ManualClock,
  o: {
    limit: number;
    windowMs: number;
    latencyMs: number;
    tokens?: boolean;
    /** Also send the wait to the ms (`retry-after-ms`). */
    precise?: boolean;
  },
) {
  const log: { t: number; amount: number }[] = [];
  let head = 0;
  let used = 0;
  const st = {
    received: 0,
    accepted: 0,
    refused: 0,
    refusedAt: [] as number[],
    acceptedAt: [] as number[],
  };
  const relay = {
    limit: o.limit,
    st,
    fetch: async (_url: RequestInfo | URL, init?: RequestInit) => {
      await clock.sleep(o.latencyMs / 2);
      const now = clock.now();
      st.received++;
      const body = JSON.parse(String(init?.body));
      const amount = o.tokens ? body.tokens as number : 1;
      while (head < log.length && log[head]!.t + o.windowMs <= now) {
        used -= log[head++]!.amount;
      }
      let response: Response;
      if (used + amount > relay.limit) {
        st.refused++;
        st.refusedAt.push(now);
        let excess = used + amount - relay.limit;
        let i = head;
        while (excess > 0 && i < log.length) excess -= log[i++]!.amount;
        const wait = log[i - 1]!.t + o.windowMs - now;
        response = Response.json(
          {
            error: {
              type: "rate_limit_error",
              // Some relays name the limit; some say nothing of it.
              message: o.tokens
                ? `over ${relay.limit} input tokens`
                : "slow down",
            },
          },
          {
            status: 429,
            headers: {
              "retry-after": String(Math.max(1, Math.ceil(wait / 1000))),
              ...(o.precise
                ? { "retry-after-ms": String(Math.ceil(wait)) }
                : {}),
            },
          },
        );
      } else {
        log.push({ t: now, amount });
        used += amount;
        st.accepted++;
        st.acceptedAt.push(now);
        response = Response.json({
          usage: { input_tokens: amount, output_tokens: 1 },
        });
      }
      await clock.sleep(o.latencyMs / 2);
      return response;
    },
  };
  return relay;
}

/** Runs `n` requests through `f` (8 at a time) on the manual clock; returns when each ended. */
async function runPaced(
  clock: ManualClock,
  f: (url: string, init: RequestInit) => Promise<Response>,
  n: number,
  tokens = (_i: number) => 10,
): Promise<number[]> {
  const endedAt: number[] = [];
  let done = false;
  const run = mapConcurrent(
    Array.from({ length: n }, (_, i) => i),
    async (i) => {
      const n = tokens(i);
      const res = await f(
        ANTHROPIC,
        post({
          model: "m",
          max_tokens: 1,
          messages: [{ role: "user", content: "word ".repeat(n) }],
          tokens: n,
        }),
      );
      expect(res.status).toBe(200);
      await res.text();
      endedAt[i] = clock.now();
    },
    { concurrency: 8 },
  ).then(() => done = true);
  for (let i = 0; i < 200_000 && !done; i++) {
    const next = clock.nextAt;
    await (next === undefined
      ? clock.flush()
      : clock.advance(next - clock.now()));
  }
  await run;
  return endedAt;
}

/**
 * The least makespan of `sizes`, sent in order, against `silentRelay`'s
 * window by a client that knows the limit: each request as soon as the
 * window (counted at arrival) has room for it, then its answer.
 */
function leastMakespan(
  sizes: number[],
  o: { limit: number; windowMs: number; latencyMs: number },
): number {
  const log: { t: number; amount: number }[] = [];
  let head = 0;
  let used = 0;
  let arrive = o.latencyMs / 2;
  for (const amount of sizes) {
    for (;;) {
      while (head < log.length && log[head]!.t + o.windowMs <= arrive) {
        used -= log[head++]!.amount;
      }
      if (used + amount <= o.limit) break;
      arrive = log[head]!.t + o.windowMs;
    }
    log.push({ t: arrive, amount });
    used += amount;
  }
  return arrive + o.latencyMs / 2;
}

describe("request path: pace finding (no limits known, 429s alone)", () => {
  /** `n` requests through a fresh fetch with no limits, against a silent relay. */
  async function paceRun(
    o: Parameters<typeof silentRelay>[1] & { limitAt?: (t: number) => number },
    n: number,
    tokens?: (i: number) => number,
  ) {
    const clock = new ManualClock();
    const relay = silentRelay(clock, o);
    const f = rateLimitedFetch({
      clock,
      concurrency: 8,
      fetch: (u, i) => {
        if (o.limitAt) relay.limit = o.limitAt(clock.now());
        return relay.fetch(u, i);
      },
      retry: { random: () => 0.5 },
    });
    const makespan = Math.max(...await runPaced(clock, f, n, tokens));
    const pace = f.stats.timeline().filter((p) => p.pace)
      .map((p) => [p.t, p.pace!.requests!] as const);
    return { st: relay.st, f, makespan, pace };
  }

  it("from above: 20 per 2 s; the first 429s find few on their way, then it holds just under", async () => {
    const { st, f, makespan } = await paceRun(
      { limit: 20, windowMs: 2000, latencyMs: 100 },
      200,
    );
    const minimum = ((200 - 20) / 20) * 2000; // 20 at once, then 20 per window
    expect(st.refused).toBeLessThanOrEqual(5);
    expect(makespan / minimum).toBeLessThanOrEqual(1.3);
    const pace = f.stats.toJSON().pace!;
    expect(pace.requests).toBeGreaterThan(8);
    expect(pace.requests).toBeLessThanOrEqual(11);
  });

  it("from below: 5 per 200 ms with a whole-second retry-after; climbs to near the limit", async () => {
    const { st, makespan, pace } = await paceRun(
      { limit: 5, windowMs: 200, latencyMs: 100 },
      200,
    );
    const minimum = ((200 - 5) / 5) * 200;
    expect(st.refused).toBeLessThanOrEqual(8);
    expect(makespan / minimum).toBeLessThanOrEqual(2.5);
    // It climbed: from the start's estimate to at least three fifths of 25/s.
    expect(pace[0]![1]).toBeLessThan(12);
    expect(Math.max(...pace.map(([, r]) => r))).toBeGreaterThan(15);
  });

  it("input tokens: 3,000 per 2 s, prompts of 50 to 250 tokens; the pace is kept in tokens too", async () => {
    const size = (i: number) => 50 + ((i * 37) % 201);
    const { st, makespan } = await paceRun(
      { limit: 3000, windowMs: 2000, latencyMs: 100, tokens: true },
      200,
      size,
    );
    let total = 0;
    for (let i = 0; i < 200; i++) total += size(i);
    const minimum = ((total - 3000) / 3000) * 2000;
    expect(st.refused).toBeLessThanOrEqual(5);
    expect(makespan / minimum).toBeLessThanOrEqual(1.3);
  });

  it("the issue's token case: 3,000 per 2 s at 100 ms, 200 prompts (16,482 tokens): ≤ 5 × 429, ≤ 1.3 × the least makespan", async () => {
    // The prompts of the CLI measurement: 28 to 57 words, 54 to 111 tokens.
    const size = (i: number) => Math.round(1.94 * (28 + ((i * 7) % 30)));
    const o = { limit: 3000, windowMs: 2000, latencyMs: 100, tokens: true };
    const { st, makespan, f } = await paceRun(o, 200, size);
    const least = leastMakespan(
      Array.from({ length: 200 }, (_, i) => size(i)),
      o,
    );
    expect(least).toBeGreaterThan(10_000); // six windows' worth, in order
    expect(st.refused).toBeLessThanOrEqual(5);
    expect(makespan / least).toBeLessThanOrEqual(1.3);
    expect(f.stats.toJSON().pace!.inputTokens).toBeGreaterThan(1300);
  });

  it("a step up whose 429 comes just after it held goes back near the step, not to 70 %", async () => {
    const size = (i: number) => Math.round(1.94 * (28 + ((i * 7) % 30)));
    const { st, pace, f } = await paceRun(
      { limit: 3000, windowMs: 2000, latencyMs: 90, tokens: true },
      200,
      size,
    );
    const last429 = st.refusedAt.at(-1)!;
    expect(last429).toBeGreaterThan(3000); // a step's, not the start's
    const before = pace.filter(([t]) => t < last429 - 1000).at(-1)![1];
    const after = f.stats.toJSON().pace!.requests!;
    expect(after).toBeGreaterThan(0.9 * before);
    expect(after).toBeLessThan(before);
  });

  it("a per-minute limit (100 per 60 s): the start's sends go again as they leave the window, so 300 requests take 2 windows, not 3", async () => {
    const o = { limit: 100, windowMs: 60_000, latencyMs: 100 };
    const { st, makespan } = await paceRun(o, 300);
    const least = leastMakespan(Array(300).fill(1), o);
    expect(makespan / least).toBeLessThanOrEqual(1.1);
    expect(st.refused).toBeLessThanOrEqual(8); // those on their way at the first
    expect(Math.max(...st.refusedAt)).toBeLessThan(5000);
  });

  it("a wait to the ms (retry-after-ms) says the window too: 3,000 tokens per 2 s, ≤ 1.25 × the least makespan", async () => {
    const size = (i: number) => Math.round(1.94 * (28 + ((i * 7) % 30)));
    const o = {
      limit: 3000,
      windowMs: 2000,
      latencyMs: 100,
      tokens: true,
      precise: true,
    };
    const { st, makespan } = await paceRun(o, 200, size);
    const least = leastMakespan(
      Array.from({ length: 200 }, (_, i) => size(i)),
      o,
    );
    expect(makespan / least).toBeLessThanOrEqual(1.25);
    expect(st.refused).toBeLessThanOrEqual(8);
  });

  it("a learned window that draws a 429 at its pace (here: the limit halved) gives way to an even pace: no more bursts", async () => {
    const { st, pace } = await paceRun({
      limit: 100,
      windowMs: 60_000,
      latencyMs: 100,
      limitAt: (t) => t < 90_000 ? 100 : 50,
    }, 400);
    const after = st.refusedAt.find((t) => t > 90_000)!;
    expect(after).toBeDefined();
    // In the window, a burst went at each refill; from the 429 on, none.
    const inSecond = (from: number) => {
      let most = 0;
      for (const t of st.acceptedAt.filter((t) => t >= from)) {
        most = Math.max(
          most,
          st.acceptedAt.filter((u) => u >= t && u < t + 1000).length,
        );
      }
      return most;
    };
    expect(inSecond(60_000)).toBeGreaterThan(10);
    expect(inSecond(after + 1)).toBeLessThanOrEqual(3);
    expect(pace.at(-1)![1]).toBeLessThanOrEqual(50 / 60);
  });

  it("a limit that drops mid-run costs at most 3 more 429s; one that rises is found again within a few windows", async () => {
    // 20 per 2 s, then 10 from 30 s, then 40 from 60 s.
    const { st, pace } = await paceRun({
      limit: 20,
      windowMs: 2000,
      latencyMs: 100,
      limitAt: (t) => t < 30_000 ? 20 : t < 60_000 ? 10 : 40,
    }, 900);
    // Dropped to 5/s at 30 s: at most 3 more 429s before it holds again.
    expect(st.refusedAt.filter((t) => t >= 30_000 && t < 60_000).length)
      .toBeLessThanOrEqual(3);
    const before60 = pace.filter(([t]) => t < 60_000).at(-1)![1];
    expect(before60).toBeLessThanOrEqual(5);
    expect(before60).toBeGreaterThan(3.5);
    // Raised to 20/s at 60 s: found again (80 %) within 10 windows.
    const found = pace.find(([t, r]) => t >= 60_000 && r >= 16);
    expect(found).toBeDefined();
    expect(found![0] - 60_000).toBeLessThanOrEqual(10 * 2000);
  });

  it("starts with one request in flight, one more every 500 ms; limit headers, given limits or findPace: false start at full concurrency; an aborted waiter is never sent", async () => {
    const inFlightAt = async (
      options: Parameters<typeof rateLimitedFetch>[0],
      headers: Record<string, string> = {},
    ) => {
      const clock = new ManualClock();
      let now = 0;
      const seen: number[] = [];
      const f = rateLimitedFetch({
        clock,
        concurrency: 8,
        ...options,
        fetch: async () => {
          now++;
          await clock.sleep(1000);
          now--;
          return Response.json(
            { usage: { input_tokens: 1, output_tokens: 1 } },
            {
              headers,
            },
          );
        },
      });
      const abort = new AbortController();
      const calls = Array.from(
        { length: 12 },
        (_, i) =>
          f(ANTHROPIC, {
            ...post(ask()),
            signal: i === 11 ? abort.signal : undefined,
          })
            .then((r) => r.text()),
      );
      const settled = Promise.allSettled(calls);
      for (const t of [0, 250, 500, 750, 1000]) {
        await clock.advance(t - clock.now());
        seen.push(now);
      }
      abort.abort(new Error("stop"));
      await clock.advance(10_000);
      const ended = await settled;
      return { seen, ended, stats: f.stats.toJSON() };
    };
    const slow = await inFlightAt({});
    expect(slow.seen).toEqual([1, 1, 2, 2, 3]);
    expect(slow.ended[11]).toMatchObject({
      status: "rejected",
      reason: { message: "stop" },
    });
    expect(slow.stats.requests).toBe(11); // the aborted one never went
    expect(slow.stats.pace).toBeUndefined(); // no 429: nothing found
    const learned = await inFlightAt({}, {
      "anthropic-ratelimit-requests-limit": "1000",
    });
    expect(learned.seen).toEqual([1, 1, 2, 2, 8]); // headers came at 1 s
    expect((await inFlightAt({ limiter: { rpm: 1000 } })).seen[0]).toBe(8);
    expect((await inFlightAt({ findPace: false })).seen[0]).toBe(8);
    expect((await inFlightAt({ learn: false })).seen[0]).toBe(8);
    expect(() => rateLimitedFetch({ findPace: 1 as unknown as boolean }))
      .toThrow(/'findPace' must be a boolean: received 1/);
  });
});

describe("Azure OpenAI: one more description", () => {
  const AZURE =
    "https://my-res.openai.azure.com/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21";

  it("its URLs (hosts, deployment paths) are Azure's; it builds them from a deployment and an api-version; the key goes in api-key", () => {
    expect(providerOf(AZURE)).toMatchObject({
      provider: azureProvider,
      endpoint: { path: "/v1/chat/completions" },
    });
    // A relay or simulator with Azure's path shape, and Azure's newer host.
    expect(
      providerOf(
        "http://127.0.0.1:9/openai/deployments/d/embeddings?api-version=x",
      )
        ?.provider,
    ).toBe(azureProvider);
    expect(
      providerOf(
        "https://r.cognitiveservices.azure.com/openai/deployments/d/completions",
      )
        ?.endpoint.path,
    ).toBe("/v1/completions");
    expect(providerOf("https://api.openai.com/v1/chat/completions")?.provider)
      .toBe(openaiProvider);
    expect(
      azureProvider.url("https://r.openai.azure.com", "/v1/embeddings", {
        model: "text embedding 3",
        apiVersion: "2025-01-01-preview",
      }),
    ).toBe(
      "https://r.openai.azure.com/openai/deployments/text%20embedding%203/embeddings?api-version=2025-01-01-preview",
    );
    expect(() =>
      azureProvider.url("https://r.openai.azure.com", "/v1/chat/completions")
    )
      .toThrow(
        /needs a deployment for \/v1\/chat\/completions.*received undefined/,
      );
    expect(azureProvider.headers("k")).toEqual({
      "content-type": "application/json",
      "api-key": "k",
    });
    expect(azureProvider.batch).toBe(openaiProvider.batch); // the same lines
  });

  it("a per-minute requests limit is also kept per 10 s and per 1 s (a sixth and a sixtieth), margins scaled; other providers' requests add nothing", async () => {
    const make = () =>
      rateLimitedFetch({
        limiter: { rpm: 600, tpm: 100_000, marginMs: 600 },
        fetch: () => Promise.resolve(usage(1, 1)),
      });
    const f = make();
    await (await f(
      AZURE,
      post({ messages: [{ role: "user", content: "hi" }] }),
    ))
      .text();
    const windows = f.limiter.usage().map((
      w,
    ) => [w.key, w.ms, w.limit, w.marginMs]);
    expect(windows).toEqual(expect.arrayContaining([
      ["requests", 60_000, 600, 600],
      ["requests", 10_000, 100, 100],
      ["requests", 1000, 10, 10],
      ["tokens", 60_000, 100_000, 600],
    ]));
    expect(windows).toHaveLength(4);
    const g = make();
    await (await g(ANTHROPIC, post(ask()))).text();
    expect(g.limiter.usage()).toHaveLength(2);
  });

  it("remaining-only headers: the limit is learned as at most what is left plus what the window holds, the least bound kept (and no pace is searched for)", async () => {
    const clock = new ManualClock();
    let left = 99;
    const f = rateLimitedFetch({
      clock,
      fetch: () =>
        Promise.resolve(
          Response.json({ usage: { prompt_tokens: 5, completion_tokens: 1 } }, {
            headers: { "x-ratelimit-remaining-requests": String(left--) },
          }),
        ),
    });
    const body = post({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "hi" }],
    });
    await (await f(AZURE, body)).text();
    const learned = () =>
      f.models.get("gpt-4o-mini")?.usage().filter((w) => w.key === "requests")
        .map((w) => [w.ms, w.limit]);
    // 99 left after this one: at most 100; and its short copies.
    expect(learned()).toEqual([[60_000, 100], [10_000, 16], [1000, 1]]);
    left = 90; // someone else used 8
    await clock.advance(1100); // the 1-s copy holds 1 (and a margin)
    await (await f(AZURE, body)).text();
    expect(learned()?.[0]).toEqual([60_000, 92]);
    left = 500; // a new fixed minute on the server: a looser bound is not taken
    await clock.advance(1100);
    await (await f(AZURE, body)).text();
    expect(learned()?.[0]).toEqual([60_000, 92]);
    expect(f.stats.toJSON().pace).toBeUndefined();
  });

  it("retry-after-ms and x-ms-retry-after-ms are obeyed to the millisecond, before a whole-second retry-after", async () => {
    for (const name of ["retry-after-ms", "x-ms-retry-after-ms"]) {
      const clock = new ManualClock();
      const sentAt: number[] = [];
      let n = 0;
      const f = rateLimitedFetch({
        clock,
        limiter: { rpm: 1000 },
        retry: { random: () => 0.5 },
        fetch: () => {
          sentAt.push(clock.now());
          return Promise.resolve(
            n++ === 0
              ? Response.json({ error: { code: "429", message: "slow" } }, {
                status: 429,
                headers: { [name]: "1234", "retry-after": "2" },
              })
              : usage(1, 1),
          );
        },
      });
      const done = f(AZURE, post({ messages: [] })).then((r) => r.text());
      await clock.advance(1233);
      expect(sentAt).toEqual([0]);
      await clock.advance(1);
      await done;
      expect(sentAt).toEqual([0, 1234]);
    }
  });
});

describe("Gemini: one more description, limits learned from its 429s", () => {
  const URL_ =
    "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent";
  const ask = {
    contents: [{ role: "user", parts: [{ text: "hello there" }] }],
    systemInstruction: { parts: [{ text: "be brief" }] },
    generationConfig: { maxOutputTokens: 77 },
  };
  const quota429 = (quotaId: string, value: string, delay: string) =>
    Response.json({
      error: {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        message: "You exceeded your current quota.",
        details: [
          {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            violations: [{
              quotaId,
              quotaValue: value,
              quotaDimensions: {
                location: "global",
                model: "gemini-2.5-flash",
              },
            }],
          },
          {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            retryDelay: delay,
          },
        ],
      },
    }, { status: 429 });

  it("its URLs, model, estimate (output cap in generationConfig) and usageMetadata (thoughts are output)", () => {
    expect(providerOf(URL_)).toMatchObject({
      provider: geminiProvider,
      endpoint: { path: ":generateContent", needs: "contents" },
    });
    expect(
      providerOf(
        URL_.replace(":generateContent", ":streamGenerateContent?alt=sse"),
      )
        ?.endpoint.path,
    ).toBe(":streamGenerateContent");
    expect(geminiProvider.modelOf!(URL_)).toBe("gemini-2.5-flash");
    expect(
      geminiProvider.url("http://h/v1beta", ":streamGenerateContent", {
        model: "models/g",
      }),
    )
      .toBe("http://h/v1beta/models/g:streamGenerateContent?alt=sse");
    expect(geminiProvider.headers("k")["x-goog-api-key"]).toBe("k");
    const cost = estimateCost(URL_, ask);
    expect(cost.outputTokens).toBe(77);
    expect(cost.inputTokens).toBeGreaterThan(4);
    expect(usageOf({
      usageMetadata: {
        promptTokenCount: 12,
        candidatesTokenCount: 5,
        thoughtsTokenCount: 30,
        cachedContentTokenCount: 8,
      },
    })).toEqual({ inputTokens: 12, outputTokens: 35 });
  });

  /** A fetch on a manual clock whose first answer is `first`, then a success. */
  const firstThen = (first: () => Response) => {
    const clock = new ManualClock();
    const sentAt: number[] = [];
    const f = rateLimitedFetch({
      clock,
      retry: { random: () => 0.5 },
      fetch: () => {
        sentAt.push(clock.now());
        return Promise.resolve(
          sentAt.length === 1 ? first() : Response.json({
            usageMetadata: { promptTokenCount: 9, candidatesTokenCount: 3 },
          }),
        );
      },
    });
    return { clock, sentAt, f };
  };

  it("a 429's RetryInfo is obeyed to the millisecond", async () => {
    const { clock, sentAt, f } = firstThen(() =>
      Response.json({
        error: {
          code: 429,
          status: "RESOURCE_EXHAUSTED",
          details: [{
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            retryDelay: "1.5s",
          }],
        },
      }, { status: 429 })
    );
    const done = f(URL_, post(ask)).then((r) => r.text());
    await clock.advance(1499);
    expect(sentAt).toEqual([0]);
    await clock.advance(1);
    await done;
    expect(sentAt).toEqual([0, 1500]);
    expect(f.stats.toJSON().inputTokens).toBe(9);
  });

  it("a per-minute quota's 429 teaches the model's limit (no pace search); the new window starts full, as the server's is", async () => {
    const { clock, sentAt, f } = firstThen(() =>
      quota429("GenerateRequestsPerMinutePerProjectPerModel", "30", "20s")
    );
    const done = f(URL_, post(ask)).then((r) => r.text());
    await clock.advance(20_000); // the told wait: the window is still full
    expect(sentAt).toEqual([0]);
    await clock.advance(41_000); // a window (and its margin, widened by the 429) after it
    await done;
    expect(sentAt[1]).toBeGreaterThanOrEqual(60_000);
    expect(sentAt[1]).toBeLessThanOrEqual(61_000);
    const windows = f.models.get("gemini-2.5-flash")!.usage();
    expect(windows.map((w) => [w.key, w.limit, w.ms])).toEqual([
      ["requests", 30, 60_000],
    ]);
    expect(f.stats.toJSON().pace).toBeUndefined();
  });

  it("a per-day quota's 429 is not retried (its short retryDelay notwithstanding): the run's quota is spent", async () => {
    let calls = 0;
    const f = rateLimitedFetch({
      fetch: () => {
        calls++;
        return Promise.resolve(
          quota429(
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "250",
            "20s",
          ),
        );
      },
    });
    const res = await f(URL_, post(ask));
    expect(res.status).toBe(429);
    await res.text();
    expect(calls).toBe(1);
    expect(f.stats.toJSON().errors).toEqual({ quota: 1 });
  });
});
