// Tests of the `paceline` CLI against the simulator.
import { describe, expect, it } from "vitest";
import { sim } from "./test/sims.ts";
import {
  anthropicLines,
  anthropicRows,
  batchFiles,
  NO_KEYS,
  openaiLine,
  openaiLines,
  readResults,
  runCli,
  spawnCli,
} from "./test/cli_helpers.ts";
import {
  appendFileSync,
  existsSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { dirname, join } from "node:path";
import { estimateCost } from "./mod.ts";

describe("paceline run", () => {
  it("Anthropic batch format, with faults: every custom_id once, in order, right shapes", async () => {
    const s = await sim({
      faults: { overloaded529: 0.1, error500: 0.05 },
      seed: 5,
    });
    const { input, output } = batchFiles(anthropicLines(60).join("\n") + "\n");
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--retries",
      "6",
      "--quiet",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    const rows = readResults(output);
    expect(rows.map((x) => x.custom_id)).toEqual(
      anthropicLines(60).map((l) => JSON.parse(l).custom_id),
    );
    for (const row of rows) {
      const result = row.result as {
        type: string;
        message: { type: string; usage: unknown };
      };
      expect(result.type).toBe("succeeded");
      expect(result.message.type).toBe("message");
      expect(result.message.usage).toBeTruthy();
    }
    expect(s.stats().faults.overloaded529 + s.stats().faults.error500)
      .toBeGreaterThan(0);
  });

  it("Anthropic batch format, streaming: messages assembled from the events", async () => {
    const s = await sim();
    const { input, output } = batchFiles(anthropicLines(12).join("\n"));
    const r = await runCli(
      ["run", input, "-o", output, "--base-url", s.url, "--stream", "--quiet"],
      NO_KEYS,
    );
    expect(r.code).toBe(0);
    const rows = readResults(output) as {
      result: {
        type: string;
        message: {
          content: { type: string; text: string }[];
          stop_reason: string;
          usage: { input_tokens: number; output_tokens: number };
        };
      };
    }[];
    expect(rows.length).toBe(12);
    let out = 0;
    for (const row of rows) {
      expect(row.result.type).toBe("succeeded");
      expect(row.result.message.content[0]!.type).toBe("text");
      expect(row.result.message.content[0]!.text.length).toBeGreaterThan(0);
      expect(row.result.message.stop_reason).toBeTruthy();
      out += row.result.message.usage.output_tokens;
    }
    expect(out).toBe(s.stats().usage.outputTokens);
  });

  it("OpenAI batch format, streaming: results in the OpenAI shape", async () => {
    const s = await sim();
    const { input, output } = batchFiles(openaiLines(25).join("\n"));
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      `${s.url}/v1`,
      "--stream",
      "--quiet",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    const rows = readResults(output);
    expect(rows.map((x) => x.custom_id)).toEqual(
      openaiLines(25).map((l) => JSON.parse(l).custom_id),
    );
    const first = rows[0] as {
      id: string;
      response: {
        status_code: number;
        request_id: string;
        body: {
          choices: { message: { content: string } }[];
          usage: { completion_tokens: number };
        };
      };
      error: null;
    };
    expect(first.id).toMatch(/^batch_req_/);
    expect(first.error).toBeNull();
    expect(first.response.status_code).toBe(200);
    expect(first.response.request_id).toMatch(/^req_/);
    expect(first.response.body.choices[0]!.message.content.length)
      .toBeGreaterThan(0);
    expect(first.response.body.usage.completion_tokens).toBeGreaterThan(0);
  });

  it("errored requests are written as errored results; exit code 1", async () => {
    const s = await sim({
      perClientFaults: { "req-3": { status: 500 }, "req-4": { status: 503 } },
    });
    const { input, output } = batchFiles(anthropicLines(6).join("\n"));
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--quiet",
      "--retries",
      "0",
    ], NO_KEYS);
    expect(r.code).toBe(1);
    const rows = anthropicRows(output);
    expect(rows.map((x) => x.result.type)).toEqual([
      "succeeded",
      "succeeded",
      "succeeded",
      "errored",
      "errored",
      "succeeded",
    ]);
    expect(rows[3]!.result.error!.error.type).toBe("api_error");
    expect(existsSync(`${output}.journal`)).toBe(false); // complete: no journal
  });

  const malformed: [string, string[], RegExp][] = [
    ["bad JSON at line 7", [
      ...anthropicLines(6),
      "{not json",
      ...anthropicLines(2).slice(1),
    ], /line 7: invalid JSON/],
    ["missing custom_id", [
      anthropicLines(1)[0]!,
      JSON.stringify({ params: { messages: [], max_tokens: 5 } }),
    ], /line 2: "custom_id" must be a non-empty string: it is missing/],
    ["a numeric custom_id", [
      JSON.stringify({
        custom_id: 7,
        params: {
          model: "m",
          max_tokens: 5,
          messages: [{ role: "user", content: "x" }],
        },
      }),
    ], /line 1: "custom_id" must be a non-empty string: received 7/],
    ["a JSON array file", [
      JSON.stringify([JSON.parse(anthropicLines(1)[0]!)]),
    ], /line 1: a JSON array; paceline reads JSONL: one request per line/],
    ["a pretty-printed .json file", [
      JSON.stringify(JSON.parse(anthropicLines(1)[0]!), null, 2),
    ], /line 1: invalid JSON .*; paceline reads JSONL: one request per line/],
    ["an empty messages array", [
      JSON.stringify({
        custom_id: "x",
        params: { model: "m", max_tokens: 5, messages: [] },
      }),
    ], /line 1: "params.messages" is empty: it needs at least one message/],
    ["a negative max_tokens", [
      anthropicLines(1)[0]!,
      JSON.stringify({
        custom_id: "x",
        params: {
          model: "m",
          max_tokens: -5,
          messages: [{ role: "user", content: "x" }],
        },
      }),
    ], /line 2: "params.max_tokens" must be a positive integer: received -5/],
    [
      "a max_tokens of 1e400",
      [
        `{"custom_id":"x","params":{"model":"m","max_tokens":1e400,"messages":[{"role":"user","content":"x"}]}}`,
      ],
      /line 1: "params.max_tokens" must be a positive integer: received Infinity/,
    ],
    [
      "a fractional max_completion_tokens",
      [
        JSON.stringify({
          custom_id: "c",
          url: "/v1/chat/completions",
          body: {
            model: "m",
            max_completion_tokens: 2.5,
            messages: [{ role: "user", content: "x" }],
          },
        }),
      ],
      /line 1: "body.max_completion_tokens" must be a positive integer: received 2.5/,
    ],
    [
      "duplicate custom_id",
      [...anthropicLines(3), anthropicLines(2)[1]!],
      /line 4: duplicate custom_id "req-1" \(first on line 2\)/,
    ],
    [
      "wrong url",
      [
        JSON.stringify({
          custom_id: "x",
          method: "POST",
          url: "/v1/images/generations",
          body: { prompt: "a cat" },
        }),
      ],
      /line 1: "url" must be one of \/v1\/chat\/completions, \/v1\/responses, \/v1\/completions, \/v1\/embeddings, \/v1\/moderations: received "\/v1\/images\/generations"/,
    ],
    [
      "embeddings without input",
      [
        openaiLine("/v1/embeddings", 0),
        JSON.stringify({
          custom_id: "e",
          method: "POST",
          url: "/v1/embeddings",
          body: { model: "emb" },
        }),
      ],
      /line 2: "body" needs "input" \(a string or a non-empty array\) for \/v1\/embeddings/,
    ],
    [
      "Responses without input",
      [
        JSON.stringify({
          custom_id: "r",
          method: "POST",
          url: "/v1/responses",
          body: { model: "m", messages: [{ role: "user", content: "hi" }] },
        }),
      ],
      /line 1: "body" needs "input" \(a string or a non-empty array\) for \/v1\/responses/,
    ],
    ["completions with an empty prompt", [
      JSON.stringify({
        custom_id: "c",
        url: "/v1/completions",
        body: { model: "m", prompt: "" },
      }),
    ], /line 1: "body" needs "prompt" .* for \/v1\/completions/],
    ["moderations with an empty input list", [
      JSON.stringify({
        custom_id: "m",
        url: "/v1/moderations",
        body: { input: [] },
      }),
    ], /line 1: "body" needs "input" .* for \/v1\/moderations/],
    ["chat without messages", [
      JSON.stringify({
        custom_id: "c",
        url: "/v1/chat/completions",
        body: { model: "m", input: "hi" },
      }),
    ], /line 1: "body" needs a "messages" array for \/v1\/chat\/completions/],
    [
      "mixed formats",
      [anthropicLines(1)[0]!, openaiLines(1)[0]!],
      /line 2: an OpenAI batch \("body"\) line in a file of Anthropic batch \("params"\) lines: one format per file/,
    ],
    ["empty file", [""], /no requests \(the file is empty\)/],
    ["missing max_tokens", [
      JSON.stringify({
        custom_id: "x",
        params: { model: "m", messages: [{ role: "user", content: "x" }] },
      }),
    ], /line 1: "params.max_tokens" is required/],
  ];
  for (const [name, rows, message] of malformed) {
    it(`rejects ${name} with exit 2 and sends nothing`, async () => {
      const s = await sim();
      const { d, input } = batchFiles(rows.join("\n"));
      const r = await runCli([
        "run",
        input,
        "-o",
        join(d, "out.jsonl"),
        "--base-url",
        s.url,
      ], NO_KEYS);
      expect(r.code).toBe(2);
      expect(r.err).toMatch(message);
      expect(s.stats().received).toBe(0);
    });
  }

  it("a request that can never fit the limits is an input error before anything is sent", async () => {
    const s = await sim();
    const { input } = batchFiles(anthropicLines(3).join("\n"));
    const r = await runCli(
      ["run", input, "--base-url", s.url, "--otpm", "10"],
      NO_KEYS,
    );
    expect(r.code).toBe(2);
    expect(r.err).toMatch(
      /line 1: "max_tokens": 40 can never fit --otpm 10 \(output tokens per minute\): lower "max_tokens" on that line or raise --otpm/,
    );
    expect(s.stats().received).toBe(0);
    // --dry-run says the same, with the same exit code.
    const dry = await runCli(
      ["run", input, "--base-url", s.url, "--otpm", "10", "--dry-run"],
      NO_KEYS,
    );
    expect(dry.code).toBe(2);
    expect(dry.err).toMatch(/line 1: "max_tokens": 40 can never fit --otpm 10/);
    const itpm = await runCli(
      ["run", input, "--base-url", s.url, "--itpm", "2", "--dry-run"],
      NO_KEYS,
    );
    expect(itpm.err).toMatch(
      /line 1: its input \(~\d+ tokens, estimated\) can never fit --itpm 2 \(input tokens per minute\): shorten it or raise --itpm/,
    );
    expect(s.stats().received).toBe(0);
  });

  it("without a key or --base-url, refuses clearly and never uses the simulator", async () => {
    const { d, input } = batchFiles(anthropicLines(2).join("\n"));
    const r = await runCli(["run", input], NO_KEYS);
    expect(r.code).toBe(2);
    expect(r.err).toMatch(
      /no API key: set ANTHROPIC_API_KEY.*Nothing was sent/,
    );
    expect(existsSync(join(d, "in.results.jsonl"))).toBe(false);
  });

  it("bad flags exit 2 naming the flag and value", async () => {
    for (
      const [args, msg] of [
        [
          ["run", "x.jsonl", "--rpm", "fast"],
          /--rpm needs a number >= 1: received "fast"/,
        ],
        [
          ["run", "x.jsonl", "--concurrency", "0"],
          /--concurrency needs a number >= 1: received "0"/,
        ],
        [
          ["run", "x.jsonl", "--provider", "google"],
          /--provider must be anthropic or openai/,
        ],
        [["run", "x.jsonl", "--nope"], /unknown option --nope/],
        [["launch"], /unknown command "launch"/],
        [
          ["run", "missing.jsonl", "--base-url", "http://127.0.0.1:1"],
          /input file not found/,
        ],
      ] as const
    ) {
      const r = await runCli([...args], NO_KEYS);
      expect({ args, code: r.code }).toEqual({ args, code: 2 });
      expect(r.err).toMatch(msg);
    }
  });

  it("progress lines without a TTY carry the counts; the API key never appears", async () => {
    const key = "sk-ant-cli-SECRET-777";
    const s = await sim({ apiKey: key, latency: { baseMs: 30 } });
    const { d, input, output } = batchFiles(anthropicLines(30).join("\n"));
    const r = await runCli(
      [
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--progress-ms",
        "50",
        "--concurrency",
        "2",
        "--rpm",
        "600",
        "--itpm",
        "100000",
        "--window-ms",
        "2000",
      ],
      { ...NO_KEYS, ANTHROPIC_API_KEY: key },
    );
    expect(r.code).toBe(0);
    // Rates in the limits' own unit: the window's use against its limit.
    const shown = [
      ...r.err.matchAll(
        /\d+\/30 \(\d+\.\d%\) ETA \S+ · req (\d+)\/600 per 2s · in tok (\d+)\/100k per 2s · 429s 0 · retries 0 · errors 0/g,
      ),
    ];
    expect(shown.length).toBeGreaterThan(0);
    for (const m of shown) {
      expect(Number(m[1])).toBeLessThanOrEqual(30);
      expect(Number(m[2])).toBeLessThanOrEqual(100_000);
    }
    expect(r.err).toMatch(/30\/30 \(100\.0%\)/);
    expect(r.err).toMatch(/calls\s+30 \(30 ok/);
    expect(r.out + r.err + readFileSync(output, "utf8")).not.toContain(key);
    // A wrong key: a fatal stop, and still no key in any output.
    const bad = await runCli([
      "run",
      input,
      "-o",
      join(d, "bad.jsonl"),
      "--base-url",
      s.url,
    ], {
      ...NO_KEYS,
      ANTHROPIC_API_KEY: "sk-ant-WRONG-SECRET-1",
    });
    expect(bad.code).toBe(3);
    expect(bad.err).toMatch(/API key was refused \(HTTP 401\)/);
    expect(
      bad.out + bad.err + readFileSync(join(d, "bad.jsonl"), "utf8") +
        readFileSync(join(d, "bad.jsonl.journal"), "utf8"),
    ).not.toContain("WRONG-SECRET");
  });
});

