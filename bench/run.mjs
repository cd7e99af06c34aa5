// @ts-check
// `npm run bench` (add `-- --quick` for a smoke run): every benchmark in one
// process tree, one markdown table per topic.
import { environment } from "./lib.mjs";
import { limiterOverhead } from "./limiter.mjs";
import { accuracy } from "./accuracy.mjs";
import { pool } from "./pool.mjs";
import { memory } from "./memory.mjs";
import { e2e } from "./e2e.mjs";
import { shared } from "./shared.mjs";
import { relay } from "./relay.mjs";

const quick = process.argv.includes("--quick");
const json = process.argv.includes("--json");
const topics = [
  ["pool", pool],
  ["limiter", limiterOverhead],
  ["accuracy", accuracy],
  ["memory", memory],
  ["e2e", e2e],
  ["shared", shared],
  ["relay", relay],
];
const only = process.argv.slice(2).filter((a) => !a.startsWith("--"));

console.log(
  `## paceline benchmarks${
    quick ? " (--quick: small sizes, not for quoting)" : ""
  }\n`,
);
console.log(
  environment([
    "p-map",
    "p-limit",
    "p-queue",
    "async-sema",
    "limiter",
    "bottleneck",
    "p-retry",
    "@anthropic-ai/sdk",
    "redis",
    "ioredis",
  ]) + "\n",
);
const all = {};
for (const [name, fn] of topics) {
  if (only.length && !only.includes(name)) continue;
  const { markdown, results } = await fn({ quick });
  all[name] = results;
  console.log(markdown + "\n");
}
if (json) console.log(JSON.stringify(all));
