// A conversation's messages as DOM nodes. Text goes in as text nodes only (see text.js).

import { imagesOfTurn, lastIndexOfRole } from "./conversation.js";
import { h } from "./dom.js";
import { figureNode } from "./figure.js";
import { formatStats } from "./stats.js";
import { renderText } from "./text.js";

const STATUS_TEXT = {
  stopped: "Stopped.",
  interrupted: "Interrupted: the page was closed while this reply came in.",
};

export function welcomeNode() {
  return h("div", { class: "welcome" },
    h("h2", { text: "Talk to the model about an image" }),
    h("p", {
      text: "Drop an image here, paste one, attach it with the clip or give its URL, "
        + "then ask a question.",
    }),
    h("p", {
      text: "Each reply shows its time to first token and speed, and for each image how "
        + "many tokens it cost and how the model saw it.",
    }));
}

// A thumbnail button; `images` is the ImageCache, `onOpen(ref)` shows it large.
export function thumbNode(ref, images, onOpen) {
  const img = h("img", { alt: ref.name ?? "image", width: 96, height: 96, loading: "lazy" });
  images.src(ref).then((src) => {
    if (src) img.src = src;
    else img.replaceWith(h("span", { class: "missing", text: "image not stored" }));
  });
  return h("button", {
    type: "button",
    class: "thumb",
    title: `${ref.name ?? "image"} · ${ref.width}×${ref.height}`,
    onclick: () => onOpen(ref),
  }, img);
}

function statusNode(m) {
  if (m.status === "streaming") {
    return h("div", { class: "status typing", "aria-label": "the reply is coming" },
      h("span"), h("span"), h("span"));
  }
  let text = STATUS_TEXT[m.status] ?? "";
  if (m.status === "error") text = `Error: ${m.error ?? "the request failed"}`;
  else if (!text && m.finish_reason === "length") text = "Stopped at the max tokens limit.";
  return text ? h("div", { class: `status status-${m.status}`, text }) : null;
}

function metaNode(conv, m, index, images) {
  const meta = h("div", { class: "meta" });
  if (m.stats) meta.append(h("div", { class: "stats", text: formatStats(m.stats) }));
  const question = conv.messages[lastIndexOfRole(conv.messages.slice(0, index), "user")];
  const turn = imagesOfTurn(m.caldera, question);
  if (turn.length) {
    const figures = h("div", { class: "figures" });
    for (const { info, ref } of turn) {
      const slot = h("div", { class: "figure-slot" });
      figures.append(slot);
      images.drawable(ref).then((source) => slot.replaceWith(figureNode(info, source)));
    }
    meta.append(figures);
  } else if (m.stats?.image_tokens) {
    meta.append(h("div", {
      class: "stats", text: `${m.stats.image_tokens} image tokens in the prompt`,
    }));
  }
  return meta.childElementCount ? meta : null;
}

function actionsNode(conv, m, index, ctx) {
  if (ctx.busy) return null;
  const buttons = [];
  if (m.role === "user" && index === lastIndexOfRole(conv.messages, "user")) {
    buttons.push(h("button", { type: "button", class: "link", onclick: () => ctx.onEdit(index) },
      "Edit"));
  }
  if (m.role === "assistant" && index === conv.messages.length - 1) {
    buttons.push(h("button", { type: "button", class: "link", onclick: ctx.onRegenerate },
      "Regenerate"));
  }
  return buttons.length ? h("div", { class: "actions" }, buttons) : null;
}

// ctx: {busy, images, onEdit(index), onRegenerate(), onOpenImage(ref)}
export function messageNode(conv, m, index, ctx) {
  const node = h("article", {
    class: `msg ${m.role}`,
    dataset: { index: String(index), status: m.status ?? "done" },
  });
  if (m.role === "user") {
    if (m.images?.length) {
      node.append(h("div", { class: "thumbs" },
        m.images.map((ref) => thumbNode(ref, ctx.images, ctx.onOpenImage))));
    }
    if (m.text) node.append(h("div", { class: "body user-text", text: m.text }));
  } else {
    const body = h("div", { class: "body" });
    renderText(body, m.text);
    node.append(body, statusNode(m) ?? "", metaNode(conv, m, index, ctx.images) ?? "");
  }
  const actions = actionsNode(conv, m, index, ctx);
  if (actions) node.append(actions);
  return node;
}
