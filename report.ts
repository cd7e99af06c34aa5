/**
 * `paceline run --report FILE.html`: one self-contained page (inline SVG
 * and CSS; no scripts, fonts or anything else from the network) that shows
 * what held a run back — each limit's use over time against the limit,
 * marks for 429s and retries, a latency histogram, the totals — and a
 * one-line verdict naming the binding limit. Built from
 * {@linkcode Stats.timeline}, so a script can make the same page.
 *
 * @module
 */
import type { Stats, TimelinePoint } from "./mod.ts";

/** Labels in the reader's language. */
export type Lang = "en" | "zh";

/** What held a run back, from {@linkcode verdict}. */
export interface Verdict {
  /** A rate limit bound the run; concurrency did; or nothing for long. */
  kind: "limit" | "concurrency" | "none";
  /** The binding window's label (e.g. `"inputTokens/60000"`), for `"limit"`. */
  window?: string;
  /** The verdict as a sentence. */
  text: string;
}

/** A window label's parts: `"gpt-4o: inputTokens/60000"`. */
function parseLabel(
  label: string,
): { model?: string; key: string; ms: number } {
  const m = /^(?:(.*): )?([^/:]+)\/(\d+(?:\.\d+)?)$/.exec(label);
  if (!m) return { key: label, ms: 0 };
  return { model: m[1], key: m[2]!, ms: Number(m[3]) };
}

const KEY_TEXT: Record<Lang, Record<string, string>> = {
  en: {
    requests: "requests",
    inputTokens: "input tokens",
    outputTokens: "output tokens",
    tokens: "tokens",
  },
  zh: {
    requests: "请求数",
    inputTokens: "输入 token",
    outputTokens: "输出 token",
    tokens: "token",
  },
};
const SHORT: Record<string, string> = {
  requests: "RPM",
  inputTokens: "ITPM",
  outputTokens: "OTPM",
  tokens: "TPM",
};

function unit(ms: number, lang: Lang): string {
  const en = lang === "en";
  if (ms === 60_000) return en ? "per minute" : "每分钟";
  if (ms === 86_400_000) return en ? "per day" : "每天";
  if (ms % 60_000 === 0) {
    return en ? `per ${ms / 60_000} min` : `每 ${ms / 60_000} 分钟`;
  }
  return en
    ? `per ${+(ms / 1000).toFixed(3)} s`
    : `每 ${+(ms / 1000).toFixed(3)} 秒`;
}

/** "input tokens per minute (gpt-4o)". */
export function windowName(label: string, lang: Lang = "en"): string {
  const { model, key, ms } = parseLabel(label);
  const name = `${KEY_TEXT[lang][key] ?? key} ${unit(ms, lang)}`;
  return model ? `${name} (${model})` : name;
}

const pct = (x: number): string => `${Math.round(x * 100)} %`;
const num = (x: number): string => Math.round(x).toLocaleString("en-US");

/**
 * When an input-token limit bound the run: what prompt caching saved (its
 * reads did not count toward the limit), or that it could save some.
 *
 * @param window The binding window's label.
 * @param s The run's totals.
 * @param lang The reader's language.
 * @returns A sentence, or `""` when input tokens did not bind.
 */
export function cacheNote(
  window: string | undefined,
  s: { inputTokens: number; cacheReadTokens: number; cacheWriteTokens: number },
  lang: Lang = "en",
): string {
  const key = window === undefined ? "" : parseLabel(window).key;
  if (key !== "inputTokens" && key !== "tokens") return "";
  const en = lang === "en";
  if (s.cacheReadTokens > 0) {
    const times = (s.inputTokens + s.cacheReadTokens) / s.inputTokens;
    return en
      ? `Prompt caching kept ${
        num(s.cacheReadTokens)
      } input tokens (cache reads) out of that limit: without it the input would have been ${
        times.toFixed(1)
      } × as much (${
        num(s.cacheWriteTokens)
      } tokens were written to the cache).`
      : `提示缓存让 ${
        num(s.cacheReadTokens)
      } 个输入 token（缓存读取）不计入该限额：没有缓存，输入量会是现在的 ${
        times.toFixed(1)
      } 倍（写入缓存 ${num(s.cacheWriteTokens)} 个 token）。`;
  }
  return en
    ? "Nothing was read from a prompt cache: if the prompts share a long prefix (a system prompt, a document), mark its end with cache_control — after the first request, reads of it do not count toward the input-token limit."
    : "没有读到提示缓存：如果各提示有一段很长的共同前缀（系统提示、文档），用 cache_control 标出其结尾——第一个请求之后，读取缓存的部分不计入输入 token 限额。";
}

