"""Test-wide setup: import the pack under a stable package name, offline Hugging Face.

The repository folder can have any name (a clone, a ComfyUI custom_nodes entry), and its
subpackage is called ``nodes`` like ComfyUI's own top-level module, so tests never import it
through the repo root on ``sys.path``; they import ``creative_generation.nodes...`` instead.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]

# The same loader the test-bed commands use (nodes/testbed/run.py), imported by path.
_spec = importlib.util.spec_from_file_location("creative_run", REPO / "nodes" / "testbed" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)
run.import_pack()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards gain nothing from intra-op threads; on a busy 2-core machine the extra
    thread's spin-waits made tiny renders and MLLM forwards several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "transformers5: needs transformers 5 (the bundled mini world's judge folder "
                                       "is saved in its layout); skipped on ComfyUI's transformers 4.5x")


def pytest_collection_modifyitems(config, items):
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.0.0"):
        return
    skip = pytest.mark.skip(reason=f"needs transformers 5 (installed: {transformers.__version__})")
    for item in items:
        if "transformers5" in item.keywords:
            item.add_marker(skip)
