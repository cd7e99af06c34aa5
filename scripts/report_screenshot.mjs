#!/usr/bin/env node
// @ts-check
// Regenerates docs/report.png (the README's picture of a report): runs the
// demo batch, opens its report in Debian's chromium, saves a screenshot.
import { spawnSync } from "node:child_process";
import { fileURLToPath, pathToFileURL } from "node:url";
import { chromium } from "playwright-core";

const root = fileURLToPath(new URL("..", import.meta.url));
const r = spawnSync(process.execPath, [
  "dist/cli.js",
  "demo",
  "--requests",
  "300",
  "--quiet",
], {
  cwd: root,
  encoding: "utf8",
  env: { ...process.env, LANG: "en_US.UTF-8" },
});
const page = /report:\s+(\S+)/.exec(r.stdout)?.[1];
if (!page) throw new Error(`no report from the demo:\n${r.stdout}${r.stderr}`);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
const tab = await browser.newPage({ viewport: { width: 840, height: 900 } });
await tab.goto(pathToFileURL(page).href);
await tab.screenshot({ path: `${root}/docs/report.png`, fullPage: true });
await browser.close();
console.log(`docs/report.png from ${page}`);
