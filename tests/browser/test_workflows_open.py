"""Every example workflow, dropped on the canvas of the real frontend, opens intact and readable."""

from __future__ import annotations

import json

import pytest

import checks
from conftest import comfy_harness

EXAMPLES = comfy_harness.REPO / "example_workflows"
WORKFLOWS = sorted(EXAMPLES.glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_intact_and_readable(path, page, artefacts):
    wf = json.loads(path.read_text())
    report = page.load(path, screenshot=artefacts / f"{path.stem}.png")
    problems = (checks.loaded_intact(wf, report) + checks.readable(report) + checks.titles_fit(report)
                + checks.model_dialog_clean(report) + [f"page error: {e[:300]}" for e in page.our_errors()])
    assert not problems, f"{path.name} (screenshot output/browser/{path.stem}.png):\n" + "\n".join(problems)


@pytest.fixture
def nodes_2(browser_server):
    """The frontend's Nodes 2.0 mode (Vue nodes) for one test; the classic canvas again afterwards."""
    browser_server.post("/api/settings/Comfy.VueNodes.Enabled", True).raise_for_status()
    yield
    browser_server.post("/api/settings/Comfy.VueNodes.Enabled", False).raise_for_status()


def test_nodes_2_shows_the_learning_rate_in_full(nodes_2, page, artefacts):
    """Nodes 2.0 draws numbers with 3 decimals unless told more: 0.0001 showed as "0" before
    web/creative_generation.js handed the widget's precision on (checked by disabling it)."""
    page.load(EXAMPLES / "creative_miniworld.json", screenshot=artefacts / "creative_miniworld-nodes2.png")
    shown = page.page.evaluate("() => [...document.querySelectorAll('input[aria-label=learning_rate]')].map(i => i.value)")
    assert shown == ["0.0001"], shown
