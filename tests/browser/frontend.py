"""Drive the real ComfyUI frontend in Debian's Chromium with Playwright, as a user would.

The frontend is the ``comfyui-frontend-package`` ComfyUI's requirements install; the browser is
the system Chromium (Playwright's own browser download is never used: ``executable_path``).
:class:`Frontend` opens the app, drops a workflow file on the canvas (the frontend's own drop
handler: ``app.handleFile`` -> ``app.loadGraphData``, with its missing-node and missing-model
dialogs), and reports what the canvas holds: node and group bounding boxes as the frontend
computes them, widget values, links, the view (zoom, offset) and the part of the canvas that
the tab bar, the sidebar and the floating toolbar leave visible.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
VIEWPORT = {"width": 1920, "height": 1080}
# The frontend stops drawing text (low-quality mode) below about this zoom at a 1x pixel ratio:
# LiteGraph.Canvas.MinFontSizeForLOD (8 px) over its 14 px base font is 0.57; we keep a margin.
TEXT_ZOOM = 0.6
# Drawn above each node's title: the pack badge (right-aligned, ~20 px at zoom 1).
BADGE_HEIGHT = 24
# Console noise that is not ours (identical with no custom nodes; see the module's tests).
NOISE = (
    re.compile(r"Failed to load resource: the server responded with a status of 404"),
    re.compile(r"Cannot read properties of undefined \(reading 'id'\)[\s\S]*at onChange"),
    re.compile(r"violates the following Content Security Policy directive"),
    re.compile(r"Error fetching file size", re.I),
    re.compile(r"api\.comfy\.org|huggingface\.co"),
    re.compile(r"Failed to fetch", re.I),
)


def chromium_path() -> str | None:
    """The system Chromium (``$CHROMIUM`` overrides), or None."""
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("chromium")
    return found


def missing_reason() -> str | None:
    """None when Chromium and Playwright are there, else what is missing (for skip/fail)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (bash .ci/setup-env installs it)"
    if chromium_path() is None:
        return "Chromium is not installed (bash .ci/setup-env runs apt-get install chromium fonts-liberation)"
    return None


def is_noise(message: str) -> bool:
    return any(p.search(message) for p in NOISE)


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    def intersects(self, other: "Box") -> bool:
        return self.x < other.right and other.x < self.right and self.y < other.bottom and other.y < self.bottom

    def inside(self, other: "Box") -> bool:
        return self.x >= other.x and self.y >= other.y and self.right <= other.right and self.bottom <= other.bottom

    def to_screen(self, scale: float, offset: tuple[float, float]) -> "Box":
        return Box((self.x + offset[0]) * scale, (self.y + offset[1]) * scale, self.w * scale, self.h * scale)


@dataclass
class CanvasReport:
    """What the canvas holds right after a workflow was loaded."""

    scale: float
    offset: tuple[float, float]
    low_quality: bool
    visible: Box  # screen px of the canvas not covered by the tab bar, sidebar or toolbar
    nodes: list[dict]  # {id, type, title, bounding [x, y, w, h] (title included), widgets, widgets_values, registered}
    groups: list[dict]  # {title, bounding [x, y, w, h], title_height}
    link_count: int
    dialogs: list[str] = field(default_factory=list)  # text of each open dialog
    overlays: list[Box] = field(default_factory=list)  # screen px of floating panels (minimap, zoom buttons)

    def node_box(self, node: dict, badge: bool = False) -> Box:
        x, y, w, h = node["bounding"]
        extra = BADGE_HEIGHT if badge else 0
        return Box(x, y - extra, w, h + extra)

    def screen(self, box: Box) -> Box:
        return box.to_screen(self.scale, self.offset)


PAGE_REPORT_JS = r"""
() => {
  const c = app.canvas, g = app.graph;
  // a point shows the canvas when the canvas, or a widget drawn on it (DOM widgets), is on top there
  const isCanvas = (x, y) => { const e = document.elementFromPoint(x, y);
    return e === c.canvas || !!e?.closest?.('.dom-widget'); };
  const W = window.innerWidth, H = window.innerHeight;
  // the canvas left visible by the UI chrome: going outwards from inside the canvas on a few lines,
  // the first point that is not canvas (tab bar, floating breadcrumb and Run toolbar, sidebar)
  const edge = (from, to, step, at) => { for (let v = from; v !== to; v += step) if (!at(v)) return v - step; return to; };
  const xs = [W * 0.07, W * 0.15, W * 0.5, W * 0.9, W * 0.95], ys = [H * 0.25, H * 0.5, H * 0.75];
  const top = Math.max(...xs.map(x => edge(Math.round(H / 4), -1, -1, y => isCanvas(x, y))));
  const left = Math.max(...ys.map(y => edge(Math.round(W / 4), -1, -1, x => isCanvas(x, y))));
  const links = g.links instanceof Map ? g.links.size : Object.keys(g.links || {}).length;
  const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = c.title_text_font || '14px Arial';
  const bound = n => { const b = n.getBounding ? n.getBounding() : n.boundingRect; return Array.from(b); };
  return {
    scale: c.ds.scale, offset: Array.from(c.ds.offset), low_quality: !!c.low_quality,
    visible: [left, top, W - left, H - top],
    // floating panels over the canvas's bottom-right corner: the minimap and the zoom controls
    overlays: Array.from(document.querySelectorAll('.litegraph-minimap, .p-buttongroup.absolute'))
      .map(e => e.getBoundingClientRect()).filter(b => b.width > 0 && b.height > 0)
      .map(b => [b.x, b.y, b.width, b.height]),
    nodes: g._nodes.map(n => ({
      id: n.id, type: n.type, title: n.getTitle ? n.getTitle() : n.title, bounding: bound(n), pos: Array.from(n.pos), size: Array.from(n.size),
      min_size: n.computeSize ? Array.from(n.computeSize()) : null,
      widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
      widgets_values: n.serialize().widgets_values ?? null,
      registered: !!LG.registered_node_types[n.type] && !n.has_errors,
      title_px: ctx.measureText((n.getTitle ? n.getTitle() : n.title) || '').width,
    })),
    groups: (g._groups || g.groups || []).map(gr => ({
      title: gr.title, bounding: Array.from(gr._bounding || gr.bounding), title_height: gr.titleHeight || 34})),
    link_count: links,
  };
}
"""

