"""What differs between the library releases the pack supports (the floors in requirements.txt).

ComfyUI asks for ``transformers>=4.50.3``, so the pack runs on transformers 4.5x and 5.x and on
diffusers from 0.30 on, instead of upgrading a user's libraries under every other custom node.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from packaging.version import Version

if TYPE_CHECKING:
    import torch

# ``from_pretrained`` takes ``dtype`` from these releases on and warns about ``torch_dtype``; older
# releases know only ``torch_dtype`` and silently load float32 when given ``dtype``.
DTYPE_KEYWORD_SINCE = {"transformers": Version("4.56.0"), "diffusers": Version("0.40.0")}


def installed_version(library: str) -> Version:
    """The imported library's own ``__version__`` (the one that runs, whatever pip's metadata says)."""
    return Version(importlib.import_module(library).__version__)


def dtype_kwargs(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword for the installed ``library`` ("transformers" or "diffusers")."""
    name = "dtype" if installed_version(library) >= DTYPE_KEYWORD_SINCE[library] else "torch_dtype"
    return {name: dtype}
