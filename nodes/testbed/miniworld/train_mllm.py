"""Stage 4 of the mini world: a tiny LLaVA-NeXT (vision tower initialised from the mini CLIP's)
answering "Is this (still) a {kind/category}? Yes or No." and "Is this image {colour}? Yes or No."."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.mllm import question_inputs
from ...engine.prior import CLIP_MEAN, CLIP_STD
from ..tiny.mllm import LLAVA_NEXT_TEMPLATE, word_tokenizer
from . import world as W
from .train_setup import Config, Split, log, seed_all, to_fp16, update

if TYPE_CHECKING:
    from transformers import (CLIPVisionConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              PreTrainedTokenizerFast)


MLLM_WORDS = ("Is", "this", "still", "a", "an", "image", "?", "Yes", "yes", "No", "no", "or", ".", ",", ":",
              "USER", "ASSISTANT", *W.KINDS, *W.CATEGORIES, *W.COLOURS)
MLLM_QUESTIONS = ("Is this {a} {w}? Yes or No.", "Is this still {a} {w}? Yes or No.")
PROBE_QUESTION = "Is this image {c}? Yes or No."


def mllm_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny LLaVA-NeXT's word-level tokenizer over the world's words (adds BOS, as Llama's does)."""
    return word_tokenizer(("<s>", "</s>", "<pad>", "<image>"), words=MLLM_WORDS, adds_bos=True, bos_token="<s>",
                          eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_mllm(cfg: Config, vision_cfg: CLIPVisionConfig,
               vision_state: dict) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tokenizer = mllm_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    pinpoints = [[cfg.res, cfg.res]]
    vision_dict = {k: v for k, v in vision_cfg.to_dict().items() if k not in ("dtype", "torch_dtype")}
    config = LlavaNextConfig(
        vision_config=vision_dict,
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.mllm_hidden,
                                intermediate_size=2 * cfg.mllm_hidden,
                                num_hidden_layers=cfg.mllm_layers, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=256,
                                bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")).to_dict(),
        image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.res}, crop_size={"height": cfg.res, "width": cfg.res},
        image_grid_pinpoints=pinpoints, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.clip_patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    model = LlavaNextForConditionalGeneration(config).float()
    missing = model.model.vision_tower.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in vision_state.items() if k.startswith("vision_model.")},
        strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys, missing
    return model, processor


def plain_colour_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    names = list(W.COLOURS)
    picks = [names[int(rng.integers(len(names)))] for _ in range(n)]
    px = np.stack([np.full((64, 64, 3), W._jitter(W.COLOURS[c], rng, 20), dtype=np.uint8) for c in picks])
    return px, picks


def mllm_prompt_ids(processor, image, question: str) -> torch.Tensor:
    """The token ids the judge's processor makes of one image + question (``engine.mllm.question_inputs``)."""
    return question_inputs(processor, image, question)["input_ids"][0]


