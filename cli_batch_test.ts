// `paceline run --batch-api` against the simulator's Batch APIs (Anthropic
// Message Batches; OpenAI Files + Batches): the same output as a live run,
// every submission journaled so a rerun never submits a line twice.
import { describe, expect, it } from "vitest";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { sim } from "./test/sims.ts";
import { inputTokensOf, type Kind } from "./sim.ts";
import {
  anthropicLines,
  batchFiles,
  NO_KEYS,
  openaiLine,
  openaiLines,
  readResults,
  runCli,
  spawnCli,
} from "./test/cli_helpers.ts";

/** `paceline run` of `input` into `output` against `base`, with more flags. */
function runOn(
  input: string,
  output: string,
  base: string,
  ...flags: string[]
) {
  return runCli(
    ["run", input, "-o", output, "--base-url", base, ...flags],
    NO_KEYS,
  );
}

/** `paceline run --batch-api` of `input` into `output` against `base`, polling every 50 ms. */
function viaBatch(
  input: string,
  output: string,
  base: string,
  ...flags: string[]
) {
  return runOn(input, output, base, "--batch-api", "--poll-ms", "50", ...flags);
}

/** The shape of a value: its keys and value types, arrays by their first item. */
function shape(v: unknown): unknown {
  if (Array.isArray(v)) return v.length ? [shape(v[0])] : [];
  if (v && typeof v === "object") {
    return Object.fromEntries(
      Object.entries(v).map(([k, x]) => [k, shape(x)]),
    );
  }
  return v === null ? null : typeof v;
}

/** A results row with its bodies left out: what must match between a live and a Batch API run. */
function skeleton(row: Record<string, unknown>): unknown {
  const r = structuredClone(row) as Record<string, Record<string, unknown>>;
  if (r.response) {
    r.response.body = shape(r.response.body);
    r.response.request_id = typeof r.response.request_id;
  }
  if (r.result?.message) r.result.message = shape(r.result.message);
  return r;
}

const waitFor = async (what: () => boolean, ms = 10_000): Promise<void> => {
  for (const end = Date.now() + ms; !what();) {
    if (Date.now() > end) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 20));
  }
};

/**
 * `paceline run --batch-api` as a child process, stopped by `signal` as
 * soon as its first batch id is journaled.
 */
async function submitThenStop(
  input: string,
  output: string,
  base: string,
  signal: "SIGKILL" | "SIGINT",
): Promise<{ code: number | null; err: string }> {
  const run = spawnCli([
    "run",
    input,
    "-o",
    output,
    "--base-url",
    base,
    "--batch-api",
    "--poll-ms",
    "100",
  ]);
  await waitFor(() => logOf(output).some((e) => e.batch));
  run.child.kill(signal);
  return { code: await run.exited, err: run.err() };
}

/** Gemini batch lines naming their model. */
function geminiLines(n: number): string[] {
  return Array.from({ length: n }, (_, i) =>
    JSON.stringify({
      key: `g-${i}`,
      request: {
        model: "gemini-sim",
        contents: [{ role: "user", parts: [{ text: `Question ${i}` }] }],
      },
    }));
}

/** The submissions log's entries. */
function logOf(output: string): Record<string, unknown>[] {
  const path = `${output}.batches`;
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8").trim().split("\n").filter(Boolean)
    .map((l) => JSON.parse(l));
}

