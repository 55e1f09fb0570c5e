// Images a user adds: read, checked, hashed, and turned back into what the API and the page
// need (data URLs, object URLs, bitmaps to draw).

import { sha256Hex } from "./sha256.js";

export const MAX_IMAGE_BYTES = 20 * 1024 * 1024;

export class ImageInputError extends Error {
  constructor(message) {
    super(message);
    this.name = "ImageInputError";
  }
}

async function measure(blob) {
  try {
    const bitmap = await createImageBitmap(blob);
    const size = { width: bitmap.width, height: bitmap.height };
    bitmap.close();
    return size;
  } catch {
    return null;
  }
}

// A File or Blob -> {record, ref}: the record to store (once per hash) and the reference a
// message keeps.
export async function readImage(blob, name = "image") {
  if (blob.size > MAX_IMAGE_BYTES) {
    const mib = (n) => (n / 2 ** 20).toFixed(1);
    throw new ImageInputError(`${name} is ${mib(blob.size)} MiB; images up to `
      + `${mib(MAX_IMAGE_BYTES)} MiB are accepted`);
  }
  if (blob.type && !blob.type.startsWith("image/")) {
    throw new ImageInputError(`${name} is ${blob.type}, not an image`);
  }
  const bytes = await blob.arrayBuffer();
  const type = blob.type || "image/png";
  const size = await measure(new Blob([bytes], { type }));
  if (!size) {
    throw new ImageInputError(`${name} is not an image this browser can read `
      + "(PNG, JPEG, WebP, GIF, BMP)");
  }
  const hash = await sha256Hex(bytes);
  const record = { hash, blob: new Blob([bytes], { type }), type, size: bytes.byteLength, ...size };
  return { record, ref: { hash, type, name, ...size } };
}

function loadElement(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(
      new ImageInputError(`no image could be loaded from ${src.slice(0, 200)}`));
    img.src = src;
  });
}

// An image by URL: downloaded and kept like a file when the other site allows it (CORS);
// otherwise kept as the URL, shown from there, and sent as the URL for the server to fetch.
export async function imageFromURL(text) {
  let url;
  try {
    url = new URL(text.trim());
  } catch {
    throw new ImageInputError(
      `"${text}" is not a URL; give one starting with https://, http:// or data:`);
  }
  if (!["http:", "https:", "data:"].includes(url.protocol)) {
    throw new ImageInputError(
      `${url.protocol} URLs are not accepted; use https://, http:// or data:`);
  }
  const name = url.protocol === "data:"
    ? "pasted image"
    : decodeURIComponent(url.pathname.split("/").pop() || url.host);
  if (url.protocol === "data:") {
    const [meta, data] = url.href.slice(5).split(",", 2);
    if (!meta.endsWith(";base64")) throw new ImageInputError("data: URLs must be base64 encoded");
    return readImage(new Blob([decodeBase64(data)], { type: meta.split(";")[0] }), name);
  }
  let blob = null;
  try {
    const response = await fetch(url.href, { mode: "cors", credentials: "omit" });
    if (response.ok) blob = await response.blob();
  } catch {
    // CORS refused or the page may not fetch there: fall back to the URL itself
  }
  if (blob && blob.type.startsWith("image/")) return readImage(blob, name);
  const img = await loadElement(url.href);
  const ref = { url: url.href, name, width: img.naturalWidth, height: img.naturalHeight };
  return { record: null, ref };
}

export function decodeBase64(text) {
  const binary = atob(text.replace(/\s+/g, ""));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function blobToDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// Object URLs, data URLs and bitmaps of stored images, made once per hash.
export class ImageCache {
  constructor(store) {
    this.store = store;
    this.records = new Map(); // records not yet saved (attachments) or already read
    this.objectURLs = new Map();
    this.dataURLs = new Map();
  }

  remember(record) {
    if (record) this.records.set(record.hash, record);
  }

  async record(hash) {
    if (!this.records.has(hash)) {
      const record = await this.store.getImage(hash);
      if (!record) return null;
      this.records.set(hash, record);
    }
    return this.records.get(hash);
  }

  // Something an <img src> can show, or null when the image is gone.
  async src(ref) {
    if (ref.url) return ref.url;
    if (!this.objectURLs.has(ref.hash)) {
      const record = await this.record(ref.hash);
      if (!record) return null;
      this.objectURLs.set(ref.hash, URL.createObjectURL(record.blob));
    }
    return this.objectURLs.get(ref.hash);
  }

  // What goes into an image_url part.
  async apiURL(ref) {
    if (ref.url) return ref.url;
    if (!this.dataURLs.has(ref.hash)) {
      const record = await this.record(ref.hash);
      if (!record) {
        const name = ref.name ?? ref.hash.slice(0, 12);
        throw new ImageInputError(`the image ${name} is no longer stored in this browser`);
      }
      this.dataURLs.set(ref.hash, await blobToDataURL(record.blob));
    }
    return this.dataURLs.get(ref.hash);
  }

  // A drawable source for a canvas, or null.
  async drawable(ref) {
    try {
      if (ref.url) return await loadElement(ref.url);
      const record = await this.record(ref.hash);
      return record ? await createImageBitmap(record.blob) : null;
    } catch {
      return null;
    }
  }
}
