"""Prior sampling with the prompt prefix computed once.

``PriorTransformer`` runs a causal transformer over ``[text tokens (77), prompt embedding,
timestep, noisy latent, readout]`` and reads only the last position. Because attention is
causal and the text comes first, the text and prompt-embedding positions never see the latent
or the timestep: their keys and values are the same at every denoising step and for every
sample of a prompt. We compute them once per prompt (:func:`build_prefix`) and each denoising
step only runs the three step-dependent tokens (:func:`predict`). Padding positions are masked
out of every query by the model's own mask, so they are dropped altogether. Outputs equal
diffusers' ``KandinskyPriorPipeline`` to float rounding, at a fraction of the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cancel
from .prior import Prior, PromptEmbeds

MASKED = -10000.0  # the additive mask value PriorTransformer itself uses


@dataclass
class PrefixCache:
    """Per-layer keys/values of each prompt's prefix, plus its key-padding bias."""

    keys: list[torch.Tensor]  # per layer [P, heads, S, head_dim]
    values: list[torch.Tensor]
    key_bias: torch.Tensor  # [P, S] additive
    tail_pos: torch.Tensor  # [3, W] positional embeddings of timestep, latent, readout


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, w = x.shape
    return x.view(b, s, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _check_architecture(transformer: torch.nn.Module) -> None:
    if transformer.prd_embedding is None:
        raise NotImplementedError("Prior transformers without a readout ('prd') token are not supported.")
    t = transformer.config.num_embeddings
    if transformer.positional_embedding.shape[1] != t + transformer.additional_embeddings:
        raise NotImplementedError("Prior transformers with a short positional embedding are not supported.")
    for block in transformer.transformer_blocks:
        if block.norm_type != "layer_norm" or block.attn2 is not None or block.pos_embed is not None:
            raise NotImplementedError(f"Unsupported prior block layout (norm_type={block.norm_type}).")


def build_prefix(transformer: torch.nn.Module, emb: PromptEmbeds) -> PrefixCache:
    """Run the prompt positions through every layer once and keep their keys and values."""
    _check_architecture(transformer)
    tf = transformer
    dtype = tf.positional_embedding.dtype
    text = emb.hidden_states.to(dtype)
    if tf.encoder_hidden_states_proj is not None:
        text = tf.encoder_hidden_states_proj(text)
    proj = emb.text_embeds.to(dtype)
    if tf.embedding_proj_norm is not None:
        proj = tf.embedding_proj_norm(proj)
    proj = tf.embedding_proj(proj)
    n_text = tf.config.num_embeddings  # the extra tokens sit after all 77 text positions, however many we keep
    pos = tf.positional_embedding[0]
    keep = emb.mask.any(0).nonzero().squeeze(1)
    x = torch.cat([text[:, keep] + pos[keep], (proj + pos[n_text])[:, None]], dim=1)
    key_bias = torch.cat([(~emb.mask[:, keep]).to(dtype) * MASKED, x.new_zeros(x.shape[0], 1)], dim=1)
    s = x.shape[1]
    causal = torch.full((s, s), MASKED, dtype=dtype, device=x.device).triu(1)
    bias = key_bias[:, None, None, :] + causal
    if tf.norm_in is not None:
        x = tf.norm_in(x)
    keys, values = [], []
    for block in tf.transformer_blocks:
        attn = block.attn1
        h = block.norm1(x)
        q, k, v = (_split_heads(f(h), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale + bias, dim=-1)
        x = x + attn.to_out[1](attn.to_out[0](_merge_heads(probs @ v)))
        x = x + block.ff(block.norm3(x))
        keys.append(k)
        values.append(v)
    return PrefixCache(keys, values, key_bias, pos[n_text + 1:n_text + 4])


def predict(transformer: torch.nn.Module, cache: PrefixCache, groups: list[tuple[int, int]],
            latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The prior's x0 prediction for ``latents``; ``groups`` = [(prefix row, count), ...] in order.

    ``timestep`` is one for all rows (sampling) or one per row ``[B]`` (training draws a noise level
    per sample)."""
    tf = transformer
    dtype = cache.tail_pos.dtype
    b = latents.shape[0]
    t = timestep.reshape(-1).to(latents.device).expand(b)
    time = tf.time_embedding(tf.time_proj(t).to(dtype))
    readout = tf.prd_embedding[0, 0].to(dtype).expand(b, -1)
    x = torch.stack([time, tf.proj_in(latents.to(dtype)), readout], dim=1) + cache.tail_pos
    causal = torch.full((3, 3), MASKED, dtype=dtype, device=x.device).triu(1)
    if tf.norm_in is not None:
        x = tf.norm_in(x)
    for block, pk, pv in zip(tf.transformer_blocks, cache.keys, cache.values):
        attn = block.attn1
        h = block.norm1(x)
        q, k, v = (_split_heads(f(h), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        outs, start = [], 0
        for row, count in groups:
            sl = slice(start, start + count)
            start += count
            s_prefix = torch.einsum("bhqd,hsd->bhqs", q[sl], pk[row]) * attn.scale + cache.key_bias[row]
            s_new = q[sl] @ k[sl].transpose(-1, -2) * attn.scale + causal
            probs = torch.softmax(torch.cat([s_prefix, s_new], dim=-1), dim=-1)
            n_prefix = s_prefix.shape[-1]
            outs.append(torch.einsum("bhqs,hsd->bhqd", probs[..., :n_prefix], pv[row])
                        + probs[..., n_prefix:] @ v[sl])
        x = x + attn.to_out[1](attn.to_out[0](_merge_heads(torch.cat(outs))))
        x = x + block.ff(block.norm3(x))
    return tf.proj_to_clip_embeddings(tf.norm_out(x[:, -1]))


def denoise(prior: Prior, cache: PrefixCache, latents: torch.Tensor, steps: int, guidance: float,
            generator: torch.Generator, cond_row: int = 1, uncond_row: int = 0) -> torch.Tensor:
    """The prior pipeline's denoising loop (same scheduler calls and noise draws), differentiable.

    The scheduler's timesteps stay on the CPU: it only indexes its CPU tables with them and tests ``t > 0``,
    which on a GPU tensor would wait for the device every step. The model gets its own copy on the device,
    sent once without blocking."""
    scheduler = prior.scheduler
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps
    on_device = timesteps.to(latents.device, non_blocking=True)
    b = latents.shape[0]
    cfg = guidance > 1.0
    for i, t in enumerate(timesteps):
        cancel.point()  # every denoising step of every batch (and of every optimiser step) may stop
        if cfg:
            pred = predict(prior.transformer, cache, [(uncond_row, b), (cond_row, b)], torch.cat([latents] * 2),
                           on_device[i])
            uncond, text = pred.chunk(2)
            pred = uncond + guidance * (text - uncond)
        else:
            pred = predict(prior.transformer, cache, [(cond_row, b)], latents, on_device[i])
        prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
        latents = scheduler.step(pred, timestep=t, sample=latents, generator=generator, prev_timestep=prev).prev_sample
    return prior.transformer.post_process_latents(latents)


def initial_latents(prior: Prior, count: int, generator: torch.Generator) -> torch.Tensor:
    """Seeded starting noise, drawn as the diffusers pipeline draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor((count, prior.embedding_dim), generator=generator, device=prior.device, dtype=prior.dtype)
    return latents * prior.scheduler.init_noise_sigma


def sample_embeddings(prior: Prior, prompt: str, count: int, *, batch_size: int = 500, steps: int = 5,
                      guidance: float = 4.0, seed: int = 0, negative_prompt: str = "",
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``count`` image embeddings for ``prompt``; the prompt is encoded once for all batches.

    One CPU generator seeded with ``seed`` drives every batch in turn, so the result equals
    calling diffusers' prior pipeline batch after batch with that generator.
    ``progress(done, count)`` is called after each batch; raising from it cancels.
    """
    if count < 1 or batch_size < 1:
        raise ValueError("count and batch_size must be at least 1.")
    if steps < 2:
        raise ValueError("steps must be at least 2: the unCLIP scheduler spaces its timesteps over steps - 1.")
    prior.activate()
    generator = torch.Generator("cpu").manual_seed(int(seed))
    out = []
    with torch.no_grad():
        cache = build_prefix(prior.transformer, prior.encode_prompt([negative_prompt, prompt]))
        done = 0
        while done < count:
            b = min(batch_size, count - done)
            latents = initial_latents(prior, b, generator)
            out.append(denoise(prior, cache, latents, steps, guidance, generator).float().cpu())
            done += b
            if progress is not None:
                progress(done, count)
    return torch.cat(out)
