// @ts-check
// Shared helpers for the benchmarks: interleaved rounds, medians, tables.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { availableParallelism, cpus } from "node:os";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);

/** The installed version of a package, read from its package.json. */
export function versionOf(name) {
  try {
    const path = require.resolve(`${name}/package.json`);
    return JSON.parse(readFileSync(path, "utf8")).version;
  } catch {
    // packages whose "exports" hide package.json
    const dir = require.resolve(name).split(`/node_modules/${name}/`)[0];
    return JSON.parse(
      readFileSync(`${dir}/node_modules/${name}/package.json`, "utf8"),
    ).version;
  }
}

/** A header describing the machine and the run. */
export function environment(names) {
  const ours = JSON.parse(
    readFileSync(new URL("../package.json", import.meta.url), "utf8"),
  ).version;
  const libs = [
    `paceline ${ours}`,
    ...names.map((n) => `${n} ${versionOf(n)}`),
  ];
  return [
    `Date: ${
      new Date().toISOString().slice(0, 10)
    }; Node ${process.version}; ` +
    `${availableParallelism()} CPUs (${cpus()[0]?.model.trim() ?? "unknown"})`,
    `Libraries: ${libs.join(", ")}`,
  ].join("\n");
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Formats a number with 3 significant digits and thousands separators. */
export function fmt(x) {
  if (!Number.isFinite(x)) return String(x);
  const abs = Math.abs(x);
  if (abs >= 1e6) return `${(x / 1e6).toPrecision(3)} M`;
  if (abs >= 1e3) return `${(x / 1e3).toPrecision(3)} k`;
  return x.toPrecision(3);
}

/** A markdown table. */
export function table(headers, rows) {
  const line = (cells) => `| ${cells.join(" | ")} |`;
  return [
    line(headers),
    line(headers.map(() => "---")),
    ...rows.map(line),
  ].join("\n");
}

/**
 * Runs every contender once per round, in rotating order, `rounds` times.
 * Each contender's `run()` returns a number (higher is better, e.g. ops/s).
 * Returns per contender: all values, and ratios to `base` computed per round.
 */
export async function interleave(contenders, rounds, base) {
  const values = new Map(contenders.map((c) => [c.name, []]));
  const ratios = new Map(contenders.map((c) => [c.name, []]));
  for (const c of contenders) await c.run(); // warm-up, not counted
  for (let r = 0; r < rounds; r++) {
    const round = new Map();
    for (let i = 0; i < contenders.length; i++) {
      const c = contenders[(i + r) % contenders.length];
      round.set(c.name, await c.run());
    }
    for (const c of contenders) {
      values.get(c.name).push(round.get(c.name));
      if (base) ratios.get(c.name).push(round.get(c.name) / round.get(base));
    }
  }
  return contenders.map((c) => ({
    name: c.name,
    values: values.get(c.name),
    median: median(values.get(c.name)),
    min: Math.min(...values.get(c.name)),
    max: Math.max(...values.get(c.name)),
    ratio: base ? median(ratios.get(c.name)) : NaN,
  }));
}

const simPath = fileURLToPath(new URL("../dist/sim.js", import.meta.url));

/** A simulator (dist/sim.js) in a child process: its URL, its stats, and how to stop it. */
export async function startSimChild(limits, windowMs, extra = []) {
  const child = spawn(process.execPath, [
    simPath,
    "--port",
    "0",
    ...(limits
      ? [
        "--rpm",
        String(limits.requests),
        "--itpm",
        String(limits.inputTokens),
        "--otpm",
        String(limits.outputTokens),
        "--window-ms",
        String(windowMs),
      ]
      : []),
    ...extra,
  ], { stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) resolve(m[1]);
    });
    child.on("exit", (c) => reject(new Error(`simulator exited ${c}`)));
  });
  return {
    url,
    stats: async () => (await fetch(`${url}/_sim/stats`)).json(),
    close: () =>
      new Promise((r) => {
        child.on("exit", r);
        child.kill();
      }),
  };
}
