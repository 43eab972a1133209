"""The SD path's evaluation script (nodes/testbed/miniworld/evaluate_sd.py) end to end at tiny settings, in-process:
the bundled mini world in SD form, its MLLM gate and the independent judge."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def world(comfy_inprocess):
    from creative_generation.nodes.testbed.miniworld.evaluate_sd import load_world

    return load_world(every=2)


def test_measure_runs_every_row_and_counts_its_unet_calls(world):
    from creative_generation.nodes.testbed.miniworld.evaluate_sd import measure

    rows = measure(world, "vehicle", 1, bank_size=24, dims=4, samples=8, steps=[0, 2], lr=1e-3, rank=2,
                   anchor_weight=1.0, gates=(True,))
    by = {(r["config"], r["step"]): r for r in rows}
    typical, zero = by[("typical", None)], by[("SD optimiser (anchor, MLLM gate)", 0)]
    trained = by[("SD optimiser (anchor, MLLM gate)", 2)]
    steps = world.render.steps
    assert typical["unet_calls"] == steps  # 8 renders in one batch, CFG's rows in one call
    assert zero["unet_calls"] == 0 and trained["unet_calls"] == 3 * steps  # 2 training renders + the gate's
    for key in ("novelty_ll", "novelty_percentile", "validity", "diversity", "rare", "creativity"):
        assert zero[key] == typical[key], key  # the LoRA at zero renders the typical row's seeds exactly
        assert trained[key] is not None
    assert 0.0 <= typical["validity"] <= 1.0 and trained["seconds"] > 0
    if ("rare select (MLLM gate)", None) in by:  # none may pass the gate out of 24
        assert 1 <= by[("rare select (MLLM gate)", None)]["selected"] <= 8


def test_bank_renders_returns_the_banks_own_render_only(world):
    from creative_generation.nodes.engine.bank import EmbeddingBank
    from creative_generation.nodes.testbed.miniworld.evaluate_sd import BankRenders

    images = torch.rand(3, 4, 4, 3)
    renders = BankRenders(EmbeddingBank(torch.eye(3)), images)
    assert torch.equal(renders(torch.eye(3)[[2, 0]]), images[[2, 0]])
    with pytest.raises(ValueError, match="only the bank's own"):
        renders(torch.ones(1, 3))
