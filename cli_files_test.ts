// `paceline run` never damages the user's files: one run per output, never
// over the input or a file that is not ours, every path and fit checked
// before the first request, honest plans and honest stats after a stop.
import { describe, expect, it } from "vitest";
import { spawn } from "node:child_process";
import {
  existsSync,
  linkSync,
  mkdirSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { sim } from "./test/sims.ts";
import {
  anthropicLines,
  batchFiles,
  NO_KEYS,
  readResults,
  runCli,
  spawnCli,
} from "./test/cli_helpers.ts";

const ids = (n: number) => Array.from({ length: n }, (_, i) => `req-${i}`);

/** The pid of a process that has exited (so no process has it, for now). */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
  await new Promise((r) => child.on("exit", r));
  return child.pid!;
}

describe("paceline run: one run per output", () => {
  it(
    "a second run on the same output exits 2 at once, naming the first; the first completes, every id once",
    async () => {
      const s = await sim({ latency: { baseMs: 40 } });
      const { input, output } = batchFiles(anthropicLines(120).join("\n"));
      const args = [
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--concurrency",
        "4",
        "--quiet",
      ];
      const first = spawnCli(args);
      const deadline = Date.now() + 20_000;
      while (!existsSync(`${output}.journal`) && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      const second = spawnCli(args);
      expect(await second.exited).toBe(2);
      expect(second.err()).toMatch(
        new RegExp(
          `is in use by another paceline run \\(process ${first.child.pid} on ${hostname()}`,
        ),
      );
      expect(await first.exited).toBe(0);
      expect(readResults(output).map((r) => r.custom_id)).toEqual(ids(120));
      expect(s.stats().received).toBe(120); // nothing sent twice
      expect(existsSync(`${output}.lock`)).toBe(false); // released
    },
    30_000,
  );

  it("a lock left by a killed run is taken over with a notice; a live or foreign one is not", async () => {
    const s = await sim();
    const { input, output } = batchFiles(anthropicLines(5).join("\n"));
    const args = ["run", input, "-o", output, "--base-url", s.url];
    const lock = (pid: number, host = hostname()) =>
      writeFileSync(
        `${output}.lock`,
        JSON.stringify({ pid, host, since: "2026-12-01T00:00:00.000Z" }),
      );
    lock(process.pid); // this test process: alive
    const live = await runCli(args, NO_KEYS);
    expect(live.code).toBe(2);
    expect(live.err).toMatch(`process ${process.pid} on ${hostname()}`);
    lock(await deadPid(), "other-host");
    const foreign = await runCli(args, NO_KEYS);
    expect(foreign.code).toBe(2);
    expect(foreign.err).toMatch(/on other-host.*delete .*out\.jsonl\.lock/);
    expect(s.stats().received).toBe(0);
    const dead = await deadPid();
    lock(dead);
    const taken = await runCli(args, NO_KEYS);
    expect(taken.code).toBe(0);
    expect(taken.err).toMatch(
      `was left by process ${dead} (since 2026-12-01T00:00:00.000Z), which is no longer running: taking it over`,
    );
    expect(readResults(output)).toHaveLength(5);
    expect(existsSync(`${output}.lock`)).toBe(false);
  });
});

describe("paceline run: never over what is not ours", () => {
  it("-o equal to the input (by name, through a hard link, or as its journal) is refused; the input is unchanged", async () => {
    const s = await sim();
    const { d, input } = batchFiles(anthropicLines(4).join("\n") + "\n");
    const before = readFileSync(input);
    const link = join(d, "link.jsonl");
    linkSync(input, link);
    for (
      const [o, msg] of [
        [input, /would write over the input/],
        [link, /would write over the input/],
        [`${input}.journal`, /names ending in \.journal are paceline's own/],
      ] as const
    ) {
      const r = await runCli(
        ["run", input, "-o", o, "--base-url", s.url],
        NO_KEYS,
      );
      expect(r.code).toBe(2);
      expect(r.err).toMatch(msg);
    }
    // The input named as the journal of the output.
    const asJournal = join(d, "x.journal");
    writeFileSync(asJournal, before);
    const j = await runCli(
      ["run", asJournal, "-o", join(d, "x"), "--base-url", s.url],
      NO_KEYS,
    );
    expect(j.code).toBe(2);
    expect(j.err).toMatch(/would write over the input .* \(as .*x\.journal\)/);
    // --retry-errored, the old advice, changes nothing either.
    const again = await runCli(
      ["run", input, "-o", input, "--retry-errored", "--base-url", s.url],
      NO_KEYS,
    );
    expect(again.code).toBe(2);
    expect(readFileSync(input)).toEqual(before);
    expect(readFileSync(asJournal)).toEqual(before);
    expect(s.stats().received).toBe(0);
  });

  it("an existing -o that is not a results file of this input is kept as it is, whatever its length", async () => {
    const s = await sim();
    const { d, input } = batchFiles(anthropicLines(3).join("\n"));
    for (
      const text of [
        "my notes\n",
        "just one line, no newline",
        "a\nb\nc\n",
        "\n",
      ]
    ) {
      const notes = join(d, "notes.txt");
      writeFileSync(notes, text);
      const r = await runCli(
        ["run", input, "-o", notes, "--base-url", s.url],
        NO_KEYS,
      );
      expect({ text, code: r.code }).toEqual({ text, code: 2 });
      expect(r.err).toMatch(
        /exists and is not a results file of this input .*nothing was changed/,
      );
      expect(readFileSync(notes, "utf8")).toBe(text);
      expect(existsSync(`${notes}.journal`)).toBe(false);
    }
    expect(s.stats().received).toBe(0);
  });

  it("another shard's output is refused", async () => {
    const { d, input } = batchFiles(anthropicLines(4).join("\n"));
    const r = await runCli([
      "run",
      input,
      "--shard",
      "1/2",
      "-o",
      join(d, "in.shard-2-of-2.results.jsonl"),
      "--base-url",
      "http://127.0.0.1:1",
    ], NO_KEYS);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(
      /is the output of shard 2\/2, not of this run's --shard 1\/2/,
    );
  });
});

describe("paceline run: every path checked before the first request", () => {
  it("missing or unusable folders and files: exit 2, a clear sentence, nothing sent", async () => {
    const s = await sim();
    const { d, input } = batchFiles(anthropicLines(3).join("\n"));
    mkdirSync(join(d, "folder"));
    const base = ["--base-url", s.url];
    for (
      const [args, msg] of [
        [
          ["-o", join(d, "nodir", "out.jsonl")],
          /-o .*: the folder .*nodir does not exist\. Nothing was sent\./,
        ],
        [["-o", d], /-o .* is a folder: give a file name/],
        [
          ["--report", join(d, "nodir", "r.html")],
          /--report .*: the folder .*nodir does not exist/,
        ],
        [["--report", join(d, "folder")], /--report .* is a folder/],
        [["--report", input], /--report .* is the input/],
      ] as const
    ) {
      for (const dry of [[], ["--dry-run"]]) {
        const r = await runCli(
          ["run", input, ...args, ...base, ...dry],
          NO_KEYS,
        );
        expect({ args, dry, code: r.code }).toEqual({ args, dry, code: 2 });
        expect(r.err).toMatch(msg);
      }
    }
    const folder = await runCli(["run", join(d, "folder"), ...base], NO_KEYS);
    expect(folder.code).toBe(2);
    expect(folder.err).toMatch(
      /folder is a folder: give a JSONL file, one request per line/,
    );
    expect(s.stats().received).toBe(0);
    expect(existsSync(join(d, "in.results.jsonl.journal"))).toBe(false);
  });

  it("a UTF-8 byte order mark before the first line is ignored", async () => {
    const s = await sim();
    const { input, output } = batchFiles(
      "\ufeff" + anthropicLines(3).join("\n"),
    );
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--quiet",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(ids(3));
  });
});

describe("paceline run: flags", () => {
  it("--flag=value works, run --help prints run's help, a misspelt flag gets a did-you-mean", async () => {
    const s = await sim();
    const { input, output } = batchFiles(anthropicLines(3).join("\n"));
    const eq = await runCli(
      [
        "run",
        input,
        `-o`,
        output,
        `--base-url=${s.url}`,
        "--rpm=50",
        "--quiet",
        "--dry-run",
      ],
      NO_KEYS,
    );
    expect(eq.code).toBe(0);
    expect(eq.out).toMatch(/everything fits in the first window/);
    const help = await runCli(["run", "--help"], NO_KEYS);
    expect(help.code).toBe(0);
    for (
      const flag of ["--margin-ms", "--progress-ms", "--dry-run", "--report"]
    ) {
      expect(help.out).toContain(flag);
    }
    const typo = await runCli(["run", input, "--concurency", "4"], NO_KEYS);
    expect(typo.code).toBe(2);
    expect(typo.err).toMatch(
      /unknown option --concurency; did you mean --concurrency\?/,
    );
    const far = await runCli(["run", input, "--banana"], NO_KEYS);
    expect(far.err).toMatch(
      /unknown option --banana \(see paceline run --help\)/,
    );
  });
});

describe("paceline run --dry-run tells the truth", () => {
  it("its least time is a lower bound of the real run, in the run's units", async () => {
    const s = await sim({ limits: { requests: 10, windowMs: 1000 } });
    const { input, output } = batchFiles(anthropicLines(40).join("\n"));
    const args = [
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--rpm",
      "10",
      "--otpm",
      "400",
      "--window-ms",
      "1000",
      "--quiet",
    ];
    const plan = await runCli([...args, "--dry-run"], NO_KEYS);
    expect(plan.code).toBe(0);
    // 40 requests at 10 per 1 s: the last 10 go 3 s after the first.
    const m = /at least (\d+)s: --rpm 10 \(requests per 1s\) binds/.exec(
      plan.out,
    );
    expect(m).not.toBeNull();
    expect(plan.out).toMatch(/output tokens as 0/);
    const t0 = performance.now();
    const r = await runCli(args, NO_KEYS);
    const took = performance.now() - t0;
    expect(r.code).toBe(0);
    expect(Number(m![1]) * 1000).toBeLessThanOrEqual(took);
  });
});

describe("paceline run: honest stats after a stop", () => {
  it(
    "Ctrl-C: lines not run are cancelled, not failed; nothing refused is counted as sent; the report says where it stopped",
    async () => {
      // 529s on a fifth of the attempts: at the stop some lines sleep before
      // a retry (aborted: never sent again) and some are in flight.
      const s = await sim({
        latency: { baseMs: 150 },
        faults: { overloaded529: 0.2 },
        seed: 3,
      });
      const { d, input, output } = batchFiles(anthropicLines(80).join("\n"));
      const report = join(d, "run.html");
      const run = spawnCli([
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--concurrency",
        "4",
        "--report",
        report,
        "--progress-ms",
        "100000",
      ]);
      // Stop once 9 results are journaled (the journal gets each at once;
      // the ordered output can sit behind a line in backoff while the rest
      // finish): the run is surely mid-way.
      const deadline = Date.now() + 20_000;
      const journal = `${output}.journal`;
      while (
        (!existsSync(journal) ||
          readFileSync(journal, "utf8").split("\n").length < 10) &&
        Date.now() < deadline
      ) {
        await new Promise((r) => setTimeout(r, 10));
      }
      run.child.kill("SIGINT");
      expect(await run.exited).toBe(130);
      const err = run.err();
      const calls =
        /calls +(\d+) \((\d+) ok, (\d+) failed(?:, (\d+) cancelled)?/.exec(err);
      expect(calls, err).not.toBeNull();
      const [, total, ok, failed, cancelled] = calls!.map(Number);
      // Only a request in flight at the stop can fail: it is not retried.
      expect(failed).toBeLessThanOrEqual(4);
      expect(cancelled).toBeGreaterThan(0);
      expect(ok! + failed! + cancelled!).toBe(total);
      expect(err).not.toMatch(/network/);
      const sent = Number(/requests +(\d+) sent/.exec(err)![1]);
      expect(sent).toBe(s.stats().received); // what was counted is what arrived
      // Every result of this run is in the journal (the run did not finish).
      const results = readFileSync(`${output}.journal`, "utf8").split("\n")
        .filter(Boolean).length;
      expect(err).toMatch(
        new RegExp(
          `interrupted\\. .*; ${
            80 - results
          } lines not run \\(stopped by SIGINT\\)`,
        ),
      );
      expect(err).not.toMatch(/aborted/);
      const page = readFileSync(report, "utf8");
      expect(page).toMatch(
        /interrupted by SIGINT: \d+ of 80 lines in the output, \d+ not run/,
      );
    },
    30_000,
  );
});
