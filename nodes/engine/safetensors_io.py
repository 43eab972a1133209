"""Safetensors files with a JSON provenance header, and the JSON log, written atomically.

Every artefact the pack writes (banks, norms, concepts) goes through here so that an interrupted
run never leaves a half-written file: we write to a temporary file beside the target and
``os.replace`` it into place, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_KEY = "creative_generation"


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary path)`` beside ``path``, then move the finished file into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (the optimisation log); atomic."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` with ``meta`` (JSON) in the safetensors header; atomic."""
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(payload, tmp, metadata=header))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and the JSON header written by :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if META_KEY not in header:
        raise ValueError(f"{path.name} was not written by Creative Generation (no '{META_KEY}' metadata).")
    return tensors, json.loads(header[META_KEY])
