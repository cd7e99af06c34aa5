// Smoke test: the simulator starts and answers in this runtime (Deno, Bun).
// `deno run -A test/sim_smoke.ts` / `bun test/sim_smoke.ts`; prints "ok".
import { startSimulator } from "../sim.ts";

const sim = await startSimulator({ limits: { requests: 1, windowMs: 60_000 } });
try {
  const ask = () =>
    fetch(`${sim.url}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "m",
        max_tokens: 20,
        messages: [{ role: "user", content: "hi" }],
      }),
    });
  const a = await ask();
  const body = await a.json();
  const b = await ask();
  await b.body?.cancel();
  if (a.status !== 200 || body.usage?.input_tokens !== 5 || b.status !== 429) {
    throw new Error(
      `unexpected: ${a.status} ${JSON.stringify(body)} ${b.status}`,
    );
  }
  console.log("ok");
} finally {
  await sim.close();
}
