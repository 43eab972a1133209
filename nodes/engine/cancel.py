"""Cancel points inside the engine's loops.

The engine never imports ComfyUI, yet a user must be able to stop every denoising step and every
optimiser step, also in loops the node cannot see into (a batch of the prior, a decoder render,
the runs inside a creativity sweep). The host (the ComfyUI bridge) sets one check that raises when
the user cancelled; every loop calls :func:`point`. Without a host, :func:`point` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable

_check: Callable[[], None] | None = None


def set_check(check: Callable[[], None] | None) -> None:
    """The host's "raise if the user cancelled" function (None: no cancelling)."""
    global _check
    _check = check


def point() -> None:
    """A place where a loop may stop: raises whatever the host's check raises."""
    if _check is not None:
        _check()
