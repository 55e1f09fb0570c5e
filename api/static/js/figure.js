// "What the model saw": an image drawn as the vision tower received it, from the geometry the
// server sends in the `caldera` extension (docs/web-ui.md):
//
//   LLaVA-NeXT   the image resized into the canvas (the chosen anyres resolution), zero padded
//                (black), cut into rows x cols tiles (the grid lines); beside it the base view,
//                the whole image squeezed to one tile.
//   low detail   the base view alone.
//   LLaVA 1.5    the resized image, the centre crop the tile keeps, the rest dimmed.

import { h } from "./dom.js";

const px = (n) => Math.round(n * 100) / 100;
const rect = (x, y, w, h, scale) => (
  { x: px(x * scale), y: px(y * scale), w: px(w * scale), h: px(h * scale) });

// Pure geometry, in display pixels, for a figure whose longest side is `maxSide`.
export function layoutFigure(info, maxSide) {
  if (info.grid) {
    const g = info.grid;
    const s = maxSide / Math.max(g.canvas.width, g.canvas.height);
    const lines = [];
    const [width, height, step] = [g.canvas.width * s, g.canvas.height * s, g.tile_size * s];
    for (let c = 1; c < g.cols; c++) {
      lines.push({ x1: px(c * step), y1: 0, x2: px(c * step), y2: px(height) });
    }
    for (let r = 1; r < g.rows; r++) {
      lines.push({ x1: 0, y1: px(r * step), x2: px(width), y2: px(r * step) });
    }
    return {
      kind: "grid",
      width: px(width),
      height: px(height),
      image: rect(g.padding.left, g.padding.top, g.resized.width, g.resized.height, s),
      lines,
      base: baseLayout(info, maxSide * 0.45),
    };
  }
  if (info.base.mode === "crop") {
    const r = info.base.resized;
    const c = info.base.crop;
    // The drawn area covers the resized image and the crop (a crop larger than the image is
    // zero padded by the processor).
    const x0 = Math.min(0, c.left);
    const y0 = Math.min(0, c.top);
    const x1 = Math.max(r.width, c.left + c.width);
    const y1 = Math.max(r.height, c.top + c.height);
    const s = maxSide / Math.max(x1 - x0, y1 - y0);
    return {
      kind: "crop",
      width: px((x1 - x0) * s),
      height: px((y1 - y0) * s),
      image: rect(-x0, -y0, r.width, r.height, s),
      crop: rect(c.left - x0, c.top - y0, c.width, c.height, s),
      lines: [],
      base: null,
    };
  }
  return { kind: "base", ...baseLayout(info, maxSide * 0.6), lines: [], base: null };
}

function baseLayout(info, maxSide) {
  const b = info.base.resized;
  const s = maxSide / Math.max(b.width, b.height);
  const image = rect(0, 0, b.width, b.height, s);
  return { width: image.w, height: image.h, image };
}

export function describeFigure(info) {
  const o = info.original;
  const tokens = `${info.image_tokens} image token${info.image_tokens === 1 ? "" : "s"}`;
  if (info.grid) {
    const g = info.grid;
    const b = info.base.resized;
    return `${tokens} · ${o.width}×${o.height} → ${g.resized.width}×${g.resized.height} `
      + `in ${g.canvas.width}×${g.canvas.height}, ${g.rows}×${g.cols} tiles of ${g.tile_size} px `
      + `+ base ${b.width}×${b.height}`;
  }
  if (info.base.mode === "crop") {
    const r = info.base.resized;
    const c = info.base.crop;
    return `${tokens} · ${o.width}×${o.height} → ${r.width}×${r.height}, `
      + `centre ${c.width}×${c.height} seen`;
  }
  const b = info.base.resized;
  return `${tokens} · ${o.width}×${o.height} → base ${b.width}×${b.height} only (low detail)`;
}

function canvasFor(width, height, label) {
  const canvas = h("canvas", { role: "img", "aria-label": label });
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  return { canvas, ctx };
}

function drawLines(ctx, lines) {
  for (const [style, width] of [["rgba(0,0,0,0.7)", 3.5], ["#ffffff", 1.5]]) {
    ctx.strokeStyle = style;
    ctx.lineWidth = width;
    ctx.beginPath();
    for (const l of lines) {
      ctx.moveTo(l.x1, l.y1);
      ctx.lineTo(l.x2, l.y2);
    }
    ctx.stroke();
  }
}

function drawView(source, layout, label) {
  const { canvas, ctx } = canvasFor(layout.width, layout.height, label);
  ctx.fillStyle = "#000"; // the processor pads with zeros
  ctx.fillRect(0, 0, layout.width, layout.height);
  const im = layout.image;
  if (source) ctx.drawImage(source, im.x, im.y, im.w, im.h);
  if (layout.crop) {
    const c = layout.crop;
    ctx.fillStyle = "rgba(0,0,0,0.55)";
    ctx.beginPath();
    ctx.rect(0, 0, layout.width, layout.height);
    ctx.rect(c.x, c.y, c.w, c.h);
    ctx.fill("evenodd");
    const [x1, y1, x2, y2] = [c.x, c.y, c.x + c.w, c.y + c.h];
    drawLines(ctx, [
      { x1, y1, x2, y2: y1 }, { x1: x2, y1, x2, y2 },
      { x1: x2, y1: y2, x2: x1, y2 }, { x1, y1: y2, x2: x1, y2: y1 },
    ]);
  }
  drawLines(ctx, layout.lines ?? []);
  return canvas;
}

// A <figure> for one image: `source` is an ImageBitmap or a loaded <img>, or null when the
// image is gone (the geometry is still drawn).
export function figureNode(info, source, maxSide = 220) {
  const layout = layoutFigure(info, maxSide);
  const label = { grid: "anyres grid", crop: "centre crop", base: "base view" }[layout.kind];
  const views = [viewNode(drawView(source, layout, label), label)];
  if (layout.base) views.push(viewNode(drawView(source, layout.base, "base view"), "base view"));
  const dataset = { imageTokens: String(info.image_tokens) };
  return h("figure", { class: `seen seen-${layout.kind}`, dataset },
    h("div", { class: "views" }, views),
    h("figcaption", { text: describeFigure(info) }));
}

function viewNode(canvas, label) {
  canvas.title = label;
  return h("div", { class: "view" }, canvas, h("span", { class: "view-label", text: label }));
}