describe("paceline run --batch-api", () => {
  for (const format of ["openai", "anthropic"] as const) {
    it(
      `10,000 ${format} lines: one batch, and the output a live run writes (ids, order, shape; bodies aside)`,
      async () => {
        const s = await sim({
          batchMs: 300,
          limits: { requests: 1_000_000, windowMs: 60_000 },
        });
        const n = 10_000;
        const text = (format === "openai" ? openaiLines(n) : anthropicLines(n))
          .join("\n") + "\n";
        const { d, input, output } = batchFiles(text);
        const base = format === "openai" ? `${s.url}/v1` : s.url;
        const batch = await viaBatch(input, output, base, "--quiet");
        expect(batch.err).toBe("");
        expect(batch.code).toBe(0);
        expect(s.stats().batches).toMatchObject({
          created: 1,
          requests: n,
          files: format === "openai" ? 1 : 0,
        });
        expect(s.stats().accepted).toBe(0); // no live request
        const live = join(d, "live.jsonl");
        const r = await runOn(
          input,
          live,
          base,
          "--concurrency",
          "64",
          "--quiet",
        );
        expect(r.code).toBe(0);
        expect(s.stats().accepted).toBe(n);
        const a = readResults(output).map(skeleton);
        const b = readResults(live).map(skeleton);
        expect(a.length).toBe(n);
        expect(a).toEqual(b);
        // The sidecars are gone: the output is complete.
        for (const x of [".batches", ".journal", ".upload-1"]) {
          expect(existsSync(output + x)).toBe(false);
        }
      },
      60_000,
    );
  }

  it(
    "120,000 OpenAI lines over two endpoints: four batches within 50,000 requests (embeddings: 50,000 inputs), one endpoint each; output in input order",
    async () => {
      const s = await sim({ batchMs: 500 });
      const n = 120_000;
      const urls = ["/v1/chat/completions", "/v1/embeddings"];
      const lines = Array.from(
        { length: n },
        (_, i) => openaiLine(urls[i % 2]!, i),
      );
      const { input, output } = batchFiles(lines.join("\n") + "\n");
      const dry = await runOn(
        input,
        output,
        `${s.url}/v1`,
        "--batch-api",
        "--dry-run",
      );
      expect(dry.code).toBe(0);
      expect(dry.out).toMatch(/120,000 openai requests in 4 batches/);
      expect(dry.out).toMatch(
        /batch 1: \/v1\/embeddings, 37,500 requests/,
      );
      expect(dry.out).toMatch(/50 % of live requests/);
      expect(s.stats().received).toBe(0);
      const r = await viaBatch(input, output, `${s.url}/v1`, "--quiet");
      expect(r.err).toBe("");
      expect(r.code).toBe(0);
      expect(s.stats().batches).toMatchObject({
        created: 4,
        requests: n,
        files: 4,
      });
      // The provider's own list: each batch for one endpoint, within 50,000.
      const listed = (await (await fetch(`${s.url}/v1/batches`)).json()).data
        .map((b: { endpoint: string; request_counts: { total: number } }) =>
          `${b.endpoint} ${b.request_counts.total}`
        ).sort();
      expect(listed).toEqual([
        "/v1/chat/completions 10000",
        "/v1/chat/completions 50000",
        "/v1/embeddings 22500",
        "/v1/embeddings 37500",
      ]);
      const ids = readResults(output).map((x) => x.custom_id);
      expect(ids).toEqual(lines.map((l) => JSON.parse(l).custom_id));
    },
    90_000,
  );

  it(
    "kill -9 right after the first submission, then rerun: batches created stays at one, every line once",
    async () => {
      const s = await sim({ batchMs: 1500 });
      const n = 400;
      const { input, output } = batchFiles(anthropicLines(n).join("\n") + "\n");
      await submitThenStop(input, output, s.url, "SIGKILL");
      expect(s.stats().batches.created).toBe(1);
      const r = await viaBatch(input, output, s.url);
      expect(r.code).toBe(0);
      expect(r.err).toMatch(/1 batch from an earlier run to collect/);
      expect(s.stats().batches.created).toBe(1);
      const ids = readResults(output).map((x) => x.custom_id);
      expect(ids).toEqual(Array.from({ length: n }, (_, i) => `req-${i}`));
      expect(existsSync(`${output}.batches`)).toBe(false);
    },
    30_000,
  );

  for (const format of ["openai", "anthropic", "gemini"] as const) {
    it(
      `${format}: a crash between creating a batch and journaling its id: the rerun finds the batch (${
        format === "anthropic" ? "by count and time" : "by its tag"
      }) instead of creating another`,
      async () => {
        const s = await sim({ batchMs: 400 });
        const n = 50;
        const lines = format === "openai"
          ? openaiLines(n)
          : format === "anthropic"
          ? anthropicLines(n)
          : geminiLines(n);
        const { input, output } = batchFiles(lines.join("\n") + "\n");
        const base = format === "openai"
          ? `${s.url}/v1`
          : format === "gemini"
          ? `${s.url}/v1beta`
          : s.url;
        await submitThenStop(input, output, base, "SIGKILL");
        // As if killed before the id was written: drop it from the log.
        const kept = readFileSync(`${output}.batches`, "utf8").split("\n")
          .filter((l) => !l.includes('"batch"'));
        writeFileSync(`${output}.batches`, kept.join("\n"));
        const r = await viaBatch(input, output, base, "--quiet");
        expect(r.code).toBe(0);
        expect(s.stats().batches.created).toBe(1);
        expect(readResults(output).length).toBe(n);
      },
      30_000,
    );
  }

  it(
    "expired and errored requests are errored results with the provider's reason; --retry-errored sends exactly those, live",
    async () => {
      const s = await sim({
        batchMs: 200,
        batchFaults: { expired: 0.05, errored: 0.05 },
        seed: 3,
      });
      const n = 200;
      const { input, output } = batchFiles(anthropicLines(n).join("\n") + "\n");
      const r = await viaBatch(input, output, s.url);
      expect(r.code).toBe(1);
      const rows = readResults(output) as {
        custom_id: string;
        result: {
          type: string;
          error?: { error: { type: string; message: string } };
        };
      }[];
      const bad = rows.filter((x) => x.result.type !== "succeeded");
      const kinds = new Set(bad.map((x) => x.result.error!.error.type));
      expect(kinds).toEqual(new Set(["expired", "api_error"]));
      expect(
        bad.find((x) => x.result.error!.error.type === "expired")!.result.error!
          .error.message,
      )
        .toMatch(/expired/);
      expect(r.err).toMatch(
        new RegExp(`${n} results \\(${bad.length} errored\\)`),
      );
      expect(s.stats().accepted).toBe(0);
      const again = await runOn(
        input,
        output,
        s.url,
        "--retry-errored",
        "--quiet",
      );
      expect(again.code).toBe(0);
      // Exactly the errored lines went out live, once each.
      expect(Object.keys(s.stats().perClient).sort()).toEqual(
        bad.map((x) => x.custom_id).sort(),
      );
      expect(s.stats().accepted).toBe(bad.length);
      const after = readResults(output).map((x) => x.custom_id);
      expect(after).toEqual(rows.map((x) => x.custom_id));
    },
    30_000,
  );

  it(
    "a batch that fails validation: exit 3 with the provider's message, nothing recorded; a fixed rerun submits again",
    async () => {
      const s = await sim({ batchMs: 200, batchEnqueuedTokens: 100 });
      const n = 40;
      const { input, output } = batchFiles(openaiLines(n).join("\n") + "\n");
      const r = await viaBatch(input, output, `${s.url}/v1`);
      expect(r.code).toBe(3);
      expect(r.err).toMatch(/failed: Enqueued token limit reached for gpt-sim/);
      expect(r.err).toMatch(/token_limit_exceeded/);
      expect(readFileSync(output, "utf8")).toBe("");
      expect(s.stats().batches).toMatchObject({ created: 1, failed: 1 });
      // A live run is allowed now (the failed batch holds nothing).
      const live = await runOn(input, output, `${s.url}/v1`, "--quiet");
      expect(live.code).toBe(0);
      expect(readResults(output).length).toBe(n);
    },
    30_000,
  );

  it(
    "Ctrl-C stops waiting (the batch keeps running); a live run then refuses those lines; paceline cancel cancels; the rerun collects, canceled lines errored",
    async () => {
      const s = await sim({ batchMs: 3000 });
      const n = 60;
      const { input, output } = batchFiles(anthropicLines(n).join("\n") + "\n");
      const run = await submitThenStop(input, output, s.url, "SIGINT");
      expect(run.code).toBe(130);
      expect(run.err).toMatch(
        /1 batch keeps running at anthropic \(msgbatch_\w+\)/,
      );
      expect(run.err).toMatch(/paceline cancel .*out\.jsonl/);
      const live = await runOn(input, output, s.url, "--quiet");
      expect(live.code).toBe(2);
      expect(live.err).toMatch(
        /60 lines are in batches submitted with --batch-api/,
      );
      expect(s.stats().accepted).toBe(0);
      const c = await runCli(["cancel", output], NO_KEYS);
      expect(c.code).toBe(0);
      expect(c.out).toMatch(/msgbatch_\w+: canceling/);
      expect(s.stats().batches.canceled).toBe(1);
      const r = await viaBatch(input, output, s.url, "--quiet");
      expect(r.code).toBe(1);
      const rows = readResults(output) as {
        result: { type: string; error?: { error: { type: string } } };
      }[];
      expect(rows.length).toBe(n);
      const canceled =
        rows.filter((x) => x.result.error?.error.type === "canceled").length;
      expect(canceled).toBeGreaterThan(0);
      expect(s.stats().batches.created).toBe(1);
      // --retry-errored with --batch-api: exactly those, through a new batch.
      const before = s.stats().batches.requests;
      const again = await runOn(
        input,
        output,
        s.url,
        "--batch-api",
        "--retry-errored",
        "--poll-ms",
        "50",
        "--quiet",
      );
      expect(again.code).toBe(0);
      expect(s.stats().batches.created).toBe(2);
      expect(s.stats().batches.requests - before).toBe(canceled);
      expect(s.stats().accepted).toBe(0); // nothing live
      expect(readResults(output).length).toBe(n);
    },
    30_000,
  );

  it(
    "says what it cannot do, naming the flag: Azure lines, --stream, --poll-ms 0, another base URL for pending batches",
    async () => {
      const s = await sim({ batchMs: 2000 });
      const az = batchFiles(openaiLines(2).join("\n") + "\n");
      const g = await runCli([
        "run",
        az.input,
        "-o",
        az.output,
        "--provider",
        "azure",
        "--base-url",
        "https://res.openai.azure.com",
        "--batch-api",
      ], { ...NO_KEYS, AZURE_OPENAI_API_KEY: "azure-key-123456" });
      expect(g.code).toBe(2);
      expect(g.err).toMatch(
        /--batch-api drives the Anthropic, OpenAI and Gemini Batch APIs; azure's is not supported yet/,
      );
      const { input, output } = batchFiles(anthropicLines(3).join("\n") + "\n");
      const st = await runOn(input, output, s.url, "--batch-api", "--stream");
      expect(st.code).toBe(2);
      expect(st.err).toMatch(/--stream is for live runs/);
      const p = await runOn(
        input,
        output,
        s.url,
        "--batch-api",
        "--poll-ms",
        "0",
      );
      expect(p.code).toBe(2);
      expect(p.err).toMatch(/--poll-ms needs a number >= 10: received "0"/);
      await submitThenStop(input, output, s.url, "SIGKILL");
      const other = await runOn(
        input,
        output,
        "http://127.0.0.1:9",
        "--batch-api",
      );
      expect(other.code).toBe(2);
      expect(other.err).toMatch(
        /was submitted to anthropic at http:\/\/127\.0\.0\.1:\d+; this run is for anthropic at http:\/\/127\.0\.0\.1:9/,
      );
      expect(s.stats().batches.created).toBe(1);
    },
    30_000,
  );

  it("a refused key stops the run (exit 3, key never printed, nothing recorded); the rerun with the right key submits once", async () => {
    const s = await sim({ batchMs: 100, apiKey: "sk-right-key-0123456789" });
    const n = 20;
    const { input, output } = batchFiles(openaiLines(n).join("\n") + "\n");
    const args = [
      "run",
      input,
      "-o",
      output,
      "--base-url",
      `${s.url}/v1`,
      "--batch-api",
      "--poll-ms",
      "50",
    ];
    const bad = await runCli(args, {
      ...NO_KEYS,
      OPENAI_API_KEY: "sk-wrong-key-9876543210",
    });
    expect(bad.code).toBe(3);
    expect(bad.err).toMatch(/the API key was refused \(HTTP 401\)/);
    expect(bad.err).not.toMatch(/wrong-key/);
    expect(readFileSync(output, "utf8")).toBe("");
    expect(s.stats().batches).toMatchObject({ created: 0, files: 0 });
    const good = await runCli(args, {
      ...NO_KEYS,
      OPENAI_API_KEY: "sk-right-key-0123456789",
    });
    expect(good.code).toBe(0);
    expect(s.stats().batches).toMatchObject({ created: 1, files: 1 });
    expect(readResults(output).length).toBe(n);
  });

  it("Gemini lines with --model: one batch per model (a request's own model wins), the output a live run writes; --dry-run names the models", async () => {
    const s = await sim({
      batchMs: 200,
      limits: { requests: 1_000_000, windowMs: 60_000 },
    });
    const n = 300;
    const lines = Array.from({ length: n }, (_, i) =>
      JSON.stringify({
        key: `g-${i}`,
        request: {
          ...(i % 3 === 0 ? { model: "gemini-other" } : {}),
          contents: [{ role: "user", parts: [{ text: `Question ${i}` }] }],
          generationConfig: { maxOutputTokens: 20 },
        },
      }));
    const { d, input, output } = batchFiles(lines.join("\n") + "\n");
    const base = `${s.url}/v1beta`;
    const dry = await runOn(
      input,
      output,
      base,
      "--model",
      "gemini-sim",
      "--batch-api",
      "--dry-run",
    );
    expect(dry.code).toBe(0);
    expect(dry.out).toMatch(/300 gemini requests in 2 batches/);
    expect(dry.out).toMatch(/batch 1: gemini-other, 100 requests/);
    expect(dry.out).toMatch(/batch 2: gemini-sim, 200 requests/);
    const r = await runOn(
      input,
      output,
      base,
      "--model",
      "gemini-sim",
      "--batch-api",
      "--poll-ms",
      "50",
      "--quiet",
    );
    expect(r.err).toBe("");
    expect(r.code).toBe(0);
    expect(s.stats().batches).toMatchObject({ created: 2, requests: n });
    const models = (await (await fetch(`${base}/batches`)).json()).operations
      .map((o: { metadata: { model: string } }) => o.metadata.model).sort();
    expect(models).toEqual(["models/gemini-other", "models/gemini-sim"]);
    const live = join(d, "live.jsonl");
    const l = await runOn(
      input,
      live,
      base,
      "--model",
      "gemini-sim",
      "--quiet",
    );
    expect(l.code).toBe(0);
    const skeletonOf = (row: Record<string, unknown>) => ({
      key: row.key,
      response: shape(row.response),
    });
    expect(readResults(output).map(skeletonOf)).toEqual(
      readResults(live).map(skeletonOf),
    );
  });

  it("a batch refused for too many enqueued tokens goes in again when our other batch ends; nothing is lost or sent twice", async () => {
    const urls = ["/v1/chat/completions", "/v1/completions"];
    const n = 100;
    const lines = Array.from(
      { length: n },
      (_, i) => openaiLine(urls[i % 2]!, i, "gpt-sim"),
    );
    const tokens = urls.map((url) =>
      lines.map((l) => JSON.parse(l)).filter((l) => l.url === url)
        .reduce((t, l) => t + inputTokensOf(l.body, url.slice(4) as Kind), 0)
    );
    // Room for either batch, not both at once.
    const s = await sim({
      batchMs: 300,
      batchEnqueuedTokens: Math.max(...tokens) + 1,
    });
    expect(Math.max(...tokens) + 1).toBeLessThan(tokens[0]! + tokens[1]!);
    const { input, output } = batchFiles(lines.join("\n") + "\n");
    const r = await viaBatch(input, output, `${s.url}/v1`);
    expect(r.code).toBe(0);
    expect(r.err).toMatch(/was refused for now: Enqueued token limit reached/);
    expect(s.stats().batches).toMatchObject({ created: 3, failed: 1 });
    expect(s.stats().batches.requests).toBe(n + n / 2);
    expect(readResults(output).map((x) => x.custom_id)).toEqual(
      lines.map((l) => JSON.parse(l).custom_id),
    );
  });
});
