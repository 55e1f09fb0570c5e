// Model text -> blocks (paragraphs and fenced code) -> DOM, built from text nodes only.
// Parsing tolerates what streaming produces: an unclosed fence is a code block in progress.

import { copyText, h } from "./dom.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;

export function parseBlocks(text) {
  const blocks = [];
  let paragraph = [];
  let code = null;
  const flush = () => {
    if (paragraph.length) blocks.push({ type: "paragraph", text: paragraph.join("\n") });
    paragraph = [];
  };
  for (const line of text.replace(/\r\n?/g, "\n").split("\n")) {
    if (code) {
      const trimmed = line.trim();
      const closes = trimmed.length >= code.fence.length && trimmed[0] === code.fence[0]
        && [...trimmed].every((c) => c === code.fence[0]);
      if (closes) {
        blocks.push({ type: "code", lang: code.lang, text: code.lines.join("\n"), closed: true });
        code = null;
      } else {
        code.lines.push(line);
      }
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      flush();
      code = { fence: fence[1], lang: fence[2], lines: [] };
    } else if (line.trim() === "") {
      flush();
    } else {
      paragraph.push(line);
    }
  }
  flush();
  if (code) {
    blocks.push({ type: "code", lang: code.lang, text: code.lines.join("\n"), closed: false });
  }
  return blocks;
}

// `inline code` spans of a paragraph: [{code: bool, text}]; an unpaired backtick is text.
export function parseInline(text) {
  const parts = [];
  const re = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g;
  let last = 0;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    if (m.index > last) parts.push({ code: false, text: text.slice(last, m.index) });
    parts.push({ code: true, text: m[2] });
    last = m.index + m[0].length;
  }
  if (last < text.length) parts.push({ code: false, text: text.slice(last) });
  return parts;
}

function paragraphNode(text) {
  const parts = parseInline(text);
  return h("p", {}, parts.map((part) => (part.code ? h("code", { text: part.text }) : part.text)));
}

function codeNode(block) {
  const button = h("button", { type: "button", class: "copy", title: "Copy the code" }, "Copy");
  button.addEventListener("click", async () => {
    try {
      await copyText(block.text);
      button.textContent = "Copied";
    } catch (err) {
      button.textContent = "Copy failed";
      button.title = String(err);
    }
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return h("div", { class: "code-block" },
    h("div", { class: "code-head" }, h("span", { text: block.lang || "code" }), button),
    h("pre", {}, h("code", { text: block.text })));
}

// Replace the contents of `container` with `text` rendered as blocks.
export function renderText(container, text) {
  const blocks = parseBlocks(text);
  const node = (b) => (b.type === "code" ? codeNode(b) : paragraphNode(b.text));
  container.replaceChildren(...blocks.map(node));
}
