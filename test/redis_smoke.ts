// Shared limits from Deno (npm:redis, the README's adapter) and Bun (its
// built-in RedisClient), against the redis-server at REDIS_URL: two
// instances of one name share "5 per 300 ms". Prints "ok".
import process from "node:process";
import { type RedisEval, RedisRateLimiter } from "../mod.ts";

const url = process.env.REDIS_URL;
if (!url) throw new Error("REDIS_URL is not set");

interface BunRedis {
  send(command: string, args: string[]): Promise<unknown>;
  close(): void;
}
const bun = (globalThis as {
  Bun?: { RedisClient: new (url: string) => BunRedis };
}).Bun;

let redis: RedisEval;
let close: () => unknown;
if (bun) {
  const client = new bun.RedisClient(url);
  redis = (s, k, a) => client.send("EVAL", [s, String(k.length), ...k, ...a]);
  close = () => client.close();
} else {
  // A variable specifier: tsc (Node) need not resolve Deno's npm: scheme.
  const spec = "npm:redis@6.3.1";
  const { createClient } = await import(spec) as typeof import("redis");
  const client = await createClient({ url }).connect();
  redis = (s, k, a) => client.eval(s, { keys: k, arguments: a });
  close = () => client.quit();
}

const name = `smoke-${bun ? "bun" : "deno"}-${Date.now()}`;
const limiters = [0, 1].map(() =>
  new RedisRateLimiter({
    redis,
    name,
    windows: [{ key: "requests", limit: 5, ms: 300 }],
    marginMs: 0,
  })
);
const t0 = performance.now();
const at: number[] = [];
await Promise.all(
  Array.from({ length: 15 }, async (_, i) => {
    await limiters[i % 2]!.acquire();
    at.push(performance.now() - t0);
  }),
);
at.sort((a, b) => a - b);
// Three waves of five, a window apart (less timer jitter).
if (at[14]! < 2 * 300 - 50 || at[5]! - at[0]! < 200) {
  throw new Error(`not paced: ${at.map(Math.round).join(" ")}`);
}
const [w] = await limiters[1]!.refresh();
if (w?.limit !== 5 || w.ms !== 300) {
  throw new Error(`shared window not seen: ${JSON.stringify(w)}`);
}
await close();
console.log("ok");
