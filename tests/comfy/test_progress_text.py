"""The optimising nodes' progress text: speed and time left, measured from the first step's event."""

from __future__ import annotations


def _event(done: int, total: int):
    from creative_generation.nodes.engine.optimizer import StepEvent
    from creative_generation.nodes.engine.steplog import StepRecord

    record = StepRecord(done, 1.5, {"creative": 1.5}, {"log_likelihood": -3.0, "mahalanobis": 2.0})
    return StepEvent(record, "", done, total)


def test_progress_text_gives_speed_and_time_left_from_the_first_step(comfy_inprocess):
    from creative_generation.nodes import run_inputs

    shown, now = [], [100.0]  # the clock stands at 100 s when step 1 reports (loading the models came before)
    on_step = run_inputs.reporter(lambda done, text, preview=None, total=None: shown.append((done, text)),
                                  clock=lambda: now[0])
    on_step(_event(1, 50))
    now[0] = 104.0  # 4 more steps in 4 s: one step a second
    on_step(_event(5, 50))
    now[0] = 149.0
    on_step(_event(50, 50))
    assert shown[0] == (1, "step 1, loss 1.5, log p -3")  # one event: no speed yet
    assert shown[1] == (5, "step 5, loss 1.5, log p -3; 1 steps/s, about 45 s left"), shown[1]
    assert shown[2] == (50, "step 50, loss 1.5, log p -3; 1 steps/s"), shown[2]  # done: nothing left to estimate


def test_time_left_reads_like_a_person_says_it(comfy_inprocess):
    from creative_generation.nodes.run_inputs import time_left

    assert [time_left(s) for s in (0.2, 44.6, 185, 3725)] == ["about 1 s", "about 45 s", "about 3 min 05 s",
                                                               "about 1 h 02 min"]
