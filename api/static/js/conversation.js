// Conversations as data: building the API request from the history, titles, edits. No DOM.

import { newId } from "./store.js";
import { samplingFields } from "./settings.js";

export function newConversation(now = Date.now()) {
  return { id: newId(), title: "New chat", created: now, updated: now, messages: [] };
}

export function titleFor(conv) {
  const first = conv.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const text = first.text.replace(/\s+/g, " ").trim();
  if (text) return text.length > 60 ? `${text.slice(0, 57)}…` : text;
  if (!first.images?.length) return "New chat";
  const plural = first.images.length > 1 ? "s" : "";
  return `Image${plural}: ${first.images[0].name ?? "untitled"}`;
}

// A reply that produced nothing (failed, or stopped before any text) is not history: it is
// dropped before the next question, so user and assistant turns keep alternating.
export function isEmptyReply(m) {
  return m.role === "assistant" && !m.text && m.status !== "streaming";
}

export function lastIndexOfRole(messages, role) {
  for (let i = messages.length - 1; i >= 0; i--) if (messages[i].role === role) return i;
  return -1;
}

// The body of a chat completion request for `messages` (the history up to the question).
// `imageURL(ref)` gives what goes into an image_url part.
export async function buildRequest(messages, settings, model, imageURL) {
  const out = [];
  if (settings.system.trim()) out.push({ role: "system", content: settings.system });
  for (const m of messages) {
    if (m.role === "assistant") {
      if (m.text) out.push({ role: "assistant", content: m.text });
      continue;
    }
    if (!m.images?.length) {
      out.push({ role: "user", content: m.text });
      continue;
    }
    const parts = [];
    for (const ref of m.images) {
      const image_url = { url: await imageURL(ref) };
      if (settings.detail && settings.detail !== "auto") image_url.detail = settings.detail;
      parts.push({ type: "image_url", image_url });
    }
    if (m.text) parts.push({ type: "text", text: m.text });
    out.push({ role: "user", content: parts });
  }
  const body = {
    messages: out,
    stream: true,
    stream_options: { include_usage: true },
    caldera_details: true,
    ...samplingFields(settings),
  };
  if (model) body.model = model;
  return body;
}

// The `caldera.images` entries that belong to the images of `userMessage`: the prompt lists
// every image of the conversation in order, and this message's come last.
export function imagesOfTurn(caldera, userMessage) {
  const infos = caldera?.images ?? [];
  const count = userMessage?.images?.length ?? 0;
  if (!count || !infos.length) return [];
  const mine = infos.slice(Math.max(0, infos.length - count));
  const refs = userMessage.images.slice(userMessage.images.length - mine.length);
  return mine.map((info, i) => ({ info, ref: refs[i] }));
}
