// The frameworks people build on, through rateLimitedFetch against the
// simulator: Vercel AI SDK (ai + @ai-sdk/anthropic, @ai-sdk/openai,
// @ai-sdk/azure against the simulator's Azure routes) and
// LangChain.js (@langchain/anthropic, @langchain/openai). Their own retries
// are off (maxRetries: 0) because paceline retries; every call must reach
// the server once, draw no 429, and settle its real usage into fetch.stats,
// streaming included.
import { describe, expect, it } from "vitest";
import { generateText, streamText } from "ai";
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import { createAzure } from "@ai-sdk/azure";
import { createGoogleGenerativeAI } from "@ai-sdk/google";
import { GoogleGenAI } from "@google/genai";
import { ChatAnthropic } from "@langchain/anthropic";
import { ChatOpenAI } from "@langchain/openai";
import { rateLimitedFetch } from "./mod.ts";
import type { Simulator } from "./sim.ts";
import { sim } from "./test/sims.ts";

const WINDOW_MS = 1000;
const LIMIT = 8;
/** Calls per framework: more than one window's worth, so limits bind. */
const CALLS = 12;

async function limited(): Promise<{
  s: Simulator;
  f: ReturnType<typeof rateLimitedFetch>;
}> {
  const s = await sim({ limits: { requests: LIMIT, windowMs: WINDOW_MS } });
  const f = rateLimitedFetch({
    limiter: {
      windows: [{ key: "requests", limit: LIMIT, ms: WINDOW_MS }],
      // The simulator shares this event loop with heavy framework code:
      // arrival can trail the send stamp by 100 ms+ (see fetch_test).
      marginMs: 200,
    },
    concurrency: 4,
    learn: false,
  });
  return { s, f };
}

/** Every call once, no 429, and the tokens the server counted = ours. */
function expectClean(s: Simulator, f: ReturnType<typeof rateLimitedFetch>) {
  const st = s.stats();
  expect(st.rateLimited.requests).toBe(0);
  expect(st.received).toBe(CALLS);
  expect(st.accepted).toBe(CALLS);
  const ours = f.stats.toJSON();
  expect(ours.calls).toBe(CALLS);
  expect(ours.retries).toBe(0);
  expect(ours.inputTokens).toBe(st.usage.inputTokens);
  expect(ours.outputTokens).toBe(st.usage.outputTokens);
  expect(ours.outputTokens).toBeGreaterThan(0);
}

const prompt = (i: number) => `Question ${i}: what is a sliding window?`;

/**
 * A third of the calls through `streamText` (the stream's reported usage
 * checked too), the rest through `generateText`; every answer non-empty.
 */
async function generateAndStream(
  model: Parameters<typeof generateText>[0]["model"],
) {
  const options = (i: number) => ({
    model,
    prompt: prompt(i),
    maxOutputTokens: 30,
    maxRetries: 0, // paceline retries
  });
  const texts = await Promise.all(
    Array.from({ length: CALLS }, async (_, i) => {
      if (i % 3 === 0) {
        const r = streamText(options(i));
        let text = "";
        for await (const t of r.textStream) text += t;
        expect((await r.usage).outputTokens).toBeGreaterThan(0);
        return text;
      }
      return (await generateText(options(i))).text;
    }),
  );
  expect(texts.every((t) => t.length > 0)).toBe(true);
}

describe("Vercel AI SDK through rateLimitedFetch", () => {
  it("@ai-sdk/anthropic: generateText and streamText", async () => {
    const { s, f } = await limited();
    const anthropic = createAnthropic({
      apiKey: "k",
      baseURL: `${s.url}/v1`,
      fetch: f,
    });
    await generateAndStream(anthropic("claude-sim"));
    expectClean(s, f);
  });

  it("@ai-sdk/openai (chat completions): generateText and streamText", async () => {
    const { s, f } = await limited();
    const openai = createOpenAI({
      apiKey: "k",
      baseURL: `${s.url}/v1`,
      fetch: f,
    });
    await generateAndStream(openai.chat("gpt-sim"));
    expectClean(s, f);
  });

  it("@ai-sdk/azure (deployment URLs, chat): generateText and streamText, Azure's short window kept", async () => {
    const { s, f } = await limited();
    const azure = createAzure({
      apiKey: "k",
      baseURL: `${s.url}/openai`,
      useDeploymentBasedUrls: true,
      apiVersion: "2024-10-21",
      fetch: f,
    });
    await generateAndStream(azure.chat("gpt-4o-mini"));
    expectClean(s, f);
    // A sixth of the limit per sixth of the window: 1 per 167 ms.
    expect(f.limiter.usage().map((w) => [w.ms, w.limit])).toContainEqual([
      WINDOW_MS / 6,
      1,
    ]);
  });
});

/** A third of the calls streamed, the rest invoked; every answer non-empty. */
async function invokeAndStream(chat: ChatAnthropic | ChatOpenAI) {
  const text = (c: unknown) => (typeof c === "string" ? c : "");
  const texts = await Promise.all(
    Array.from({ length: CALLS }, async (_, i) => {
      if (i % 3 === 0) {
        let out = "";
        for await (const chunk of await chat.stream(prompt(i))) {
          out += text(chunk.content);
        }
        return out;
      }
      return text((await chat.invoke(prompt(i))).content);
    }),
  );
  expect(texts.every((t) => t.length > 0)).toBe(true);
}

describe("Gemini through rateLimitedFetch", () => {
  it("@ai-sdk/google: generateText and streamText", async () => {
    const { s, f } = await limited();
    const google = createGoogleGenerativeAI({
      apiKey: "k",
      baseURL: `${s.url}/v1beta`,
      fetch: f,
    });
    await generateAndStream(google("gemini-sim"));
    expectClean(s, f);
  });

  it("@google/genai: generateContent and generateContentStream", async () => {
    const { s, f } = await limited();
    const ai = new GoogleGenAI({
      apiKey: "k",
      httpOptions: { baseUrl: s.url, fetch: f },
    });
    const texts = await Promise.all(
      Array.from({ length: CALLS }, async (_, i) => {
        const request = {
          model: "gemini-sim",
          contents: prompt(i),
          config: { maxOutputTokens: 30 },
        };
        if (i % 3 === 0) {
          let text = "";
          for await (
            const c of await ai.models.generateContentStream(request)
          ) {
            text += c.text ?? "";
          }
          return text;
        }
        return (await ai.models.generateContent(request)).text ?? "";
      }),
    );
    expect(texts.every((t) => t.length > 0)).toBe(true);
    expectClean(s, f);
    // Gemini's limits are per model: the lane is the URL's model.
    expect([...f.models.keys()]).toEqual(["gemini-sim"]);
  });
});

describe("LangChain.js through rateLimitedFetch", () => {
  it("ChatAnthropic: invoke and stream", async () => {
    const { s, f } = await limited();
    const chat = new ChatAnthropic({
      model: "claude-sim",
      apiKey: "k",
      anthropicApiUrl: s.url,
      maxTokens: 30,
      maxRetries: 0,
      clientOptions: { fetch: f },
    });
    await invokeAndStream(chat);
    expectClean(s, f);
  });

  it("ChatOpenAI: invoke and stream", async () => {
    const { s, f } = await limited();
    const chat = new ChatOpenAI({
      model: "gpt-sim",
      apiKey: "k",
      maxTokens: 30,
      maxRetries: 0,
      streamUsage: true,
      configuration: { baseURL: `${s.url}/v1`, fetch: f },
    });
    await invokeAndStream(chat);
    expectClean(s, f);
  });
});
