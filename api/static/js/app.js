// The chat page: wires the DOM to the store, the API and the renderers.

import { UnauthorizedError, getApiKey, listModels, setApiKey, streamChat } from "./api.js";
import {
  buildRequest, isEmptyReply, lastIndexOfRole, newConversation, titleFor,
} from "./conversation.js";
import { $, h } from "./dom.js";
import { ImageCache, imageFromURL, readImage } from "./images.js";
import { createKeyPrompt } from "./keyprompt.js";
import { loadSettings, saveSettings, validateSettings } from "./settings.js";
import { ReplyTracker } from "./stats.js";
import { openStore } from "./store.js";
import { renderText } from "./text.js";
import { fromExport, toExport } from "./transfer.js";
import { messageNode, thumbNode, welcomeNode } from "./view.js";

const SAVE_EVERY_MS = 3000; // while streaming, so a reload keeps most of a long reply

const ui = {
  app: $("#app"),
  list: $("#conversation-list"),
  storageNote: $("#storage-note"),
  title: $("#title"),
  model: $("#model"),
  banner: $("#banner"),
  messages: $("#messages"),
  composer: $("#composer"),
  input: $("#input"),
  attachments: $("#attachments"),
  editing: $("#editing"),
  send: $("#send"),
  stop: $("#stop"),
  fileInput: $("#file-input"),
  dropOverlay: $("#drop-overlay"),
  settingsDialog: $("#settings-dialog"),
  settingsForm: $("#settings-form"),
  settingsError: $("#settings-error"),
  keyState: $("#key-state"),
  keyForm: $("#key-form"),
  keyCancel: $("#key-cancel"),
  keyInput: $("#key-input"),
  keyReason: $("#key-reason"),
  urlDialog: $("#url-dialog"),
  urlForm: $("#url-form"),
  urlInput: $("#url-input"),
  urlError: $("#url-error"),
  viewer: $("#viewer"),
  viewerImage: $("#viewer-image"),
};

const state = {
  store: null,
  images: null,
  conv: null,
  attachments: [], // [{ref, record}] waiting in the composer; record null when already stored
  editing: false,
  run: null, // {conv, message, controller, tracker}
  model: null,
  settings: loadSettings(),
  deleted: new Set(), // ids of conversations deleted while this page is open
};

// ------------------------------------------------------------------------------------------
// Banner
// ------------------------------------------------------------------------------------------

function showBanner(message, kind = "error") {
  ui.banner.replaceChildren(
    h("span", { text: message }),
    h("button", {
      type: "button", class: "link", onclick: () => { ui.banner.hidden = true; },
    }, "Dismiss"),
  );
  ui.banner.dataset.kind = kind;
  ui.banner.hidden = false;
}

// ------------------------------------------------------------------------------------------
// Conversations: list, open, save, delete
// ------------------------------------------------------------------------------------------

async function refreshList() {
  const items = await state.store.listConversations();
  ui.list.replaceChildren(...items.map((c) => h("li", {},
    h("button", {
      type: "button",
      class: `conversation${state.conv && c.id === state.conv.id ? " active" : ""}`,
      dataset: { id: c.id },
      onclick: () => openConversation(c.id),
    }, h("span", { class: "conversation-title", text: c.title }),
    h("time", {
      datetime: new Date(c.updated).toISOString(),
      text: new Date(c.updated).toLocaleString(),
    })))));
}

async function openConversation(id) {
  const conv = state.run?.conv.id === id ? state.run.conv : await state.store.getConversation(id);
  if (!conv) {
    showBanner("That conversation is no longer stored.");
    return refreshList();
  }
  for (const m of conv.messages) {
    if (m.status === "streaming" && state.run?.conv !== conv) m.status = "interrupted";
  }
  state.conv = conv;
  clearComposer();
  closeSidebar();
  renderConversation();
  await refreshList();
}

function startNewConversation() {
  state.conv = newConversation();
  clearComposer();
  closeSidebar();
  renderConversation();
  refreshList();
  ui.input.focus();
}

// Store `conv` whole; a failure keeps what was stored before and says so.
async function persist(conv, newImages = []) {
  if (!conv.messages.length || state.deleted.has(conv.id)) return;
  conv.updated = Date.now();
  conv.title = titleFor(conv);
  try {
    await state.store.saveConversation(conv, newImages);
  } catch (err) {
    showBanner(`Could not save this conversation (${err?.message ?? err}). What was saved before `
      + "is kept; export the history to keep a copy of this one.");
  }
  if (conv === state.conv) ui.title.textContent = conv.title;
  await refreshList();
}