/**
 * Which limit bound a run. A window binds when, while work was waiting
 * (`queued > 0`), it sat at ≥ 95 % of its limit for at least half of that
 * time; the one that did so longest is named, with how high the others
 * went. Otherwise, if requests in flight sat at `concurrency` for at least
 * half of the busy time, concurrency bound it; otherwise nothing did for
 * long (the server's latency and the input set the pace). With no windows
 * but a pace found from 429s (a server that sent no limit headers), that
 * pace bound it.
 *
 * @param points The run's {@linkcode Stats.timeline}.
 * @param options `concurrency` (most in flight), `lang`.
 * @returns The verdict, with a sentence.
 */
export function verdict(
  points: TimelinePoint[],
  options: { concurrency?: number; lang?: Lang } = {},
): Verdict {
  const lang = options.lang ?? "en";
  const en = lang === "en";
  const waiting = points.filter((p) => p.queued > 0);
  const labels = new Set(points.flatMap((p) => Object.keys(p.windows)));
  const rows = [...labels].map((label) => {
    let full = 0;
    let peak = 0;
    let limit = 0;
    for (const p of points) {
      const w = p.windows[label];
      if (!w) continue;
      limit = w.limit;
      peak = Math.max(peak, w.used / w.limit);
    }
    for (const p of waiting) {
      const w = p.windows[label];
      if (w && w.used >= 0.95 * w.limit) full++;
    }
    return {
      label,
      share: waiting.length ? full / waiting.length : 0,
      peak,
      limit,
    };
  }).sort((a, b) => b.share - a.share || b.peak - a.peak);
  const best = rows[0];
  const others = (except?: string): string =>
    rows.filter((r) => r.label !== except).map((r) =>
      en
        ? `${windowName(r.label, lang)} peaked at ${pct(r.peak)}`
        : `${windowName(r.label, lang)}最高 ${pct(r.peak)}`
    ).join(en ? "; " : "；");
  if (best && best.share >= 0.5) {
    const rest = rows.filter((r) => r.label !== best.label);
    const higher = rest.map((r) => {
      const { key, ms } = parseLabel(r.label);
      return ms === 60_000 && SHORT[key]
        ? SHORT[key]
        : windowName(r.label, lang);
    });
    const tail = rest.length
      ? en
        ? `; ${others(best.label)} — a higher ${
          [...new Set(higher)].join(" or ")
        } would not make it faster`
        : `；${others(best.label)}——提高${
          [...new Set(higher)].join("或")
        }不会更快`
      : "";
    return {
      kind: "limit",
      window: best.label,
      text: en
        ? `${windowName(best.label, lang)} bound this run: at ≥ 95 % of ${
          num(best.limit)
        } for ${pct(best.share)} of the time work was waiting${tail}.`
        : `本次运行的瓶颈是${windowName(best.label, lang)}：有任务排队时，${
          pct(best.share)
        }的时间用量在上限 ${num(best.limit)} 的 95 % 以上${tail}。`,
    };
  }
  const paced = rows.length ? undefined : paceVerdict(points, lang);
  if (paced) return paced;
  const busy = points.filter((p) => p.inFlight > 0 || p.queued > 0);
  const c = options.concurrency;
  if (c && busy.length) {
    const atCap = busy.filter((p) => p.inFlight >= c).length / busy.length;
    if (atCap >= 0.5) {
      const limits = rows.length
        ? en
          ? `; no rate limit held it back (${others()})`
          : `；没有限额拖慢它（${others()}）`
        : "";
      return {
        kind: "concurrency",
        text: en
          ? `Concurrency bound this run: ${c} requests in flight for ${
            pct(atCap)
          } of the busy time${limits} — more concurrency, not higher limits, would make it faster.`
          : `本次运行的瓶颈是并发数：${
            pct(atCap)
          }的忙碌时间里有 ${c} 个请求在途${limits}——提高并发数（而不是限额）才会更快。`,
      };
    }
  }
  return {
    kind: "none",
    text: en
      ? `No limit bound this run for long${
        rows.length ? ` (${others()})` : ""
      }: the server's latency and the size of the input set the pace.`
      : `本次运行没有长时间受限${
        rows.length ? `（${others()}）` : ""
      }：速度由服务器延迟和输入规模决定。`,
  };
}

