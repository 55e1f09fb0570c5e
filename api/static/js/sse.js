// Server-sent events: the data payloads of a text/event-stream, as the HTML standard parses it
// (any line ending, comments, multi-line data, "data:" with or without the space).

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
  }

  // Feed decoded text; returns the data of each event this text completes.
  push(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buffer);
      if (!m) break;
      if (m[0] === "\r" && m.index === this.buffer.length - 1) break; // maybe half of \r\n
      const line = this.buffer.slice(0, m.index);
      this.buffer = this.buffer.slice(m.index + m[0].length);
      this.line(line, events);
    }
    return events;
  }

  // End of stream: an event not followed by a blank line is dropped, as the standard says.
  finish() {
    this.buffer = "";
    this.data = [];
    return [];
  }

  line(line, events) {
    if (line === "") {
      if (this.data.length) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

// The data payloads of a fetch Response's event stream, as they arrive.
export async function* eventData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* parser.push(value);
    }
  } finally {
    reader.cancel().catch(() => {}); // stops the download when the reader leaves early
  }
}
