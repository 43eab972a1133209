"""Issue 18.4: a large render stops soon after a cancel, also inside one long attention, and a render
no machine of its kind can finish in reasonable time is refused with the size that can."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from creative_generation.nodes.engine import cancel, render, render_cost
from creative_generation.nodes.engine.render import load_decoder
from creative_generation.nodes.engine.render_cost import DecoderCost, Levels, RenderTooSlowError, check_render_time
from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k21_decoder, build_tiny_k22_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module", params=["kandinsky-2.2", "kandinsky-2.1"])
def decoder(request, tmp_path_factory):
    build = build_tiny_k22_decoder if request.param == "kandinsky-2.2" else build_tiny_k21_decoder
    return load_decoder(build(tmp_path_factory.mktemp("decoder") / "d"))


def _qkv(rows: int, keys: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, n, 8, generator=g) for n in (rows, keys, keys))


@pytest.mark.parametrize("mask_rows", [None, 1, 50])
def test_chunked_attention_is_exact_and_each_chunk_is_bounded(monkeypatch, mask_rows):
    q, k, v = _qkv(50, 40)
    mask = None if mask_rows is None else torch.randn(mask_rows, 40) > 0
    monkeypatch.setattr(render, "ATTENTION_CHUNK_MACS", 7 * 40 * 16 * 6)  # 7 rows a chunk
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q_, *a, **kw: calls.append(q_.shape[-2]) or sdpa(q_, *a, **kw))
    got = render.chunked_attention(q, k, v, attn_mask=mask)
    assert calls == [7] * 7 + [1]
    torch.testing.assert_close(got, sdpa(q, k, v, attn_mask=mask), rtol=0, atol=1e-6)


def test_a_cancel_stops_between_chunks_of_one_attention(monkeypatch):
    checks = []
    monkeypatch.setattr(render, "ATTENTION_CHUNK_MACS", 5 * 40 * 16 * 6)
    cancel.set_check(lambda: checks.append(1) or (len(checks) == 3 and (_ for _ in ()).throw(Cancelled())))
    try:
        with pytest.raises(Cancelled):
            render.chunked_attention(*_qkv(50, 40))
    finally:
        cancel.set_check(None)
    assert len(checks) == 3  # two chunks done, stopped before the third of ten


def test_a_render_checks_for_cancel_inside_each_attention(decoder, monkeypatch):
    """With chunks of one row's work, a cancel raised while an attention call is running stops the
    render there: the attention of a large image is no longer one call that cannot be stopped."""
    inside, original = [], render.chunked_attention

    def spying(*args, **kwargs):
        inside.append(True)
        try:
            return original(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(render, "chunked_attention", spying)
    monkeypatch.setattr(render, "ATTENTION_CHUNK_MACS", 1)
    cancel.set_check(lambda: inside and (_ for _ in ()).throw(Cancelled()))
    try:
        with pytest.raises(Cancelled):
            decoder.render(torch.randn(1, decoder.embed_dim), steps=2, height=64, width=64)
    finally:
        cancel.set_check(None)
    monkeypatch.undo()
    decoder.render(torch.randn(1, decoder.embed_dim), steps=1, height=32, width=32)  # the mode is gone after


MINI = DecoderCost(4, Levels((32, 64), (False, True), 3), Levels((32, 32, 16), (True, False, False), 2))  # mini world
K22 = DecoderCost(8, Levels((384, 768, 1152, 1536), (False, True, True, True), 7),
                  Levels((512, 256, 256, 128), (True, False, False, False), 3))  # Kandinsky 2.2 decoder


def _check(cost, side, steps, *, on_gpu=False, threads=1, height=None):
    return check_render_time(cost, height=height or side, width=side, steps=steps, guidance=4.0, batch=1,
                             multiple=16, on_gpu=on_gpu, threads=threads)


def test_a_render_that_cannot_finish_is_refused_with_the_size_that_can():
    with pytest.raises(RenderTooSlowError, match=r"2048x2048 decoder render with 200 steps .* Render at most "
                                                 r"(\d+)x\1 \(width x height\)") as refused:
        _check(MINI, 2048, 200)
    side = int(str(refused.value).split("Render at most ")[1].split("x")[0])
    assert side % 16 == 0 and 512 <= side < 2048
    _check(MINI, side, 200)  # the size it names passes, the next one up does not
    with pytest.raises(RenderTooSlowError):
        _check(MINI, side + 16, 200)
    with pytest.raises(RenderTooSlowError, match=r"Render at most (\d+)x(\d+) ") as refused:
        _check(MINI, 4096, 200, height=2048)
    width, height = (int(n) for n in re.search(r"Render at most (\d+)x(\d+) ", str(refused.value)).groups())
    assert width == 2 * height  # the same shape


@pytest.mark.parametrize("cost, side, steps", [(MINI, 32, 10), (MINI, 512, 25), (MINI, 1024, 50), (K22, 512, 25),
                                               (K22, 768, 50)])
def test_renders_the_tests_and_workflows_make_pass(cost, side, steps):
    assert _check(cost, side, steps) < render_cost.TIME_LIMIT_S


def test_a_gpu_draws_the_largest_size():
    _check(K22, 2048, 200, on_gpu=True)
    _check(MINI, 2048, 200, threads=16)  # and a CPU with many threads the mini world's


def test_the_cost_model_reads_the_decoder(decoder):
    cost = DecoderCost.of(decoder)
    assert cost.latent_factor ** 2 == decoder.size_multiple
    assert cost.unet.attends[0] is False and cost.movq.channels[0] == decoder.pipeline.movq.config.block_out_channels[-1]
    small, large = (render_cost.render_macs(cost, height=s, width=s, steps=2, guidance=4.0) for s in (256, 512))
    assert 4 < large / small < 16  # linear in pixels for convolutions, quadratic for attention
