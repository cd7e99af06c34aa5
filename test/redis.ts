// The throwaway redis-server of the shared-limit tests (see redis_server.mjs).
export { freePort, type RedisServer, startRedis } from "./redis_server.mjs";
