// The run report: the binding-limit verdict on synthetic timelines, the
// timeline's bounded memory, and the page itself in Debian's chromium.
import { describe, expect, it } from "vitest";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { chromium } from "playwright-core";
import {
  ManualClock,
  rateLimitedFetch,
  Stats,
  type TimelinePoint,
} from "./mod.ts";
import { cacheNote, renderReport, verdict } from "./report.ts";
import { main } from "./cli.ts";
import { sim } from "./test/sims.ts";

/** A synthetic timeline: `n` one-second points made by `f(i)`. */
function timeline(
  n: number,
  f: (i: number) => Partial<TimelinePoint>,
): TimelinePoint[] {
  return Array.from({ length: n }, (_, i) => ({
    t: i * 1000,
    ms: 1000,
    sent: 1,
    inputTokens: 0,
    outputTokens: 0,
    rateLimited: 0,
    retries: 0,
    errors: 0,
    inFlight: 1,
    queued: 0,
    queueWaitMs: 0,
    windows: {},
    ...f(i),
  }));
}

/** A fresh folder with an Anthropic batch of `n` lines, and where the report goes. */
function batch(n: number, maxTokens: number): { input: string; page: string } {
  const d = mkdtempSync(join(tmpdir(), "paceline-report-"));
  const input = join(d, "in.jsonl");
  writeFileSync(
    input,
    Array.from({ length: n }, (_, i) =>
      JSON.stringify({
        custom_id: `q${i}`,
        params: {
          model: "claude-sim",
          max_tokens: maxTokens,
          messages: [{ role: "user", content: `Question number ${i}` }],
        },
      })).join("\n") + "\n",
  );
  return { input, page: join(d, "run.html") };
}

describe("verdict", () => {
  it("tokens bound: names the window pinned while work waited, and how high the others went", () => {
    const pts = timeline(100, (i) => ({
      queued: 5,
      windows: {
        "requests/60000": { used: 20, limit: 50 },
        "inputTokens/60000": { used: i < 92 ? 29_500 : 10_000, limit: 30_000 },
        "outputTokens/60000": { used: 3280, limit: 8000 },
      },
    }));
    const v = verdict(pts, { concurrency: 8 });
    expect(v.kind).toBe("limit");
    expect(v.window).toBe("inputTokens/60000");
    expect(v.text).toBe(
      "input tokens per minute bound this run: at ≥ 95 % of 30,000 for 92 % of the time work was waiting; output tokens per minute peaked at 41 %; requests per minute peaked at 40 % — a higher OTPM or RPM would not make it faster.",
    );
    expect(verdict(pts, { lang: "zh" }).text).toMatch(
      /^本次运行的瓶颈是输入 token 每分钟：有任务排队时，92 %的时间用量在上限 30,000 的 95 % 以上/,
    );
  });

  it("requests bound (per model): the model's requests window", () => {
    const pts = timeline(60, () => ({
      queued: 3,
      windows: {
        "gpt-4o: requests/60000": { used: 500, limit: 500 },
        "gpt-4o: tokens/60000": { used: 9000, limit: 30_000 },
      },
    }));
    const v = verdict(pts);
    expect(v.window).toBe("gpt-4o: requests/60000");
    expect(v.text).toMatch(
      /^requests per minute \(gpt-4o\) bound this run: at ≥ 95 % of 500 for 100 %/,
    );
    expect(v.text).toMatch(/a higher TPM would not make it faster\.$/);
  });

  it("nothing bound because concurrency was the limit: says so", () => {
    const pts = timeline(50, () => ({
      inFlight: 8,
      queued: 12,
      windows: { "requests/60000": { used: 100, limit: 1000 } },
    }));
    const v = verdict(pts, { concurrency: 8 });
    expect(v.kind).toBe("concurrency");
    expect(v.text).toBe(
      "Concurrency bound this run: 8 requests in flight for 100 % of the busy time; no rate limit held it back (requests per minute peaked at 10 %) — more concurrency, not higher limits, would make it faster.",
    );
  });

  it("nothing bound at all: latency and the input set the pace", () => {
    const pts = timeline(10, () => ({
      inFlight: 2,
      windows: { "outputTokens/60000": { used: 50, limit: 8000 } },
    }));
    const v = verdict(pts, { concurrency: 8 });
    expect(v.kind).toBe("none");
    expect(v.text).toMatch(
      /^No limit bound this run for long \(output tokens per minute peaked at 1 %\)/,
    );
  });
});

