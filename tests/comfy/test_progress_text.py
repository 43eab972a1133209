"""Progress text: the time left, at the pace measured from a node's first progress update."""

from __future__ import annotations


def test_progress_text_gives_the_time_left_from_the_first_update(comfy_inprocess):
    from creative_generation.nodes.comfy_bridge import Progress

    now = [100.0]  # the clock stands at 100 s at the first update (loading the models came before)
    progress = Progress(None, 50, clock=lambda: now[0])
    shown = []
    progress.text = shown.append
    progress(1, "step 1")
    now[0] = 104.0  # 4 more steps in 4 s: one step a second
    progress(5, "step 5")
    now[0] = 110.0
    progress(9)  # a bar-only update still counts for the pace
    now[0] = 149.0
    progress(50, "step 50")
    assert shown == ["step 1", "step 5; about 45 s left", "step 50"]  # no pace yet; 45 steps at 1 s; done


def test_a_longer_job_says_minutes_and_hours(comfy_inprocess):
    from creative_generation.nodes.comfy_bridge import Progress, time_left

    assert [time_left(s) for s in (0.2, 44.6, 185, 3725)] == ["about 1 s", "about 45 s", "about 3 min 05 s",
                                                               "about 1 h 02 min"]
    now = [0.0]
    progress = Progress(None, 5000, clock=lambda: now[0])
    shown = []
    progress.text = shown.append
    progress(0, "sampled 0/5000 embeddings")
    now[0] = 10.0
    progress(500, "sampled 500/5000 embeddings")  # 500 in 10 s: 4,500 more in 90 s
    assert shown[-1] == "sampled 500/5000 embeddings; about 1 min 30 s left"
