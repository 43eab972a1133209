"""Safetensors files with a JSON provenance header, and the JSON log, written atomically, never over another file.

Every artefact the pack writes (banks, norms, concepts) goes through here so that an interrupted
run never leaves a half-written file: each save works in its own hidden folder beside the target
(``.creative-partial-<random>/``), writes the file there and only then gives it its name.
:func:`save_tensors` replaces the target (``os.replace``, atomic on POSIX and Windows); with
``numbered=True`` it instead takes the first free ``<stem>_00001<suffix>`` name with an exclusive
hard link (``os.link`` fails if the name exists), so two saves at once, in one process or two,
never overwrite each other or an earlier file.

The folder holds everything a killed save can leave behind, the safetensors library's own
``.tmpXXXXXX`` file included (it writes beside the name it is given, then renames), so a clean-up
finds it all by one name pattern and never guesses at a user's hidden files. The writer holds an
exclusive lock on its folder; the kernel drops the lock when the process dies (``kill -9`` too),
so :func:`remove_leftovers` deletes exactly the folders no live save is using. Where there are no
file locks (Windows), a folder counts as abandoned once nothing in it changed for a minute.
Temporaries of older versions of the pack (``.<name>.<random>.tmp``, and the library's
``.tmpXXXXXX`` whose header carries our metadata key) are removed after a minute as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: abandoned work folders are told by their age instead
    fcntl = None

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

META_KEY = "creative_generation"
PARTIAL_PREFIX = ".creative-partial-"
PARTIAL = re.compile(rf"^{re.escape(PARTIAL_PREFIX)}[a-z0-9_]{{8}}$")  # mkdtemp(prefix=PARTIAL_PREFIX)
LEFTOVER = re.compile(r"^\..+\.(safetensors|json)\.[a-z0-9_]{8}\.tmp$")  # older versions: mkstemp(".<name>.", ".tmp")
LIBRARY_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own temporary file (Rust tempfile crate)
LEFTOVER_AGE_S = 60.0
LOCK_GRACE_S = 5.0  # a work folder is empty and unlocked for microseconds before its writer locks it
SAVED_MODE = 0o644  # what an output file gets under the usual umask: others may read it


class DamagedFileError(ValueError):
    """A file that is not a readable safetensors file written by this pack."""


def remove_leftovers(folder: str | os.PathLike, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Delete what killed saves of this pack left in ``folder`` (not below it); returns what went.

    Work folders go once no writer holds their lock (see the module docstring); older versions'
    temporary files once untouched for ``min_age_s``. Nothing else is touched: a user's own
    ``.tmpabc`` or hidden file does not match, a library temporary without our header stays.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        try:
            if PARTIAL.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                gone = _remove_work_folder(entry, min_age_s)
            elif gone := _abandoned_file(entry, min_age_s):
                entry.unlink()
            if gone:
                removed.append(entry)
        except OSError:  # vanished meanwhile, or not ours to delete
            continue
    return removed


def remove_leftovers_below(root: str | os.PathLike, min_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """:func:`remove_leftovers` in ``root`` and every visible sub-folder (saves go to sub-folders a
    prefix names; prefixes never name hidden ones, so hidden folders are not searched)."""
    removed: list[Path] = []
    for here, subfolders, _ in os.walk(root):
        removed += remove_leftovers(here, min_age_s)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    return removed


def _abandoned_file(entry: Path, min_age_s: float) -> bool:
    """Whether ``entry`` is a temporary file of ours (an older version's, or the library's with our
    header) untouched for ``min_age_s``."""
    if not (LEFTOVER.match(entry.name) or LIBRARY_TEMP.match(entry.name)) or not entry.is_file():
        return False
    old = time.time() - entry.stat().st_mtime >= min_age_s
    return old and (LEFTOVER.match(entry.name) is not None or _has_our_header(entry))


def _remove_work_folder(work: Path, min_age_s: float) -> bool:
    """Delete a work folder no live save is using; whether it went.

    A writer locks its folder before writing anything into it, so a folder is abandoned once its lock
    can be taken, unless it is still empty and new (made, not yet locked). The lock is held while the
    folder is deleted: a writer waiting for it then finds its folder gone and makes another
    (:func:`_work_folder`), whatever the delay between its making the folder and locking it.
    Without file locks, a folder is abandoned once nothing in it changed within ``min_age_s``."""
    if fcntl is None:
        newest = max([work.stat().st_mtime, *(p.stat().st_mtime for p in work.iterdir())])
        if time.time() - newest < min_age_s:
            return False
        shutil.rmtree(work)
        return True
    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not any(work.iterdir()) and time.time() - work.stat().st_mtime < LOCK_GRACE_S:
            return False
        shutil.rmtree(work)
        return True
    finally:
        os.close(fd)  # drops the lock, after the folder is gone


def _has_our_header(path: Path) -> bool:
    """Whether a safetensors (partial) file's JSON header carries our metadata key."""
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            return False
        size = struct.unpack("<Q", start)[0]
        return size < 100_000_000 and f'"{META_KEY}"'.encode() in f.read(min(size, 1 << 20))


@contextlib.contextmanager
def _work_folder(parent: Path) -> Iterator[Path]:
    """A fresh hidden folder in ``parent`` for one save, locked while the save runs, removed after."""
    work, fd = _locked_folder(parent)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _locked_folder(parent: Path, attempts: int = 5) -> tuple[Path, int | None]:
    """Make a work folder and lock it; if a clean-up deleted it before the lock was taken (possible
    only when this thread stalled past ``LOCK_GRACE_S``), make another."""
    for _ in range(attempts):
        work = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=parent))
        if fcntl is None:
            return work, None
        try:
            fd = os.open(work, os.O_RDONLY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(work).st_ino == os.fstat(fd).st_ino:
                return work, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(f"Could not keep a work folder in {parent}: another process deleted {attempts} in a row. "
                  f"Is something else cleaning hidden folders there?")


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, numbered: bool = False) -> Path:
    """Call ``write(temporary path)`` in a work folder beside ``path``, then publish the finished file;
    returns its path.

    ``numbered=False``: atomically replace ``path``. ``numbered=True``: ``path`` names the stem and
    suffix (``folder/concept.safetensors``); the file becomes the first free
    ``folder/concept_NNNNN.safetensors`` and nothing existing is ever replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent)
    with _work_folder(path.parent) as work:
        tmp = str(work / path.name)
        write(tmp)
        os.chmod(tmp, SAVED_MODE)  # a saved concept is meant to be shared
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if not numbered:
            os.replace(tmp, path)
            return path
        return _link_numbered(tmp, path)


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
