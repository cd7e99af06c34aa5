// @ts-check
// One process of the multi-process test: `n` requests to the simulator at
// `sim` through rateLimitedFetch on a RedisRateLimiter named `name`.
import { createClient } from "redis";
import {
  mapConcurrent,
  rateLimitedFetch,
  RedisRateLimiter,
} from "../dist/mod.js";

const { redis: url, sim, name, n, id, limit, windowMs, marginMs, at } = JSON
  .parse(process.argv[2] ?? "{}");
const client = createClient({ url });
await client.connect();
const f = rateLimitedFetch({
  limiter: new RedisRateLimiter({
    redis: (s, k, a) => client.eval(s, { keys: k, arguments: a }),
    name,
    windows: [{ key: "requests", limit, ms: windowMs }],
    marginMs,
  }),
  learn: false,
  concurrency: 8,
});
// Warm up (a request the simulator does not count), then start with the
// others: four processes booting on two cores would otherwise send their
// first requests long after Redis stamped them.
await (await fetch(`${sim}/_sim/stats`)).text();
await new Promise((r) => setTimeout(r, Math.max(0, at - Date.now())));
await mapConcurrent(Array.from({ length: n }, (_, i) => i), async (i) => {
  const r = await f(`${sim}/v1/messages`, {
    method: "POST",
    body: JSON.stringify({
      model: "claude-sim",
      max_tokens: 16,
      messages: [{ role: "user", content: `${id} ${i}` }],
      metadata: { user_id: `${id}-${i}` },
    }),
  });
  await r.text();
  if (r.status !== 200) throw new Error(`status ${r.status}`);
}, { concurrency: 16 });
await client.quit();
console.log("ok");
