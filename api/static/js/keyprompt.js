// Asking for the API key after a 401. A panel in the page rather than a modal dialog: it opens
// without a user gesture (on the page's first API call), and in Chromium, text typed after a
// modal dialog opened that way was closed by a click did not reach the message box.

import { getApiKey, setApiKey } from "./api.js";

// els: {form, input, reason, cancel}; `afterClose()` runs when the panel hides.
export function createKeyPrompt(els, afterClose = () => {}) {
  let pending = null;

  // Resolves true when a key was entered, false when the user cancelled.
  return function askForKey(reason) {
    if (pending) return pending;
    els.reason.textContent = getApiKey()
      ? `The server refused the key (${reason}). Enter another.`
      : "This server needs an API key. It is kept for this browser session only.";
    els.input.value = "";
    els.form.hidden = false;
    els.input.focus();
    pending = new Promise((resolve) => {
      const finish = (entered) => {
        els.form.removeEventListener("submit", onSubmit);
        els.cancel.removeEventListener("click", onCancel);
        els.form.hidden = true;
        pending = null;
        afterClose();
        resolve(entered);
      };
      const onSubmit = (event) => {
        event.preventDefault();
        const key = els.input.value.trim();
        if (!key) return;
        setApiKey(key);
        finish(true);
      };
      const onCancel = () => finish(false);
      els.form.addEventListener("submit", onSubmit);
      els.cancel.addEventListener("click", onCancel);
    });
    return pending;
  };
}