/** With no windows at all: the pace found from 429s bound the run, if one was. */
function paceVerdict(points: TimelinePoint[], lang: Lang): Verdict | undefined {
  const paced = points.filter((p) => p.pace?.requests !== undefined);
  if (!paced.length) return undefined;
  const last = paced[paced.length - 1]!.pace!.requests!;
  const refused = points.reduce((a, p) => a + p.rateLimited, 0);
  const rate = last >= 10 ? num(last) : String(+last.toFixed(2));
  return {
    kind: "limit",
    text: lang === "en"
      ? `The server's own limit bound this run: it sent no limit headers, so paceline found the pace from its 429s (${refused} in all) and held it at about ${rate} requests per second at the end.`
      : `本次运行的瓶颈是服务器自己的限额：它的响应头里没有限额，paceline 从它的 429（共 ${refused} 次）中找到了速度，最后保持在每秒约 ${rate} 个请求。`,
  };
}

const esc = (s: string): string =>
  s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;");

const W = 760;
const H = 170;
const PAD = { l: 64, r: 12, t: 12, b: 26 };

function fmtTime(ms: number): string {
  const s = ms / 1000;
  if (s < 120) return `${+s.toFixed(1)} s`;
  if (s < 7200) return `${+(s / 60).toFixed(1)} min`;
  return `${+(s / 3600).toFixed(1)} h`;
}

/** One window's use over time against its limit, with 429 and retry marks. */
function windowChart(
  label: string,
  points: TimelinePoint[],
  end: number,
  lang: Lang,
): string {
  const series = points.filter((p) => p.windows[label]);
  const limit = Math.max(...series.map((p) => p.windows[label]!.limit));
  const top = Math.max(limit, ...series.map((p) => p.windows[label]!.used)) *
    1.1;
  const x = (t: number): number =>
    PAD.l + (end > 0 ? (t / end) * (W - PAD.l - PAD.r) : 0);
  const y = (v: number): number => PAD.t + (1 - v / top) * (H - PAD.t - PAD.b);
  const line = series.map((p) =>
    `${x(p.t + p.ms / 2).toFixed(1)},${y(p.windows[label]!.used).toFixed(1)}`
  ).join(" ");
  const ly = y(limit).toFixed(1);
  return `<figure class="chart">
<figcaption>${esc(windowName(label, lang))}</figcaption>
<svg class="window" data-window="${
    esc(label)
  }" data-points="${series.length}" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${
    esc(windowName(label, lang))
  }">
${axes(end)}
<line class="limit" x1="${PAD.l}" x2="${W - PAD.r}" y1="${ly}" y2="${ly}"/>
<text class="lbl" x="${
    PAD.l - 6
  }" y="${ly}" text-anchor="end" dominant-baseline="middle">${num(limit)}</text>
<polyline class="use" points="${line}"/>
${marks(points, x)}
</svg></figure>`;
}

/** The axes, with 0 and the run's length. */
function axes(end: number): string {
  return `<line class="axis" x1="${PAD.l}" x2="${PAD.l}" y1="${PAD.t}" y2="${
    H - PAD.b
  }"/>
<line class="axis" x1="${PAD.l}" x2="${W - PAD.r}" y1="${H - PAD.b}" y2="${
    H - PAD.b
  }"/>
<text class="lbl" x="${PAD.l - 6}" y="${H - PAD.b}" text-anchor="end">0</text>
<text class="lbl" x="${W - PAD.r}" y="${H - 6}" text-anchor="end">${
    fmtTime(end)
  }</text>`;
}

