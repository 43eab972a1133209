"""The main job's report: measured from saved files with the independent judge, numbers that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.testbed.miniworld import world as W
from creative_generation.nodes.testbed.miniworld.judge import load_judge
from creative_generation.nodes.testbed.miniworld.report import RunFiles, format_report, measure_run, sheet_of_files

JUDGE = Path(__file__).resolve().parents[2] / "models" / "miniworld" / "judge"


def _pngs(folder: Path, name: str, scenes: list[W.Scene]) -> list[Path]:
    paths = []
    for i, pixels in enumerate(W.draw_many(scenes, size=32)):
        paths.append(folder / f"{name}_{i:05}_.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_report_measures_saved_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    bank = EmbeddingBank(torch.randn(400, 16, generator=g), {"prior": "p"})
    samples = EmbeddingBank(torch.randn(12, 16, generator=g) * 3 + 2, {"prior": "p"})  # far from the bank
    bank.save(tmp_path / "bank.safetensors")
    samples.save(tmp_path / "samples.safetensors")
    cars = [W.make_scene("car", "red", "road", seed=i) for i in range(5)] + [W.make_scene("car", "purple", "road")]
    fish = [W.make_scene("fish", "orange", "water", seed=i) for i in range(4)] + [W.make_scene("bus", "yellow", "road")]
    log = {"entries": [{"step": 1, "log_likelihood": -3.0, "seconds": 0.5},
                       {"step": 2, "log_likelihood": -9.0, "seconds": 0.5, "gate_p_yes": 0.9, "gate_passed": True}],
           "stop_reason": "max_steps", "steps_run": 2, "accepted_step": 2}
    (tmp_path / "run.json").write_text(json.dumps(log))
    files = RunFiles(tmp_path / "bank.safetensors", tmp_path / "samples.safetensors",
                     _pngs(tmp_path, "typical", cars), _pngs(tmp_path, "concept", fish), tmp_path / "run.json")

    r = measure_run(files, "vehicle", 8, load_judge(JUDGE))

    assert r["typical"]["validity"] == 1.0 and r["concept"]["validity"] == pytest.approx(0.2)  # 1 bus out of 5 renders
    assert r["concept"]["judge_sees"]["kind"] == {"fish": 4, "bus": 1}
    assert r["typical"]["rare"] == pytest.approx(1 / 6)  # purple cars are 1 % of cars; red ones on roads common
    assert r["concept"]["novelty_percentile"] == 0.0 < r["typical"]["novelty_percentile"]
    assert r["concept"]["count"] == 12 and r["typical"]["count"] == 6  # typical = the rendered head of the bank
    assert r["optimisation"]["gate"] == [{"step": 2, "p_yes": 0.9, "passed": True}]
    text = format_report(r)
    assert "| validity: independent judge says \"vehicle\" | 100% | 20% |" in text
    assert "| rare in the world: colour or background ≤ 2% likely for the judged kind | 17% | 0% |" in text
    assert "Gate at step 2: P(yes) 0.900 -> yes" in text and "fish 80%, bus 20%" in text
    assert sheet_of_files(files.typical_images, columns=4).size == (4 * 64, 2 * 64)