def train_mllm(cfg: Config, train: Split, model: LlavaNextForConditionalGeneration,
               processor: LlavaNextProcessor) -> LlavaNextForConditionalGeneration:
    from PIL import Image, ImageFilter

    rng = seed_all(cfg.seed + 5)
    tok = processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    n_img = min(cfg.mllm_images, len(train.scenes))
    idx_img = rng.choice(len(train.scenes), n_img, replace=False)
    probe_px, probe_colour = plain_colour_images(n_img // 5, rng)
    pixels = np.concatenate([train.pixels[idx_img], probe_px])
    scenes = [train.scenes[i] for i in idx_img] + [None] * len(probe_px)
    t0 = time.time()
    # A third of the scenes blurred, as decoded images are: the gate judges renders.
    images = [Image.fromarray(p) for p in pixels]
    for i in range(n_img):
        if rng.random() < 0.33:
            images[i] = images[i].filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    pv = processor.image_processor(images, return_tensors="pt")
    pixel_values, image_sizes = pv["pixel_values"], pv["image_sizes"]
    log(f"mllm: {len(pixels)} images preprocessed ({time.time() - t0:.0f} s), "
        f"{len(mllm_prompt_ids(processor, Image.fromarray(pixels[0]), 'Is this a car? Yes or No.'))} tokens a question")
    prompt_cache: dict[str, torch.Tensor] = {}
    probe = Image.fromarray(pixels[0])

    def prompt(q: str) -> torch.Tensor:
        if q not in prompt_cache:
            prompt_cache[q] = mllm_prompt_ids(processor, probe, q)
        return prompt_cache[q]

    words = list(W.KINDS) + list(W.CATEGORIES)
    # The vision tower starts as the mini CLIP's and is fine-tuned too (at mllm_vision_lr_scale x the rate).
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in vision_ids], "scale": 1.0},
                             {"params": [p for p in params if id(p) in vision_ids], "scale": cfg.mllm_vision_lr_scale}],
                            lr=cfg.mllm_lr, weight_decay=0.01)
    model.train()
    for step in range(cfg.mllm_steps):
        # Every image is asked twice, once with a true and once with a false subject, so the image
        # alone never predicts the answer: the model has to read the question (it otherwise settles
        # on "does this look like a typical picture" and ignores the word).
        still = rng.random() < 0.5
        half = rng.choice(len(pixels), cfg.mllm_batch // 2, replace=False)
        idx, questions, answers = [], [], []
        for i in half:
            scene = scenes[i]
            if scene is None:
                true_c = probe_colour[i - n_img]
                false_c = [c for c in W.COLOURS if c != true_c][int(rng.integers(len(W.COLOURS) - 1))]
                if not still:
                    pair = [PROBE_QUESTION.format(c=true_c), PROBE_QUESTION.format(c=false_c)]
                else:  # a plain colour is no kind or category at all
                    w = words[int(rng.integers(len(words)))]
                    pair = [None, MLLM_QUESTIONS[1].format(a=W.article(w), w=w)]
            else:
                true_w = scene.kind if rng.random() < 0.7 else scene.category
                false_w = [w for w in words if w not in (scene.kind, scene.category)][int(rng.integers(len(words) - 2))]
                pair = [MLLM_QUESTIONS[int(still)].format(a=W.article(w) if rng.random() < 0.7 else "a", w=w)
                        for w in (true_w, false_w)]
            for question, answer in zip(pair, (True, False)):
                if question is not None:
                    idx.append(i)
                    questions.append(question)
                    answers.append(answer)
        idx = np.array(idx)
        ids = torch.stack([prompt(q) for q in questions])
        # Questions end "... {subject} ? Yes or No . ASSISTANT :", so the subject is the 8th token from
        # the end. Besides the answer, the model learns to predict a *true* subject from the token
        # before it (a captioning loss on the same sequences): it then holds "what I see" as a word
        # right where the question states one, and the yes/no compares the two.
        assert all(int(row[-8]) == tok.convert_tokens_to_ids(q.split()[-4].rstrip("?")) for row, q in
                   zip(ids[:2], questions[:2]))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values[idx],
                    image_sizes=image_sizes[idx], logits_to_keep=9).logits
        logits = out[:, -1]
        target = torch.tensor([yes if a else no for a in answers])
        true_rows = torch.tensor(answers)
        loss = F.cross_entropy(logits, target) + F.cross_entropy(out[true_rows, 0], ids[true_rows, -8])
        update(opt, loss, cfg.mllm_lr, step, cfg.mllm_steps, clip=params)
        if step % 100 == 0 or step == cfg.mllm_steps - 1:
            acc = ((logits[:, yes] > logits[:, no]) == torch.tensor(answers)).float().mean()
            log(f"mllm step {step}: loss {loss.item():.3f} batch acc {acc:.2f} ({time.time() - t0:.0f} s)")
    return model.eval().requires_grad_(False)


def save_mllm(folder: Path, model, processor) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    to_fp16(model).save_pretrained(folder, safe_serialization=True)
    model.float()
    processor.save_pretrained(folder)
