export interface RedisServer {
  url: string;
  port: number;
  /** Stops the server (SIGKILL: what a crash looks like to clients). */
  kill(): Promise<void>;
}
export function freePort(): Promise<number>;
export function startRedis(port?: number): Promise<RedisServer>;
