"""A learned creative concept: a placeholder token embedding plus a LoRA on the prior.

The token lives in the prior's CLIP text encoder; rather than resizing its vocabulary (which
would mutate a shared model), a forward hook swaps the placeholder's row in at encode time.
The LoRA is a peft adapter on the prior transformer, one named adapter per concept, so several
concepts (and the plain prior) can share one loaded model: :func:`activate_concept` selects one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .safetensors_io import load_tensors, save_tensors

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerBase

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FORMAT = "creative-concept/1"
CONCEPT_ADAPTER = re.compile(r"^creative_[0-9a-f]{12}$")  # Concept.adapter_name; training adapters differ
MAX_CONCEPT_ADAPTERS = 4  # loaded concept LoRAs kept on a shared prior; older ones are reloaded when needed


class ConceptMismatchError(ValueError):
    """A concept applied to a prior other than the one it was trained on."""


@dataclass
class Concept:
    """Token embedding + LoRA weights + provenance. ``token`` may be empty (LoRA only)."""

    token: str
    token_embedding: torch.Tensor | None  # [W] or None when only the LoRA was trained
    lora_state: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_rank: int = 10
    lora_alpha: float = 10.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # the file it was loaded from, for messages; never saved

    @property
    def adapter_name(self) -> str:
        """Stable per content, so re-applying the same concept reuses the loaded adapter.

        The key covers all that defines the adapter (rank, alpha, targets, each weight's name, shape
        and values): two concepts that differ in any of them must never share a loaded adapter, or
        one would run with the other's scale, or a damaged one pass where it fails on its own.
        """
        h = hashlib.sha256(self.token.encode())
        h.update(repr((int(self.lora_rank), float(self.lora_alpha), tuple(map(str, self.lora_targets)))).encode())
        for key in sorted(self.lora_state):
            h.update(f"{key}{tuple(self.lora_state[key].shape)}".encode())
            h.update(self.lora_state[key].detach().float().cpu().numpy().tobytes())
        if self.token_embedding is not None:
            h.update(self.token_embedding.detach().float().cpu().numpy().tobytes())
        return "creative_" + h.hexdigest()[:12]

    def check_base(self, prior_identity: str) -> None:
        base = self.meta.get("base_prior")
        if base and base != prior_identity:
            raise ConceptMismatchError(
                f"This concept was trained on prior '{base}' but is applied to '{prior_identity}'. "
                "Load the prior it was trained on (see the concept's metadata), or train a new concept.")

    def check_token_width(self, width: int) -> None:
        """Refuse a token embedding the prior's text encoder cannot take (``width``: its token embedding width).

        A concept without a base-prior tag passes :meth:`check_base`; a wrong width would otherwise
        surface only at sampling, as a tensor-size error naming no file.
        """
        e = self.token_embedding
        if e is not None and e.shape[-1] != width:
            raise ConceptMismatchError(
                f"{self.source or 'This concept'}: the token embedding of '{self.token}' is {e.shape[-1]} wide, "
                f"but this prior's text encoder takes {width}-wide token embeddings. The concept was made for "
                "another prior: load the prior it was trained on, or train the concept again on this one.")

    def save(self, path: str | os.PathLike, *, numbered: bool = False) -> Path:
        """Write the concept; ``numbered``: as the first free ``<stem>_NNNNN`` name (see save_tensors)."""
        tensors = {f"lora.{k}": v for k, v in self.lora_state.items()}
        if self.token_embedding is not None:
            tensors["token_embedding"] = self.token_embedding
        meta = dict(self.meta, format=FORMAT, token=self.token, lora_rank=self.lora_rank,
                    lora_alpha=self.lora_alpha, lora_targets=list(self.lora_targets))
        return save_tensors(path, tensors, meta, numbered=numbered)

    @classmethod
    def load(cls, path) -> "Concept":
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a Creative Generation concept (format {meta.get('format')!r}).")
        lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
        try:
            info = {k: meta.pop(k) for k in ("token", "lora_rank", "lora_alpha", "lora_targets")}
            meta.pop("format")
            concept = cls(str(info["token"]), tensors.get("token_embedding"), lora, int(info["lora_rank"]),
                          float(info["lora_alpha"]), tuple(str(t) for t in info["lora_targets"]), meta)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: the concept's metadata is damaged ({err}); save the concept again.") from None
        problem = concept.problem()
        if problem:
            raise ValueError(f"{path}: {problem} The file is damaged: delete it or save the concept again.")
        concept.source = str(path)
        return concept

    def problem(self) -> str | None:
        """What makes this concept unusable (None when it is fine)."""
        e = self.token_embedding
        if e is not None and (e.ndim != 1 or not e.is_floating_point() or not bool(torch.isfinite(e).all())):
            return "its token embedding is not a finite float vector."
        if e is None and not self.lora_state:
            return "it holds neither a token embedding nor a LoRA."
        if any(not v.is_floating_point() or not bool(torch.isfinite(v).all()) for v in self.lora_state.values()):
            return "its LoRA has non-float or non-finite (NaN/inf) weights."
        if self.lora_rank < 1 or not math.isfinite(self.lora_alpha) or not self.lora_targets:
            return f"its LoRA settings are invalid (rank {self.lora_rank}, alpha {self.lora_alpha})."
        return None


def lora_config(rank: int, alpha: float, targets: tuple[str, ...]) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)


def add_lora(transformer: torch.nn.Module, name: str, rank: int, alpha: float, targets: tuple[str, ...],
             seed: int) -> None:
    """Inject a fresh peft LoRA (A Kaiming-random from ``seed``, B zero) as adapter ``name``."""
    with torch.random.fork_rng(devices=[]), _undone_on_failure(transformer, name):
        torch.manual_seed(seed)
        transformer.add_adapter(lora_config(rank, alpha, targets), adapter_name=name)


@contextlib.contextmanager
def _undone_on_failure(transformer: torch.nn.Module, name: str) -> Iterator[None]:
    """Adding adapter ``name`` within the block; when the block raises, ``transformer`` is put back as it was.

    A half-added adapter is worse than a refused one: diffusers' ``add_adapter`` marks the model as
    carrying adapters (``_hf_peft_config_loaded``) before peft injects a layer, and peft attaches
    ``peft_config`` only once injection succeeded, so targets that match no layer used to leave the
    mark without the registry and every later ``add_adapter`` on the shared prior failed with
    ``AttributeError: ... no attribute 'peft_config'``. Injection can also stop halfway (a target
    that is not a supported layer), and loading weights switches the active adapter. So this puts
    back the mark, the registry, each adapter layer's active and enabled state, every
    ``requires_grad``, and unwraps the layers that were wrapped for this adapter alone.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    attrs = {k: transformer.__dict__[k] for k in ("_hf_peft_config_loaded", "peft_config") if k in transformer.__dict__}
    configs = dict(attrs.get("peft_config") or {})
    layers = {n: (list(m.active_adapters), m.disable_adapters)
              for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    grads = {n: p.requires_grad for n, p in transformer.named_parameters()}
    try:
        yield
    except BaseException:
        for path, module in list(transformer.named_modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            if path not in layers:  # wrapped for this adapter only: put the original layer back
                parent, _, child = path.rpartition(".")
                setattr(transformer.get_submodule(parent), child, module.get_base_layer())
                continue
            with warnings.catch_warnings():  # peft warns when the adapter it deletes was the active one
                warnings.simplefilter("ignore", UserWarning)
                module.delete_adapter(name)
            active, disabled = layers[path]
            module.set_adapter(active)
            module.enable_adapters(not disabled)
        for key in ("_hf_peft_config_loaded", "peft_config"):
            transformer.__dict__.pop(key, None)
        transformer.__dict__.update(attrs)
        if "peft_config" in attrs:  # the same dict, since peft and mixing hold on to it
            attrs["peft_config"].clear()
            attrs["peft_config"].update(configs)
        for n, p in transformer.named_parameters():
            p.requires_grad_(grads.get(n, False))
        raise


def lora_state(transformer: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def _loaded_adapters(transformer: torch.nn.Module) -> set[str]:
    return set(getattr(transformer, "peft_config", {}) or {})


def activate_concept(transformer: torch.nn.Module, concept: Concept | None) -> None:
    """Make ``concept``'s LoRA the only active adapter (loading it once), or disable all."""
    if concept is None or not concept.lora_state:
        if _loaded_adapters(transformer):
            transformer.disable_adapters()
        return
    name = concept.adapter_name
    if name not in _loaded_adapters(transformer):
        _load_adapter(transformer, concept)  # raises, leaving nothing behind, when it does not fit
    _touch(transformer, name)
    _evict_concepts(transformer, keep=MAX_CONCEPT_ADAPTERS)  # reached only once it loaded: a failure evicts nothing
    transformer.set_adapter(name)
    transformer.enable_adapters()


def _load_adapter(transformer: torch.nn.Module, concept: Concept) -> None:
    """Add ``concept``'s LoRA as an adapter; a LoRA that does not fit is removed again and refused."""
    from peft import set_peft_model_state_dict

    name = concept.adapter_name
    try:
        with _undone_on_failure(transformer, name):  # a failed load leaves the prior as it was
            transformer.add_adapter(lora_config(concept.lora_rank, concept.lora_alpha, concept.lora_targets),
                                    adapter_name=name)
            result = set_peft_model_state_dict(transformer, concept.lora_state, adapter_name=name)
            # every key of the state is a LoRA weight, so each unexpected one is the concept's; missing
            # keys of the prior's own weights are expected, those of this adapter mean a layer left untrained
            unexpected = list(result.unexpected_keys)
            if unexpected:
                raise ValueError(f"{len(unexpected)} weight(s) match no layer of this prior, e.g. {unexpected[0]}.")
            missing = [k for k in result.missing_keys if f".{name}." in k]
            if missing:
                raise ValueError(f"{len(missing)} LoRA weight(s) of its layers are missing, e.g. {missing[0]}.")
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConceptMismatchError(f"The concept '{concept.token or name}' does not fit this prior's layers "
                                   f"({str(err).splitlines()[0][:300]}). It was made for another model or "
                                   "is damaged: load the prior it was trained on, or train it again.") from None


def _touch(transformer: torch.nn.Module, name: str) -> None:
    """Mark ``name`` most recently used among the concept adapters on ``transformer``."""
    order = [n for n in getattr(transformer, "_creative_adapter_order", []) if n != name]
    transformer._creative_adapter_order = order + [name]


def _evict_concepts(transformer: torch.nn.Module, keep: int) -> None:
    """Delete the least recently used concept adapters so at most ``keep`` stay loaded.

    Concept views of a prior share its transformer; each concept's LoRA is an adapter on it (about
    1 MB at rank 64), so without a bound a server that samples many concepts grows without end. An
    evicted concept is simply loaded again from its weights the next time it is activated.
    """
    loaded = [n for n in _loaded_adapters(transformer) if CONCEPT_ADAPTER.match(n)]
    order = [n for n in getattr(transformer, "_creative_adapter_order", []) if n in loaded]
    order = [n for n in loaded if n not in order] + order  # unknown ones count as oldest
    for name in order[:max(0, len(order) - keep)]:
        with warnings.catch_warnings():  # peft warns when the deleted adapter was the last one set
            warnings.simplefilter("ignore", UserWarning)
            transformer.delete_adapters(name)
    transformer._creative_adapter_order = order[max(0, len(order) - keep):]


@contextlib.contextmanager
def placeholder_embeddings(text_encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, concept: Concept | None,
                           vector: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the concept token's id maps to its learned embedding row.

    ``vector`` overrides the concept's stored embedding (the optimiser passes its trainable
    parameter so gradients reach it). Also points CLIP's pooling at the real EOS id: legacy
    configs pool at ``argmax(input_ids)``, which would pick the new, highest id instead.
    """
    vector = vector if vector is not None else (concept.token_embedding if concept else None)
    if concept is None or vector is None:
        yield
        return
    token_id = tokenizer.convert_tokens_to_ids(concept.token)
    text_model = text_encoder.text_model
    table = text_encoder.get_input_embeddings()
    found: dict[str, torch.Tensor] = {}

    def pre_hook(module: torch.nn.Module, args: tuple) -> tuple:
        ids = args[0]
        found["mask"] = ids == token_id
        return (ids.masked_fill(found["mask"], 0),) + tuple(args[1:])

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        mask = found["mask"].unsqueeze(-1)
        return torch.where(mask, vector.to(out.dtype).expand_as(out), out)

    old_eos = text_model.eos_token_id
    handles = [table.register_forward_pre_hook(pre_hook), table.register_forward_hook(hook)]
    text_model.eos_token_id = tokenizer.eos_token_id
    try:
        yield
    finally:
        text_model.eos_token_id = old_eos
        for h in handles:
            h.remove()