describe("paceline run: interrupt and resume", () => {
  it(
    "SIGINT stops cleanly; a re-run resumes; a torn last line is cut; nothing lost or duplicated",
    async () => {
      const s = await sim({ latency: { baseMs: 150 } });
      const n = 60;
      const { d, input, output } = batchFiles(
        anthropicLines(n).join("\n") + "\n",
      );
      const { child, exited, err: stderr } = spawnCli([
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--concurrency",
        "4",
      ]);
      // Interrupt once some results are out, however slow this machine is.
      for (let i = 0; i < 200; i++) {
        await new Promise((r) => setTimeout(r, 50));
        if (
          existsSync(output) &&
          readFileSync(output, "utf8").split("\n").length > 5
        ) break;
      }
      child.kill("SIGINT");
      const code = await exited;
      const err = stderr();
      expect(code).toBe(130);
      expect(err).toMatch(/stopping: finishing requests in flight/);
      expect(err).toMatch(/interrupted\. Results kept: \d+ of 60 in order/);
      const partial = readResults(output);
      expect(partial.length).toBeGreaterThan(0);
      expect(partial.length).toBeLessThan(n);
      // Simulate a kill -9 in the middle of a write.
      appendFileSync(output, '{"custom_id":"req-');
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
      const rows = readResults(output);
      expect(rows.map((x) => x.custom_id)).toEqual(
        Array.from({ length: n }, (_, i) => `req-${i}`),
      );
      // A results file of another input is refused.
      const other = join(d, "other.jsonl");
      writeFileSync(other, openaiLines(3).join("\n"));
      const mismatch = await runCli([
        "run",
        other,
        "-o",
        output,
        "--base-url",
        s.url,
      ], NO_KEYS);
      expect(mismatch.code).toBe(2);
      expect(mismatch.err).toMatch(/not a results file of this input/);
    },
    20_000,
  );
});

