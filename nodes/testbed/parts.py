"""One (subject, seed) per process: how the evaluation commands spread themselves over the cores.

``python nodes/testbed/run.py evaluate`` and ``evaluate_sd`` run many independent (subject, seed) studies of
many tiny torch ops; one thread each in processes of their own uses a multi-core machine fully (a second
thread inside one process only spin-waits). Each part is the same command with ``--jobs 1``, one subject,
one seed and its own ``--out``; its output goes to a ``.log`` beside that file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"  # the test bed's entry point
OWN = ("--subjects", "--seeds", "--out", "--jobs")  # options every part gets its own value of


def shared_options(argv: Iterable[str]) -> list[str]:
    """The command's options less the ones each part sets itself (both ``--opt value`` and ``--opt=value``)."""
    out, it = [], iter(argv)
    for arg in it:
        if arg in OWN:
            next(it, None)
        elif not arg.startswith(tuple(f"{o}=" for o in OWN)):
            out.append(arg)
    return out


def run_parts(command: str, argv: Iterable[str], pairs: Iterable[tuple[str, str]], folder: Path,
              jobs: int) -> list[Path]:
    """Run ``run.py command`` once per (subject, seed), ``jobs`` at a time, one thread each; returns the parts'
    ``--out`` files in ``folder``. A failed part stops the command, naming the part and its log."""
    folder.mkdir(parents=True, exist_ok=True)
    base = shared_options(argv)
    pending = [(folder / f"{subject}_{seed}.json", [sys.executable, str(RUN), command, *base, "--subjects", subject,
                                                  "--seeds", seed, "--out", str(folder / f"{subject}_{seed}.json"),
                                                  "--jobs", "1"]) for subject, seed in pairs]
    files = [out for out, _ in pending]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running, failed = [], []
    while pending or running:
        while pending and len(running) < jobs:
            out, cmd = pending.pop(0)
            log = open(out.with_suffix(".log"), "w")
            running.append((cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode != 0:
                failed.append(" ".join(item[0]))
    if failed:
        raise SystemExit("failed (see the .log beside each part):\n" + "\n".join(failed))
    return files
