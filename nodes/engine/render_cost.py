"""How long a Kandinsky decoder render takes at best, and the largest size that finishes in reasonable time.

The memory check alone lets through renders that fit but never end: the decoder's attention
compares every latent pixel with every other, so its cost grows with the square of the pixel
count (a 2048 x 2048 render of the mini world's decoder is 256 times the attention work of a 512
one, per step). :func:`render_macs` counts the multiply-adds of the UNet's steps and the MoVQ
decode from the model's configuration; :func:`check_render_time` divides them by a throughput no
machine of the kind beats (so it only refuses what cannot finish), and refuses with the largest
size of the same shape that fits the limit. Deterministic: no timing is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

TIME_LIMIT_S = 3600.0  # "reasonable time" for one render call
CPU_MACS_PER_THREAD_S = 1e11  # faster than any CPU core sustains on these convolutions and attentions
GPU_MACS_PER_S = 1e15  # faster than any GPU today (an H200 peaks near 5e14 dense bf16 multiply-adds a second)


class RenderTooSlowError(ValueError):
    """A render that no machine of this kind finishes within :data:`TIME_LIMIT_S`; the message says what does."""


@dataclass(frozen=True)
class Levels:
    """One network's resolution levels: channels, whether it attends there, resnets per block."""

    channels: tuple[int, ...]
    attends: tuple[bool, ...]
    resnets: int


@dataclass(frozen=True)
class DecoderCost:
    """What the cost of a render depends on, read off a loaded Kandinsky decoder."""

    latent_factor: int
    unet: Levels
    movq: Levels  # the MoVQ decoder from the latent level up: channels of the latent level first

    @classmethod
    def of(cls, decoder) -> DecoderCost | None:
        """From a :class:`..render.KandinskyDecoder` (``None`` for renderers without a diffusers pipeline)."""
        pipe = getattr(decoder, "pipeline", None)
        if pipe is None or getattr(pipe, "unet", None) is None or getattr(pipe, "movq", None) is None:
            return None
        u, m = pipe.unet.config, pipe.movq.config
        unet = Levels(tuple(u.block_out_channels), tuple("Attn" in t for t in u.down_block_types),
                      2 * u.layers_per_block + 1)  # down blocks have layers_per_block resnets, up blocks one more
        movq = Levels(tuple(reversed(m.block_out_channels)), tuple("Attn" in t for t in m.up_block_types),
                      m.layers_per_block + 1)
        return cls(2 ** (len(m.block_out_channels) - 1), unet, movq)


def _level_macs(channels: int, tokens: int, attends: bool, layers: int) -> int:
    """``layers`` resnets (two 3x3 convolutions each) and, where it attends, as many attention layers
    (q, k, v, out projections and the token-by-token products)."""
    convs = 18 * channels * channels * tokens
    attention = 4 * channels * channels * tokens + 2 * tokens * tokens * channels if attends else 0
    return layers * (convs + attention)


def render_macs(cost: DecoderCost, *, height: int, width: int, steps: int, guidance: float, batch: int = 1) -> int:
    """Multiply-adds of rendering ``batch`` embeddings: ``steps`` UNet calls (two rows each with
    classifier-free guidance), a middle block at the coarsest level, and one MoVQ decode."""
    latent = (height // cost.latent_factor) * (width // cost.latent_factor)
    unet = sum(_level_macs(c, latent // 4 ** i, a, cost.unet.resnets)
               for i, (c, a) in enumerate(zip(cost.unet.channels, cost.unet.attends)))
    coarsest = len(cost.unet.channels) - 1
    unet += _level_macs(cost.unet.channels[-1], latent // 4 ** coarsest, True, 2)
    movq = sum(_level_macs(c, latent * 4 ** i, a, cost.movq.resnets)
               for i, (c, a) in enumerate(zip(cost.movq.channels, cost.movq.attends)))
    movq += _level_macs(cost.movq.channels[0], latent, True, 2)  # the middle block at the latent level
    rows = 2 if guidance > 1.0 else 1
    return batch * (steps * rows * unet + movq)


def best_seconds(macs: int, *, on_gpu: bool, threads: int) -> float:
    """The least time ``macs`` multiply-adds take on this kind of machine."""
    return macs / (GPU_MACS_PER_S if on_gpu else CPU_MACS_PER_THREAD_S * max(1, threads))


def largest_size(*, height: int, width: int, multiple: int, fits) -> tuple[int, int] | None:
    """The largest ``(height, width)`` of the same shape, multiples of ``multiple``, for which ``fits(h, w)``."""
    longest = max(height, width)
    best, low, high = None, 1, longest // multiple
    while low <= high:  # the longer side in steps of ``multiple``; the cost grows with the size
        mid = (low + high) // 2
        h, w = (max(multiple, round(side * mid / longest) * multiple) for side in (height, width))
        if fits(h, w):
            best, low = (h, w), mid + 1
        else:
            high = mid - 1
    return best


def check_render_time(cost: DecoderCost, *, height: int, width: int, steps: int, guidance: float, batch: int,
                      multiple: int, on_gpu: bool, threads: int) -> float:
    """Refuse (:class:`RenderTooSlowError`) a render that cannot finish within :data:`TIME_LIMIT_S` even at
    the best throughput of this machine's kind; returns that best time in seconds."""
    def seconds(h: int, w: int) -> float:
        macs = render_macs(cost, height=h, width=w, steps=steps, guidance=guidance, batch=batch)
        return best_seconds(macs, on_gpu=on_gpu, threads=threads)

    needed = seconds(height, width)
    if needed <= TIME_LIMIT_S:
        return needed
    where = "GPU" if on_gpu else f"CPU ({threads} thread{'s' if threads != 1 else ''})"
    size = largest_size(height=height, width=width, multiple=multiple,
                        fits=lambda h, w: seconds(h, w) <= TIME_LIMIT_S)
    instead = (f"Render at most {size[1]}x{size[0]} (width x height) to finish within "
               f"{TIME_LIMIT_S / 3600:.0g} hour, or use fewer steps or fewer images at once." if size else
               "Use fewer steps or fewer images at once.")
    raise RenderTooSlowError(
        f"A {width}x{height} decoder render with {steps} steps{f' of {batch} images' if batch > 1 else ''} would "
        f"take at least {needed / 3600:.1f} hours on this {where} even at its best speed (the decoder's "
        f"attention grows with the square of the pixels). {instead}")
