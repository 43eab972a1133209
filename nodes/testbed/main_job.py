"""The main job: the paper's pipeline on the bundled mini world, through a real headless ComfyUI.

    python nodes/testbed/run.py main_job --out output/miniworld

Starts a ComfyUI server with this pack, queues ``example_workflows/creative_miniworld.json`` as
a user would (typical bank -> norm -> token + LoRA optimisation with anchor and MLLM gate ->
concept sampled and drawn), then writes next to ComfyUI's own outputs a contact sheet of the
typical and of the creative samples and a report measured by the mini world's independent judge.
No downloads: every model is in ``models/miniworld/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..engine.threads import cpu_threads, threads_for
from .miniworld.judge import load_judge
from .miniworld.report import RunFiles, format_report, measure_run, sheet_of_files
from .headless import REPO, HeadlessComfy

WORKFLOW = REPO / "example_workflows" / "creative_miniworld.json"
JUDGE = REPO / "models" / "miniworld" / "judge"


def _nodes(prompt: dict, class_type: str) -> dict[str, dict]:
    return {nid: n for nid, n in prompt.items() if n["class_type"] == class_type}


def _image_paths(history: dict, root: Path, node_id: str) -> list[Path]:
    return [root / i["subfolder"] / i["filename"] for i in history["outputs"][node_id]["images"]]


def _saved_file(history: dict, node_id: str) -> Path:
    """Where a Save Embeddings / Save Log node wrote (its text preview: 'saved NAME in FOLDER')."""
    text = " ".join(history["outputs"][node_id]["text"]).split("saved ", 1)[1]
    name, folder = text.split(" in ", 1)
    return Path(folder.splitlines()[0].strip()) / name


def _outputs(prompt: dict, history: dict, root: Path) -> tuple[RunFiles, str, int]:
    """The run's files, found by following the graph from the optimiser (no reliance on node ids)."""
    optimiser_id, optimiser = next(iter(_nodes(prompt, "CreativeLoRAOptimizer").items()))
    norm = prompt[optimiser["inputs"]["norm"][0]]
    bank_source = norm["inputs"]["embeds"][0]
    samplers = {nid for nid, n in _nodes(prompt, "CreativePriorSampler").items()
                if n["inputs"]["prior"][0] == optimiser_id}
    found: dict[str, object] = {}
    for nid, node in prompt.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CreativeSaveEmbeds" and inputs["embeds"][0] == bank_source:
            found["bank"] = _saved_file(history, nid)
        elif kind == "CreativeSaveEmbeds" and inputs["embeds"][0] in samplers:
            found["samples"] = _saved_file(history, nid)
        elif kind == "CreativeSaveLog":
            found["log"] = _saved_file(history, nid)
        elif kind == "SaveImage" and prompt[inputs["images"][0]]["class_type"] == "CreativeRenderEmbeds":
            rendered = prompt[inputs["images"][0]]["inputs"]["embeds"][0]
            which = "typical_images" if rendered == bank_source else "concept_images" if rendered in samplers else None
            if which:
                found[which] = _image_paths(history, root, nid)
    files = RunFiles(found["bank"], found["samples"], found["typical_images"], found["concept_images"],
                     found.get("log"))
    return files, optimiser["inputs"]["subject"], int(norm["inputs"]["pca_dims"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("output/miniworld"), help="output folder (replaced)")
    p.add_argument("--workflow", type=Path, default=WORKFLOW, help="a UI workflow on the mini-world models")
    p.add_argument("--comfyui", type=Path, default=None, help="ComfyUI folder (default: .comfyui or $COMFYUI_DIR)")
    args = p.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    t0 = time.monotonic()
    with HeadlessComfy(out / "comfyui", args.comfyui, log_path=out / "comfyui.log") as server:
        if server.import_failed():
            raise SystemExit(f"ComfyUI could not import the pack:\n{server.log_tail()}")
        print(f"ComfyUI up in {time.monotonic() - t0:.0f} s ({server.url}); queuing {args.workflow.name}")
        prompt = server.to_api(json.loads(args.workflow.read_text()))
        (out / "workflow_api.json").write_text(json.dumps(prompt, indent=1))
        history = server.run(prompt)
    ran = time.monotonic() - t0
    files, subject, dims = _outputs(prompt, history, out / "comfyui")
    sheet_of_files(files.typical_images).save(out / "typical_samples.png")
    sheet_of_files(files.concept_images).save(out / "concept_samples.png")
    judge = load_judge(JUDGE)
    with cpu_threads(threads_for([judge.net])):  # a small net: one thread, robust to a busy core
        result = measure_run(files, subject, dims, judge)
    result["seconds"] = {"comfyui_workflow": round(ran, 1), "total": round(time.monotonic() - t0, 1)}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    report = format_report(result)
    (out / "report.md").write_text(report)
    print(report)
    print(f"Wrote {out}: report.md, typical_samples.png, concept_samples.png, comfyui/ (every image, plot, "
          f"the concept, the embeddings and the run log); {result['seconds']['total']:.0f} s in all.")


if __name__ == "__main__":
    main()