async function deleteCurrent() {
  const conv = state.conv;
  if (!conv.messages.length) return;
  const question = `Delete "${conv.title}"? Its images go too, unless another conversation `
    + "shows them.";
  if (!window.confirm(question)) return;
  state.deleted.add(conv.id); // a reply still streaming into it must not store it again
  if (state.run?.conv === conv) state.run.controller.abort();
  try {
    await state.store.deleteConversation(conv.id);
  } catch (err) {
    state.deleted.delete(conv.id);
    showBanner(`Could not delete the conversation: ${err?.message ?? err}`);
    return;
  }
  const rest = await state.store.listConversations();
  if (rest.length) await openConversation(rest[0].id);
  else startNewConversation();
}

// ------------------------------------------------------------------------------------------
// Rendering messages
// ------------------------------------------------------------------------------------------

function renderConversation() {
  const conv = state.conv;
  ui.title.textContent = conv.title;
  const ctx = {
    busy: state.run?.conv === conv,
    images: state.images,
    onEdit: startEdit,
    onRegenerate: regenerate,
    onOpenImage: openViewer,
  };
  const nodes = conv.messages.map((m, i) => messageNode(conv, m, i, ctx));
  ui.messages.replaceChildren(...(nodes.length ? nodes : [welcomeNode()]));
  scrollToEnd(true);
}

// Only the text of the reply that is streaming, once per frame.
let pendingFrame = 0;
function updateStreamingText(run) {
  if (pendingFrame || run.conv !== state.conv) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const index = run.conv.messages.indexOf(run.message);
    const body = ui.messages.querySelector(`.msg[data-index="${index}"] .body`);
    if (!body) return;
    const follow = nearEnd();
    renderText(body, run.message.text);
    if (follow) scrollToEnd(true);
  });
}

