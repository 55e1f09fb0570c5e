// Calls to the server's OpenAI-compatible API. The API key, when the server has one, lives in
// sessionStorage only (gone when the browser session ends) and goes out as a bearer token.

import { eventData } from "./sse.js";

const KEY_NAME = "caldera.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

// The server answered 401: the page asks for a key and tries again.
export class UnauthorizedError extends ApiError {
  constructor(message) {
    super(401, message);
    this.name = "UnauthorizedError";
  }
}

export function getApiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_NAME, key);
    else sessionStorage.removeItem(KEY_NAME);
  } catch {
    // Storage disabled: the key cannot be kept, and the next 401 asks again.
  }
}

function headers(extra = {}) {
  const key = getApiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    const message = body?.error?.message ?? body?.detail ?? body?.message;
    if (message) return typeof message === "string" ? message : JSON.stringify(message);
  } catch {
    // not JSON: use the text
  }
  return text.trim() || `${response.status} ${response.statusText}`;
}

async function checked(response) {
  if (response.ok) return response;
  const message = await errorMessage(response);
  if (response.status === 401) throw new UnauthorizedError(message);
  throw new ApiError(response.status, message);
}

// Relative URLs, so the page also works behind a proxy that serves it under a path prefix.
export async function listModels() {
  const response = await checked(await fetch("v1/models", { headers: headers() }));
  return (await response.json()).data ?? [];
}

// The chunks of a streamed chat completion, as parsed JSON objects, until [DONE].
export async function* streamChat(body, signal) {
  const response = await checked(await fetch("v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  }));
  for await (const data of eventData(response)) {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.code ?? 500, chunk.error.message ?? data);
    yield chunk;
  }
}
