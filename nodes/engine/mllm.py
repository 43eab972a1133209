"""The multimodal-LLM judge of the validity gate: "Is this still a {subject}? Yes or No."

The paper asks an MLLM (Janus-1.3B or LLaVA-NeXT) whether a rendered image is still its
subject and ends the trial on "No". Parsing generated text is brittle (casing, "Yes." vs
"yes,", refusals), and a bare verdict throws away how sure the model was. So the judge reads
the next-token logits at the answer position and returns a probability instead:

    P(yes) = softmax([logsumexp(logits[yes variants]), logsumexp(logits[no variants])])[0]

:func:`load_mllm` loads any local transformers image-text-to-text folder (LLaVA-NeXT, Qwen2-VL,
Qwen2.5-VL, Janus, Idefics3, SmolVLM, ...) through transformers' native classes, without
touching the network; family-specific details live in ``FAMILIES``.

Answers are deterministic (one forward, no sampling), so each (image, question) is computed once
per judge and cached by the sha256 of the 8-bit pixels; ``MLLMJudge.history`` logs every answer.
A model whose vision tower is missing or broken still answers fluently from the text alone, so
:meth:`MLLMJudge.check_vision` asks about plain red and blue images before it is trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from packaging.version import Version
from PIL import Image

from . import budget
from .compat import dtype_kwargs, installed_version
from .layouts import SENTENCEPIECE_FILES, TOKENIZER_FILES, Layout, first_missing
from .model_shapes import MLLMShape, vision_patches

if TYPE_CHECKING:
    from transformers import BatchFeature, PretrainedConfig

YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NO_VARIANTS = ("No", "no", " No", " no")

# The vision check: plain images of these colours (RGB 0..1), each asked about both colours.
PROBE_COLOURS = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0)}
PROBE_QUESTION = "Is this image {colour}? Yes or No."
PROBE_SIZE = 64
# A judge lives as long as ComfyUI caches it: its answer cache and history stay bounded on a long-running server.
ANSWER_CACHE_LIMIT = 4096
HISTORY_LIMIT = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What differs between model families; a new family is one ``FAMILIES`` entry.

    ``processor_kwargs`` go to the processor call behind ``apply_chat_template`` (e.g. a mode
    switch for processors that also prepare image generation). ``layout``: files the family needs
    beyond every model's, which transformers would load without and fail on only at the first question.
    ``min_transformers`` is the oldest transformers the family's tests pass with: ComfyUI's 4.50.3 for
    LLaVA-NeXT, 5.0.0 for the others (their processors and tiny test folders need transformers 5), so on
    4.5x those refuse at load, naming the release, while the rest of the pack works.
    """

    name: str
    processor_kwargs: dict[str, object] = field(default_factory=dict)
    layout: Layout = field(default_factory=dict)
    min_transformers: str = "5.0.0"


# transformers ``config.model_type`` -> family. Other image-text-to-text models load too,
# through ``GENERIC``; these are the ones the tests exercise. All load through
# AutoModelForImageTextToText (Janus included: transformers maps "janus" to its native
# JanusForConditionalGeneration), so none needs remote code.
FAMILIES: dict[str, Family] = {
    # processor_config.json holds patch_size: without it the processor loads and the first question fails
    # counting image tokens ("unsupported operand type(s) for //: 'int' and 'NoneType'").
    "llava_next": Family("LLaVA-NeXT", layout={"": (("processor_config.json",),)}, min_transformers="4.50.3"),
    "qwen2_vl": Family("Qwen2-VL"),
    "qwen2_5_vl": Family("Qwen2.5-VL"),
    # Janus also draws images; "text" mode keeps its processor from appending a begin-of-image token.
    "janus": Family("Janus", processor_kwargs={"generation_mode": "text"}),
    "idefics3": Family("Idefics3"),
    "smolvlm": Family("SmolVLM"),
}
GENERIC = Family("image-text-to-text")

# Published layouts transformers has no native class for -> what to load instead. DeepSeek's own
# Janus repos (the paper's Janus-1.3B among them) run on the ``janus`` package, not on transformers.
NOT_NATIVE = {
    "multi_modality": ("DeepSeek's original Janus/DeepSeek-VL layout, which needs the 'janus' package's own code. "
                       "Use a transformers-format Janus (deepseek-community/Janus-Pro-1B or -7B), or convert this one "
                       "with transformers' convert_janus_weights_to_hf.py"),
}


