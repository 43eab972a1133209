"""Benchmark (not a test): the README's main job on an idle machine and beside one busy core.

    .venv/bin/python tests/benchmarks/bench_busy_core.py [--rounds 1] [--out /tmp/bench_busy_core]

Runs ``nodes/testbed/run.py main_job`` (the mini world through a real headless ComfyUI) as a
fresh process, once with nothing else of ours running and once while a second process spins on
one core, alternately for ``--rounds`` rounds, and prints one table: wall seconds of the whole
job, of the ComfyUI workflow, of the optimisation steps (sum of the run log's per-step seconds),
the ratio to the idle run, and the 1-minute load average when the run started (other users of
the machine show up there: an "idle" run is only as idle as that number). A third run beside the
busy core sets ``OMP_NUM_THREADS=1`` for the whole job: the reference the issue measured (22 s),
i.e. what the pack's own one-thread scoping should match. The goal of issue 10: beside one busy
core, at most 1.5x the idle time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def spinner() -> subprocess.Popen:
    """A process that keeps one core busy until it is killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main_job(out: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "nodes" / "testbed" / "run.py"), "main_job", "--out", str(out)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    wall = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    logs = sorted((out / "comfyui").rglob("logs/**/*.json"))
    steps = json.loads(logs[-1].read_text())["entries"] if logs else []
    return {"load": load, "total": wall, "workflow": report["seconds"]["comfyui_workflow"],
            "optimisation": sum(e["seconds"] for e in steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_busy_core"))
    args = p.parse_args()
    rows: list[tuple[str, dict[str, float]]] = []
    for _ in range(args.rounds):
        rows.append(("idle", main_job(args.out / "idle")))
        busy = spinner()
        try:
            time.sleep(1.0)
            rows.append(("one core busy", main_job(args.out / "busy")))
            rows.append(("busy, OMP=1", main_job(args.out / "busy_omp1", {"OMP_NUM_THREADS": "1"})))
        finally:
            busy.kill()
            busy.wait()
    idle = min(r["total"] for name, r in rows if name == "idle")
    print(f"CPU cores: {os.cpu_count()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'condition':<14} {'load@start':>10} {'total s':>8} {'workflow s':>10} {'optimisation s':>14} {'x idle':>7}")
    for name, r in rows:
        print(f"{name:<14} {r['load']:>10.2f} {r['total']:>8.1f} {r['workflow']:>10.1f} {r['optimisation']:>14.1f} "
              f"{r['total'] / idle:>7.2f}")


if __name__ == "__main__":
    main()
