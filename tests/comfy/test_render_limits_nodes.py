"""Issue 18.4 at the node: the Decoder Renderer refuses, when it is made, a render no machine like this
one finishes in reasonable time, and names the size that does; the sizes the workflows use pass."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def decoder(pack_nodes, comfy_inprocess):
    import comfy_harness

    return comfy_harness.execute_node(pack_nodes["CreativeLoadDecoder"], "limits", decoder="miniworld/decoder",
                                      dtype="auto")[0]


def _renderer(run, decoder, side, steps):
    return run("CreativeDecoderRenderer", decoder=decoder, steps=steps, guidance=2.0, width=side, height=side, seed=0)


def test_a_render_that_cannot_finish_is_refused_when_the_renderer_is_made(run, decoder):
    with pytest.raises(ValueError, match=r"2048x2048 decoder render with 200 steps would take at least .* hours on "
                                         r"this CPU .* Render at most \d+x\d+ \(width x height\)"):
        _renderer(run, decoder, 2048, 200)


@pytest.mark.parametrize("side, steps", [(32, 10), (512, 25)])
def test_the_workflows_sizes_pass(run, decoder, side, steps):
    _renderer(run, decoder, side, steps)
