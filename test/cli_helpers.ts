// Shared by the CLI test files: batch files, and `paceline` run in-process
// (runCli) or as a child process of the built dist/cli.js (spawnCli).
import { expect } from "vitest";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { main } from "../cli.ts";

export function dir(): string {
  return mkdtempSync(join(tmpdir(), "paceline-cli-"));
}

/** A fresh folder with `in.jsonl` holding `text`, and where `out.jsonl` goes. */
export function batchFiles(
  text: string,
): { d: string; input: string; output: string } {
  const d = dir();
  const input = join(d, "in.jsonl");
  writeFileSync(input, text);
  return { d, input, output: join(d, "out.jsonl") };
}

export function anthropicLines(n: number): string[] {
  return Array.from({ length: n }, (_, i) =>
    JSON.stringify({
      custom_id: `req-${i}`,
      params: {
        model: "claude-sim",
        max_tokens: 40,
        messages: [{
          role: "user",
          content: i % 3 ? `Question ${i}` : `第${i}个问题`,
        }],
        metadata: { user_id: `req-${i}` }, // the simulator counts per line
      },
    }));
}

export function openaiLines(n: number): string[] {
  return Array.from({ length: n }, (_, i) =>
    JSON.stringify({
      custom_id: `oa-${i}`,
      method: "POST",
      url: "/v1/chat/completions",
      body: {
        model: "gpt-sim",
        max_tokens: 30,
        messages: [{ role: "user", content: `Hi ${i}` }],
      },
    }));
}

/** One OpenAI batch line for `url`, varied by `i` (each input form the endpoint takes). */
export function openaiLine(url: string, i: number, model?: string): string {
  const bodies: Record<string, () => Record<string, unknown>> = {
    "/v1/chat/completions": () => ({
      model: model ?? "gpt-sim",
      max_tokens: 30,
      messages: [{ role: "user", content: `Hi ${i}` }],
    }),
    "/v1/responses": () => ({
      model: model ?? "gpt-sim",
      max_output_tokens: 30,
      instructions: "Be brief.",
      input: i % 2 ? `Tell me about ${i}` : [{
        role: "user",
        content: [{ type: "input_text", text: `Tell me about ${i}` }],
      }],
    }),
    "/v1/completions": () => ({
      model: model ?? "gpt-sim-instruct",
      max_tokens: 20,
      prompt: i % 2 ? `Once upon ${i}` : [`Once upon ${i}`],
    }),
    "/v1/embeddings": () => ({
      model: model ?? "emb-sim",
      input: i % 3 === 0
        ? [`document ${i}`, `第${i}个文档`]
        : i % 3 === 1
        ? `document ${i}`
        : [101, 2023, i, 102],
    }),
    "/v1/moderations": () => ({
      model: model ?? "mod-sim",
      input: `some text ${i}`,
    }),
  };
  return JSON.stringify({
    custom_id: `${url.slice(4)}-${i}`,
    method: "POST",
    url,
    body: bodies[url]!(),
  });
}

export async function runCli(
  args: string[],
  env: Record<string, string | undefined> = {},
) {
  let out = "";
  let err = "";
  const saved: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(env)) {
    saved[k] = process.env[k];
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    const code = await main(args, {
      out: (s) => void (out += s),
      err: (s) => void (err += s),
      isTTY: false,
    });
    return { code, out, err };
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

/** Results in the Anthropic shape. */
export type AnthropicRow = {
  custom_id: string;
  result: {
    type: string;
    error?: { error: { type: string; message: string } };
  };
};

export function anthropicRows(path: string): AnthropicRow[] {
  return readResults(path) as AnthropicRow[];
}

export function readResults(path: string): Record<string, unknown>[] {
  const text = readFileSync(path, "utf8");
  expect(text.endsWith("\n")).toBe(true);
  return text.trimEnd().split("\n").map((l) => JSON.parse(l));
}

export const NO_KEYS = {
  ANTHROPIC_API_KEY: undefined,
  OPENAI_API_KEY: undefined,
  ANTHROPIC_BASE_URL: undefined,
  OPENAI_BASE_URL: undefined,
  AZURE_OPENAI_API_KEY: undefined,
  AZURE_OPENAI_ENDPOINT: undefined,
  GEMINI_API_KEY: undefined,
  GOOGLE_API_KEY: undefined,
  GEMINI_BASE_URL: undefined,
};

export function spawnCli(args: string[]) {
  const cli = join(import.meta.dirname, "..", "dist", "cli.js");
  expect(existsSync(cli)).toBe(true); // npm test builds first
  const child = spawn(process.execPath, [cli, ...args], {
    env: {
      ...process.env,
      ...Object.fromEntries(Object.keys(NO_KEYS).map((k) => [k, ""])),
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (c) => (err += c));
  const exited = new Promise<number | null>((r) =>
    child.on("exit", (c) => r(c))
  );
  return { child, exited, err: () => err };
}
