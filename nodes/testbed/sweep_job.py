"""A creativity sweep spread over several ComfyUI servers: one prompt per subject, seed and configuration.

    python nodes/testbed/run.py sweep --subjects car,fish --seeds 0,1 --configs none,gate --local 2
    python nodes/testbed/run.py sweep --servers http://gpu0:8188,http://gpu1:8188 ...

Each prompt is ``example_workflows/creative_miniworld_sweep.json`` (Creativity Sweep on the
bundled mini world) with its subject, seed and configuration set; the prompts are handed to
whichever server is free through ComfyUI's own queue (:func:`headless.run_spread`), and every
prompt's table is collected into one report (``report.md`` and ``report.json``), with the mean
over subjects and seeds. The servers are independent, so the numbers equal a single server's.
``--local N`` starts N servers here, each capped at ``--threads`` CPU threads; ``--servers``
uses running ones (they need this pack and the mini-world models in their model folders).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

from ..engine.bank import PAPER_TEMPLATE
from ..engine.evaluation import format_table, mean_by
from .headless import REPO, ComfyClient, HeadlessComfy, run_spread

WORKFLOW = REPO / "example_workflows" / "creative_miniworld_sweep.json"


def _node(prompt: dict, class_type: str) -> tuple[str, dict]:
    return next((nid, n) for nid, n in prompt.items() if n["class_type"] == class_type)


def sweep_prompts(base: dict, subjects: list[str], seeds: list[int], configs: list[str], steps: str, bank: int,
                  samples: int) -> tuple[list[dict], list[dict]]:
    """One API prompt per (subject, seed, configuration), and what each one is."""
    prompts, jobs = [], []
    for subject in subjects:
        for seed in seeds:
            for config in configs:
                prompt = copy.deepcopy(base)
                _, sampler = _node(prompt, "CreativePriorSampler")
                sampler["inputs"].update(prompt=PAPER_TEMPLATE.format(subject=subject), count=bank)
                _, sweep = _node(prompt, "CreativeWundtSweep")
                sweep["inputs"].update(subject=subject, seeds=str(seed), configs=config, steps=steps, samples=samples,
                                       anchor_text=PAPER_TEMPLATE.format(subject=subject))
                for node in prompt.values():
                    if node["class_type"] == "SaveImage":
                        node["inputs"]["filename_prefix"] = f"miniworld/sweep_{subject}_{seed}_{config}"
                prompts.append(prompt)
                jobs.append({"subject": subject, "seed": seed, "config": config})
    return prompts, jobs


def table_rows(text: str) -> list[dict]:
    """Rows of the sweep node's plain-text table (``format_table``): numbers as floats, "-" as None."""
    header, *lines = text.strip().splitlines()
    columns = header.split()
    rows = []
    for line in lines:
        cells = [line.strip().rsplit(maxsplit=len(columns) - 1)[0], *line.split()[-(len(columns) - 1):]]
        rows.append({c: (None if v == "-" else v if c == "config" else float(v)) for c, v in zip(columns, cells)})
    return rows


def collect(prompts: list[dict], jobs: list[dict], histories: list[dict]) -> list[dict]:
    """Every prompt's table rows, labelled with its subject and seed and the server that ran it."""
    sweep_id, _ = _node(prompts[0], "CreativeWundtSweep")
    rows = []
    for job, history in zip(jobs, histories):
        text = "".join(history["outputs"][sweep_id]["text"])
        rows += [{**r, "subject": job["subject"], "seed": job["seed"], "server": history["server"],
                  "prompt_seconds": round(history["seconds"], 1)} for r in table_rows(text)]
    return rows


def report(rows: list[dict], seconds: float, servers: list[str]) -> str:
    metrics = tuple(c for c in rows[0] if c not in ("config", "step", "n", "subject", "seed", "server",
                                                    "prompt_seconds"))
    per_prompt = format_table(rows, ["subject", "seed", "config", "step", *metrics, "server", "prompt_seconds"])
    summary = format_table(mean_by(rows, ("config", "step"), metrics), ["config", "step", *metrics, "n"])
    return (f"# Creativity sweep on {len(servers)} ComfyUI server(s)\n\n{len(rows)} rows, {seconds:.0f} s; "
            f"servers: {', '.join(servers)}\n\n## Mean over subjects and seeds\n\n```\n{summary}\n```\n\n"
            f"## Every prompt\n\n```\n{per_prompt}\n```\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", default="car,fish")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--configs", default="none,gate", help="any of none, anchor, gate, both")
    p.add_argument("--steps", default="0,25,50,100")
    p.add_argument("--bank", type=int, default=1000)
    p.add_argument("--samples", type=int, default=32)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--servers", default="", help="URLs of running ComfyUI servers, comma-separated")
    where.add_argument("--local", type=int, default=1, help="start this many local servers (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per local server (default: cores / N)")
    p.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: .comfyui or $COMFYUI_DIR)")
    p.add_argument("--out", type=Path, default=Path("output/sweep"))
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with ExitStack() as stack:
        if args.servers:
            servers: list[ComfyClient] = [ComfyClient(u.strip()) for u in args.servers.split(",") if u.strip()]
        else:
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.local)
            local = [HeadlessComfy(out / f"server{i}", args.comfyui, log_path=out / f"server{i}.log", threads=threads)
                     for i in range(args.local)]
            for server in local:
                stack.callback(server.stop)
                server.launch()
            for server in local:
                server.wait_ready()
            servers = list(local)
            print(f"{len(local)} ComfyUI servers up in {time.monotonic() - t0:.0f} s, {threads} thread(s) each")
        base = servers[0].to_api(json.loads(WORKFLOW.read_text()))
        prompts, jobs = sweep_prompts(base, args.subjects.split(","), [int(s) for s in args.seeds.split(",")],
                                      args.configs.split(","), args.steps, args.bank, args.samples)
        t1 = time.monotonic()
        histories = run_spread(servers, prompts)
        ran = time.monotonic() - t1
    rows = collect(prompts, jobs, histories)
    text = report(rows, ran, [s.url for s in servers])
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"rows": rows, "seconds": ran}, indent=1))
    print(text)
    print(f"Wrote {out}/report.md; prompts {ran:.0f} s, {time.monotonic() - t0:.0f} s in all.")


if __name__ == "__main__":
    main()
