"""Every node that does heavy work checks its memory first (issue 16).

Walks the ``execute`` of every node class in ``nodes/*.py``: a node that samples, trains, renders
or selects (the engine's heavy entry points) must call one of ``memory``'s pre-flight entry points
before the first heavy call, so a run that cannot fit is refused with numbers before any work.
"""

from __future__ import annotations

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[1] / "nodes"

# Engine calls that allocate in proportion to the user's inputs (count, steps, size, candidates).
HEAVY = {"sample_bank", "sample_embeddings", "run_trials", "image_variations", "wundt_sweep", "select_rare",
         "sd_sample_bank"}
HEAVY_METHODS = {"run"}  # CreativeRun.run
HEAVY_CALLEES = {"renderer"}  # drawing: renderer(embeds)
PREFLIGHT = {"prepare_sampling", "prepare_run", "prepare_sweep", "prepare_selection", "prepare_rendering", "prepare_sd_bank",
             "check_renderer"}


def _name(call: ast.Call) -> tuple[str, str]:
    """(kind, name) of a call: ("attr", "run") for x.run(...), ("name", "f") for f(...)."""
    if isinstance(call.func, ast.Attribute):
        return "attr", call.func.attr
    if isinstance(call.func, ast.Name):
        return "name", call.func.id
    return "", ""


def _calls_in_order(fn: ast.FunctionDef) -> list[ast.Call]:
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def violations(source: str, where: str) -> list[str]:
    """Heavy calls in a node's ``execute`` that no pre-flight call precedes."""
    out = []
    for cls in [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)]:
        for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "execute"]:
            checked = False
            for call in _calls_in_order(fn):
                kind, name = _name(call)
                if kind == "attr" and name in PREFLIGHT:
                    checked = True
                heavy = name in HEAVY or (kind == "attr" and name in HEAVY_METHODS) or (
                    kind == "name" and name in HEAVY_CALLEES)
                if heavy and not checked:
                    out.append(f"{where}: {cls.name}.execute calls {name}() at line {call.lineno} with no memory "
                               "pre-flight before it")
    return out


def test_every_heavy_node_runs_the_preflight_first():
    found, heavy_nodes = [], 0
    for path in sorted(NODES.glob("*.py")):
        source = path.read_text()
        found += violations(source, path.name)
        heavy_nodes += sum(1 for name in HEAVY | PREFLIGHT if f"{name}(" in source)
    assert heavy_nodes >= 8, "the walk found too few heavy calls: has the layout changed?"
    assert not found, "\n".join(found)


def test_the_walk_catches_a_node_that_skips_it():
    skips = '''
class Bad:
    @classmethod
    def execute(cls, prior, prompt):
        bank = sample_bank(prior, prompt, 5000)
        memory.prepare_sampling(prior, prompt, "", count=5000, batch_size=500, steps=5, guidance=4.0)
        return bank
'''
    draws = '''
class AlsoBad:
    @classmethod
    def execute(cls, renderer, embeds):
        return renderer(embeds)
'''
    good = '''
class Good:
    @classmethod
    def execute(cls, run):
        loader = memory.prepare_run(run)
        return run.run(None, on_phase=loader)
'''
    assert len(violations(skips, "x")) == 1 and len(violations(draws, "x")) == 1
    assert violations(good, "x") == []
