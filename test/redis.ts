// A throwaway Debian redis-server on a free port, for the shared-limit
// tests. `npm test` installs redis-server first when it is missing; here a
// missing binary is an error, never a skip.
import { type ChildProcess, spawn } from "node:child_process";
import { createServer, Socket } from "node:net";

export interface RedisServer {
  url: string;
  port: number;
  /** Stops the server (SIGKILL: what a crash looks like to clients). */
  kill(): Promise<void>;
}

/** A port nobody listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as { port: number };
      srv.close(() => resolve(port));
    });
  });
}

function ping(port: number): Promise<boolean> {
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

/** Starts `redis-server` (no persistence) and waits until it answers PING. */
export async function startRedis(): Promise<RedisServer> {
  const port = await freePort();
  const child: ChildProcess = spawn("redis-server", [
    "--port",
    String(port),
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
  ], { stdio: "ignore" });
  let failed: Error | undefined;
  child.once("error", (e) => {
    failed = new Error(
      `cannot start redis-server (${e.message}): install it with apt-get install -y redis-server (npm test does this as root)`,
    );
  });
  for (let i = 0; i < 100; i++) {
    if (failed) throw failed;
    if (await ping(port)) break;
    await new Promise((r) => setTimeout(r, 50));
    if (i === 99) {
      throw new Error(`redis-server did not answer on port ${port}`);
    }
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    kill: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.once("exit", () => resolve());
        child.kill("SIGKILL");
      }),
  };
}
