// Smoke test of `paceline run`'s journal in this runtime (Deno, Bun):
// `deno run -A test/cli_smoke.ts` / `bun test/cli_smoke.ts`; prints "ok".
// A spend limit stops the run (exit 3, the journal kept); a rerun against a
// healthy server sends only what is left and removes the journal.
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { main } from "../cli.ts";
import { startSimulator } from "../sim.ts";
import { writeBatch } from "./batch_file.ts";

const n = 40;
const dir = mkdtempSync(join(tmpdir(), "paceline-smoke-"));
const input = join(dir, "in.jsonl");
const output = join(dir, "out.jsonl");
writeBatch(input, n, "问题");
const io = { out: () => {}, err: () => {}, isTTY: false };
const args = (url: string) => [
  "run",
  input,
  "-o",
  output,
  "--base-url",
  url,
  "--concurrency",
  "4",
  "--quiet",
];
const broke = await startSimulator({ quotaAfter: 15 });
const healthy = await startSimulator();
try {
  const first = await main(args(broke.url), io);
  if (first !== 3) throw new Error(`first run exited ${first}, expected 3`);
  if (!existsSync(`${output}.journal`)) throw new Error("no journal kept");
  const second = await main(args(healthy.url), io);
  if (second !== 0) throw new Error(`second run exited ${second}`);
  const rows = readFileSync(output, "utf8").trimEnd().split("\n").map((l) =>
    JSON.parse(l).custom_id
  );
  const want = Array.from({ length: n }, (_, i) => `r${i}`);
  if (rows.join() !== want.join()) throw new Error(`output: ${rows.join()}`);
  const resent = Object.keys(healthy.stats().perClient).filter((id) =>
    (broke.stats().perClient[id]?.succeeded ?? 0) > 0
  );
  if (resent.length) throw new Error(`sent again: ${resent.join()}`);
  if (existsSync(`${output}.journal`)) throw new Error("journal left behind");
  console.log("ok");
} finally {
  await broke.close();
  await healthy.close();
}