DROP_JS = r"""
([text, name]) => {
  const dt = new DataTransfer();
  dt.items.add(new File([text], name, {type: 'application/json'}));
  document.querySelector('#graph-canvas').dispatchEvent(
    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""


LISTEN_JS = r"""
() => {
  if (window.__creative) return;
  const api = window.comfyAPI?.api?.api ?? app.api;
  const state = window.__creative = {runs: []};
  const run = () => state.runs.at(-1) ?? {};
  api.addEventListener('executing', e => { const id = e.detail?.node ?? e.detail; if (id != null) run().executed?.push(String(id)); });
  api.addEventListener('execution_cached', e => run().cached?.push(...(e.detail?.nodes ?? []).map(String)));
  for (const kind of ['b_preview', 'b_preview_with_metadata']) api.addEventListener(kind, () => { run().previews += 1; });
  for (const kind of ['execution_success', 'execution_error', 'execution_interrupted'])
    api.addEventListener(kind, e => { const r = run(); r.status = kind.split('_')[1]; if (kind !== 'execution_success') r.error = e.detail; });
}
"""


class Frontend:
    """One browser page on a ComfyUI server's frontend; collects page errors and console errors."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        self.page = self.context.new_page()
        self.errors: list[str] = []  # page errors and console errors, noise included
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

    def open(self) -> "Frontend":
        self.page.goto(self.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=90_000)
        self.page.wait_for_selector("[data-testid=queue-button]", timeout=60_000)
        return self

    def close(self) -> None:
        self.context.close()

    def our_errors(self) -> list[str]:
        return [e for e in self.errors if not is_noise(e)]

    def load(self, path: Path, screenshot: Path | None = None, timeout: float = 30.0) -> CanvasReport:
        """Drop the workflow file on the canvas and wait until its nodes are on the graph."""
        wf = json.loads(path.read_text())
        self.page.evaluate(DROP_JS, [path.read_text(), path.name])
        self.page.wait_for_function(
            "([n, name]) => app.graph._nodes.length === n && "
            "(app.workflowManager?.activeWorkflow?.filename ?? name) === name",
            arg=[len(wf["nodes"]), path.stem], timeout=timeout * 1000)
        time.sleep(1.5)  # dialogs open and sizes settle after the graph is configured
        return self.report(screenshot)

    def dialogs(self) -> list[str]:
        return self.page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    def report(self, screenshot: Path | None = None) -> CanvasReport:
        """The canvas as the user sees it once the dialogs that opened with the workflow are read and
        closed (``screenshot``: saved before closing them, as ``<name>-dialog.png``, and after)."""
        dialogs = self.dialogs()
        if screenshot is not None and dialogs:
            self.screenshot(screenshot.with_name(screenshot.stem + "-dialog.png"))
        self.close_dialogs()
        r = self.page.evaluate(PAGE_REPORT_JS)
        if screenshot is not None:
            self.screenshot(screenshot)
        return CanvasReport(r["scale"], tuple(r["offset"]), r["low_quality"], Box(*r["visible"]), r["nodes"],
                            r["groups"], r["link_count"], dialogs, [Box(*o) for o in r["overlays"]])

    def listen(self) -> None:
        """Record the run's websocket events (as the frontend's api object dispatches them) in the page."""
        self.page.evaluate(LISTEN_JS)

    def queue(self, timeout: float = 600.0) -> dict:
        """Click the Run button and wait for the prompt to end; returns the recorded events of this run:
        ``{"status": "success"|"error"|..., "executed": [node ids], "cached": [...], "previews": n, "error": {...}}``."""
        self.page.evaluate("() => { window.__creative.runs.push({executed: [], cached: [], previews: 0}); }")
        self.page.click("[data-testid=queue-button]")
        self.page.wait_for_function("() => window.__creative.runs.at(-1).status !== undefined", timeout=timeout * 1000)
        time.sleep(1.0)  # outputs are drawn after the last event
        return self.page.evaluate("() => window.__creative.runs.at(-1)")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(),
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])
