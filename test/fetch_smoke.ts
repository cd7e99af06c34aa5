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
      // The server counts arrivals, the client counts sends: the margin
      // covers the gap on a loaded machine (a CI run once saw a 429 at 50).
      marginMs: 150,
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
  const wrong = [
    out.length !== 25 && `results ${out.length}, not 25`,
    st.rateLimited.requests !== 0 && `${st.rateLimited.requests} x 429`,
    js.inputTokens !== st.usage.inputTokens &&
    `input tokens ${js.inputTokens}, server ${st.usage.inputTokens}`,
    js.outputTokens !== st.usage.outputTokens &&
    `output tokens ${js.outputTokens}, server ${st.usage.outputTokens}`,
  ].filter(Boolean);
  if (wrong.length > 0) {
    throw new Error(`${wrong.join("; ")}\n${JSON.stringify({ st, js })}`);
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
