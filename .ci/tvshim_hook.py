"""Test-infrastructure import hook: lets ``import torchvision`` work on a CPU-only torch.

torchvision 0.28.0 (the only build for torch 2.13) is CUDA-linked; importing it dies in
``register_fake("torchvision::nms")`` because its C++ ops library cannot load. ComfyUI core
imports torchvision unconditionally (``comfy/sd.py`` -> ``ldm/cascade/stage_c_coder.py``).
Before the first ``import torchvision`` this hook defines the ``torchvision::nms``/``qnms``
op schemas so the Python side imports; models and transforms work, only the C++ ops are
missing. Installed by ``.ci/setup-env`` as ``_tvshim_hook.py`` + ``zz_tvshim.pth`` in the test
venv's site-packages. CI infrastructure only: never part of the node pack.
"""

import importlib.abc
import sys


class _TorchvisionOpsHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        try:
            import torch

            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            sys.modules["_tvshim_lib"] = lib  # keep the Library alive
        except Exception:  # noqa: BLE001 - never break interpreter start-up
            pass
        return None  # let the normal finders import the real torchvision


if not any(type(f).__name__ == "_TorchvisionOpsHook" for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsHook())