describe("the verdict on prompt caching", () => {
  it("input tokens bound: what cache reads kept out of the limit, or that marking a prefix could", () => {
    const run = {
      inputTokens: 2000,
      cacheReadTokens: 18_000,
      cacheWriteTokens: 600,
    };
    expect(cacheNote("inputTokens/60000", run)).toBe(
      "Prompt caching kept 18,000 input tokens (cache reads) out of that limit: without it the input would have been 10.0 × as much (600 tokens were written to the cache).",
    );
    expect(cacheNote("claude: tokens/2000", run, "zh")).toMatch(
      /提示缓存让 18,000 个输入 token.*10\.0 倍/,
    );
    expect(cacheNote("inputTokens/60000", { ...run, cacheReadTokens: 0 }))
      .toMatch(/^Nothing was read from a prompt cache: .*cache_control/);
    expect(cacheNote("requests/60000", run)).toBe("");
    expect(cacheNote(undefined, run)).toBe("");
  });
});

describe("Stats.timeline", () => {
  it("a simulated 7-day run keeps at most a few thousand points, every attempt counted", async () => {
    const clock = new ManualClock();
    const stats = new Stats(clock);
    stats.call();
    let sent = 0;
    for (let s = 0; s < 7 * 86_400; s += 7) {
      stats.attempt(5, 100, s % 700 === 0 ? 429 : 200);
      stats.tokens(10, 2);
      stats.sample({
        inFlight: 3,
        queued: 1,
        windows: { "requests/60000": { used: 40, limit: 50 } },
      });
      sent++;
      await clock.advance(7000);
    }
    const t = stats.timeline();
    expect(t.length).toBeLessThanOrEqual(2000);
    expect(t.length).toBeGreaterThan(500);
    expect(t.reduce((a, p) => a + p.sent, 0)).toBe(sent);
    expect(t.reduce((a, p) => a + p.inputTokens, 0)).toBe(sent * 10);
    expect(t.reduce((a, p) => a + p.rateLimited, 0)).toBe(
      stats.toJSON().rateLimited,
    );
    // Contiguous buckets of one width, covering the week.
    const w = t[0]!.ms;
    t.forEach((p, i) => expect(p.t).toBe(i * w));
    expect(t.at(-1)!.t + w).toBeGreaterThanOrEqual(7 * 86_400_000 - 7000);
    expect(t[10]!.windows["requests/60000"]).toEqual({ used: 40, limit: 50 });
    expect(() => new Stats(clock, { maxPoints: 1 })).toThrow(/'maxPoints'/);
  });
});

describe("rateLimitedFetch's timeline", () => {
  it("in flight counts requests sent, not those holding a slot while they wait for a permit", async () => {
    const clock = new ManualClock();
    const f = rateLimitedFetch({
      clock,
      learn: false,
      limiter: {
        windows: [{ key: "requests", limit: 1, ms: 1000 }],
        marginMs: 0,
      },
      fetch: () => Promise.resolve(new Response("ok")),
    });
    let done = false;
    const calls = Promise.all(
      [0, 1, 2].map(() => f("http://x/v1/models").then((r) => r.text())),
    ).then(() => (done = true));
    for (let i = 0; i < 100 && !done; i++) {
      await clock.flush();
      if (!done && clock.nextAt !== undefined) {
        await clock.advance(clock.nextAt - clock.now());
      }
    }
    await calls;
    const t = f.stats.timeline();
    expect(Math.max(...t.map((p) => p.inFlight))).toBe(1);
    expect(Math.max(...t.map((p) => p.queued))).toBe(3);
    expect(t.reduce((a, p) => a + p.sent, 0)).toBe(3);
  });
});

