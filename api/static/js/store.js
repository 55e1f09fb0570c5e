// The browser's copy of the history, in IndexedDB:
//
//   conversations   {id, title, created, updated, messages: [...]}; a user message refers to
//                   its images by SHA-256 ({hash, type, width, height, name}) or, for an image
//                   the browser could not download, by URL ({url, width, height, name})
//   images          {hash, blob, type, width, height, size}: each image once, whatever number
//                   of messages show it
//
// Every change is one transaction, so a failed write (quota, private mode) leaves what was
// stored before untouched; an image is deleted only with the last conversation that shows it.

const DB_NAME = "caldera-chat";
const DB_VERSION = 1;

const request = (req) => new Promise((resolve, reject) => {
  req.onsuccess = () => resolve(req.result);
  req.onerror = () => reject(req.error);
});

const finished = (tx) => new Promise((resolve, reject) => {
  tx.oncomplete = () => resolve();
  tx.onabort = () => reject(tx.error ?? new Error("the browser aborted the write"));
  tx.onerror = () => {}; // the abort handler reports it
});

export function summary(conv) {
  return { id: conv.id, title: conv.title, created: conv.created, updated: conv.updated };
}

export function imageHashes(conv) {
  const hashes = new Set();
  for (const m of conv.messages ?? []) {
    for (const img of m.images ?? []) if (img.hash) hashes.add(img.hash);
  }
  return hashes;
}

const newestFirst = (a, b) => (b.updated ?? 0) - (a.updated ?? 0);

export class IndexedStore {
  constructor(db) {
    this.db = db;
    this.persistent = true;
  }

  static async open() {
    const req = indexedDB.open(DB_NAME, DB_VERSION);
    req.onupgradeneeded = () => {
      const db = req.result;
      for (const [name, keyPath] of [["conversations", "id"], ["images", "hash"]]) {
        if (!db.objectStoreNames.contains(name)) db.createObjectStore(name, { keyPath });
      }
    };
    return new IndexedStore(await request(req));
  }

  async listConversations() {
    const tx = this.db.transaction("conversations");
    const all = await request(tx.objectStore("conversations").getAll());
    return all.map(summary).sort(newestFirst);
  }

  async getConversation(id) {
    const tx = this.db.transaction("conversations");
    return (await request(tx.objectStore("conversations").get(id))) ?? null;
  }

  async getImage(hash) {
    const tx = this.db.transaction("images");
    return (await request(tx.objectStore("images").get(hash))) ?? null;
  }

  // Store `conv` whole, with the image records it newly refers to, in one transaction.
  async saveConversation(conv, images = []) {
    const tx = this.db.transaction(["conversations", "images"], "readwrite");
    const done = finished(tx);
    try {
      addImages(tx.objectStore("images"), images);
      tx.objectStore("conversations").put(conv); // throws at once on what cannot be stored
    } catch (err) {
      tx.abort(); // nothing of this save is written, not even its images
      done.catch(() => {});
      throw err;
    }
    await done;
  }

  async deleteConversation(id) {
    const tx = this.db.transaction(["conversations", "images"], "readwrite");
    const conversations = tx.objectStore("conversations");
    const images = tx.objectStore("images");
    conversations.delete(id);
    const [rest, keys] = await Promise.all(
      [request(conversations.getAll()), request(images.getAllKeys())]);
    const used = new Set(rest.filter((c) => c.id !== id).flatMap((c) => [...imageHashes(c)]));
    for (const key of keys) if (!used.has(key)) images.delete(key);
    await finished(tx);
  }

  async exportAll() {
    const tx = this.db.transaction(["conversations", "images"]);
    const [conversations, images] = await Promise.all([
      request(tx.objectStore("conversations").getAll()),
      request(tx.objectStore("images").getAll()),
    ]);
    return { conversations: conversations.sort(newestFirst), images };
  }

  // Add imported conversations and images; returns how many conversations were added.
  async importAll({ conversations, images }) {
    const tx = this.db.transaction(["conversations", "images"], "readwrite");
    const store = tx.objectStore("conversations");
    const existing = new Map((await request(store.getAll())).map((c) => [c.id, c]));
    addImages(tx.objectStore("images"), images);
    let added = 0;
    for (const conv of conversations) {
      const same = existing.get(conv.id);
      if (same && same.updated === conv.updated) continue; // this very version is here already
      store.put(same ? { ...conv, id: newId() } : conv);
      added += 1;
    }
    await finished(tx);
    return added;
  }
}

// `add` keeps an image already stored (same hash, same bytes) instead of writing it again.
function addImages(store, images) {
  for (const image of images) {
    const req = store.add(image);
    req.onerror = (event) => {
      if (req.error?.name === "ConstraintError") {
        event.preventDefault(); // not a failure: keep the transaction going
        event.stopPropagation();
      }
    };
  }
}

// Used when IndexedDB cannot be opened (some private modes): the same interface, kept in
// memory, and the page says that history will not survive a reload.
export class MemoryStore {
  constructor(reason) {
    this.persistent = false;
    this.reason = reason;
    this.conversations = new Map();
    this.images = new Map();
  }

  async listConversations() {
    return [...this.conversations.values()].map(summary).sort(newestFirst);
  }

  async getConversation(id) {
    const conv = this.conversations.get(id);
    return conv ? structuredClone(conv) : null;
  }

  async getImage(hash) {
    return this.images.get(hash) ?? null;
  }

  addImages(images) {
    for (const image of images) {
      if (!this.images.has(image.hash)) this.images.set(image.hash, image);
    }
  }

  async saveConversation(conv, images = []) {
    const copy = structuredClone(conv); // throws, as IndexedDB would, before anything changes
    this.addImages(images);
    this.conversations.set(conv.id, copy);
  }

  async deleteConversation(id) {
    this.conversations.delete(id);
    const used = new Set([...this.conversations.values()].flatMap((c) => [...imageHashes(c)]));
    for (const hash of [...this.images.keys()]) if (!used.has(hash)) this.images.delete(hash);
  }

  async exportAll() {
    const conversations = [...this.conversations.values()].sort(newestFirst);
    return { conversations, images: [...this.images.values()] };
  }

  async importAll({ conversations, images }) {
    let added = 0;
    this.addImages(images);
    for (const conv of conversations) {
      const same = this.conversations.get(conv.id);
      if (same && same.updated === conv.updated) continue;
      const copy = same ? { ...conv, id: newId() } : conv;
      this.conversations.set(copy.id, structuredClone(copy));
      added += 1;
    }
    return added;
  }
}

export async function openStore() {
  try {
    if (!globalThis.indexedDB) throw new Error("this browser has no IndexedDB");
    return await IndexedStore.open();
  } catch (err) {
    return new MemoryStore(err?.message ?? String(err));
  }
}

export function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}
