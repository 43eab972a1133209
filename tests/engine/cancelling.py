"""A user's cancel, as the engine sees it: the host's check (``cancel.set_check``) starts raising."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Cancelled(Exception):
    """What the test host's cancel check raises (ComfyUI's bridge raises its interruption instead)."""


class UserCancel:
    """A host's cancel check: the user presses cancel once ``when(event)`` holds for a step event (:meth:`on_step`
    is the run's step callback); the next cancel point raises :class:`Cancelled` and, as ComfyUI's interruption
    does, clears the press."""

    def __init__(self, when: Callable[[object], bool]) -> None:
        self.when, self.pressed, self.events, self.raised = when, False, [], 0

    def on_step(self, event) -> None:
        self.events.append(event)
        if self.when(event):
            self.pressed = True

    def __call__(self) -> None:
        if self.pressed:
            self.pressed, self.raised = False, self.raised + 1
            raise Cancelled


def training_adapters(prior) -> list[str]:
    """The optimisers' training adapters on the shared prior (none may be left once a run has ended)."""
    return [name for name in (getattr(prior.transformer, "peft_config", None) or {})
            if name.startswith("creative_train")]


def prior_state(prior) -> dict[str, object]:
    """What a run must leave as it found it: no training adapter, no gradients, the same samples of the base prior.
    (Concepts' content-named adapters are a cache: sampling a trial's concept may load one and evict another.)"""
    from creative_generation.nodes.engine.sampling import sample_embeddings

    tf = prior.transformer
    return {"adapters": training_adapters(prior),
            "requires_grad": [n for n, p in tf.named_parameters() if p.requires_grad]
            + [n for n, p in prior.text_encoder.named_parameters() if p.requires_grad],
            "samples": sample_embeddings(prior, "a photo of a car", 4, seed=2)}


def assert_same_prior(before: dict[str, object], after: dict[str, object]) -> None:
    assert after["adapters"] == before["adapters"] == []
    assert after["requires_grad"] == []  # a run ends with every weight frozen (even a concept's, which loads unfrozen)
    assert torch.equal(after["samples"], before["samples"])
