#!/usr/bin/env node
// @ts-check
// The whole test suite, one step after another: `npm test` runs this.
// Each step's output is shown only when it fails (or with --verbose), so the
// log stays readable; the last line is "N passed, N failed".
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { startRedis } from "../test/redis_server.mjs";

const root = resolve(import.meta.dirname, "..");
const verbose = process.argv.includes("--verbose");
const only = process.argv.slice(2).filter((a) => !a.startsWith("--"));
const bin = (name) => join(root, "node_modules", ".bin", name);

/** @type {[string, () => unknown][]} */
const steps = [];
const step = (name, fn) => steps.push([name, fn]);

/** Runs a command; throws with its output if it fails. */
function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd ?? root,
    encoding: "utf8",
    env: { ...process.env, NO_COLOR: "1", FORCE_COLOR: "0", ...opts.env },
    maxBuffer: 64 * 1024 * 1024,
  });
  // Deno warns that it cannot resolve @types/node's own references; noise.
  const out = `${r.stdout ?? ""}${r.stderr ?? ""}`
    .replace(/^.*Failed resolving types.*\n.*\n/gm, "");
  if (r.status !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${r.status ?? r.signal}\n${out}`,
    );
  }
  return out;
}

const deno = (...args) => run(bin("deno"), args);

/**
 * Debian packages the tests need: installed when missing (as root, saying
 * so), never skipped.
 */
function ensureDebian(binary, pkg) {
  if (spawnSync("sh", ["-c", `command -v ${binary}`]).status === 0) {
    return `${binary} present`;
  }
  if (process.getuid?.() !== 0) {
    throw new Error(
      `${binary} is missing and this is not root: run apt-get install -y ${pkg}`,
    );
  }
  console.log(`installing ${pkg}: apt-get install -y ${pkg}`);
  const install = () =>
    spawnSync("apt-get", ["install", "-y", pkg], {
      encoding: "utf8",
      env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
    });
  let r = install();
  if (r.status !== 0) {
    spawnSync("apt-get", ["update"], { encoding: "utf8" });
    r = install();
  }
  if (r.status !== 0) {
    throw new Error(`apt-get install -y ${pkg} failed\n${r.stdout}${r.stderr}`);
  }
  return `${pkg} installed`;
}

step(
  "system packages (redis-server, chromium)",
  () =>
    [
      ensureDebian("redis-server", "redis-server"),
      ensureDebian("chromium", "chromium"),
    ].join("; "),
);
step("build", () => run("npm", ["run", "--silent", "build"]));
step("typecheck (tsc)", () => run(bin("tsc"), ["-p", "tsconfig.json"]));
step(
  "vitest (Node: mod_test.ts, path_test.ts, sim_test.ts, fetch_test.ts, cli_test.ts, cli_batch_test.ts, frameworks_test.ts, redis_test.ts, cli_redis_test.ts, report_test.ts)",
  () => run(bin("vitest"), ["run"]),
);
step(
  "deno check",
  () =>
    deno(
      "check",
      "mod.ts",
      "mod_test.ts",
      "path_test.ts",
      "sim.ts",
      "cli.ts",
      "test/fetch_smoke.ts",
      "test/cli_smoke.ts",
      "test/cli_kill_smoke.ts",
      "test/cli_batch_smoke.ts",
    ),
);
step("deno lint", () => deno("lint"));
step("deno fmt --check", () => deno("fmt", "--check"));
step("deno doc --lint mod.ts", () => deno("doc", "--lint", "mod.ts"));
step(
  "deno publish --dry-run",
  () => deno("publish", "--dry-run", "--allow-dirty"),
);
step("deno test", () => deno("test", "-A", "mod_test.ts", "path_test.ts"));
step(
  "deno test --doc (JSDoc examples run)",
  () => deno("test", "--doc", "-A", "mod.ts"),
);
/**
 * Runs every `ts` block of both READMEs as a file beside the sources
 * (`from "paceline"` → `../mod.ts`); returns how many ran.
 */
function readmeBlocks(runFile) {
  const readme = ["README.md", "README.zh-CN.md"]
    .map((f) => readFileSync(join(root, f), "utf8")).join("\n");
  const blocks = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
  if (blocks.length === 0) throw new Error("no ts blocks in README.md");
  const dir = mkdtempSync(join(root, ".tmp-readme-"));
  try {
    blocks.forEach((code, i) => {
      const file = join(dir, `block${i}.ts`);
      writeFileSync(
        file,
        code.replaceAll('from "paceline"', 'from "../mod.ts"').replaceAll(
          'from "./',
          'from "../',
        ),
      );
      runFile(file);
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return `${blocks.length} blocks`;
}
step(
  "README examples run (Deno)",
  () => readmeBlocks((file) => deno("run", "-A", file)),
);
step(
  "bun test",
  () => run(bin("bun"), ["test", "mod_test.ts", "path_test.ts"]),
);

// Node 24 (the current LTS) beside the machine's Node: the binary comes from
// the npm registry (test/node24: the platform package for this machine), or
// from PACELINE_NODE24. Missing is a failure with what to do, never a skip.
const NODE24_VERSION = "24.22.3";
let node24Path;
function node24() {
  if (node24Path) return node24Path;
  const candidates = process.env.PACELINE_NODE24
    ? [process.env.PACELINE_NODE24]
    : [
      join(
        root,
        "node_modules",
        `node-${process.platform}-${process.arch}`,
        "bin",
        "node",
      ),
    ];
  for (const path of candidates) {
    const r = spawnSync(path, ["--version"], { encoding: "utf8" });
    if (r.status === 0 && /^v24\./.test(r.stdout)) return node24Path = path;
  }
  throw new Error(
    `no Node 24 at ${
      candidates[0]
    }: npm ci installs node-${process.platform}-${process.arch}@${NODE24_VERSION} ` +
      `on linux x64/arm64; elsewhere add your platform's package to test/node24/package.json, ` +
      `or set PACELINE_NODE24 to a Node 24 binary`,
  );
}
const onNode24 = (args, opts) => run(node24(), args, opts);
step(
  "Node 24: vitest mod_test.ts",
  () =>
    `${run(node24(), ["--version"]).trim()}\n` +
    onNode24([
      join(root, "node_modules", "vitest", "vitest.mjs"),
      "run",
      "mod_test.ts",
    ]),
);
step(
  "Node 24: CLI run, kill -9, resume (cli.ts as it is, no build)",
  () => smoke(node24(), ["test/cli_kill_smoke.ts"]),
);
step(
  "Node 24: CLI journal: fatal stop, then resume",
  () => smoke(node24(), ["test/cli_smoke.ts"]),
);
step(
  "Node 24: README examples run",
  () => readmeBlocks((file) => onNode24([file])),
);
step("Node 24: a copy of mod.ts imported from a .ts script, no flags", () => {
  // Outside the repository: no package.json, no tsconfig, no node_modules.
  const dir = mkdtempSync(join(tmpdir(), "paceline-copy-"));
  try {
    writeFileSync(join(dir, "mod.ts"), readFileSync(join(root, "mod.ts")));
    writeFileSync(
      join(dir, "script.ts"),
      `import { ManualClock, mapConcurrent, type Permit, RateLimiter } from "./mod.ts";
const clock = new ManualClock();
const limiter = new RateLimiter({ rpm: 2, marginMs: 0, clock });
const first: Permit = await limiter.acquire();
await limiter.acquire();
if (limiter.tryAcquire()) throw new Error("third request admitted");
first.settle({ requests: 1 });
const doubled: number[] = await mapConcurrent([3, 1, 2], async (x: number) => x * 2, { concurrency: 2 });
if (doubled.join() !== "6,2,4") throw new Error(\`mapConcurrent gave \${doubled}\`);
console.log("ok");
`,
    );
    const r = spawnSync(node24(), ["script.ts"], {
      cwd: dir,
      encoding: "utf8",
    });
    const out = `${r.stdout}${r.stderr}`;
    if (r.status !== 0 || r.stdout.trim() !== "ok") {
      throw new Error(`node script.ts exited ${r.status}\n${out}`);
    }
    return out;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
const smoke = (cmd, args) => {
  const out = run(cmd, args);
  if (!/^ok$/m.test(out)) {
    throw new Error(`no "ok" from the smoke test\n${out}`);
  }
  return out;
};
step(
  "simulator smoke (Deno)",
  () => smoke(bin("deno"), ["run", "-A", "test/sim_smoke.ts"]),
);
step("simulator smoke (Bun)", () => smoke(bin("bun"), ["test/sim_smoke.ts"]));
step(
  "no env permission (Deno)",
  () =>
    smoke(bin("deno"), [
      "run",
      "--no-prompt",
      "--allow-read",
      "test/env_smoke.ts",
    ]),
);
step(
  "fetch e2e smoke (Deno)",
  () => smoke(bin("deno"), ["run", "-A", "test/fetch_smoke.ts"]),
);
step("fetch e2e smoke (Bun)", () => smoke(bin("bun"), ["test/fetch_smoke.ts"]));
step(
  "CLI journal: fatal stop, then resume (Deno)",
  () => smoke(bin("deno"), ["run", "-A", "test/cli_smoke.ts"]),
);
step(
  "CLI journal: fatal stop, then resume (Bun)",
  () => smoke(bin("bun"), ["test/cli_smoke.ts"]),
);
step(
  "CLI --batch-api through the simulator's Batch APIs (Deno, Bun, Node 24)",
  () => {
    smoke(bin("deno"), ["run", "-A", "test/cli_batch_smoke.ts"]);
    smoke(bin("bun"), ["test/cli_batch_smoke.ts"]);
    return smoke(node24(), ["test/cli_batch_smoke.ts"]);
  },
);
step(
  "shared limits on redis-server (Deno npm:redis, Bun RedisClient)",
  async () => {
    const redis = await startRedis();
    try {
      const env = { REDIS_URL: redis.url };
      const out = [];
      for (
        const [cmd, args] of [
          [bin("deno"), ["run", "-A", "test/redis_smoke.ts"]],
          [bin("bun"), ["test/redis_smoke.ts"]],
        ]
      ) {
        const o = run(cmd, args, { env });
        if (!/^ok$/m.test(o)) throw new Error(`no "ok" from ${cmd}\n${o}`);
        out.push(o);
      }
      return out.join("");
    } finally {
      await redis.kill();
    }
  },
);
const demoSmoke = (cmd, args) => {
  const out = run(cmd, args);
  if (!/simulator: 20 accepted/.test(out)) {
    throw new Error(`demo did not finish\n${out}`);
  }
  return out;
};
step(
  "demo (Deno: deno run -A cli.ts demo)",
  () =>
    demoSmoke(bin("deno"), [
      "run",
      "-A",
      "cli.ts",
      "demo",
      "--requests",
      "20",
      "--quiet",
    ]),
);
step(
  "demo (Bun: bun cli.ts demo)",
  () =>
    demoSmoke(bin("bun"), ["cli.ts", "demo", "--requests", "20", "--quiet"]),
);
step("simulator standalone (node dist/sim.js, deno run sim.ts)", async () => {
  for (
    const [cmd, args] of [
      ["node", ["dist/sim.js", "--port", "0", "--rpm", "1"]],
      [bin("deno"), ["run", "-A", "sim.ts", "--port", "0", "--rpm", "1"]],
    ]
  ) {
    const child = spawn(cmd, args, {
      cwd: root,
      stdio: ["ignore", "pipe", "pipe"],
    });
    try {
      const url = await new Promise((resolve, reject) => {
        let out = "";
        const timer = setTimeout(
          () => reject(new Error(`no URL printed: ${out}`)),
          20_000,
        );
        child.stdout.on("data", (d) => {
          out += d;
          const m = /listening on (http:\/\/\S+)/.exec(out);
          if (m) {
            clearTimeout(timer);
            resolve(m[1]);
          }
        });
        child.on("exit", (code) => reject(new Error(`exited ${code}: ${out}`)));
      });
      const ask = () =>
        fetch(`${url}/v1/messages`, {
          method: "POST",
          body: JSON.stringify({
            model: "m",
            max_tokens: 5,
            messages: [{ role: "user", content: "x" }],
          }),
        });
      const a = await ask();
      const b = await ask();
      await Promise.all([a.text(), b.text()]);
      if (a.status !== 200 || b.status !== 429) {
        throw new Error(`${cmd}: ${a.status} ${b.status}`);
      }
    } finally {
      child.kill();
    }
  }
});
step("bench --quick (smoke: it runs and yields numbers)", () => {
  const out = run("node", ["bench/run.mjs", "--quick", "--json"]);
  const json = JSON.parse(out.trim().split("\n").pop() ?? "{}");
  const numbers = [];
  const walk = (v) => {
    if (typeof v === "number") numbers.push(v);
    else if (v && typeof v === "object") Object.values(v).forEach(walk);
  };
  walk(json);
  for (const topic of ["pool", "limiter", "accuracy", "memory", "relay"]) {
    if (!(topic in json)) {
      throw new Error(`bench topic ${topic} missing\n${out}`);
    }
  }
  if (numbers.length < 50 || numbers.some((x) => Number.isNaN(x))) {
    throw new Error(
      `bench produced ${numbers.length} numbers, some NaN\n${out}`,
    );
  }
  return out;
});
step("package (npm pack, install, import, types)", () => {
  const dir = mkdtempSync(join(tmpdir(), "paceline-pack-"));
  try {
    const packed = run("npm", ["pack", "--silent", "--pack-destination", dir]);
    const tgz = join(dir, packed.trim().split("\n").pop() ?? "");
    const app = join(dir, "app");
    run("mkdir", ["-p", app]);
    writeFileSync(
      join(app, "package.json"),
      JSON.stringify({ name: "app", private: true, type: "module" }),
    );
    run("npm", ["install", "--silent", "--no-audit", "--no-fund", tgz], {
      cwd: app,
    });
    writeFileSync(
      join(app, "main.mjs"),
      `import { RateLimiter, ManualClock, Mutex, systemClock } from "paceline";
const clock = new ManualClock();
const limiter = new RateLimiter({ rpm: 2, marginMs: 0, clock });
await limiter.acquire();
await limiter.acquire();
if (limiter.tryAcquire()) throw new Error("third request admitted");
if (typeof systemClock.now() !== "number" || !new Mutex()) throw new Error("exports");
console.log("ok");
`,
    );
    const version = run(join(app, "node_modules", ".bin", "paceline"), [
      "--version",
    ], { cwd: app });
    if (!/^\d+\.\d+\.\d+/.test(version.trim())) {
      throw new Error(`paceline --version printed ${version}`);
    }
    const out = run("node", ["main.mjs"], { cwd: app });
    if (out.trim() !== "ok") throw new Error(`consumer printed ${out}`);
    writeFileSync(
      join(app, "consumer.ts"),
      `import { RateLimiter, type Permit, type WindowUsage } from "paceline";
const limiter = new RateLimiter({ rpm: 50, itpm: 30_000 });
const permit: Permit | undefined = limiter.tryAcquire({ requests: 1, inputTokens: 10 });
permit?.settle({ inputTokens: 5 });
const usage: WindowUsage[] = limiter.usage();
const n: number = usage.length;
// @ts-expect-error: costs are numbers
limiter.tryAcquire({ requests: "1" });
export { n };
`,
    );
    writeFileSync(
      join(app, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          strict: true,
          noEmit: true,
          module: "NodeNext",
          moduleResolution: "NodeNext",
          target: "ES2022",
          lib: ["ES2022", "DOM", "ESNext.Disposable"],
          types: [],
        },
        files: ["consumer.ts"],
      }),
    );
    run(bin("tsc"), ["-p", "tsconfig.json"], { cwd: app });
    run(bin("publint"), ["run", tgz, "--strict"]);
    run(bin("attw"), [
      tgz,
      "--profile",
      "esm-only",
      "--format",
      "table-flipped",
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

let passed = 0;
let failed = 0;
for (const [name, fn] of steps) {
  if (only.length && !only.some((o) => name.includes(o))) continue;
  const t0 = performance.now();
  try {
    const out = await fn();
    passed++;
    const s = ((performance.now() - t0) / 1000).toFixed(1);
    console.log(`ok   ${name} (${s} s)`);
    if (verbose && out) console.log(out);
  } catch (error) {
    failed++;
    console.log(
      `FAIL ${name}\n${error instanceof Error ? error.message : error}`,
    );
  }
}
console.log(`\n${passed} passed, ${failed} failed`);
process.exitCode = failed ? 1 : 0;
