"""Every example workflow, dropped on the canvas of the real frontend, opens intact and readable."""

from __future__ import annotations

import json

import pytest

import checks
from conftest import comfy_harness

WORKFLOWS = sorted((comfy_harness.REPO / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_intact_and_readable(path, page, artefacts):
    wf = json.loads(path.read_text())
    report = page.load(path, screenshot=artefacts / f"{path.stem}.png")
    problems = (checks.loaded_intact(wf, report) + checks.readable(report) + checks.titles_fit(report)
                + checks.model_dialog_clean(report) + [f"page error: {e[:300]}" for e in page.our_errors()])
    assert not problems, f"{path.name} (screenshot output/browser/{path.stem}.png):\n" + "\n".join(problems)
