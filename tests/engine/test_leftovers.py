"""Issue 18.3: what a killed save leaves behind is found and removed, and nothing else is.

A save works in its own locked hidden folder; the safetensors library's ``.tmpXXXXXX`` lands there
too. A clean-up removes folders no live save holds, and older versions' temporaries (their own
name pattern, or the library's name with our header), never a user's file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from creative_generation.nodes.engine import safetensors_io
from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.engine.safetensors_io import remove_leftovers, save_tensors, write_atomic

REPO = Path(__file__).resolve().parents[2]
HOUR_AGO = time.time() - 3600
WORK_FOLDER = re.compile(r"^\.creative-partial-[a-z0-9_]{8}$")

# Saves one large bank into argv[1] through the pack's own import path, so the parent can kill it mid-write.
_SAVER = f"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("creative_run", {str(REPO / "nodes" / "testbed" / "run.py")!r})
run = importlib.util.module_from_spec(spec); spec.loader.exec_module(run); run.import_pack()
from creative_generation.nodes.engine.bank import EmbeddingBank
bank = EmbeddingBank(torch.ones(1 << 16, 1 << 10))  # 256 MiB: the library writes for a while
print("saving", flush=True)
bank.save(sys.argv[1] + "/bank.safetensors", numbered=True)
"""


def _backdate(*paths: Path) -> None:
    for p in paths:
        os.utime(p, (HOUR_AGO, HOUR_AGO))


def _kill_mid_save(folder: Path) -> list[Path]:
    """SIGKILL a process while the safetensors library writes inside the save's work folder (into a ``.tmpXXXXXX``
    of its own since safetensors 0.5; older releases write the named file directly); what it left in ``folder``."""
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 60
        while not [p for p in folder.rglob("*") if p.is_file() and WORK_FOLDER.match(p.parent.name)] \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    return sorted(folder.iterdir())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_save_killed_mid_write_leaves_only_what_the_clean_up_removes(tmp_path):
    left = _kill_mid_save(tmp_path)
    assert [p.name for p in left if not WORK_FOLDER.match(p.name)] == []  # no library .tmpXXXXXX beside the saves
    work, = left
    assert list(work.iterdir())  # killed inside the library's write
    foreign = [tmp_path / ".tmpabc", tmp_path / ".hidden", tmp_path / "notes.txt"]
    for p in foreign:
        p.write_bytes(b"mine")
    _backdate(*foreign)
    assert remove_leftovers(tmp_path) == [work]  # its writer is dead: no age needed
    assert sorted(tmp_path.iterdir()) == sorted(foreign)


def test_a_live_save_is_never_touched_however_old(tmp_path):
    writing, finish, made = threading.Event(), threading.Event(), []

    def slow_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        writing.set()
        finish.wait(30)

    saver = threading.Thread(target=lambda: made.append(write_atomic(tmp_path / "log.json", slow_write, numbered=True)))
    saver.start()
    assert writing.wait(30)
    work, = tmp_path.iterdir()
    _backdate(work, *work.iterdir())
    assert remove_leftovers(tmp_path, min_age_s=0) == []
    assert safetensors_io.remove_leftovers_below(tmp_path, min_age_s=0) == []
    finish.set()
    saver.join()
    assert made == [tmp_path / "log_00001.json"] and [p.name for p in tmp_path.iterdir()] == ["log_00001.json"]


@pytest.mark.skipif(os.name != "posix", reason="file locks (POSIX)")
def test_an_empty_unlocked_work_folder_is_kept_for_a_moment(tmp_path):
    """Between making its folder and locking it a save holds no lock: a young empty folder stays."""
    work = tmp_path / ".creative-partial-abcd1234"
    work.mkdir()
    assert remove_leftovers(tmp_path) == [] and work.exists()
    _backdate(work)
    assert remove_leftovers(tmp_path) == [work]


@pytest.mark.skipif(os.name != "posix", reason="file locks (POSIX)")
def test_a_save_whose_folder_is_cleaned_before_it_locks_it_makes_another(tmp_path, monkeypatch):
    """A writer stalled past the grace between making its folder and locking it (a loaded machine, swap) loses
    the folder to another save's clean-up; it must notice and save anyway, and overwrite nothing."""
    monkeypatch.setattr(safetensors_io, "LOCK_GRACE_S", 0.0)
    made_folders, real_mkdtemp = [], safetensors_io.tempfile.mkdtemp

    def mkdtemp_then_cleaned(**kwargs):
        made_folders.append(real_mkdtemp(**kwargs))
        if len(made_folders) == 1:  # another save's clean-up runs in the stall
            assert remove_leftovers(tmp_path) == [Path(made_folders[0])]
        return made_folders[-1]

    monkeypatch.setattr(safetensors_io.tempfile, "mkdtemp", mkdtemp_then_cleaned)
    saved = save_tensors(tmp_path / "bank.safetensors", {"embeds": torch.ones(3, 2)}, {"format": "creative-bank/1"},
                         numbered=True)
    assert len(made_folders) == 2 and saved == tmp_path / "bank_00001.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]
    assert torch.equal(safetensors_io.load_tensors(saved)[0]["embeds"], torch.ones(3, 2))


def test_without_file_locks_a_work_folder_goes_by_its_age(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "fcntl", None)
    old, young = tmp_path / ".creative-partial-abcd1234", tmp_path / ".creative-partial-wxyz_987"
    for work in (old, young):
        work.mkdir()
        (work / "bank.safetensors").write_bytes(b"half")
    _backdate(old, *old.iterdir())
    assert remove_leftovers(tmp_path) == [old] and young.exists()


def test_older_versions_leftovers_go_and_a_users_files_stay(tmp_path):
    """Older versions wrote ``.<name>.<random>.tmp`` beside the target, and the library its ``.tmpXXXXXX``
    beside that; only the one whose header carries our metadata key is ours."""
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    ours_lib = sub / ".tmpAb3dE9"
    save_tensors(tmp_path / "x.safetensors", {"embeds": torch.zeros(4, 2)}, {"format": "creative-bank/1"}).rename(ours_lib)
    ours_old = sub / ".bank_00001.safetensors.ab12cd34.tmp"
    ours_old.write_bytes(b"")
    foreign_lib = sub / ".tmpQw9rT2"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(foreign_lib), metadata={"other": "pack"})
    empty = [sub / ".tmpabc", sub / ".tmpZZZZZZ", tmp_path / ".tmp123456"]  # a user's, or nobody knows whose
    for p in empty:
        p.write_bytes(b"")
    (sub / ".creative-partial-x").mkdir()  # not a name mkdtemp gives
    foreign = [foreign_lib, *empty, sub / ".creative-partial-x"]
    (tmp_path / ".hidden").mkdir()
    hidden_old = tmp_path / ".hidden" / ".bank.safetensors.ab12cd34.tmp"  # not a folder saves go to
    hidden_old.write_bytes(b"")
    young = sub / ".bank_00002.safetensors.zz99yy88.tmp"
    young.write_bytes(b"")
    _backdate(ours_lib, ours_old, *foreign, hidden_old)
    assert sorted(safetensors_io.remove_leftovers_below(tmp_path)) == sorted([ours_lib, ours_old])
    assert all(p.exists() for p in [*foreign, hidden_old, young])


def test_a_finished_save_leaves_no_work_folder(tmp_path):
    path = EmbeddingBank(torch.randn(3, 2)).save(tmp_path / "b.safetensors", numbered=True)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(RuntimeError):
        write_atomic(tmp_path / "c.json", lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
