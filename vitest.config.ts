import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["*_test.ts", "test/*_test.ts"],
    testTimeout: 30_000,
  },
});
