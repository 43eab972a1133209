"""Run a test-bed command under the pack's own package name, so ``nodes`` never becomes top-level.

    python nodes/testbed/run.py main_job --out output/miniworld     # the README's main job
    python nodes/testbed/run.py evaluate --studies wundt            # the mini-world evaluation
    python nodes/testbed/run.py evaluate_sd                         # the same on the mini world in SD form
    python nodes/testbed/run.py train --out models/miniworld         # rebuild the mini world
    python nodes/testbed/run.py sweep --local 2                      # a sweep spread over 2 ComfyUI servers

The pack's subpackage is called ``nodes`` like ComfyUI's own top-level module; ``python -m
nodes...`` from the repository root would import it under that clashing name. This script instead
imports the repository as the package ``creative_generation`` (the name ComfyUI's loader and the
tests use too) and runs the command's module inside it.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "creative_generation"
COMMANDS = {
    "main_job": "nodes.testbed.main_job",
    "evaluate": "nodes.testbed.miniworld.evaluate",
    "evaluate_sd": "nodes.testbed.miniworld.evaluate_sd",
    "train": "nodes.testbed.miniworld.train",
    "sweep": "nodes.testbed.sweep_job",
}


def import_pack(name: str = PACKAGE) -> ModuleType:
    """Import the repository as package ``name`` (idempotent) and return it."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python {Path(__file__).as_posix()} {{{','.join(COMMANDS)}}} [options]")
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)  # this folder is not a root of top-level modules
    import_pack()
    sys.argv = [f"{Path(__file__).name} {argv[0]}", *argv[1:]]
    runpy.run_module(f"{PACKAGE}.{COMMANDS[argv[0]]}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
