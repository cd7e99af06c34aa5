/**
 * The subset of the vitest API our tests use, for Deno. deno.json maps the
 * bare specifier "vitest" here, so the same `*_test.ts` files run under
 * vitest (Node), `bun test` (which maps "vitest" to bun:test) and
 * `deno test`. Assertions come from Jest's standalone `expect` package.
 */
import { expect } from "expect";

export { expect };

type Fn = () => unknown;
const names: string[] = [];
const befores: Fn[][] = [[]];
const afters: Fn[][] = [[]];

export function describe(name: string, body: () => void): void {
  names.push(name);
  befores.push([]);
  afters.push([]);
  try {
    body();
  } finally {
    names.pop();
    befores.pop();
    afters.pop();
  }
}

export function beforeEach(fn: Fn): void {
  befores[befores.length - 1]!.push(fn);
}

export function afterEach(fn: Fn): void {
  afters[afters.length - 1]!.push(fn);
}

function register(name: string, fn: Fn, timeout?: number): void {
  const full = [...names, name].join(" > ");
  const pre = befores.flat();
  const post = afters.flat().reverse();
  Deno.test({
    name: full,
    // Our tests check their own timers and listeners; the op sanitizer
    // would also flag node:http sockets closing a tick after the test.
    sanitizeOps: false,
    sanitizeResources: false,
    async fn() {
      for (const b of pre) await b();
      try {
        if (timeout === undefined) await fn();
        else {
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            fn(),
            new Promise((_, reject) => {
              timer = setTimeout(
                () => reject(new Error(`test timed out after ${timeout} ms`)),
                timeout,
              );
            }),
          ]).finally(() => clearTimeout(timer));
        }
      } finally {
        for (const a of post) await a();
      }
    },
  });
}

export function it(name: string, fn: Fn, timeout?: number): void {
  register(name, fn, timeout);
}
export const test = it;
