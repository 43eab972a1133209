"""Packaging rules: Comfy Registry metadata, dependency hygiene, cheap import."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_dependencies_mirror_requirements_and_never_pin_torch():
    project = _project()["project"]
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip()]
    assert project["dependencies"] == requirements
    names = {r.split(">")[0].split("=")[0].split("<")[0].lower() for r in requirements}
    assert not names & {"torch", "torchvision", "torchaudio", "xformers"}
    assert all("==" not in r for r in requirements), "exact pins fight other packs"


def test_stated_floors_are_the_tested_floors():
    """Every requirement's ``>=`` floor is the version CI installs in .venv-floor (.ci/constraints-floor.txt),
    and transformers' floor is ComfyUI 0.3.75's own (4.50.3): the pack never upgrades what ComfyUI accepts."""
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip()]
    floors = dict(r.split(">=") for r in requirements)
    pins = [line.strip() for line in (REPO / ".ci" / "constraints-floor.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert floors == dict(p.split("==") for p in pins)
    assert floors["transformers"] == "4.50.3"

def test_registry_metadata():
    data = _project()
    name = data["project"]["name"]
    assert "comfyui" not in name.lower() and name.replace("-", "").isalnum()
    assert data["tool"]["comfy"]["PublisherId"] and data["tool"]["comfy"]["DisplayName"]
    assert data["project"]["urls"]["Repository"]
    from creative_generation.nodes.engine import __version__

    assert data["project"]["version"] == __version__


def test_pack_import_is_cheap():
    """ComfyUI imports every pack at start-up: ours must not pull torch or models in at import time."""
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('cg', r'{REPO / '__init__.py'}', "
            f"submodule_search_locations=[r'{REPO}']); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m); assert hasattr(m, 'comfy_entrypoint'); "
            "print(sorted(k for k in ('torch', 'diffusers', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_shadows_comfyui():
    """Top-level names ComfyUI owns must never appear as our modules (they would shadow core's)."""
    forbidden = {"utils", "server", "execution", "app", "folder_paths", "latent_preview", "protocol", "comfy"}
    ours = {p.stem for p in (REPO / "nodes").rglob("*.py")} | {p.name for p in (REPO / "nodes").rglob("*") if p.is_dir()}
    assert not ours & forbidden


def _imports(path: Path) -> set[str]:
    """Modules a file imports (relative ones resolved against its package), as dotted names under the repo."""
    import ast

    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            found.add(".".join((*base, *(node.module.split(".") if node.module else ()))))
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_layers_engine_nodes_testbed():
    """The engine imports neither ComfyUI nor the nodes nor the test bed; no node module imports the test bed."""
    for path in (REPO / "nodes").rglob("*.py"):
        layer = path.relative_to(REPO / "nodes").parts[0]
        imported = _imports(path)
        if layer == "engine":
            assert not {m for m in imported if m.split(".")[0] in {"comfy", "comfy_api", "folder_paths", "server"}}, path
            assert all(m.startswith("nodes.engine") for m in imported if m.startswith("nodes.")), path
        elif layer != "testbed":
            assert not any(m.startswith("nodes.testbed") for m in imported), path