/** 429 ticks below, retry ticks on top, and event lines, at their points' times. */
function marks(points: TimelinePoint[], x: (t: number) => number): string {
  return points.flatMap((p) => {
    const out: string[] = [];
    const cx = x(p.t + p.ms / 2).toFixed(1);
    if (p.rateLimited) {
      out.push(
        `<line class="m429" x1="${cx}" x2="${cx}" y1="${H - PAD.b}" y2="${
          H - PAD.b - 10
        }"><title>${p.rateLimited} × 429</title></line>`,
      );
    }
    for (const note of p.notes ?? []) {
      out.push(
        `<line class="note" x1="${cx}" x2="${cx}" y1="${PAD.t}" y2="${
          H - PAD.b
        }"><title>${esc(note)}</title></line>`,
      );
    }
    if (p.retries) {
      out.push(
        `<line class="retry" x1="${cx}" x2="${cx}" y1="${PAD.t}" y2="${
          PAD.t + 6
        }"><title>${p.retries} retries</title></line>`,
      );
    }
    return out;
  }).join("\n");
}

/**
 * The pace found from 429s (no limits given or sent in headers): requests
 * sent per second against the pace, a step line as it was found, cut and
 * raised.
 */
function paceChart(points: TimelinePoint[], end: number, lang: Lang): string {
  const first = points.findIndex((p) => p.pace?.requests !== undefined);
  if (first < 0) return "";
  const sent = points.map((p) => p.sent / (p.ms / 1000));
  let pace = NaN;
  const steps = points.map((p) => pace = p.pace?.requests ?? pace);
  const top = Math.max(...sent, ...steps.filter((v) => v >= 0)) * 1.1 || 1;
  const x = (t: number): number =>
    PAD.l + (end > 0 ? (t / end) * (W - PAD.l - PAD.r) : 0);
  const y = (v: number): number => PAD.t + (1 - v / top) * (H - PAD.t - PAD.b);
  const use = points.map((p, i) =>
    `${x(p.t + p.ms / 2).toFixed(1)},${y(sent[i]!).toFixed(1)}`
  ).join(" ");
  const step = points.slice(first).flatMap((p, i) => {
    const v = y(steps[first + i]!).toFixed(1);
    return [`${x(p.t).toFixed(1)},${v}`, `${x(p.t + p.ms).toFixed(1)},${v}`];
  }).join(" ");
  const last = steps[steps.length - 1]!;
  const caption = lang === "en"
    ? "Requests per second: sent, and the pace found from 429s"
    : "每秒请求数：实际发出，与从 429 中找到的速度";
  return `<figure class="chart">
<figcaption>${caption}</figcaption>
<svg class="pace" data-points="${points.length}" data-pace="${
    last.toFixed(2)
  }" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img" aria-label="${caption}">
${axes(end)}
<polyline class="limit" fill="none" points="${step}"/>
<text class="lbl" x="${PAD.l - 6}" y="${
    y(last).toFixed(1)
  }" text-anchor="end" dominant-baseline="middle">${+last.toFixed(2)}/s</text>
<polyline class="use" points="${use}"/>
${marks(points, x)}
</svg></figure>`;
}

/** Latency histogram: 24 bins from 0 to the largest sample kept. */
function histogram(latencies: number[], lang: Lang): string {
  if (latencies.length === 0) return "";
  const max = Math.max(...latencies, 1);
  const bins = new Array(24).fill(0) as number[];
  for (const v of latencies) bins[Math.min(23, Math.floor((v / max) * 24))]!++;
  const top = Math.max(...bins);
  const bw = (W - PAD.l - PAD.r) / 24;
  const bars = bins.map((n, i) => {
    const h = (n / top) * (H - PAD.t - PAD.b);
    return `<rect x="${(PAD.l + i * bw + 1).toFixed(1)}" y="${
      (H - PAD.b - h).toFixed(1)
    }" width="${(bw - 2).toFixed(1)}" height="${h.toFixed(1)}"><title>${
      num(i * max / 24)
    }–${num((i + 1) * max / 24)} ms: ${n}</title></rect>`;
  }).join("\n");
  return `<figure class="chart">
<figcaption>${
    lang === "en"
      ? "Latency (send → response), ms"
      : "延迟（发送 → 响应），毫秒"
  }</figcaption>
<svg class="histogram" viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" role="img">
<line class="axis" x1="${PAD.l}" x2="${W - PAD.r}" y1="${H - PAD.b}" y2="${
    H - PAD.b
  }"/>
${bars}
<text class="lbl" x="${PAD.l}" y="${H - 6}">0</text>
<text class="lbl" x="${W - PAD.r}" y="${H - 6}" text-anchor="end">${
    num(max)
  } ms</text>
</svg></figure>`;
}

