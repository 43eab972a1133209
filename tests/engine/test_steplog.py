"""The per-step record: terms apart from metrics, and the saved log's JSON, old and new."""

from __future__ import annotations

import json

from creative_generation.nodes.engine.gate import Verdict
from creative_generation.nodes.engine.plots import plot_log
from creative_generation.nodes.engine.steplog import RunLog, StepRecord

METRICS = {"log_likelihood": -12.5, "mahalanobis": 3.0, "anchor_cos": 0.8}


def test_a_term_named_like_a_metric_keeps_both_values():
    record = StepRecord(3, 1.5, {"creative": -12.0, "log_likelihood": 7.0}, METRICS, 0.25)
    saved = json.loads(json.dumps(record.to_json()))
    assert saved["log_likelihood"] == -12.5 and saved["terms"]["log_likelihood"] == 7.0
    again = StepRecord.from_json(saved)
    assert again == record


def test_saved_entries_keep_the_flat_keys_in_their_order():
    gate = Verdict(25, "Is this still a vehicle? Yes or No.", 0.9, True)
    entry = StepRecord(25, 1.0, {"creative": -3.0, "anchor": 0.1}, METRICS, 0.5, gate).to_json()
    assert list(entry) == ["step", "loss", "creative", "anchor", "log_likelihood", "mahalanobis", "anchor_cos",
                           "gate_p_yes", "gate_passed", "gate_question", "seconds", "terms"]


def test_a_log_saved_before_terms_existed_loads():
    old = {"entries": [{"step": 1, "loss": 2.0, "creative": -3.0, "ugly": 1.0, "log_likelihood": -3.0,
                        "mahalanobis": 2.0, "seconds": 0.5},
                       {"step": 2, "loss": 1.0, "creative": -4.0, "ugly": 0.5, "log_likelihood": -4.0,
                        "mahalanobis": 2.5, "gate_p_yes": 0.2, "gate_passed": False, "gate_question": "q",
                        "seconds": 0.5}],
           "stop_reason": "gate_rejected", "steps_run": 2, "accepted_step": 0}
    run = RunLog.from_json(old)
    assert [r.terms for r in run.records] == [{"creative": -3.0, "ugly": 1.0}, {"creative": -4.0, "ugly": 0.5}]
    assert run.records[0].gate is None and run.records[1].gate.passed is False
    assert run.stop_reason == "gate_rejected" and run.accepted_step == 0


def test_plot_draws_a_colliding_term_on_its_own_panel():
    records = [StepRecord(i, 1.0 / i, {"creative": -i, "log_likelihood": float(i)}, METRICS, 0.1) for i in (1, 2, 3, 4)]
    # loss, creative, the term log_likelihood, the metric log_likelihood: two rows of two panels
    assert plot_log(records, panel_height=100).shape == (1, 200, 768, 3)
    assert plot_log(records[:1] * 0).shape == (1, 150, 768, 3)
