"""The optimiser's per-step record and the JSON form of a run's log.

A :class:`StepRecord` keeps the loss terms apart from the metrics, so a loss term may carry any
name (a negative cluster labelled ``log_likelihood`` no longer overwrites the metric), and the
gate's verdict is present exactly on the steps it was asked. The optimiser writes the records;
plots, nodes and the log saver read them.

Saved logs keep the flat entries they always had (``step``, ``loss``, one key per term,
``log_likelihood``, ``mahalanobis``, ``anchor_cos``, ``gate_p_yes``, ``gate_passed``,
``gate_question``, ``seconds``) and add ``terms``, every term by name: a term whose name is one of
those reserved keys appears only there. Logs saved before ``terms`` existed load as well. A log also keeps
``notes``: how the run ran where it could not run as asked (e.g. no fused AdamW kernel); older logs have none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .gate import Verdict

METRICS = ("log_likelihood", "mahalanobis", "anchor_cos")
GATE_KEYS = ("gate_p_yes", "gate_passed", "gate_question")
RESERVED = frozenset({"step", "loss", "seconds", "terms", *METRICS, *GATE_KEYS})


@dataclass(frozen=True)
class StepRecord:
    """One optimiser step: total loss, each term's unweighted value, the metrics, the gate's verdict."""

    step: int
    loss: float
    terms: dict[str, float]  # loss-term name -> unweighted value (names made unique by losses.objective)
    metrics: dict[str, float]  # log_likelihood and mahalanobis under the norm; anchor_cos with an anchor term
    seconds: float = 0.0
    gate: Verdict | None = None  # set on the steps the gate was asked

    @property
    def log_likelihood(self) -> float:
        return self.metrics["log_likelihood"]

    def to_json(self) -> dict[str, Any]:
        """The saved log's entry: the flat keys logs always had, plus ``terms``."""
        out: dict[str, Any] = {"step": self.step, "loss": self.loss}
        out.update({k: v for k, v in self.terms.items() if k not in RESERVED})
        out.update(self.metrics)
        if self.gate is not None:
            out.update(gate_p_yes=self.gate.p_yes, gate_passed=self.gate.passed, gate_question=self.gate.question)
        out["seconds"] = self.seconds
        out["terms"] = dict(self.terms)
        return out

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> StepRecord:
        """Read an entry written by :meth:`to_json`, or by a version without ``terms``."""
        terms = entry.get("terms")
        if terms is None:
            terms = {k: v for k, v in entry.items()
                     if k not in RESERVED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        gate = None
        if "gate_p_yes" in entry:
            gate = Verdict(int(entry["step"]), str(entry.get("gate_question", "")), float(entry["gate_p_yes"]),
                           bool(entry["gate_passed"]))
        return cls(int(entry["step"]), float(entry["loss"]), dict(terms),
                   {k: float(entry[k]) for k in METRICS if k in entry}, float(entry.get("seconds", 0.0)), gate)


@dataclass(frozen=True)
class RunLog:
    """A run's records and how it ended; :meth:`to_json` is the file the log saver writes."""

    records: list[StepRecord] = field(default_factory=list)
    stop_reason: str = ""
    steps_run: int = 0
    accepted_step: int = 0
    notes: list[str] = field(default_factory=list)  # how the run ran where it could not run as asked (a fallback)

    def to_json(self) -> dict[str, Any]:
        return {"entries": [r.to_json() for r in self.records], "stop_reason": self.stop_reason,
                "steps_run": self.steps_run, "accepted_step": self.accepted_step, "notes": list(self.notes)}

    @classmethod
    def from_json(cls, log: dict[str, Any]) -> RunLog:
        return cls([StepRecord.from_json(e) for e in log["entries"]], str(log["stop_reason"]),
                   int(log["steps_run"]), int(log["accepted_step"]), [str(n) for n in log.get("notes", [])])
