"""Independent prompts spread over two real ComfyUI servers give what one server gives.

Two headless servers (``nodes/testbed/headless.py``, one CPU thread each) run a tiny Creativity
Sweep on the mini world (one prompt per seed and configuration): first all prompts on one
server, then spread over both. Every prompt's table must be identical, both servers must have
worked, and the sweep node must really have run each time (not come from ComfyUI's cache).
"""

from __future__ import annotations

import json

import comfy_harness


def _cached_nodes(history: dict) -> set[str]:
    return {n for kind, data in history["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def test_two_servers_give_the_single_servers_results(tmp_path, comfyui_available):
    headless = comfy_harness.headless()
    from creative_generation.nodes.testbed import sweep_job

    servers = [headless.HeadlessComfy(tmp_path / f"server{i}", threads=1) for i in range(2)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        base = servers[0].to_api(json.loads(sweep_job.WORKFLOW.read_text()))
        prompts, jobs = sweep_job.sweep_prompts(base, ["car"], [0, 1], ["none", "gate"], "0, 3", bank=64, samples=4)
        alone = headless.run_spread(servers[:1], prompts)
        spread = headless.run_spread(servers, prompts)
    finally:
        for server in servers:
            server.stop()

    sweep_id, _ = sweep_job._node(prompts[0], "CreativeWundtSweep")
    assert [h["outputs"][sweep_id]["text"] for h in spread] == [h["outputs"][sweep_id]["text"] for h in alone]
    assert {h["server"] for h in spread} == {s.url for s in servers}
    assert not any(sweep_id in _cached_nodes(h) for h in alone + spread)
    rows = sweep_job.collect(prompts, jobs, spread)
    assert {(r["seed"], r["config"], r["step"]) for r in rows} == {
        (seed, config, step) for seed in (0, 1) for config in ("none", "gate") for step in (0.0, 3.0)}
    assert "Mean over subjects and seeds" in sweep_job.report(rows, 1.0, [s.url for s in servers])
