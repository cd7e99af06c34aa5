import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["*_test.ts", "test/*_test.ts"],
    testTimeout: 30_000,
    // The end-to-end files measure real-time behaviour against a simulator
    // on loopback; running them one at a time keeps the 2-core machine's
    // noise out of their send-to-arrival skew.
    fileParallelism: false,
  },
});
