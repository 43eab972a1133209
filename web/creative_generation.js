// Creative Generation in the ComfyUI frontend: the curation grid (click a tile to mark it), the
// messages our nodes return ("saved ... in ...") shown in the node, and small floats shown in full.
// Plain JavaScript, no build step. Every frontend API is checked before use: where one is missing,
// the nodes keep working through their ordinary widgets (the marks are a plain text widget).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const OURS = "Creative"; // our node ids start with it
const CURATE = "CreativeCurateEmbeds";
const LOG = "[creative_generation]";

const widgetNamed = (node, name) => node.widgets?.find((w) => w.name === name);

// "0, 3, 5-7" -> Set {0, 3, 5, 6, 7}; parts it cannot read are left to the server's check.
export function parseMarks(text) {
  const marked = new Set();
  for (const part of String(text ?? "").split(",")) {
    const m = part.trim().match(/^(\d+)(?:\s*-\s*(\d+))?$/);
    if (!m) continue;
    const lo = Number(m[1]);
    const hi = m[2] === undefined ? lo : Number(m[2]);
    for (let i = lo; i <= hi && i - lo < 10000; i++) marked.add(i);
  }
  return marked;
}

export const formatMarks = (marked) => [...marked].sort((a, b) => a - b).join(", ");

function viewUrl(ref) {
  const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  return typeof api?.apiURL === "function" ? api.apiURL(`/view?${query}`) : `/view?${query}`;
}

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

// A read-only panel at the bottom of the node (not saved with the workflow).
function panel(node, name, element, minHeight) {
  if (typeof node.addDOMWidget !== "function") return null;
  const w = node.addDOMWidget(name, name, element, { serialize: false, hideOnZoom: false, getMinHeight: () => minHeight });
  w.serialize = false;
  const size = node.computeSize?.();
  if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  return w;
}

// The text a node returned (ui.PreviewText), e.g. Save Concept's "saved concept_00001.safetensors in ...".
function showMessage(node, text) {
  let w = widgetNamed(node, "creative_message");
  if (!w) {
    const el = document.createElement("pre");
    el.className = "creative-message";
    el.style.cssText = "margin:0;padding:4px 6px;white-space:pre-wrap;word-break:break-all;overflow:auto;" +
      "font:11px monospace;color:var(--input-text,#ddd);background:var(--comfy-input-bg,#222);border-radius:4px;";
    w = panel(node, "creative_message", el, 64);
    if (!w) {
      // no DOM widgets here: a plain (unsaved) text widget still shows it
      w = node.addWidget?.("text", "creative_message", "", () => {}, { serialize: false });
      if (w) w.serialize = false;
    }
  }
  if (!w) return;
  if (w.element) w.element.textContent = text;
  else w.value = text;
  redraw(node);
}

// Curate Embeddings: a grid of the batch's renders; a click marks or unmarks a tile by editing the
// "marks" widget, which is what is saved and queued.
function setupCuration(node) {
  const marks = widgetNamed(node, "marks");
  if (!marks) return;
  const grid = document.createElement("div");
  grid.className = "creative-curation-grid";
  grid.style.cssText = "display:grid;grid-template-columns:repeat(auto-fill,minmax(72px,1fr));gap:6px;" +
    "padding:4px;overflow:auto;align-content:start;";
  const hint = document.createElement("div");
  hint.textContent = "Queue to see the batch here; click a render to mark it as unwanted.";
  hint.style.cssText = "grid-column:1/-1;font:12px sans-serif;opacity:0.7;";
  grid.append(hint);
  if (!panel(node, "creative_tiles", grid, 180)) return; // no DOM widgets: type the marks instead

  let tiles = [];
  const paint = () => {
    const marked = parseMarks(marks.value);
    tiles.forEach((tile, i) => {
      const on = marked.has(i);
      tile.dataset.marked = on ? "true" : "false";
      tile.style.outline = on ? "3px solid #e5484d" : "1px solid #555";
      tile.style.filter = on ? "grayscale(0.8) brightness(0.55)" : "none";
      tile.title = `#${i}${on ? " (marked)" : ""}: click to ${on ? "unmark" : "mark"}`;
    });
  };
  const toggle = (i) => {
    const marked = parseMarks(marks.value);
    if (marked.has(i)) marked.delete(i);
    else marked.add(i);
    marks.value = formatMarks(marked);
    marks.callback?.(marks.value, app.canvas, node);
    paint();
    redraw(node);
  };
  const edited = marks.callback;
  marks.callback = function (...args) {
    const result = edited?.apply(this, args);
    paint();
    return result;
  };
  node.creativeShowTiles = (refs) => {
    tiles = refs.map((ref, i) => {
      const img = document.createElement("img");
      img.className = "creative-tile";
      img.dataset.index = String(i);
      img.src = viewUrl(ref);
      img.draggable = false;
      img.style.cssText = "width:100%;aspect-ratio:1;object-fit:contain;image-rendering:pixelated;cursor:pointer;" +
        "border-radius:3px;";
      img.addEventListener("pointerdown", (e) => e.stopPropagation());
      img.addEventListener("click", (e) => {
        e.stopPropagation();
        toggle(i);
      });
      return img;
    });
    grid.replaceChildren(...tiles);
    paint();
    redraw(node);
  };
}

// Nodes 2.0 draws numbers with at most 3 decimals unless told more: learning_rate 0.0001 showed "0".
// The precision the frontend derives from the input's step is handed on as the fraction digits.
function showFloatsInFull(node) {
  for (const w of node.widgets ?? []) {
    const digits = w.options?.precision;
    if (w.type === "number" && typeof digits === "number" && digits > 3 && w.options.maxFractionDigits === undefined) {
      w.options.maxFractionDigits = Math.min(digits, 20);
    }
  }
}

app.registerExtension({
  name: "creative_generation.ui",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(OURS)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = created?.apply(this, args);
      try {
        showFloatsInFull(this);
        if (nodeData.name === CURATE) setupCuration(this);
      } catch (e) {
        console.warn(LOG, e);
      }
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...rest) {
      const result = executed?.apply(this, [message, ...rest]);
      try {
        if (Array.isArray(message?.creative_tiles)) this.creativeShowTiles?.(message.creative_tiles);
        if (Array.isArray(message?.text) && message.text.length) showMessage(this, message.text.join("\n"));
      } catch (e) {
        console.warn(LOG, e);
      }
      return result;
    };
  },
});
