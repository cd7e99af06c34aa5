// Shared by the test files: simulators that close themselves after each test.
import { afterEach } from "vitest";
import {
  type Simulator,
  type SimulatorOptions,
  startSimulator,
} from "../sim.ts";

const open: Simulator[] = [];

/** Starts a simulator that is closed after the current test. */
export async function sim(options: SimulatorOptions = {}): Promise<Simulator> {
  const s = await startSimulator(options);
  open.push(s);
  return s;
}

afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
});