function nearEnd() {
  const el = ui.messages;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function scrollToEnd(force = false) {
  if (force || nearEnd()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

// ------------------------------------------------------------------------------------------
// Sending and streaming
// ------------------------------------------------------------------------------------------

async function send() {
  const text = ui.input.value.trim();
  if (state.run || (!text && !state.attachments.length)) return;
  const conv = state.conv;
  if (state.editing) conv.messages.splice(lastIndexOfRole(conv.messages, "user"));
  while (conv.messages.length && isEmptyReply(conv.messages.at(-1))) conv.messages.pop();
  const newImages = state.attachments.map((a) => a.record).filter(Boolean);
  const images = state.attachments.map((a) => a.ref);
  conv.messages.push({ role: "user", text, images, created: Date.now() });
  clearComposer();
  await reply(conv, newImages);
}

async function regenerate() {
  const conv = state.conv;
  if (state.run || conv.messages.at(-1)?.role !== "assistant") return;
  conv.messages.pop();
  await reply(conv, []);
}

function setRunning(running) {
  ui.send.hidden = running;
  ui.stop.hidden = !running;
  ui.app.classList.toggle("running", running);
}

async function reply(conv, newImages) {
  const message = { role: "assistant", text: "", status: "streaming", created: Date.now() };
  const history = conv.messages.slice();
  conv.messages.push(message);
  const run = { conv, message, controller: new AbortController(), tracker: null };
  state.run = run;
  setRunning(true);
  if (conv === state.conv) renderConversation();
  await persist(conv, newImages);
  try {
    const body = await buildRequest(history, state.settings, state.model,
      (ref) => state.images.apiURL(ref));
    await streamInto(run, body);
    message.status = "done";
  } catch (err) {
    if (run.controller.signal.aborted) {
      message.status = "stopped";
    } else {
      message.status = "error";
      message.error = err instanceof Error ? err.message : String(err);
    }
  }
  if (run.tracker) {
    message.text = run.tracker.text;
    message.finish_reason = run.tracker.finishReason;
    message.stats = run.tracker.stats();
    if (run.tracker.caldera) message.caldera = run.tracker.caldera;
  }
  message.model = state.model;
  state.run = null;
  setRunning(false);
  if (conv === state.conv) renderConversation();
  await persist(conv);
}

async function streamInto(run, body) {
  for (;;) {
    run.tracker = new ReplyTracker();
    let lastSave = performance.now();
    try {
      for await (const chunk of streamChat(body, run.controller.signal)) {
        if (!run.tracker.add(chunk)) continue;
        run.message.text = run.tracker.text;
        updateStreamingText(run);
        if (performance.now() - lastSave > SAVE_EVERY_MS) {
          lastSave = performance.now();
          persist(run.conv);
        }
      }
      return;
    } catch (err) {
      // A 401 comes before any text: ask for the key and send again.
      const retry = err instanceof UnauthorizedError && !run.tracker.chunks
        && (await askForKey(err.message));
      if (!retry) throw err;
    }
  }
}

function stop() {
  state.run?.controller.abort();
}

// ------------------------------------------------------------------------------------------
// Composer: text, attachments, editing
// ------------------------------------------------------------------------------------------

function clearComposer() {
  ui.input.value = "";
  autosize();
  state.attachments = [];
  state.editing = false;
  ui.editing.hidden = true;
  renderAttachments();
}

function renderAttachments() {
  const chip = (a, i) => h("div", { class: "attachment" },
    thumbNode(a.ref, state.images, openViewer),
    h("span", { class: "attachment-size", text: `${a.ref.width}×${a.ref.height}` }),
    h("button", {
      type: "button",
      class: "remove",
      "aria-label": `Remove ${a.ref.name ?? "image"}`,
      title: "Remove",
      onclick: () => {
        state.attachments.splice(i, 1);
        renderAttachments();
      },
    }, "×"));
  ui.attachments.replaceChildren(...state.attachments.map(chip));
}

function attach(result) {
  state.images.remember(result.record);
  state.attachments.push(result);
  renderAttachments();
}

async function addFiles(files) {
  for (const file of files) {
    try {
      attach(await readImage(file, file.name || "pasted image"));
    } catch (err) {
      showBanner(err.message);
    }
  }
}

function startEdit(index) {
  const m = state.conv.messages[index];
  clearComposer();
  state.editing = true;
  ui.editing.hidden = false;
  ui.input.value = m.text;
  state.attachments = (m.images ?? []).map((ref) => ({ ref, record: null }));
  renderAttachments();
  autosize();
  ui.input.focus();
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

// ------------------------------------------------------------------------------------------
// Dialogs: API key, settings, image URL, viewer
// ------------------------------------------------------------------------------------------

const askForKey = createKeyPrompt(
  { form: ui.keyForm, input: ui.keyInput, reason: ui.keyReason, cancel: ui.keyCancel },
  () => ui.input.focus(),
);

function openSettings() {
  for (const [name, value] of Object.entries(state.settings)) {
    const field = ui.settingsForm.elements.namedItem(name);
    if (field) field.value = value;
  }
  ui.settingsError.hidden = true;
  ui.keyState.textContent = getApiKey()
    ? "An API key is set for this session."
    : "No API key is set.";
  ui.settingsDialog.showModal();
}

function submitSettings(event) {
  if (event.submitter?.value !== "save") return;
  const raw = Object.fromEntries(new FormData(ui.settingsForm).entries());
  const { settings, error } = validateSettings(raw);
  if (error) {
    event.preventDefault();
    ui.settingsError.textContent = error;
    ui.settingsError.hidden = false;
    return;
  }
  state.settings = settings;
  saveSettings(settings);
}

async function submitURL(event) {
  event.preventDefault();
  ui.urlError.hidden = true;
  try {
    attach(await imageFromURL(ui.urlInput.value));
    ui.urlDialog.close();
  } catch (err) {
    ui.urlError.textContent = err.message;
    ui.urlError.hidden = false;
  }
}

async function openViewer(ref) {
  const src = await state.images.src(ref);
  if (!src) return;
  ui.viewerImage.src = src;
  ui.viewerImage.alt = ref.name ?? "image";
  ui.viewer.showModal();
}

// ------------------------------------------------------------------------------------------
// Export / import
// ------------------------------------------------------------------------------------------

async function exportHistory() {
  try {
    const data = await toExport(await state.store.exportAll());
    const url = URL.createObjectURL(new Blob([JSON.stringify(data)], { type: "application/json" }));
    const day = new Date().toISOString().slice(0, 10);
    const link = h("a", { href: url, download: `caldera-chats-${day}.json` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showBanner(`Export failed: ${err?.message ?? err}`);
  }
}

async function importHistory(file) {
  try {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch {
      throw new Error(`${file.name} is not JSON`);
    }
    const added = await state.store.importAll(await fromExport(data));
    await refreshList();
    const plural = added === 1 ? "" : "s";
    showBanner(`Imported ${added} conversation${plural} from ${file.name}.`, "info");
  } catch (err) {
    showBanner(`Import failed: ${err?.message ?? err}`);
  }
}

// ------------------------------------------------------------------------------------------
// Layout: sidebar on narrow screens, drag and drop
// ------------------------------------------------------------------------------------------

function openSidebar() {
  ui.app.classList.add("sidebar-open");
}

function closeSidebar() {
  ui.app.classList.remove("sidebar-open");
}

function hasFiles(event) {
  return [...(event.dataTransfer?.types ?? [])].includes("Files");
}

function bindDragAndDrop() {
  let depth = 0;
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    ui.dropOverlay.hidden = false;
  });
  document.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (!depth) ui.dropOverlay.hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (hasFiles(e) || e.dataTransfer?.types.includes("text/uri-list")) e.preventDefault();
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault(); // never let the browser navigate to a dropped file
    depth = 0;
    ui.dropOverlay.hidden = true;
    const files = [...(e.dataTransfer?.files ?? [])];
    if (files.length) {
      addFiles(files);
      return;
    }
    const lines = e.dataTransfer?.getData("text/uri-list")?.split(/\r?\n/) ?? [];
    const url = lines.find((l) => l && !l.startsWith("#"));
    if (url) imageFromURL(url).then(attach, (err) => showBanner(err.message));
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])].filter((f) => f.type.startsWith("image/"));
    if (!files.length) return;
    e.preventDefault();
    addFiles(files);
  });
}

