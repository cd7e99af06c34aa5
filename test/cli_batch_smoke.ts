// Smoke test of `paceline run --batch-api` in this runtime (Deno, Bun, Node
// 24): `deno run -A test/cli_batch_smoke.ts` / `bun test/cli_batch_smoke.ts`;
// prints "ok". An OpenAI batch (file upload, multipart) and an Anthropic one
// through the simulator: every line once, in input order, one batch each.
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { main } from "../cli.ts";
import { startSimulator } from "../sim.ts";
import { writeBatch } from "./batch_file.ts";

const n = 30;
const dir = mkdtempSync(join(tmpdir(), "paceline-batch-smoke-"));
const io = { out: () => {}, err: () => {}, isTTY: false };
const sim = await startSimulator({ batchMs: 200 });
try {
  const anthropic = join(dir, "a.jsonl");
  writeBatch(anthropic, n, "问题");
  const openai = join(dir, "o.jsonl");
  writeFileSync(
    openai,
    Array.from({ length: n }, (_, i) =>
      JSON.stringify({
        custom_id: `r${i}`,
        method: "POST",
        url: "/v1/chat/completions",
        body: { model: "m", messages: [{ role: "user", content: `q ${i}` }] },
      })).join("\n") + "\n",
  );
  for (
    const [input, base] of [[anthropic, sim.url], [openai, `${sim.url}/v1`]]
  ) {
    const output = `${input}.out`;
    const code = await main(
      [
        "run",
        input!,
        "-o",
        output,
        "--base-url",
        base!,
        "--batch-api",
        "--poll-ms",
        "50",
        "--quiet",
      ],
      io,
    );
    if (code !== 0) throw new Error(`${input}: exited ${code}`);
    const ids = readFileSync(output, "utf8").trimEnd().split("\n").map((l) =>
      JSON.parse(l).custom_id
    );
    const want = Array.from({ length: n }, (_, i) => `r${i}`);
    if (ids.join() !== want.join()) throw new Error(`output: ${ids.join()}`);
  }
  const b = sim.stats().batches;
  if (b.created !== 2 || b.files !== 1) {
    throw new Error(`batches: ${JSON.stringify(b)}`);
  }
  console.log("ok");
} finally {
  await sim.close();
}
