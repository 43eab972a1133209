"""What a workflow must look like right after a user drops it on the canvas (issue 11).

Each check returns a list of problems (empty = fine), so one test reports all of them at once.
"""

from __future__ import annotations

import itertools

from frontend import TEXT_ZOOM, Box, CanvasReport

NOTES = {"Note", "MarkdownNote"}
MODEL_DIALOG_ERROR = "Only allowed suffixes"


def loaded_intact(wf: dict, report: CanvasReport) -> list[str]:
    """Every node type known, every link and every saved widget value kept."""
    problems = [f"node {n['id']} {n['type']}: node type not registered in the frontend"
                for n in report.nodes if not n["registered"]]
    if len(report.nodes) != len(wf["nodes"]):
        problems.append(f"{len(report.nodes)} nodes on the canvas, {len(wf['nodes'])} in the file")
    if report.link_count != len(wf["links"]):
        problems.append(f"{report.link_count} links on the canvas, {len(wf['links'])} in the file")
    loaded = {n["id"]: n for n in report.nodes}
    for node in wf["nodes"]:
        saved = node.get("widgets_values")
        if saved is None or node["id"] not in loaded:
            continue
        now = loaded[node["id"]]["widgets_values"]
        if list(now or []) != list(saved):
            problems.append(f"node {node['id']} {node['type']}: widget values {now} after loading, {saved} saved")
    return problems


def readable(report: CanvasReport) -> list[str]:
    """Zoom above the text threshold; note and nodes on screen; no overlaps; group titles clear."""
    problems = []
    if report.scale < TEXT_ZOOM or report.low_quality:
        problems.append(f"zoom {report.scale:.2f} is below {TEXT_ZOOM} (low-quality mode {report.low_quality}): "
                        "the frontend draws no text")
    for node in report.nodes:
        box = report.screen(report.node_box(node, badge=node["type"] not in NOTES))
        if not box.inside(report.visible):
            problems.append(f"node {node['id']} '{node['title']}' at screen {_fmt(box)} is outside the visible "
                            f"canvas {_fmt(report.visible)}")
        for panel in report.overlays:
            if box.intersects(panel):
                problems.append(f"node {node['id']} '{node['title']}' at screen {_fmt(box)} is under the panel at "
                                f"{_fmt(panel)} (minimap / zoom controls)")
    for a, b in itertools.combinations(report.nodes, 2):
        if report.node_box(a, badge=a["type"] not in NOTES).intersects(report.node_box(b, badge=b["type"] not in NOTES)):
            problems.append(f"nodes {a['id']} '{a['title']}' and {b['id']} '{b['title']}' overlap "
                            "(title bar and the badge above it included)")
    groups = [(g, Box(*g["bounding"])) for g in report.groups]
    for (ga, a), (gb, b) in itertools.combinations(groups, 2):
        if a.intersects(b):
            problems.append(f"groups '{ga['title']}' and '{gb['title']}' overlap")
    for g, box in groups:
        title = Box(box.x, box.y, box.w, g["title_height"])
        for node in report.nodes:
            nb = report.node_box(node, badge=node["type"] not in NOTES)
            if node["type"] in NOTES and nb.intersects(box):
                problems.append(f"the note overlaps group '{g['title']}'")
            elif nb.intersects(title):
                problems.append(f"node {node['id']} '{node['title']}' covers the title of group '{g['title']}'")
        if not report.screen(title).inside(report.visible):
            problems.append(f"group title '{g['title']}' is outside the visible canvas")
    return problems


def titles_fit(report: CanvasReport, padding: float = 50.0) -> list[str]:
    """Titles the frontend would cut with an ellipsis (measured in its title font; ``padding``: the
    title's indent and right margin, seen: a 363 px title cut on a 403 px node, a 281 px one whole on a 360 px node)."""
    return [f"node {n['id']}: title '{n['title']}' ({n['title_px']:.0f} px) is cut at its {n['bounding'][2]:.0f} px width"
            for n in report.nodes if n["type"] not in NOTES and padding + n["title_px"] > n["bounding"][2]]


def model_dialog_clean(report: CanvasReport) -> list[str]:
    return [f"dialog shows errors: {text[:400]!r}" for text in report.dialogs if MODEL_DIALOG_ERROR in text]


def _fmt(box: Box) -> str:
    return f"[{box.x:.0f}, {box.y:.0f}, {box.w:.0f}x{box.h:.0f}]"