// ------------------------------------------------------------------------------------------
// Start
// ------------------------------------------------------------------------------------------

async function loadModel() {
  for (;;) {
    try {
      const models = await listModels();
      state.model = models[0]?.id ?? null;
      ui.model.textContent = state.model ?? "";
      ui.model.title = state.model ?? "";
      return;
    } catch (err) {
      if (err instanceof UnauthorizedError && (await askForKey(err.message))) continue;
      if (err instanceof UnauthorizedError) {
        showBanner("This server needs an API key: send a message or reload to enter it.");
      } else {
        showBanner(`Cannot reach the server's API: ${err?.message ?? err}`);
      }
      return;
    }
  }
}

function bind() {
  $("#new-chat").addEventListener("click", startNewConversation);
  $("#delete-chat").addEventListener("click", deleteCurrent);
  $("#open-sidebar").addEventListener("click", openSidebar);
  $("#close-sidebar").addEventListener("click", closeSidebar);
  $("#scrim").addEventListener("click", closeSidebar);
  $("#export").addEventListener("click", exportHistory);
  $("#import").addEventListener("change", (e) => {
    const [file] = e.target.files;
    e.target.value = "";
    if (file) importHistory(file);
  });
  $("#open-settings").addEventListener("click", openSettings);
  $("#forget-key").addEventListener("click", () => {
    setApiKey("");
    ui.keyState.textContent = "No API key is set.";
  });
  ui.settingsForm.addEventListener("submit", submitSettings);
  ui.urlForm.addEventListener("submit", submitURL);
  for (const button of document.querySelectorAll(".dialog-cancel")) {
    button.addEventListener("click", () => button.closest("dialog").close("cancel"));
  }
  $("#add-url").addEventListener("click", () => {
    ui.urlInput.value = "";
    ui.urlError.hidden = true;
    ui.urlDialog.showModal();
  });
  ui.viewer.addEventListener("click", () => ui.viewer.close());
  ui.fileInput.addEventListener("change", () => {
    const files = [...ui.fileInput.files];
    ui.fileInput.value = "";
    addFiles(files);
  });
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.stop.addEventListener("click", stop);
  $("#cancel-edit").addEventListener("click", clearComposer);
  ui.input.addEventListener("input", autosize);
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  bindDragAndDrop();
}

async function main() {
  bind();
  state.store = await openStore();
  state.images = new ImageCache(state.store);
  if (!state.store.persistent) {
    ui.storageNote.textContent = `History is not kept in this browser (${state.store.reason}); `
      + "export it to keep it.";
    ui.storageNote.hidden = false;
  }
  const [latest] = await state.store.listConversations();
  if (latest) await openConversation(latest.id);
  else startNewConversation();
  document.documentElement.dataset.ready = "true"; // for tests and scripts driving the page
  await loadModel();
}

main().catch((err) => showBanner(`The page failed to start: ${err?.message ?? err}`));
