// One streamed reply, followed chunk by chunk: its text, timings and the server's extras.

export class ReplyTracker {
  constructor(now = () => performance.now()) {
    this.now = now;
    this.started = now();
    this.first = null;
    this.last = null;
    this.chunks = 0;
    this.text = "";
    this.finishReason = null;
    this.usage = null;
    this.caldera = null;
  }

  // Take one chunk; returns true when it added text.
  add(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    if (chunk.caldera) this.caldera = chunk.caldera;
    let added = false;
    for (const choice of chunk.choices ?? []) {
      if (choice.index !== undefined && choice.index !== 0) continue;
      const piece = choice.delta?.content;
      if (piece) {
        const t = this.now();
        if (this.first === null) this.first = t;
        this.last = t;
        this.chunks += 1;
        this.text += piece;
        added = true;
      }
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    return added;
  }

  stats() {
    return replyStats(this);
  }
}

// TTFT: from sending the request to the first text. Tokens/s: the tokens after the first over
// the time from the first to the last (decode speed, as vLLM's benchmarks count it). Token
// counts come from the server's usage when it sent one, else from the chunks (one per token
// unless the server held some back, e.g. for a stop string), marked approximate.
export function replyStats({ started, first, last, chunks, usage }) {
  const exact = Boolean(usage && Number.isFinite(usage.completion_tokens));
  const tokens = exact ? usage.completion_tokens : chunks;
  const span = first !== null && last !== null ? (last - first) / 1000 : 0;
  const details = usage?.prompt_tokens_details ?? {};
  return {
    ttft_ms: first === null ? null : first - started,
    tokens_per_s: tokens > 1 && span > 0 ? (tokens - 1) / span : null,
    completion_tokens: tokens,
    exact,
    prompt_tokens: usage?.prompt_tokens ?? null,
    cached_tokens: details.cached_tokens ?? null,
    image_tokens: details.image_tokens ?? null,
  };
}

export function formatStats(stats) {
  const parts = [];
  if (stats.ttft_ms !== null && stats.ttft_ms !== undefined) {
    const ms = stats.ttft_ms;
    parts.push(`TTFT ${ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`}`);
  }
  if (stats.tokens_per_s !== null && stats.tokens_per_s !== undefined) {
    parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
  }
  if (stats.completion_tokens) {
    const n = stats.completion_tokens;
    parts.push(`${stats.exact ? "" : "~"}${n} token${n === 1 ? "" : "s"}`);
  }
  if (stats.prompt_tokens !== null && stats.prompt_tokens !== undefined) {
    let prompt = `prompt ${stats.prompt_tokens}`;
    if (stats.cached_tokens) prompt += ` (${stats.cached_tokens} cached)`;
    parts.push(prompt);
  }
  return parts.join(" · ");
}
