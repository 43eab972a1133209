"""Stage 1 of the mini world: a small CLIP (transformers ``CLIPModel``), contrastive with
multi-positive targets (a caption is a positive for every image in the batch it is true of)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import world as W
from .train_setup import Captioner, Config, Split, log, seed_all, update

if TYPE_CHECKING:
    from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)


def clip_configs(cfg: Config) -> tuple[CLIPConfig, CLIPTextConfig, CLIPVisionConfig]:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                          num_hidden_layers=cfg.clip_layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=cfg.width, bos_token_id=49406, eos_token_id=2, pad_token_id=1,
                          hidden_act="gelu")
    vision = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                              num_hidden_layers=cfg.clip_layers, num_attention_heads=4, image_size=cfg.res,
                              patch_size=cfg.clip_patch, projection_dim=cfg.width, hidden_act="gelu")
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.width)
    return config, text, vision


def train_clip(cfg: Config, train: Split, captioner: Captioner,
               out: Path) -> tuple[CLIPModel, CLIPTextConfig, CLIPVisionConfig]:
    from transformers import CLIPModel

    rng = seed_all(cfg.seed + 1)
    config, text_cfg, vision_cfg = clip_configs(cfg)
    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.01)
    used: set[int] = set()
    t0 = time.time()
    for step in range(cfg.clip_steps):
        idx = rng.choice(len(train.scenes), cfg.clip_batch, replace=False)
        texts, match = captioner.sample([train.scenes[i] for i in idx], rng)
        ids = captioner.ids(texts)
        used.update(ids.unique().tolist())
        img = model.get_image_features(pixel_values=train.x[idx]).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T * model.logit_scale.exp().clamp(max=100)
        m = match.float()
        loss = 0.5 * (-(logits.log_softmax(1) * m / m.sum(1, keepdim=True)).sum(1).mean()
                      - (logits.log_softmax(0) * m / m.sum(0, keepdim=True)).sum(0).mean())
        update(opt, loss, cfg.clip_lr, step, cfg.clip_steps)
        if step % 100 == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    # Every caption the world can produce, so no row a world caption uses is zeroed.
    for scene in W.sample_scenes(3000, cfg.seed + 99):
        for t in range(len(W.TEMPLATES)):
            used.update(captioner.ids([W.caption(scene, rng, t)[0]])[0].tolist())
    used.update(captioner.ids([""])[0].tolist())
    with torch.no_grad():
        table = model.text_model.embeddings.token_embedding.weight
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[sorted(used)] = True
        table[~keep] = 0.0
    log(f"clip: {int(keep.sum())} token rows used and kept, the other {int((~keep).sum())} zeroed")
    return model.eval().requires_grad_(False), text_cfg, vision_cfg


def split_clip(model: CLIPModel, text_cfg: CLIPTextConfig,
               vision_cfg: CLIPVisionConfig) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """CLIPModel -> (CLIPTextModelWithProjection, CLIPVisionModelWithProjection) sharing its weights."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    state = model.state_dict()
    text = CLIPTextModelWithProjection(text_cfg)
    text.load_state_dict({k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))})
    vision = CLIPVisionModelWithProjection(vision_cfg)
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    return text.eval().requires_grad_(False), vision.eval().requires_grad_(False)


@torch.no_grad()
def image_embeds(vision, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([vision(pixel_values=x[i:i + batch]).image_embeds for i in range(0, len(x), batch)]).float()
