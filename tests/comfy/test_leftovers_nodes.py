"""Issue 18.3 with ComfyUI imported in this process: what killed saves left in the pack's output and
model folders (sub-folders too) goes when ComfyUI loads the pack and when a loader lists its files;
a user's own files stay."""

from __future__ import annotations

import os
import time
from pathlib import Path

import comfy_harness
import pytest

HOUR_AGO = time.time() - 3600


def _plant(folder: Path) -> tuple[list[Path], list[Path]]:
    """In ``folder/sub``: a killed save's work folder and an older version's temporary (ours), and a
    user's ``.tmpabc``, hidden file and a work-folder-like name mkdtemp never gives (not ours)."""
    sub = folder / "sub"
    work = sub / ".creative-partial-k2j4h5g6"
    work.mkdir(parents=True)
    (work / ".tmpAbC123").write_bytes(b"\0" * 64)
    ours = [work, sub / ".concept_00001.safetensors.k2j4h5g6.tmp"]
    ours[1].write_bytes(b"")
    theirs = [sub / ".tmpabc", sub / ".mine", sub / ".creative-partial-notes"]
    for p in theirs:
        p.write_bytes(b"user data")
    for p in (*ours, *theirs, *work.iterdir()):
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    return ours, theirs


@pytest.fixture
def model_folder(comfy_inprocess, tmp_path):
    """A second creative_concepts model folder (the real models/ folder is shared: never planted in)."""
    fp = comfy_inprocess.folder_paths
    fp.add_model_folder_path("creative_concepts", str(tmp_path))
    yield tmp_path
    fp.folder_names_and_paths["creative_concepts"][0].remove(str(tmp_path))


def test_start_up_cleans_output_and_model_folders(pack_nodes, comfy_inprocess, model_folder):
    output = Path(comfy_inprocess.folder_paths.get_output_directory()) / "creative" / "logs"
    planted = [_plant(output), _plant(model_folder)]
    comfy_harness.run_async(comfy_harness.pack_extension().on_load())  # what ComfyUI does when it imports the pack
    for ours, theirs in planted:
        assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


def test_listing_cleans_sub_folders(pack_nodes, model_folder):
    ours, theirs = _plant(model_folder)
    pack_nodes["CreativeLoadConcept"].GET_SCHEMA()  # lists the folder
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
