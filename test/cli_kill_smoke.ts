// `paceline run` killed with SIGKILL mid-run, then run again, in the runtime
// that runs this file: `node test/cli_kill_smoke.ts` (Node ≥ 22.18 runs the
// TypeScript sources as they are), `deno run -A …`, `bun …`. Prints "ok".
// The rerun must give every line once, in input order, and redo at most the
// requests that were in flight when the first run died.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import process from "node:process";
import { startSimulator } from "../sim.ts";
import { writeBatch } from "./batch_file.ts";

const n = 200;
const concurrency = 4;
const root = resolve(import.meta.dirname ?? ".", "..");
const dir = mkdtempSync(join(tmpdir(), "paceline-kill-"));
const input = join(dir, "in.jsonl");
const output = join(dir, "out.jsonl");
writeBatch(input, n, "question");
const isDeno = "Deno" in globalThis;
const cli = (url: string) => {
  const args = [
    ...(isDeno ? ["run", "-A"] : []),
    join(root, "cli.ts"),
    "run",
    input,
    "-o",
    output,
    "--base-url",
    url,
    "--concurrency",
    String(concurrency),
    "--quiet",
  ];
  return spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
};
const linesIn = (file: string): string[] => {
  try {
    return readFileSync(file, "utf8").split("\n").filter(Boolean);
  } catch {
    return [];
  }
};
const exited = (child: ReturnType<typeof spawn>) =>
  new Promise<number | string>((done) =>
    child.on("exit", (code, signal) => done(code ?? signal ?? "?"))
  );

const sim = await startSimulator({ latency: { baseMs: 40 } });
try {
  const first = cli(sim.url);
  const firstExit = exited(first);
  const deadline = Date.now() + 30_000;
  // Kill it once some results are journaled and most lines are not.
  while (linesIn(`${output}.journal`).length < 30) {
    if (Date.now() > deadline) throw new Error("no results within 30 s");
    await new Promise((r) => setTimeout(r, 20));
  }
  first.kill("SIGKILL");
  const killedWith = await firstExit;
  if (killedWith !== "SIGKILL") {
    throw new Error(`first run ended with ${killedWith}, not SIGKILL`);
  }
  const before = linesIn(`${output}.journal`).length;
  if (before >= n) throw new Error("the first run finished before the kill");
  const second = cli(sim.url);
  let stderr = "";
  second.stderr?.on("data", (d) => stderr += d);
  const code = await exited(second);
  if (code !== 0) throw new Error(`rerun exited ${code}: ${stderr}`);
  const ids = linesIn(output).map((l) => JSON.parse(l).custom_id);
  const want = Array.from({ length: n }, (_, i) => `r${i}`);
  if (ids.join() !== want.join()) throw new Error(`output: ${ids.join()}`);
  const accepted = Object.values(sim.stats().perClient)
    .reduce((sum, c) => sum + c.succeeded, 0);
  if (accepted - n > 2 * concurrency) {
    throw new Error(
      `${accepted - n} lines redone (at most ${2 * concurrency})`,
    );
  }
  console.log(
    `killed after ${before} journaled; rerun redid ${accepted - n}`,
  );
  console.log("ok");
} finally {
  await sim.close();
  rmSync(dir, { recursive: true, force: true });
}
