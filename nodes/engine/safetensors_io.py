"""Safetensors files with a JSON provenance header, and the JSON log, written atomically, never over another file.

Every artefact the pack writes (banks, norms, concepts) goes through here so that an interrupted
run never leaves a half-written file: we write a hidden temporary file beside the target
(``.<name>.<random>.tmp``) and only then give it its name. :func:`save_tensors` replaces the target
(``os.replace``, atomic on POSIX and Windows); with ``numbered=True`` it instead takes the first
free ``<stem>_00001<suffix>`` name with an exclusive hard link (``os.link`` fails if the name
exists), so two saves at once, in one process or two, never overwrite each other or an earlier
file. Temporary files a killed process left behind are removed the next time the folder is
written or listed (:func:`remove_leftovers`), only ours (by their name pattern) and only when
older than a minute, so a save in progress elsewhere is never touched.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

META_KEY = "creative_generation"
LEFTOVER = re.compile(r"^\..+\.(safetensors|json)\.[a-z0-9_]{8}\.tmp$")  # mkstemp(prefix=".<name>.", suffix=".tmp")
LEFTOVER_AGE_S = 60.0
SAVED_MODE = 0o644  # what an output file gets under the usual umask: others may read it


class DamagedFileError(ValueError):
    """A file that is not a readable safetensors file written by this pack."""


def remove_leftovers(folder: str | os.PathLike, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Delete our own temporary files older than ``min_age_s`` in ``folder``; returns what went."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        try:
            if LEFTOVER.match(entry.name) and entry.is_file() and now - entry.stat().st_mtime >= min_age_s:
                entry.unlink()
                removed.append(entry)
        except OSError:  # vanished meanwhile, or not ours to delete
            continue
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, numbered: bool = False) -> Path:
    """Call ``write(temporary path)`` beside ``path``, then publish the finished file; returns its path.

    ``numbered=False``: atomically replace ``path``. ``numbered=True``: ``path`` names the stem and
    suffix (``folder/concept.safetensors``); the file becomes the first free
    ``folder/concept_NNNNN.safetensors`` and nothing existing is ever replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, SAVED_MODE)  # mkstemp made it owner-only; a saved concept is meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if not numbered:
            os.replace(tmp, path)
            return path
        return _link_numbered(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _next_counter(path: Path) -> int:
    pattern = re.compile(rf"^{re.escape(path.stem)}_(\d{{5,}})_?{re.escape(path.suffix)}$")
    found = [int(m[1]) for e in path.parent.iterdir() if (m := pattern.match(e.name))]
    return max(found, default=0) + 1


def _link_numbered(tmp: str, path: Path) -> Path:
    counter = _next_counter(path)
    while True:
        target = path.with_name(f"{path.stem}_{counter:05}{path.suffix}")
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            counter += 1
        except OSError:  # no hard links on this file system: reserve the name exclusively, then fill it
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                counter += 1
                continue
            os.replace(tmp, target)
            return target


def save_json(path: str | os.PathLike, data: Any, *, numbered: bool = False) -> Path:
    """Write ``data`` as indented JSON (the optimisation log); atomic. See :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)), numbered=numbered)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                 numbered: bool = False) -> Path:
    """Write ``tensors`` with ``meta`` (JSON) in the safetensors header; atomic. See :func:`write_atomic`."""
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    return write_atomic(path, lambda tmp: save_file(payload, tmp, metadata=header), numbered=numbered)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and the JSON header written by :func:`save_tensors`.

    A file that is not one (truncated, empty, random bytes, a renamed pickle, a header that is not
    JSON) raises :class:`DamagedFileError` naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DamagedFileError(f"{path.name} is damaged or not a safetensors file ({err}). Delete or replace it "
                               f"(in {path.parent}); save it again from the graph that made it.") from None
    if META_KEY not in header:
        raise DamagedFileError(f"{path.name} was not written by Creative Generation (no '{META_KEY}' metadata). "
                               f"Move it out of {path.parent}, or save it again with this pack's Save nodes.")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise DamagedFileError(f"{path.name} has a damaged '{META_KEY}' header (not a JSON object). Delete or "
                               f"replace it (in {path.parent}).")
    return tensors, meta
