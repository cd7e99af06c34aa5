// Deno without --allow-env: the clients must not crash reading the
// environment; with no key and no baseURL they refuse clearly.
// `deno run --no-prompt --allow-read test/env_smoke.ts` prints "ok".
import { anthropic, openai } from "../mod.ts";

let refused = 0;
for (const make of [() => anthropic({}), () => openai({})]) {
  try {
    make();
  } catch (e) {
    if (/no API key/.test((e as Error).message)) refused++;
  }
}
const c = anthropic({ baseURL: "http://127.0.0.1:9" });
if (refused !== 2 || typeof c.messages !== "function") {
  throw new Error(`unexpected: refused ${refused}`);
}
console.log("ok");