def family_of(model_type: str) -> Family:
    """The family for a ``config.model_type``; unknown image-text-to-text models use the generic path."""
    return FAMILIES.get(model_type, GENERIC)


def transformers_too_old(family: Family = GENERIC) -> str | None:
    """Why the installed transformers cannot run ``family``'s judge, or None when it can."""
    have = installed_version("transformers")
    if have >= Version(family.min_transformers):
        return None
    return (f"the {family.name} judge needs transformers>={family.min_transformers} (installed: {have}); "
            "upgrade transformers to use an MLLM gate (everything else in the pack works with this version)")


class MLLMVisionError(ValueError):
    """The loaded MLLM failed the colour check: it answers, but not from the image.

    A ``ValueError`` like every other "this model folder cannot be the judge" refusal, so the
    loader node reports it the same way; ``check`` holds the four probabilities.
    """

    def __init__(self, check: VisionCheck) -> None:
        self.check = check
        super().__init__(check.describe())


@dataclass(frozen=True)
class VisionCheck:
    """P(yes) for "Is this image {asked}?" about a plain {shown} image, keyed ``(shown, asked)``.

    A model that sees says yes (> 0.5) exactly when the colours agree. Asking both colours about
    both images rules out a model that favours one colour word whatever it is shown.
    """

    p_yes: dict[tuple[str, str], float]

    @property
    def sees(self) -> bool:
        return all((p > 0.5) == (shown == asked) for (shown, asked), p in self.p_yes.items())

    def describe(self) -> str:
        """One line per probe with the probability and the side of 0.5 it needed."""
        lines = [f"  plain {shown} image, '{PROBE_QUESTION.format(colour=asked)}': P(yes) = {p:.3f} "
                 f"(needs {'>' if shown == asked else '<'} 0.5)" for (shown, asked), p in self.p_yes.items()]
        verdict = "sees images" if self.sees else "cannot see images: its answers do not follow the picture"
        return "\n".join([f"MLLM vision check: the model {verdict}.", *lines])

    def raise_if_blind(self) -> None:
        """Turn a failed check into an error the loader node shows; a passed one returns quietly."""
        if not self.sees:
            raise MLLMVisionError(self)


