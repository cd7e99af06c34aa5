// Smoke test of the fetch layer end to end in this runtime (Deno, Bun):
// `deno run -A test/fetch_smoke.ts` / `bun test/fetch_smoke.ts`; prints "ok".
import { anthropic, mapConcurrent } from "../mod.ts";
import { startSimulator } from "../sim.ts";

const sim = await startSimulator({ limits: { requests: 10, windowMs: 500 } });
try {
  const claude = anthropic({
    apiKey: "k",
    baseURL: sim.url,
    limiter: {
      windows: [{ key: "requests", limit: 10, ms: 500 }],
      marginMs: 50,
    },
    learn: false,
  });
  const out = await mapConcurrent(
    Array.from({ length: 25 }, (_, i) => i),
    async (i) => {
      const m = await claude.messages({
        model: "m",
        max_tokens: 20,
        messages: [{ role: "user", content: `第${i}个问题` }],
      });
      return m.content[0]?.text?.length ?? 0;
    },
    { concurrency: 8 },
  );
  const st = sim.stats();
  const js = claude.stats.toJSON();
  if (
    out.length !== 25 || st.rateLimited.requests !== 0 ||
    js.inputTokens !== st.usage.inputTokens ||
    js.outputTokens !== st.usage.outputTokens
  ) {
    throw new Error(`unexpected: ${JSON.stringify({ st, js })}`);
  }
  const text = await claude.stream({
    model: "m",
    max_tokens: 20,
    messages: [{ role: "user", content: "stream" }],
  }).text();
  if (!text) throw new Error("empty stream");
  console.log("ok");
} finally {
  await sim.close();
}
