"""Diffusers / transformers folder layouts: which files each subfolder of a model folder must hold.

The prior and decoder loaders check a folder against its layout before loading, so a missing
file is named up front instead of surfacing as a library error deep inside ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

# subfolder -> files that must exist (any one of each tuple) for the part to load.
Layout = dict[str, tuple[tuple[str, ...], ...]]

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# A tokenizer transformers can build without the sentencepiece / tiktoken converters: a serialised fast
# tokenizer, or a BPE / WordPiece vocabulary it converts itself. (``sentencepiece.bpe.model`` is not one.)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
SENTENCEPIECE_FILES = ("tokenizer.model",)  # usable only with the sentencepiece package installed


def first_missing(root: Path, layout: Layout) -> str | None:
    """The first required file ``root`` lacks, as ``sub/file (or alternatives)``; ``None`` if complete.
    The sub-folder ``""`` is ``root`` itself (a transformers folder keeps its files at the top)."""
    for sub, needs in layout.items():
        for options in needs:
            if not any((root / sub / name).is_file() for name in options):
                alternatives = f" (or {', '.join(options[1:])})" if len(options) > 1 else ""
                return f"{sub + '/' if sub else ''}{options[0]}{alternatives}"
    return None