class MLLMJudge:
    """A loaded MLLM answering yes/no questions about images, as probabilities.

    Deterministic: eval mode, no sampling, no gradients, one image per forward (batching
    would pad prompts differently per family and shift the answer position). Hence answers
    are cached per judge (so the model is part of the key) by pixel hash + question, and every
    answer, cached or not, is appended to ``history`` as
    ``{"question", "image_sha256", "p_yes", "cached"}`` for the run's log.
    """

    def __init__(self, model: torch.nn.Module, processor: object, family: Family = GENERIC) -> None:
        self.model = model.eval()
        self.processor = processor
        self.family = family
        self.yes_ids, self.no_ids = answer_token_ids(processor.tokenizer)
        # Computing logits for the last position only skips a [T, vocab] matmul (150 k vocab for Qwen).
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._answers: OrderedDict[tuple[str, str], float] = OrderedDict()  # least recently used first
        self.history: deque[dict[str, object]] = deque(maxlen=HISTORY_LIMIT)

    @property
    def device(self) -> torch.device:
        """Where the inputs must go: wherever the caller put the model."""
        return next(self.model.parameters()).device

    def managed_modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules a host's memory manager moves together (the first one keys the model)."""
        return {"model": self.model}

    def p_yes(self, images: torch.Tensor, question: str) -> torch.Tensor:
        """P("yes") for each image of a ComfyUI IMAGE ``[B, H, W, 3]`` in 0..1; returns ``[B]`` float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an IMAGE tensor [B, H, W, 3], got shape {tuple(images.shape)}")
        return torch.tensor([self._answer(to_uint8(image), question) for image in images], dtype=torch.float32)

    def _answer(self, pixels: np.ndarray, question: str) -> float:
        """P(yes) for one 8-bit image, from the cache when this judge already answered it."""
        key = (pixel_sha256(pixels), question)
        cached = key in self._answers
        if cached:
            self._answers.move_to_end(key)
        else:
            logits = self.next_token_logits(Image.fromarray(pixels), question)
            self._answers[key] = float(yes_probability(logits, self.yes_ids, self.no_ids))
            if len(self._answers) > ANSWER_CACHE_LIMIT:
                self._answers.popitem(last=False)
        p = self._answers[key]
        self.history.append({"question": question, "image_sha256": key[0], "p_yes": p, "cached": cached})
        log.info("MLLM judge (%s): P(yes) = %.4f for %r on image %s%s", self.family.name, p, question, key[0][:12],
                 " (cached)" if cached else "")
        return p

    def memory_estimate(self, question: str, height: int, width: int, *, on_gpu: bool) -> budget.Estimate:
        """Memory of one question about a ``width`` x ``height`` image: the weights and one forward, with the
        tokens and image patches this judge's processor makes of such an image."""
        shape = MLLMShape.of(self.model)
        try:
            inputs = self.inputs(Image.new("RGB", (width, height)), question)
            temporal = int(getattr(getattr(self.model.config, "vision_config", None), "temporal_patch_size", 1) or 1)
            tokens = int(inputs["input_ids"].shape[-1])
            patches = vision_patches(inputs.get("pixel_values"), shape.vision_patch, temporal)
        except Exception as error:  # an unusual processor: fall back to a generous guess
            log.debug("Creative Generation: could not count MLLM tokens (%s); assuming 2,048", error)
            tokens = patches = 2048
        return budget.mllm_estimate(shape, tokens=tokens, vision_tokens=patches, on_gpu=on_gpu)

    def check_vision(self) -> VisionCheck:
        """Ask about plain red and blue images; see :class:`VisionCheck`. Call ``.raise_if_blind()`` to enforce."""
        shape = (1, PROBE_SIZE, PROBE_SIZE, 3)
        return VisionCheck({
            (shown, asked): float(self.p_yes(torch.tensor(rgb).expand(shape), PROBE_QUESTION.format(colour=asked)))
            for shown, rgb in PROBE_COLOURS.items() for asked in PROBE_COLOURS})

    @torch.no_grad()
    def next_token_logits(self, image: Image.Image, question: str) -> torch.Tensor:
        """Logits ``[vocab]`` (float32, CPU) of the token the model would answer with."""
        inputs = self.inputs(image, question).to(device=self.device, dtype=self.model.dtype)
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        return self.model(**inputs, **extra).logits[0, -1].float().cpu()

    def inputs(self, image: Image.Image, question: str) -> BatchFeature:
        """The processor's model inputs for one image + question, ending at the assistant's turn.

        ``apply_chat_template(tokenize=True)`` is the path each family's processor is maintained
        for: it inserts the image placeholder tokens and avoids a duplicated BOS.
        """
        return question_inputs(self.processor, image, question, self.family.processor_kwargs)


def question_inputs(processor: object, image: Image.Image, question: str,
                    processor_kwargs: dict[str, object] | None = None) -> BatchFeature:
    """One user turn (the image, then the question) through the processor's chat template, ending at the
    assistant's turn: what the judge asks, and what the mini world's MLLM is trained on."""
    content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs=dict(processor_kwargs or {}))


