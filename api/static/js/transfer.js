// Export and import of the whole history as one JSON file, images included (base64), so a
// file moves conversations between browsers:
//
//   {"format": "caldera-chat", "version": 1, "exported_at": ISO date,
//    "conversations": [{id, title, created, updated, messages}],
//    "images": {"<sha256>": {"type", "width", "height", "data": base64}}}
//
// On import every image is hashed again and messages are pointed at the recomputed hashes,
// so a file edited by hand cannot attach the wrong bytes to a stored hash.

import { blobToDataURL, decodeBase64 } from "./images.js";
import { sha256Hex } from "./sha256.js";

export const FORMAT = "caldera-chat";
export const VERSION = 1;

export class ImportError extends Error {
  constructor(message) {
    super(message);
    this.name = "ImportError";
  }
}

export async function toExport({ conversations, images }, now = new Date()) {
  const encoded = {};
  for (const image of images) {
    const dataURL = await blobToDataURL(image.blob);
    const data = dataURL.slice(dataURL.indexOf(",") + 1);
    encoded[image.hash] = { type: image.type, width: image.width, height: image.height, data };
  }
  const exported_at = now.toISOString();
  return { format: FORMAT, version: VERSION, exported_at, conversations, images: encoded };
}

const isObject = (x) => x !== null && typeof x === "object" && !Array.isArray(x);

function checkConversation(conv, index) {
  const where = `conversation ${index + 1}`;
  if (!isObject(conv) || typeof conv.id !== "string" || !Array.isArray(conv.messages)) {
    throw new ImportError(`${where} needs an "id" string and a "messages" list`);
  }
  conv.messages.forEach((m, i) => {
    const at = `${where}, message ${i + 1}`;
    if (!isObject(m) || !["user", "assistant"].includes(m.role)
      || typeof (m.text ?? "") !== "string") {
      throw new ImportError(`${at}: needs a "role" of user or assistant and a "text" string`);
    }
    if (m.images !== undefined && !Array.isArray(m.images)) {
      throw new ImportError(`${at}: "images" must be a list`);
    }
  });
}

// Parsed JSON -> {conversations, images: records}, checked and re-hashed.
export async function fromExport(data) {
  if (!isObject(data) || data.format !== FORMAT) {
    throw new ImportError(`this is not a Caldera chat export (expected "format": "${FORMAT}")`);
  }
  if (data.version !== VERSION) {
    throw new ImportError(
      `export version ${data.version} is not supported; this page reads version ${VERSION}`);
  }
  if (!Array.isArray(data.conversations) || !isObject(data.images ?? {})) {
    throw new ImportError('an export needs a "conversations" list and an "images" object');
  }
  data.conversations.forEach(checkConversation);
  const rename = new Map();
  const records = [];
  for (const [hash, image] of Object.entries(data.images ?? {})) {
    if (!isObject(image) || typeof image.data !== "string") {
      throw new ImportError(`image ${hash.slice(0, 12)} has no base64 "data"`);
    }
    let bytes;
    try {
      bytes = decodeBase64(image.data);
    } catch {
      throw new ImportError(`image ${hash.slice(0, 12)}: "data" is not valid base64`);
    }
    const isImageType = typeof image.type === "string" && image.type.startsWith("image/");
    const type = isImageType ? image.type : "image/png";
    const actual = await sha256Hex(bytes);
    rename.set(hash, actual);
    records.push({
      hash: actual, blob: new Blob([bytes], { type }), type, size: bytes.byteLength,
      width: image.width, height: image.height,
    });
  }
  const conversations = data.conversations.map((conv) => ({
    ...conv,
    title: typeof conv.title === "string" ? conv.title : "Imported chat",
    created: Number(conv.created) || Date.now(),
    updated: Number(conv.updated) || Date.now(),
    messages: conv.messages.map((m) => ({
      ...m,
      images: (m.images ?? []).map((ref) => (
        ref.hash ? { ...ref, hash: rename.get(ref.hash) ?? ref.hash } : ref)),
      status: m.status === "streaming" ? "interrupted" : m.status,
    })),
  }));
  return { conversations, images: records };
}