describe("paceline demo", () => {
  it(
    "runs a small batch on the built-in simulator with no key and no network",
    async () => {
      const r = await runCli(["demo", "--requests", "30"], NO_KEYS);
      expect(r.code).toBe(0);
      expect(r.err).toMatch(/30 requests \(a third in Chinese\)/);
      expect(r.out).toMatch(/simulator: 30 accepted, 0 refused by rate limits/);
      const path = /results: (\S+)/.exec(r.out)![1]!;
      expect(readResults(path).length).toBe(30);
    },
    20_000,
  );
});

/** Lines of a journal file (complete ones), parsed. */
function journalRows(path: string): { i: number; e: number; r: unknown }[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8").split("\n").filter(Boolean).map((l) =>
    JSON.parse(l)
  );
}

const ids = (n: number) => Array.from({ length: n }, (_, i) => `req-${i}`);

/** Starts the built CLI as a child process (so it can be killed). */

describe("paceline run: journal, stalls and fatal stops", () => {
  it("a slow, failing early line holds nothing back; output still in input order", async () => {
    const s = await sim({
      latency: { baseMs: 2 },
      perClientFaults: { "req-0": { status: 529, delayMs: 3000, times: 1 } },
    });
    const { input, output } = batchFiles(anthropicLines(400).join("\n"));
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--quiet",
      "--concurrency",
      "4",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    const order = s.stats().completed;
    // Every other line finished while line 0 was slow and then backing off
    // (an ordered pipeline would stall once its buffer filled behind it).
    expect(order.length).toBe(400);
    expect(order.at(-1)).toBe("req-0");
    expect(s.stats().perClient["req-0"]!.attempts).toBe(2);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(ids(400));
    expect(existsSync(`${output}.journal`)).toBe(false);
  });

  it(
    "kill -9 at ~40 % under 8 % 529s, then rerun: every line once, in order; at most ~2 × concurrency redone",
    async () => {
      const s = await sim({
        latency: { baseMs: 30 },
        faults: { overloaded529: 0.08 },
        retryAfterMs: true,
        seed: 11,
      });
      const n = 300;
      const concurrency = 8;
      const { input, output } = batchFiles(anthropicLines(n).join("\n") + "\n");
      const journal = `${output}.journal`;
      const run = spawnCli([
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--concurrency",
        String(concurrency),
        "--quiet",
      ]);
      for (let i = 0; i < 400; i++) {
        await new Promise((r) => setTimeout(r, 25));
        if (journalRows(journal).length >= 0.4 * n) break;
      }
      run.child.kill("SIGKILL");
      expect(await run.exited).toBe(null); // killed, no clean-up ran
      const before = journalRows(journal).length;
      expect(before).toBeGreaterThan(0);
      expect(before).toBeLessThan(n);
      const r = await runCli([
        "run",
        input,
        "-o",
        output,
        "--base-url",
        s.url,
        "--concurrency",
        String(concurrency),
        "--quiet",
      ], NO_KEYS);
      expect(r.code).toBe(0);
      expect(readResults(output).map((x) => x.custom_id)).toEqual(ids(n));
      expect(existsSync(journal)).toBe(false);
      const st = s.stats();
      const redone = Object.values(st.perClient).filter((c) => c.succeeded > 1);
      expect(redone.length).toBeLessThanOrEqual(2 * concurrency);
      for (const id of ids(n)) {
        expect(st.perClient[id]!.succeeded).toBeGreaterThanOrEqual(1);
      }
      expect(st.faults.overloaded529).toBeGreaterThan(0);
    },
    30_000,
  );

  it("spend limit reached: exit 3, nothing more sent, no quota results; a healthy rerun sends only what is left", async () => {
    const concurrency = 4;
    const s = await sim({ quotaAfter: 30, latency: { baseMs: 5 } });
    const n = 80;
    const { input, output } = batchFiles(anthropicLines(n).join("\n"));
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--concurrency",
      String(concurrency),
    ], NO_KEYS);
    expect(r.code).toBe(3);
    expect(r.err).toMatch(
      /stopped at line \d+: the account's quota.*enforced_spend_limit_reached/,
    );
    expect(r.err).toMatch(/run the same command again/);
    const st = s.stats();
    expect(st.rejected.quota).toBeGreaterThan(0);
    expect(st.rejected.quota).toBeLessThanOrEqual(2 * concurrency);
    // Nothing recorded is a quota refusal; everything recorded succeeded.
    const written = existsSync(output) && readFileSync(output, "utf8")
      ? readResults(output)
      : [];
    const journaled = journalRows(`${output}.journal`);
    for (const row of written) {
      expect((row.result as { type: string }).type).toBe("succeeded");
    }
    for (const row of journaled) expect(row.e).toBe(0);
    expect(new Set(journaled.map((x) => x.i)).size).toBe(30);

    const healthy = await sim({ latency: { baseMs: 5 } });
    const again = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      healthy.url,
      "--quiet",
    ], NO_KEYS);
    expect(again.code).toBe(0);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(ids(n));
    const first = s.stats().perClient;
    const second = healthy.stats().perClient;
    for (const id of ids(n)) {
      const done = (first[id]?.succeeded ?? 0) > 0;
      expect(second[id] === undefined).toBe(done); // no success sent twice
    }
    expect(healthy.stats().received).toBe(n - 30);
  });

  it("a wrong key (401): exit 3 after at most ~2 × concurrency requests; the right key finishes the job", async () => {
    const s = await sim({ apiKey: "sk-right-key-1", latency: { baseMs: 5 } });
    const { input, output } = batchFiles(anthropicLines(50).join("\n"));
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--concurrency",
      "4",
    ], { ...NO_KEYS, ANTHROPIC_API_KEY: "sk-wrong-key-2" });
    expect(r.code).toBe(3);
    expect(r.err).toMatch(/API key was refused \(HTTP 401\)/);
    expect(r.err).toMatch(/Check the key in ANTHROPIC_API_KEY/);
    expect(r.err).not.toContain("sk-wrong-key-2");
    expect(s.stats().rejected.auth).toBeLessThanOrEqual(8);
    expect(readFileSync(output, "utf8")).toBe("");
    const ok = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--quiet",
    ], { ...NO_KEYS, ANTHROPIC_API_KEY: "sk-right-key-1" });
    expect(ok.code).toBe(0);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(ids(50));
    expect(s.stats().accepted).toBe(50);
  });

  it("a server's 30-year retry-after is obeyed: that line errored at once, saying how long; no hammering", async () => {
    const s = await sim({
      perClientFaults: { "req-1": { status: 429, retryAfter: "946080000" } },
    });
    const { input, output } = batchFiles(anthropicLines(4).join("\n"));
    const r = await runCli(
      ["run", input, "-o", output, "--base-url", s.url, "--quiet"],
      NO_KEYS,
    );
    expect(r.code).toBe(1);
    const rows = anthropicRows(output);
    expect(rows.map((x) => x.result.type)).toEqual([
      "succeeded",
      "errored",
      "succeeded",
      "succeeded",
    ]);
    expect(s.stats().perClient["req-1"]!.attempts).toBe(1);
    expect(r.err).toBe("");
    expect(rows[1]!.result.error!.error.message).toBe(
      "the server asked to wait 30 years; not retried (longer than 2m00s): Scripted 429",
    );
  });

  it("--dry-run prints exact totals and the least time, naming the binding limit; sends nothing", async () => {
    const s = await sim();
    const lines = anthropicLines(10);
    const { input, output } = batchFiles(lines.join("\n"));
    const input_tokens = lines.reduce(
      (a, l) =>
        a +
        estimateCost("https://x/v1/messages", JSON.parse(l).params)
          .inputTokens!,
      0,
    );
    const args = ["run", input, "-o", output, "--base-url", s.url, "--dry-run"];
    // rpm 4: 10 requests need 3 windows → 2 min; otpm 100: 400 → 4 windows
    // → 3 min, but only if every answer used its max_tokens.
    const r = await runCli([...args, "--rpm", "4", "--otpm", "100"], NO_KEYS);
    expect(r.code).toBe(0);
    expect(r.out).toBe(
      `10 requests · ~${input_tokens} input tokens (estimated) · ≤ 400 output tokens (max_tokens)
→ at least 2m00s: --rpm 4 (requests per minute) binds; with every answer at its max_tokens, up to 3m00s, set by --otpm 100 (output tokens per minute).
(The bound counts output tokens as 0: an answer's length is known only after it.)
`,
    );
    const rpm = await runCli([...args, "--rpm", "2", "--otpm", "100"], NO_KEYS);
    expect(rpm.out).toMatch(
      /at least 4m00s: --rpm 2 \(requests per minute\) binds\.\n/,
    );
    // Under --window-ms the units are the run's own.
    const short = await runCli(
      [...args, "--rpm", "4", "--window-ms", "2000"],
      NO_KEYS,
    );
    expect(short.out).toMatch(/at least 4s: --rpm 4 \(requests per 2s\) binds/);
    const none = await runCli(args, NO_KEYS);
    expect(none.out).toMatch(/no limits given/);
    expect(s.stats().received).toBe(0);
    expect(existsSync(output)).toBe(false);
    expect(existsSync(`${output}.journal`)).toBe(false);
    const { input: bad } = batchFiles(`${lines[0]}\n{oops\n`);
    const b = await runCli(["run", bad, "--dry-run"], NO_KEYS);
    expect(b.code).toBe(2);
    expect(b.err).toMatch(/line 2: invalid JSON/);
  });

  it("--provider azure: OpenAI batch lines to deployments with an api-version and api-key, --rpm's short windows kept: every line once, in order, ≤ 1 × 429; an Azure base URL alone picks it; mistakes are named", async () => {
    const s = await sim({
      limits: { requests: 60, windowMs: 2000 },
      apiKey: "az-key",
    });
    const lines = openaiLines(120);
    const { input, output } = batchFiles(lines.join("\n"));
    const args = [
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--api-version",
      "2024-10-21",
      "--rpm",
      "60",
      "--window-ms",
      "2000",
      "--margin-ms",
      "120",
      "--concurrency",
      "16",
    ];
    const env = { ...NO_KEYS, AZURE_OPENAI_API_KEY: "az-key" };
    const r = await runCli([...args, "--provider", "azure"], env);
    expect(r.code).toBe(0);
    const rows = readFileSync(output, "utf8").trim().split("\n").map((l) =>
      JSON.parse(l)
    );
    expect(rows.map((x) => x.custom_id)).toEqual(
      lines.map((l) => JSON.parse(l).custom_id),
    );
    expect(rows.every((x) => x.response?.status_code === 200)).toBe(true);
    const st = s.stats();
    expect(st.accepted).toBe(120);
    expect(st.rateLimited.requests).toBeLessThanOrEqual(1);
    expect(st.rejected.auth).toBe(0);
    // Mistakes, each named before anything is sent.
    const anthropicInput = batchFiles(anthropicLines(2).join("\n"));
    const wrong = await runCli(
      ["run", anthropicInput.input, "--dry-run", "--deployment", "d1"],
      env,
    );
    expect(wrong.code).toBe(2);
    expect(wrong.err).toMatch(/--deployment is for --provider azure/);
    const noEndpoint = await runCli(
      [
        "run",
        input,
        "-o",
        join(dirname(output), "x.jsonl"),
        "--provider",
        "azure",
      ],
      env,
    );
    expect(noEndpoint.code).toBe(2);
    expect(noEndpoint.err).toMatch(
      /--provider azure needs the resource's endpoint: --base-url https:\/\/<resource>\.openai\.azure\.com, or set AZURE_OPENAI_ENDPOINT/,
    );
    const badVersion = await runCli([...args, "--api-version", "latest"], env);
    expect(badVersion.code).toBe(2);
    expect(badVersion.err).toMatch(
      /--api-version needs a version such as 2024-10-21: received "latest"/,
    );
    // An Azure host alone picks Azure (so --deployment is taken).
    const picked = await runCli([
      "run",
      input,
      "--dry-run",
      "--base-url",
      "https://my-res.openai.azure.com",
      "--deployment",
      "d1",
    ], env);
    expect(picked.code).toBe(0);
    const notAzure = await runCli([
      "run",
      input,
      "--dry-run",
      "--base-url",
      "https://relay.example.com/v1",
      "--deployment",
      "d1",
    ], env);
    expect(notAzure.code).toBe(2);
    expect(notAzure.err).toMatch(/--deployment is for --provider azure/);
    expect(s.stats().received).toBe(120 + st.rateLimited.requests);
  });

  it("Gemini batch lines with --model: results in Gemini's format, in order; limits given: 0 × 429; none given: learned from the 429 bodies (≤ 3 × 429); a spent per-day quota stops the run (exit 3, named, with its reset), results kept, and a rerun finishes", async () => {
    const lines = Array.from({ length: 60 }, (_, i) =>
      JSON.stringify({
        key: `g-${i}`,
        request: {
          contents: [{
            role: "user",
            parts: [{ text: `Question ${i}: why pace?` }],
          }],
          generationConfig: { maxOutputTokens: 20 },
        },
      }));
    const limits = { requests: 20, inputTokens: 400, windowMs: 2000 };
    const run = async (
      extra: string[],
      s: { url: string },
      files = batchFiles(lines.join("\n")),
    ) => {
      const r = await runCli([
        "run",
        files.input,
        "-o",
        files.output,
        "--base-url",
        `${s.url}/v1beta`,
        "--model",
        "gemini-sim",
        "--window-ms",
        "2000",
        "--margin-ms",
        "150",
        "--concurrency",
        "8",
        ...extra,
      ], { ...NO_KEYS, GEMINI_API_KEY: "gk" });
      return { ...r, output: files.output, files };
    };
    const rows = (path: string) =>
      readFileSync(path, "utf8").trim().split("\n").map((l) => JSON.parse(l));
    // Limits given.
    const s = await sim({
      limits,
      apiKey: "gk",
      faults: { unavailable503: 0.05 },
      seed: 5,
    });
    const given = await run(["--rpm", "20", "--itpm", "400"], s);
    expect(given.code).toBe(0);
    const out = rows(given.output);
    expect(out.map((r) => r.key)).toEqual(lines.map((_, i) => `g-${i}`));
    expect(
      out.every((r) => r.response?.candidates?.[0]?.content?.parts?.[0]?.text),
    ).toBe(true);
    expect(s.stats().rateLimited.requests + s.stats().rateLimited.inputTokens)
      .toBe(0);
    expect(s.stats().faults.unavailable503).toBeGreaterThan(0);
    // None given: the 429s' QuotaFailure says them.
    const t = await sim({
      limits,
      apiKey: "gk",
      faults: { unavailable503: 0.05 },
      seed: 6,
    });
    const learned = await run([], t);
    expect(learned.code).toBe(0);
    expect(rows(learned.output).map((r) => r.key)).toEqual(
      out.map((r) => r.key),
    );
    const refused = t.stats().rateLimited.requests +
      t.stats().rateLimited.inputTokens;
    expect(refused).toBeGreaterThan(0);
    expect(refused).toBeLessThanOrEqual(3);
    // A per-day quota of 25 requests: exit 3 naming it; 25 results kept.
    const u = await sim({ apiKey: "gk", quotaAfter: 25 });
    const first = await run([], u);
    expect(first.code).toBe(3);
    expect(first.err).toMatch(
      /the per-day quota GenerateRequestsPerDayPerProjectPerModel is spent; it resets at midnight Pacific time, in \d+h \d+m \(\d\d:\d\d UTC\)/,
    );
    expect(first.err).toMatch(/Wait for the quota to reset/);
    const kept = existsSync(first.output) ? rows(first.output) : [];
    const journaled = existsSync(`${first.output}.journal`)
      ? readFileSync(`${first.output}.journal`, "utf8").trim().split("\n")
        .length
      : 0;
    expect(kept.length + journaled).toBeGreaterThanOrEqual(25 - 8);
    expect(kept.every((r) => !r.error)).toBe(true); // refusals not recorded
    // "Midnight": a fresh quota; the rerun sends only the rest.
    const v = await sim({ apiKey: "gk" });
    const rest = await run([], v, first.files);
    expect(rest.code).toBe(0);
    expect(rows(first.output).map((r) => r.key)).toEqual(
      lines.map((_, i) => `g-${i}`),
    );
    expect(v.stats().received).toBeLessThanOrEqual(60 - kept.length);
  });

  it("a silent relay: the pace is found from its 429s (≤ 8 of them), shown in the summary and the report; no line written off; a line that never gets through ends by its time budget", async () => {
    const s = await sim({
      limits: { requests: 5, windowMs: 200 },
      limitHeaders: false,
    });
    const lines = anthropicLines(50);
    const { input, output } = batchFiles(lines.join("\n"));
    const report = output.replace(/\.jsonl$/, ".html");
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      s.url,
      "--concurrency",
      "8",
      "--retries",
      "1",
      "--report",
      report,
    ], NO_KEYS);
    expect(r.code).toBe(0);
    const rows = anthropicRows(output);
    expect(rows.filter((x) => x.result.type !== "succeeded")).toEqual([]);
    const refused = s.stats().rateLimited.requests;
    expect(refused).toBeGreaterThan(0); // it was paced by 429s
    expect(refused).toBeLessThanOrEqual(8);
    const found =
      /pace found +([\d.]+) requests\/s, ([\d,]+) input tokens\/s from 429s/
        .exec(r.err);
    expect(found).not.toBeNull();
    // 5 per 200 ms is 25 per second; evenly spaced, it holds below that.
    expect(Number(found![1])).toBeGreaterThan(3);
    expect(Number(found![1])).toBeLessThan(25);
    const html = readFileSync(report, "utf8");
    expect(html).toMatch(/<svg class="pace"/);
    expect(html).toMatch(/paceline found the pace from its 429s/);
    // --no-find-pace: all 8 go at once (none has answered by then), and
    // the relay refuses those past its 5.
    const u = await sim({
      limits: { requests: 5, windowMs: 200 },
      limitHeaders: false,
      latency: { baseMs: 300 },
    });
    const few = batchFiles(lines.slice(0, 8).join("\n"));
    const off = await runCli([
      "run",
      few.input,
      "-o",
      few.output,
      "--base-url",
      u.url,
      "--no-find-pace",
    ], NO_KEYS);
    expect(off.code).toBe(0);
    expect(u.stats().rateLimited.requests).toBeGreaterThanOrEqual(2);
    expect(off.err).not.toMatch(/pace found/);
    // A line that can never get through still ends, by its time budget.
    const t = await sim({
      perClientFaults: { "req-0": { status: 429, retryAfter: "1" } },
    });
    const one = batchFiles(lines.slice(0, 2).join("\n"));
    const b = await runCli([
      "run",
      one.input,
      "-o",
      one.output,
      "--base-url",
      t.url,
      "--max-rate-limited-ms",
      "1500",
    ], NO_KEYS);
    expect(b.code).toBe(1);
    const [first, second] = anthropicRows(one.output);
    expect(first!.result.type).toBe("errored");
    expect(first!.result.error?.error.message).toMatch(
      /^still rate-limited when the line.s time budget ran out \(--max-rate-limited-ms\): Scripted 429/,
    );
    expect(second!.result.type).toBe("succeeded");
  });

  it("a cached prefix larger than --itpm: --dry-run splits writes and reads and its least time matches the run; the run has 0 × 429, one write", async () => {
    // ~10,800 tokens by the simulator's count, cached; each question a few.
    const rubric = Array.from({ length: 5400 }, (_, i) => `item${i % 10}`)
      .join(" ");
    const lines = Array.from({ length: 40 }, (_, i) =>
      JSON.stringify({
        custom_id: `c-${i}`,
        params: {
          model: "claude-sim",
          max_tokens: 40,
          system: [{
            type: "text",
            text: rubric,
            cache_control: { type: "ephemeral" },
          }],
          messages: [{ role: "user", content: `Grade answer ${i}` }],
        },
      }));
    const s = await sim({
      limits: { requests: 20, inputTokens: 8000, windowMs: 2000 },
      latency: { baseMs: 100 },
    });
    const { input, output } = batchFiles(lines.join("\n"));
    // A 2-s "minute" magnifies a new process's first-request skew (its
    // first fetch starts slowly): a margin of 250 ms covers it.
    const flags = [
      "--base-url",
      s.url,
      "--rpm",
      "20",
      "--itpm",
      "8000",
      "--window-ms",
      "2000",
      "--margin-ms",
      "250",
    ];
    const plan = await runCli([
      "run",
      input,
      "-o",
      output,
      ...flags,
      "--dry-run",
    ], NO_KEYS);
    expect(plan.code).toBe(0);
    expect(plan.out).toMatch(
      /40 requests · ~[\d,]+ input tokens \(estimated: [\d,]+ written to the prompt cache, [\d,]+ read from it, [\d,]+ uncached; reads do not count toward input-token limits\)/,
    );
    expect(plan.out).toMatch(/after 1 cache write larger than --itpm 8000/);
    const least = Number(/at least (\d+)s/.exec(plan.out)?.[1]) * 1000;
    expect(least).toBe(4000);
    // In a process of its own, as users run it: the simulator here counts
    // arrivals on this event loop, which the CLI's fsyncs would delay.
    const run = spawnCli([
      "run",
      input,
      "-o",
      output,
      ...flags,
      "--concurrency",
      "32",
    ]);
    const code = await run.exited;
    expect(run.err()).not.toMatch(/can never fit/);
    expect(code).toBe(0);
    const rows = anthropicRows(output);
    expect(rows.map((x) => x.custom_id)).toEqual(lines.map((_, i) => `c-${i}`));
    expect(rows.every((x) => x.result.type === "succeeded")).toBe(true);
    const st = s.stats();
    expect(st.rateLimited).toEqual({
      requests: 0,
      inputTokens: 0,
      outputTokens: 0,
      tokens: 0,
    });
    expect(st.cache.writes).toBe(1);
    expect(st.cache.reads).toBe(39);
    const makespan = st.acceptedAt.last - st.acceptedAt.first;
    expect({ makespan, least, ok: Math.abs(makespan - least) <= 0.25 * least })
      .toMatchObject({ ok: true });
  });

  it("every OpenAI batch endpoint, mixed in one file: each line once, in order, its own shape, 0 × 429, usage equal to the server's", async () => {
    const s = await sim({
      limits: { requests: 30, inputTokens: 600, windowMs: 2000 },
    });
    const urls = [
      "/v1/chat/completions",
      "/v1/responses",
      "/v1/completions",
      "/v1/embeddings",
      "/v1/moderations",
    ];
    const lines = Array.from(
      { length: 60 },
      (_, i) => openaiLine(urls[i % 5]!, i),
    );
    const { input, output } = batchFiles(lines.join("\n") + "\n");
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      `${s.url}/v1`,
      "--rpm",
      "30",
      "--itpm",
      "600",
      "--window-ms",
      "2000",
      // The first window's requests reach the in-process simulator up to
      // ~100 ms after they are stamped (cold connections, one busy event
      // loop for both); a real minute's default margin is 300 ms.
      "--margin-ms",
      "150",
      "--progress-ms",
      "100000",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    expect(r.err).toMatch(/this file mixes endpoints/);
    const rows = readResults(output) as {
      custom_id: string;
      response: { status_code: number; body: Record<string, unknown> };
    }[];
    expect(rows.map((x) => x.custom_id)).toEqual(
      lines.map((l) => JSON.parse(l).custom_id),
    );
    const st = s.stats();
    expect(st.accepted).toBe(60);
    expect(st.received).toBe(60);
    expect(Object.values(st.rateLimited).reduce((a, b) => a + b)).toBe(0);
    for (const [i, row] of rows.entries()) {
      expect(row.response.status_code).toBe(200);
      // Five response shapes, each checked field by field below.
      // deno-lint-ignore no-explicit-any
      const b = row.response.body as Record<string, any>;
      const url = urls[i % 5];
      if (url === "/v1/chat/completions") {
        expect(b.object).toBe("chat.completion");
        expect(b.choices[0].message.content.length).toBeGreaterThan(0);
      } else if (url === "/v1/responses") {
        expect(b.object).toBe("response");
        expect(b.output[0].content[0].type).toBe("output_text");
        expect(b.usage.output_tokens).toBeGreaterThan(0);
      } else if (url === "/v1/completions") {
        expect(b.object).toBe("text_completion");
        expect(b.choices[0].text.length).toBeGreaterThan(0);
      } else if (url === "/v1/embeddings") {
        expect(b.object).toBe("list");
        expect(b.data.length).toBe(i % 3 === 0 ? 2 : 1);
        expect(b.data[0].embedding.length).toBe(8);
        expect(b.usage.prompt_tokens).toBeGreaterThan(0);
      } else {
        expect(b.results[0].flagged).toBe(false);
      }
    }
    // The report's token totals are the server's.
    const m = /tokens\s+([\d,]+) in, ([\d,]+) out/.exec(r.err);
    expect(m).not.toBeNull();
    expect(Number(m![1]!.replace(/,/g, ""))).toBe(st.usage.inputTokens);
    expect(Number(m![2]!.replace(/,/g, ""))).toBe(st.usage.outputTokens);
  });

  it("a batch mixing a fast and a slow model, limits learned: each model gets its own, 429s ≤ 5 %", async () => {
    const s = await sim({
      limits: { requests: 40, windowMs: 500 },
      modelLimits: { "gpt-slow": { requests: 8 } },
    });
    const lines = Array.from(
      { length: 120 },
      (_, i) =>
        openaiLine(
          "/v1/chat/completions",
          i,
          i % 2 ? "gpt-slow" : "gpt-fast",
        ),
    );
    const { input, output } = batchFiles(lines.join("\n") + "\n");
    const r = await runCli([
      "run",
      input,
      "-o",
      output,
      "--base-url",
      `${s.url}/v1`,
      "--window-ms",
      "500",
      "--concurrency",
      "8",
      "--quiet",
    ], NO_KEYS);
    expect(r.code).toBe(0);
    const st = s.stats();
    expect(st.accepted).toBe(120);
    const refused = Object.values(st.rateLimited).reduce((a, b) => a + b);
    expect(refused / st.received).toBeLessThanOrEqual(0.05);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(
      lines.map((l) => JSON.parse(l).custom_id),
    );
  });

  it("--dry-run --per-model: each model's totals against its own limits; the slowest model binds", async () => {
    const lines = [
      ...Array.from(
        { length: 6 },
        (_, i) => openaiLine("/v1/chat/completions", i, "big"),
      ),
      ...Array.from(
        { length: 2 },
        (_, i) => openaiLine("/v1/embeddings", i, "emb"),
      ),
    ];
    const { input } = batchFiles(lines.join("\n"));
    const cost = (l: string) => {
      const o = JSON.parse(l);
      return estimateCost(`https://x${o.url}`, o.body);
    };
    const inBig = lines.slice(0, 6).reduce(
      (a, l) => a + cost(l).inputTokens!,
      0,
    );
    const inEmb = lines.slice(6).reduce((a, l) => a + cost(l).inputTokens!, 0);
    const r = await runCli(
      ["run", input, "--dry-run", "--per-model", "--rpm", "2"],
      NO_KEYS,
    );
    expect(r.code).toBe(0);
    // big: 6 requests at 2 a minute → 3 windows → 2 min; emb: 2 → 0 s.
    expect(r.out).toBe(
      `8 requests · ~${
        inBig + inEmb
      } input tokens (estimated) · ≤ 180 output tokens (max_tokens); the limits apply to each model:
  big: 6 requests · ~${inBig} input tokens (estimated) · ≤ 180 output tokens (max_tokens) → at least 2m00s: --rpm 2 (requests per minute) binds
  emb: 2 requests · ~${inEmb} input tokens (estimated) · ≤ 0 output tokens (max_tokens) → everything fits in the first window of every limit given
→ at least 2m00s: --rpm 2 (requests per minute) binds (model big).
(The bound counts output tokens as 0: an answer's length is known only after it.)
`,
    );
    const roomy = await runCli(
      ["run", input, "--dry-run", "--per-model", "--rpm", "6"],
      NO_KEYS,
    );
    expect(roomy.out).toMatch(
      /\n→ everything fits in the first window of every limit given\.\n/,
    );
    // The same limit for the key as a whole: 8 requests → 4 windows → 3 min.
    const key = await runCli(
      ["run", input, "--dry-run", "--rpm", "2"],
      NO_KEYS,
    );
    expect(key.out).toMatch(
      /→ at least 3m00s: --rpm 2 \(requests per minute\) binds/,
    );
    const both = await runCli(
      ["run", input, "--dry-run", "--per-model", "--per-key"],
      NO_KEYS,
    );
    expect(both.code).toBe(2);
    expect(both.err).toMatch(/--per-model and --per-key exclude each other/);
  });

  it("--retry-errored sends only the errored lines and rewrites the output in order", async () => {
    const s = await sim({
      perClientFaults: { "req-2": { status: 500 }, "req-5": { status: 529 } },
    });
    const { input, output } = batchFiles(anthropicLines(8).join("\n"));
    const args = ["run", input, "-o", output, "--quiet", "--retries", "0"];
    const first = await runCli([...args, "--base-url", s.url], NO_KEYS);
    expect(first.code).toBe(1);
    // Without the flag, a rerun has nothing to do.
    const idle = await runCli([...args, "--base-url", s.url], NO_KEYS);
    expect(idle.code).toBe(1);
    expect(s.stats().received).toBe(8);
    const healthy = await sim();
    const r = await runCli(
      [...args, "--base-url", healthy.url, "--retry-errored"],
      NO_KEYS,
    );
    expect(r.code).toBe(0);
    expect(Object.keys(healthy.stats().perClient).sort()).toEqual([
      "req-2",
      "req-5",
    ]);
    const rows = readResults(output);
    expect(rows.map((x) => x.custom_id)).toEqual(ids(8));
    expect(
      rows.every((x) => (x.result as { type: string }).type === "succeeded"),
    )
      .toBe(true);
    expect(existsSync(`${output}.tmp`)).toBe(false);
    expect(existsSync(`${output}.journal`)).toBe(false);
  });

  it("a torn journal line (kill -9 mid-write) is ignored, never half-read; journaled results are used, not resent", async () => {
    const s = await sim();
    const n = 10;
    const { input, output } = batchFiles(anthropicLines(n).join("\n"));
    const journal = `${output}.journal`;
    const entry = (i: number, text: string) =>
      JSON.stringify({
        i,
        e: 0,
        r: {
          custom_id: `req-${i}`,
          result: {
            type: "succeeded",
            message: { content: [{ type: "text", text }] },
          },
        },
      });
    writeFileSync(
      journal,
      `${entry(3, "from the journal")}\n` +
        `{"i":4,"e":0,"r":{"custom_id":"req-4","res\n` + // a damaged line
        `${entry(7, "also journaled")}\n` +
        entry(8, "torn").slice(0, 40), // torn: no newline
    );
    const r = await runCli(
      ["run", input, "-o", output, "--base-url", s.url],
      NO_KEYS,
    );
    expect(r.code).toBe(0);
    expect(r.err).toMatch(/1 torn line\(s\) in .*journal ignored/);
    const rows = readResults(output) as {
      custom_id: string;
      result: { message: { content: { text: string }[] } };
    }[];
    expect(rows.map((x) => x.custom_id)).toEqual(ids(n));
    expect(rows[3]!.result.message.content[0]!.text).toBe("from the journal");
    expect(rows[7]!.result.message.content[0]!.text).toBe("also journaled");
    expect(rows[8]!.result.message.content[0]!.text).not.toBe("torn");
    expect(Object.keys(s.stats().perClient).sort()).toEqual(
      ids(n).filter((id) => id !== "req-3" && id !== "req-7").sort(),
    );
    // A journal of another input is refused, and nothing is sent.
    writeFileSync(journal, `${entry(2, "x").replace("req-2", "other")}\n`);
    const { input: input2, output: output2 } = batchFiles(
      anthropicLines(3).join("\n"),
    );
    writeFileSync(`${output2}.journal`, readFileSync(journal));
    const before = s.stats().received;
    const bad = await runCli(
      ["run", input2, "-o", output2, "--base-url", s.url],
      NO_KEYS,
    );
    expect(bad.code).toBe(2);
    expect(bad.err).toMatch(/journal belongs to another input/);
    expect(s.stats().received).toBe(before);
  });
});

