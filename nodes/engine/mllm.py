"""The multimodal-LLM judge of the validity gate: "Is this still a {subject}? Yes or No."

The paper asks an MLLM (Janus-1.3B or LLaVA-NeXT) whether a rendered image is still its
subject and ends the trial on "No". Parsing generated text is brittle (casing, "Yes." vs
"yes,", refusals), and a bare verdict throws away how sure the model was. So the judge reads
the next-token logits at the answer position and returns a probability instead:

    P(yes) = softmax([logsumexp(logits[yes variants]), logsumexp(logits[no variants])])[0]

:func:`load_mllm` loads any local transformers image-text-to-text folder (LLaVA-NeXT,
Qwen2-VL, ...) without touching the network; family-specific details live in ``FAMILIES``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from transformers import BatchFeature, PretrainedConfig

YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NO_VARIANTS = ("No", "no", " No", " no")


@dataclass(frozen=True)
class Family:
    """What differs between model families; a new family is one ``FAMILIES`` entry.

    ``processor_kwargs`` go to the processor call behind ``apply_chat_template`` (e.g. a mode
    switch for processors that also prepare image generation).
    """

    name: str
    processor_kwargs: dict[str, object] = field(default_factory=dict)


# transformers ``config.model_type`` -> family. Other image-text-to-text models load too,
# through ``GENERIC``; these are the ones the tests exercise.
FAMILIES: dict[str, Family] = {
    "llava_next": Family("LLaVA-NeXT"),
    "qwen2_vl": Family("Qwen2-VL"),
}
GENERIC = Family("image-text-to-text")


def family_of(model_type: str) -> Family:
    """The family for a ``config.model_type``; unknown image-text-to-text models use the generic path."""
    return FAMILIES.get(model_type, GENERIC)


class MLLMJudge:
    """A loaded MLLM answering yes/no questions about images, as probabilities.

    Deterministic: eval mode, no sampling, no gradients, one image per forward (batching
    would pad prompts differently per family and shift the answer position).
    """

    def __init__(self, model: torch.nn.Module, processor: object, family: Family = GENERIC) -> None:
        self.model = model.eval()
        self.processor = processor
        self.family = family
        self.yes_ids, self.no_ids = answer_token_ids(processor.tokenizer)
        # Computing logits for the last position only skips a [T, vocab] matmul (150 k vocab for Qwen).
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def device(self) -> torch.device:
        """Where the inputs must go: wherever the caller put the model."""
        return next(self.model.parameters()).device

    def p_yes(self, images: torch.Tensor, question: str) -> torch.Tensor:
        """P("yes") for each image of a ComfyUI IMAGE ``[B, H, W, 3]`` in 0..1; returns ``[B]`` float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an IMAGE tensor [B, H, W, 3], got shape {tuple(images.shape)}")
        return torch.stack([self._p_yes_one(to_pil(image), question) for image in images])

    def _p_yes_one(self, image: Image.Image, question: str) -> torch.Tensor:
        logits = self.next_token_logits(image, question)
        return yes_probability(logits, self.yes_ids, self.no_ids)

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
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs=dict(self.family.processor_kwargs))


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


def to_pil(image: torch.Tensor) -> Image.Image:
    """ComfyUI ``[H, W, 3]`` float 0..1 -> 8-bit RGB PIL, the input every image processor accepts."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def load_mllm(folder: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              trust_remote_code: bool = False) -> MLLMJudge:
    """Load a local image-text-to-text model + processor as a judge, or refuse with a ValueError.

    Offline (``local_files_only``) and safetensors only: pickled ``.bin`` weights can run code
    on load, and so can remote code, which stays off unless ``trust_remote_code``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(folder)
    config = _checked_config(path, trust_remote_code)
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no .safetensors weights (pickled .bin checkpoints are refused: they can run code)")
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    _check_processor(path, processor)
    return MLLMJudge(model.to(device), processor, family_of(config.model_type))


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
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: config.json could not be read: {error}") from error
    remote = trust_remote_code and "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not remote:
        known = ", ".join(f.name for f in FAMILIES.values())
        raise ValueError(f"{path}: a '{config.model_type}' model cannot see images; the gate needs an "
                         f"image-text-to-text model ({known}, ...)")
    return config


def _check_processor(path: Path, processor: object) -> None:
    """Without an image processor or chat template the prompt cannot be built as the model was trained."""
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: no image processor (processor_config.json / preprocessor_config.json)")
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{path}: the processor has no chat template (chat_template.jinja); "
                         "the question cannot be formatted the way the model was trained")
