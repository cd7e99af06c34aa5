// @ts-check
// One process of the "shared" benchmark: takes `n` permits from limits
// shared through Redis — paceline's RedisRateLimiter (node-redis) or
// bottleneck's clustering (ioredis) — and prints, as one JSON line, the
// wall-clock time (Date.now) at which each job started.
import { createClient } from "redis";
import Bottleneck from "bottleneck";
import { mapConcurrent, RedisRateLimiter } from "../dist/mod.js";

const { mode, url, port, name, n, concurrency, limit, windowMs } = JSON.parse(
  process.argv[2] ?? "{}",
);
const starts = [];
let close = async () => {};
/** @type {() => Promise<unknown>} */
let take;
if (mode === "paceline") {
  const client = createClient({ url });
  await client.connect();
  const limiter = new RedisRateLimiter({
    redis: (s, k, a) => client.eval(s, { keys: k, arguments: a }),
    name,
    windows: [{ key: "requests", limit, ms: windowMs }],
  });
  take = () => limiter.acquire();
  close = async () => {
    await client.quit();
  };
} else {
  const limiter = new Bottleneck({
    datastore: "ioredis",
    clientOptions: { host: "127.0.0.1", port },
    id: name,
    ...(limit < 1e9
      ? {
        reservoir: limit,
        reservoirRefreshAmount: limit,
        reservoirRefreshInterval: windowMs,
      }
      : {}),
  });
  await limiter.ready();
  take = () => limiter.schedule(() => Promise.resolve());
  close = () => limiter.disconnect();
}
// Every process starts together at the time the parent names.
const { at } = JSON.parse(process.argv[3] ?? "{}");
if (at) await new Promise((r) => setTimeout(r, Math.max(0, at - Date.now())));
await mapConcurrent(Array.from({ length: n }), async () => {
  await take();
  starts.push(Date.now());
}, { concurrency });
await close();
console.log(JSON.stringify(starts));