/** Options for {@linkcode renderReport}. */
export interface ReportOptions {
  /** The page title, e.g. the input file's name. */
  title: string;
  /** Most requests in flight (`--concurrency`), for the verdict. */
  concurrency?: number;
  /** Labels in English (default) or Chinese. */
  lang?: Lang;
  /** A fatal stop to mark, e.g. "stopped at line 30: quota". */
  stopped?: string;
}

/**
 * The report page for a run's stats: self-contained HTML.
 *
 * @param stats The run's {@linkcode Stats}.
 * @param options Title, concurrency, language.
 * @returns The whole HTML document.
 */
export function renderReport(stats: Stats, options: ReportOptions): string {
  const lang = options.lang ?? "en";
  const en = lang === "en";
  const points = stats.timeline();
  const end = points.length
    ? points[points.length - 1]!.t + points[points.length - 1]!.ms
    : 0;
  const v = verdict(points, { concurrency: options.concurrency, lang });
  const labels = [...new Set(points.flatMap((p) => Object.keys(p.windows)))];
  const s = stats.toJSON();
  return `<!doctype html>
<html lang="${en ? "en" : "zh-CN"}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(options.title)} — paceline</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;max-width:800px;margin:24px auto;padding:0 16px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:22px 0 6px}
.verdict{background:#f3f6fb;border-left:4px solid #2f6fd6;padding:10px 12px;margin:14px 0}
.verdict.limit{border-color:#c0392b;background:#fbf1f0}
.stopped{color:#c0392b;font-weight:600}
figure{margin:10px 0}figcaption{font-weight:600;margin-bottom:2px}
svg{max-width:100%;height:auto;background:#fff}
.axis{stroke:#8a93a3;stroke-width:1}.limit{stroke:#c0392b;stroke-dasharray:6 4;stroke-width:1.5}
.use{fill:none;stroke:#2f6fd6;stroke-width:1.8}.m429{stroke:#c0392b;stroke-width:2}
.retry{stroke:#e08e0b;stroke-width:2}.note{stroke:#111;stroke-width:1.5;stroke-dasharray:2 3}.lbl{font-size:11px;fill:#5b6473}
rect{fill:#7fa6e6}pre{background:#f6f7f9;padding:10px;overflow:auto;font-size:12px}
.legend span{margin-right:14px}.sw{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}
</style></head><body>
<h1>${esc(options.title)}</h1>
<div>${en ? "paceline run report" : "paceline 运行报告"} · ${num(s.calls)} ${
    en ? "calls" : "次调用"
  } · ${fmtTime(s.elapsedMs)}</div>
${options.stopped ? `<p class="stopped">${esc(options.stopped)}</p>` : ""}
<p class="verdict ${v.kind}" id="verdict">${esc(v.text)}${
    v.kind === "limit" && cacheNote(v.window, s, lang)
      ? ` ${esc(cacheNote(v.window, s, lang))}`
      : ""
  }</p>
<h2>${en ? "Each limit's use over time" : "各限额随时间的用量"}</h2>
<div class="legend"><span><i class="sw" style="background:#2f6fd6"></i>${
    en ? "use of the window" : "窗口用量"
  }</span><span><i class="sw" style="background:#c0392b"></i>${
    en ? "limit; red ticks below: 429s" : "上限；底部红线：429"
  }</span><span><i class="sw" style="background:#e08e0b"></i>${
    en ? "retries (ticks on top)" : "重试（顶部）"
  }</span><span><i class="sw" style="background:#111"></i>${
    en ? "events (e.g. a fatal stop)" : "事件（如致命错误停止）"
  }</span></div>
${labels.map((l) => windowChart(l, points, end, lang)).join("\n")}
${
    labels.length
      ? ""
      : `<p>${
        s.pace
          ? (en
            ? "No limits were given, and the server sent none in its headers: paceline found the pace from its 429s."
            : "没有给出限额，服务器响应头里也没有：paceline 从它的 429 中找到了速度。")
          : (en
            ? "No limits were given or learned."
            : "没有给出或学到任何限额。")
      }</p>`
  }
${paceChart(points, end, lang)}
<h2>${en ? "Latency" : "延迟"}</h2>
${histogram(stats.latencies(), lang)}
<h2>${en ? "Totals" : "总计"}</h2>
<pre>${esc(stats.report())}</pre>
</body></html>
`;
}