def yes_probability(logits: torch.Tensor, yes_ids: list[int], no_ids: list[int]) -> torch.Tensor:
    """Two-way softmax of the pooled yes/no logits; other tokens (e.g. "Maybe") do not dilute it."""
    pooled = torch.stack([logits[yes_ids].logsumexp(0), logits[no_ids].logsumexp(0)])
    return pooled.softmax(0)[0].to(torch.float32)


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First-token ids of the yes and no variants.

    Tokenisers differ on case and leading space ("Yes" vs "ĠYes" vs "▁Yes"), so every variant
    counts. Unknown tokens say nothing, and neither does an id that starts both a yes and a
    no variant (SentencePiece can split " Yes" into "▁" + "Yes"), so both are dropped.
    """
    yes, no = _first_ids(tokenizer, YES_VARIANTS), _first_ids(tokenizer, NO_VARIANTS)
    yes, no = [i for i in yes if i not in no], [i for i in no if i not in yes]
    if not yes or not no:
        raise ValueError("the tokenizer has no usable token for 'Yes' or 'No'; this model cannot answer the gate")
    return yes, no


def _first_ids(tokenizer, variants: tuple[str, ...]) -> list[int]:
    ids: list[int] = []
    for text in variants:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if encoded and encoded[0] != tokenizer.unk_token_id and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI ``[H, W, 3]`` float 0..1 -> 8-bit RGB array: what every image processor sees, so what is hashed."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(array)


def pixel_sha256(pixels: np.ndarray) -> str:
    """sha256 of the shape and the 8-bit pixels; the shape keeps equal bytes at other sizes apart."""
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def load_mllm(folder: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              trust_remote_code: bool = False, sanity_check: bool = False) -> MLLMJudge:
    """Load a local image-text-to-text model + processor as a judge, or refuse with a ValueError.

    Offline (``local_files_only``) and safetensors only: pickled ``.bin`` weights can run code
    on load, and so can remote code, which stays off unless ``trust_remote_code``.
    ``sanity_check`` runs :meth:`MLLMJudge.check_vision` (four forwards) and raises
    :class:`MLLMVisionError` if the model cannot tell red from blue.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(folder)
    config = _checked_config(path, trust_remote_code)
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no .safetensors weights (pickled .bin checkpoints are refused: they can run code)")
    _check_files(path, family_of(config.model_type))
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
        **dtype_kwargs("transformers", dtype))
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    _check_processor(path, processor)
    judge = MLLMJudge(model.to(device), processor, family_of(config.model_type))
    if sanity_check:
        judge.check_vision().raise_if_blind()
    return judge


def _checked_config(path: Path, trust_remote_code: bool) -> PretrainedConfig:
    """The folder's config, if it describes a model that takes images and answers in text."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if not path.is_dir():
        raise ValueError(f"{path}: not a folder; expected a local transformers model folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: missing config.json; expected a transformers model folder")
    try:
        declared = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:  # not JSON, or JSON that is not an object
        raise ValueError(f"{path}: config.json could not be read: {error}") from error
    if declared in NOT_NATIVE:
        raise ValueError(f"{path}: a '{declared}' model is {NOT_NATIVE[declared]}.")
    if isinstance(declared, str) and declared in FAMILIES and (too_old := transformers_too_old(FAMILIES[declared])):
        raise ValueError(f"{path}: {too_old}")  # before AutoConfig: 4.5x does not know every family's config
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: config.json could not be read: {error}") from error
    remote = trust_remote_code and "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not remote:
        known = ", ".join(f.name for f in FAMILIES.values())
        raise ValueError(f"{path}: a '{config.model_type}' model cannot see images; the gate needs an "
                         f"image-text-to-text model ({known}, ...)")
    if too_old := transformers_too_old(family_of(config.model_type)):
        raise ValueError(f"{path}: {too_old}")
    return config


def _check_files(path: Path, family: Family) -> None:
    """Refuse up front a folder that lacks a file the model needs, naming it, instead of a library error
    at load (a tokenizer transformers cannot build) or at the first question (a family's processor file)."""
    import importlib.util

    sentencepiece = importlib.util.find_spec("sentencepiece") is not None
    missing = first_missing(path, {"": (TOKENIZER_FILES + (SENTENCEPIECE_FILES if sentencepiece else ()),)})
    if missing is not None:
        found = sorted(p.name for p in path.iterdir() if "token" in p.name or p.suffix == ".model")
        hint = "" if sentencepiece else " (a tokenizer.model would also need the sentencepiece package)"
        raise ValueError(f"{path}: no tokenizer file transformers can load: needs {missing}{hint}; found "
                         f"{', '.join(found) or 'none'}. Copy the tokenizer files from the model's repo.")
    missing = first_missing(path, family.layout)
    if missing is not None:
        raise ValueError(f"{path}: a {family.name} model needs {missing}, which this folder lacks; copy it from the "
                         "model's repo.")


def _check_processor(path: Path, processor: object) -> None:
    """Without an image processor or chat template the prompt cannot be built as the model was trained."""
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: no image processor (processor_config.json / preprocessor_config.json)")
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{path}: the processor has no chat template (chat_template.jinja); "
                         "the question cannot be formatted the way the model was trained")