describe("paceline run --stream with Gemini lines", () => {
  it("streams from :streamGenerateContent: a server that cuts streams fails those lines (no retries) but not whole ones; a healthy one gives what whole requests give", async () => {
    const lines = Array.from({ length: 12 }, (_, i) =>
      JSON.stringify({
        key: `g-${i}`,
        request: {
          contents: [{ role: "user", parts: [{ text: `Question ${i}` }] }],
          generationConfig: { maxOutputTokens: 30 },
        },
      }));
    const run = (base: string, output: string, ...extra: string[]) =>
      runCli([
        "run",
        files.input,
        "-o",
        output,
        "--base-url",
        `${base}/v1beta`,
        "--model",
        "gemini-sim",
        "--quiet",
        ...extra,
      ], NO_KEYS);
    const files = batchFiles(lines.join("\n") + "\n");
    const cuts = await sim({ faults: { truncatedStream: 1 } });
    const whole = join(files.d, "whole.jsonl");
    expect((await run(cuts.url, whole, "--retries", "0")).code).toBe(0);
    const cut = join(files.d, "cut.jsonl");
    expect((await run(cuts.url, cut, "--retries", "0", "--stream")).code)
      .toBe(1);
    expect(readResults(cut).every((r) => r.error)).toBe(true);
    const healthy = await sim();
    const streamed = join(files.d, "streamed.jsonl");
    expect((await run(healthy.url, streamed, "--stream")).code).toBe(0);
    const text = (r: Record<string, unknown>) =>
      (r.response as {
        candidates: { content: { parts: { text: string }[] } }[];
      }).candidates[0]!.content.parts[0]!.text;
    expect(readResults(streamed).map(text)).toEqual(
      readResults(whole).map(text),
    );
  });
});