describe("paceline run --report, in a real browser", () => {
  it("chromium: no console errors, no network requests, one chart per window with its points, the verdict names the binding limit", async () => {
    // The simulator binds on output tokens: 600 per window, ~27 per answer.
    const s = await sim({
      limits: {
        requests: 100,
        inputTokens: 20_000,
        outputTokens: 600,
        windowMs: 1000,
      },
      latency: { baseMs: 5 },
    });
    const { input, page } = batch(120, 48);
    let err = "";
    const code = await main([
      "run",
      input,
      "--base-url",
      s.url,
      "--rpm",
      "100",
      "--itpm",
      "20000",
      "--otpm",
      "600",
      "--window-ms",
      "1000",
      "--margin-ms",
      "100",
      "--report",
      page,
      "--lang",
      "en",
      "--progress-ms",
      "100000",
    ], { out: () => {}, err: (x) => void (err += x), isTTY: false });
    expect(code).toBe(0);
    expect(err).toContain(`report in ${page}`);
    const html = readFileSync(page, "utf8");
    expect(html).not.toMatch(/<script|https?:\/\//);

    const browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      args: ["--no-sandbox"],
    });
    try {
      const tab = await browser.newPage({
        viewport: { width: 840, height: 1200 },
      });
      const errors: string[] = [];
      const requests: string[] = [];
      tab.on("console", (m) => {
        if (m.type() === "error") errors.push(m.text());
      });
      tab.on("pageerror", (e) => errors.push(String(e)));
      tab.on("request", (r) => requests.push(r.url()));
      const url = pathToFileURL(page).href;
      await tab.goto(url);
      expect(errors).toEqual([]);
      expect(requests).toEqual([url]); // the page itself, nothing else
      const charts = await tab.$$eval("svg.window", (els) =>
        els.map((e) => ({
          window: e.getAttribute("data-window"),
          points: Number(e.getAttribute("data-points")),
          drawn: (e.querySelector("polyline")?.getAttribute("points") ?? "")
            .trim().split(/\s+/).filter(Boolean).length,
        })));
      expect(charts.map((c) => c.window).sort()).toEqual([
        "inputTokens/1000",
        "outputTokens/1000",
        "requests/1000",
      ]);
      for (const c of charts) {
        expect(c.drawn).toBe(c.points);
        expect(c.points).toBeGreaterThanOrEqual(3); // a run of several seconds
      }
      const text = await tab.textContent("#verdict");
      expect(text).toMatch(
        /^output tokens per 1 s bound this run: at ≥ 95 % of 600/,
      );
      expect(await tab.$$eval("svg.histogram rect", (r) => r.length)).toBe(24);
      await tab.screenshot({
        path: page.replace(/run\.html$/, "report.png"),
        fullPage: true,
      });
      console.log(
        `report screenshot: ${page.replace(/run\.html$/, "report.png")}`,
      );
    } finally {
      await browser.close();
    }
  });
});

describe("renderReport", () => {
  it("a fatal stop is marked on the charts and named at the top", async () => {
    const s = await sim({
      limits: { requests: 100, windowMs: 1000 },
      quotaAfter: 10,
    });
    const { input, page } = batch(30, 16);
    const code = await main([
      "run",
      input,
      "--base-url",
      s.url,
      "--rpm",
      "100",
      "--window-ms",
      "1000",
      "--report",
      page,
      "--quiet",
      "--concurrency",
      "2",
    ], { out: () => {}, err: () => {}, isTTY: false });
    expect(code).toBe(3);
    const html = readFileSync(page, "utf8");
    expect(html).toMatch(
      /<p class="stopped">stopped at line \d+: the account's quota/,
    );
    expect(html).toMatch(
      /<line class="note"[^>]*><title>stopped at line \d+: the account/,
    );
  });

  it("Stats.note: kept in the timeline, merged with its bucket, at most 100", async () => {
    const clock = new ManualClock();
    const stats = new Stats(clock, { bucketMs: 1000, maxPoints: 4 });
    stats.call();
    stats.note("first");
    for (let i = 0; i < 10; i++) await clock.advance(1000);
    stats.note("second");
    const notes = stats.timeline().flatMap((p) => p.notes ?? []);
    expect(notes).toEqual(["first", "second"]);
    for (let i = 0; i < 200; i++) stats.note(`n${i}`);
    expect(stats.timeline().flatMap((p) => p.notes ?? []).length).toBe(100);
  });

  it("escapes what it shows and says when nothing was limited", () => {
    const stats = new Stats();
    const html = renderReport(stats, { title: "<b>x</b>.jsonl" });
    expect(html).toContain("&lt;b&gt;x&lt;/b&gt;.jsonl");
    expect(html).toContain("No limits were given or learned.");
  });
});
