// Shared by the runtime smoke tests (Deno, Bun, Node 24): an Anthropic batch
// file of `n` lines, custom_id `r0…`, each tagged with its id as the
// simulator's client id (`metadata.user_id`), so its stats count per line.
import { writeFileSync } from "node:fs";

export function writeBatch(path: string, n: number, prompt: string): void {
  writeFileSync(
    path,
    Array.from({ length: n }, (_, i) =>
      JSON.stringify({
        custom_id: `r${i}`,
        params: {
          model: "m",
          max_tokens: 20,
          messages: [{ role: "user", content: `${prompt} ${i}` }],
          metadata: { user_id: `r${i}` },
        },
      })).join("\n") + "\n",
  );
}
