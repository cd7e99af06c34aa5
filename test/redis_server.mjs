// @ts-check
// A throwaway Debian redis-server on a free port (no persistence), for the
// tests, the test script and the benchmarks. A missing binary is an error,
// never a skip: `npm test` installs redis-server first when it is missing.
import { spawn } from "node:child_process";
import { createServer, Socket } from "node:net";

/** A port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (srv
        .address());
      srv.close(() => resolve(port));
    });
  });
}

/** @param {number} port */
function ping(port) {
  return new Promise((resolve) => {
    const s = new Socket();
    s.once("error", () => resolve(false));
    s.connect(port, "127.0.0.1", () => {
      s.write("PING\r\n");
      s.once("data", (d) => {
        s.destroy();
        resolve(d.toString().startsWith("+PONG"));
      });
    });
  });
}

/**
 * Starts `redis-server` and waits until it answers PING: on a free port, or
 * on `port` (a restart where an earlier one ran, as after a crash).
 * @param {number} [port]
 */
export async function startRedis(port) {
  port ??= /** @type {number} */ (await freePort());
  const child = spawn("redis-server", [
    "--port",
    String(port),
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
  ], { stdio: "ignore" });
  /** @type {Error | undefined} */
  let failed;
  child.once("error", (e) => {
    failed = new Error(
      `cannot start redis-server (${e.message}): install it with apt-get install -y redis-server (npm test does this as root)`,
    );
  });
  for (let i = 0;; i++) {
    if (failed) throw failed;
    if (await ping(port)) break;
    if (i === 100) {
      throw new Error(`redis-server did not answer on port ${port}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    /** Stops the server (SIGKILL: what a crash looks like to clients). */
    kill: () => /** @type {Promise<void>} */ (new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) {
        return resolve();
      }
      child.once("exit", () => resolve());
      child.kill("SIGKILL");
    })),
  };
}
