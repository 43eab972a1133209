"""Every node's inputs checked against its own schema, in one place.

ComfyUI 0.3.75 checks little for V3 nodes: it passes ``None`` for a linked input during
validation, converts ``"false"`` to ``True`` for a BOOLEAN, lets NaN through every FLOAT, and
does not check a combo value or the object on a custom socket once a node declares its own
``validate_inputs``. :func:`guard` gives a node class one ``validate_inputs`` and one ``execute``
wrapper that check what the schema declares (types, ranges, finiteness, combo options, socket
objects) and then run the node's own checks: at validation on the values known then (linked ones
are ``None`` and skipped), and again at execution on the real values.

:func:`refuse_bad_widgets` runs on every ``POST /prompt`` before validation, the only moment the
raw JSON is still visible (ComfyUI then turns ``"false"`` into ``True`` and ``null`` into
``"None"``). It checks our widget values as they arrived, and the node's own checks on them, and
replaces each value at fault with a :class:`RefusedValue`: ComfyUI's own conversion of it fails, so
ComfyUI reports the problem on that input alone, at validation, before any cached result is used.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import numbers
import re
import string
from collections.abc import Callable, Iterable
from typing import Any, Self

from comfy_api.latest import io

from . import sockets as s

_GUARDED = "_creative_inputs_guarded"


class InputError(ValueError):
    """A node input that cannot be used; the message names the input and what to change."""


def _socket_checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Socket type -> (accepts the object?, what belongs there). Imported late: engine modules are heavy."""
    import torch

    from .engine.bank import EmbeddingBank
    from .engine.concept import Concept
    from .engine.gate import ValidityGate
    from .engine.norm import GaussianNorm
    from .engine.prior import Prior
    from .engine.render import KandinskyDecoder
    from .engine.steplog import RunLog

    def losses(v: Any) -> bool:
        return isinstance(v, (tuple, list)) and all(callable(t) and hasattr(t, "weight") for t in v)

    def renderer(v: Any) -> bool:
        return callable(v) and hasattr(v, "settings")

    def judge(v: Any) -> bool:
        return callable(getattr(v, "p_yes", None))

    def core(kind: str) -> Callable[[Any], bool]:
        def check(v: Any) -> bool:
            if kind == "MODEL":
                import comfy.model_patcher
                return isinstance(v, comfy.model_patcher.ModelPatcher)
            if kind == "VAE":
                import comfy.sd
                return isinstance(v, comfy.sd.VAE)
            return isinstance(v, list) and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in v)
        return check

    return {
        s.Prior.io_type: (lambda v: isinstance(v, Prior), "a prior (Load Diffusion Prior)"),
        s.Embeds.io_type: (lambda v: isinstance(v, EmbeddingBank), "embeddings (Prior Sampler, Load Embeddings)"),
        s.Norm.io_type: (lambda v: isinstance(v, GaussianNorm), "a norm (Norm Gaussian Fit)"),
        s.Loss.io_type: (losses, "loss terms (Anchor Loss, Negative Cluster)"),
        s.Gate.io_type: (lambda v: isinstance(v, ValidityGate), "a validity gate (MLLM Validity Gate)"),
        s.MLLM.io_type: (judge, "a multimodal LLM (Load Multimodal LLM)"),
        s.Decoder.io_type: (lambda v: isinstance(v, KandinskyDecoder), "a decoder (Load Kandinsky Decoder)"),
        s.Renderer.io_type: (renderer, "a renderer (Decoder Renderer, Core Model Renderer)"),
        s.Concept.io_type: (lambda v: isinstance(v, Concept), "a concept (Load Concept, the optimiser)"),
        s.Log.io_type: (lambda v: isinstance(v, RunLog), "an optimiser log"),
        "IMAGE": (lambda v: isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[-1] in (1, 3, 4),
                  "an IMAGE batch [B, H, W, C]"),
        "MODEL": (core("MODEL"), "a MODEL (a checkpoint loader)"),
        "VAE": (core("VAE"), "a VAE (a checkpoint or VAE loader)"),
        "CONDITIONING": (core("CONDITIONING"), "CONDITIONING (CLIP Text Encode)"),
    }


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _number_problem(name: str, value: Any, spec: io.Input, whole: bool) -> str | None:
    kind = "a whole number" if whole else "a number"
    # numbers.Integral / Real, not int / float: another pack's node may hand on a numpy scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
        return f"{name} must be {kind}, got {_describe(value)}."
    if not whole and not math.isfinite(value):
        return f"{name} must be a finite number, got {value}: give a value between {spec.min} and {spec.max}."
    if spec.min is not None and value < spec.min:
        return f"{name} is {value}, below its minimum {spec.min}."
    if spec.max is not None and value > spec.max:
        return f"{name} is {value}, above its maximum {spec.max}."
    return None


def value_problem(spec: io.Input, value: Any, sockets: dict | None = None, own_options: bool = False) -> str | None:
    """Why ``value`` cannot go into the input ``spec`` (None when it can). ``value`` is not None.

    ``own_options``: the node's own ``validate_inputs`` checks this combo's value (a loader that can
    also download), so only its type is checked here, as ComfyUI does for inputs a check names.
    """
    name = spec.id
    if isinstance(spec, io.Boolean.Input):
        return None if isinstance(value, bool) else (
            f"{name} must be true or false (a JSON boolean), got {_describe(value)}; it stays off otherwise.")
    if isinstance(spec, io.Int.Input):
        return _number_problem(name, value, spec, whole=True)
    if isinstance(spec, io.Float.Input):
        return _number_problem(name, value, spec, whole=False)
    if isinstance(spec, io.String.Input):
        return None if isinstance(value, str) else f"{name} must be text, got {_describe(value)}."
    if isinstance(spec, io.Combo.Input):
        options = list(spec.options or [])
        if isinstance(value, str) and (own_options or value in options):
            return None
        shown = options if len(options) <= 20 else f"{len(options)} options, e.g. {options[:5]}"
        return f"{name}: {_describe(value)} is not one of its options {shown}."
    check = (sockets if sockets is not None else _socket_checks()).get(spec.get_io_type())
    if check is not None and not check[0](value):
        return f"{name} must be {check[1]}, got {type(value).__name__}."
    return None


def schema_problems(schema: io.Schema, values: dict[str, Any], *, complete: bool,
                    own: frozenset[str] = frozenset(), defaults: frozenset[str] = frozenset()) -> list[str]:
    """Problems of ``values`` against ``schema``. ``complete``: every required input must be present
    (or, when absent, have a default in ``defaults``); ``own``: inputs the node's own
    ``validate_inputs`` takes (their combo options are its to check)."""
    sockets = _socket_checks()
    problems = []
    for spec in schema.inputs:
        value = values.get(spec.id)
        if value is None:
            if complete and not spec.optional and (spec.id in values or spec.id not in defaults):
                problems.append(f"{spec.id} is missing: connect it or give it a value.")
            continue
        problem = value_problem(spec, value, sockets, own_options=spec.id in own)
        if problem:
            problems.append(problem)
    return problems


def template_problem(name: str, text: str | None, allowed: Iterable[str], required: Iterable[str] = ()) -> str | None:
    """Why ``text`` cannot be ``str.format``-ed with the ``allowed`` fields (None when it can, or is linked)."""
    if text is None:
        return None
    allowed, required = set(allowed), set(required)
    shown = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as err:
        return f"{name}: {err}. Write {{{{ and }}}} for literal braces; allowed fields: {shown}."
    unknown = sorted(fields - allowed)
    if unknown:
        return f"{name} uses unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; allowed: {shown}."
    missing = sorted(required - fields)
    if missing:
        return f"{name} must contain {', '.join('{' + f + '}' for f in missing)}, e.g. 'a photo of a {{token}}'."
    return None


def text_problem(name: str, text: str | None, hint: str) -> str | None:
    """An empty text input (``None`` = linked, checked later)."""
    return None if text is None or text.strip() else f"{name} is empty: {hint}"


# A file name holds at most 255 bytes on common file systems; the saved name adds "_00001.safetensors" and
# its temporary "." + ".<8 random>.tmp" (32 bytes), so each part of a prefix keeps well below that.
MAX_PREFIX_PART_BYTES = 200


def filename_prefix_problem(prefix: str | None) -> str | None:
    """A prefix that would write a hidden file, leave the output folder, or that the file system refuses
    (a part too long, a NUL or other control character) -- refused before any upstream work runs."""
    if prefix is None:
        return None
    parts = prefix.replace("\\", "/").split("/")
    if not prefix.strip() or any(not p.strip() or p.strip().startswith(".") for p in parts) or ":" in prefix:
        return (f"filename_prefix {prefix!r} is not allowed: give a name such as 'concept' or 'runs/concept' "
                "(no empty or dot-leading parts, no absolute paths or '..'): it must name a visible file inside the "
                "output folder.")
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        return f"filename_prefix {prefix[:40]!r}... contains a control character (e.g. NUL): use plain text."
    longest = max(len(p.encode("utf-8")) for p in parts)
    if longest > MAX_PREFIX_PART_BYTES:
        return (f"filename_prefix is too long: a part of it has {longest} bytes, at most {MAX_PREFIX_PART_BYTES} fit "
                "in a file name; shorten it or split it into folders with '/'.")
    return None


# Hugging Face's repo id rules (huggingface_hub.utils.validate_repo_id), with the owner required: each part
# 1-96 of [A-Za-z0-9_.-], starting and ending with a letter, digit or '_', no '--' or '..', no '.git' ending.
_REPO_PART = re.compile(r"^(?=.{1,96}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def repo_id_problem(repo_id: str | None, example: str) -> str | None:
    """An ``hf_repo_id`` that is not ``owner/name`` (None = linked or empty): refused before the hub is asked."""
    if repo_id is None or not repo_id.strip():
        return None
    parts = repo_id.strip().split("/")
    if (len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts) or "--" in repo_id or ".." in repo_id
            or repo_id.strip().endswith(".git")):
        return (f"hf_repo_id {repo_id[:120]!r} is not a Hugging Face repo id: write owner/name, e.g. {example} "
                "(letters, digits, '-', '_' and '.', at most 96 characters each, no '--' or '..').")
    return None


def first(*problems: str | None) -> bool | str:
    """``validate_inputs``' answer: True, or the first problem."""
    return next((p for p in problems if p), True)


def _own_validate(node_cls: type) -> Callable | None:
    fn = node_cls.__dict__.get("validate_inputs")
    return fn.__func__ if isinstance(fn, classmethod) else None


def _call_own(cls: type, own: Callable | None, names: frozenset[str], values: dict[str, Any]) -> bool | str:
    if own is None:
        return True
    return own(cls, **{k: v for k, v in values.items() if k in names})


def guard(node_cls: type) -> type:
    """Install the schema checks on ``node_cls`` (once); returns it."""
    if node_cls.__dict__.get(_GUARDED):
        return node_cls
    own_validate = _own_validate(node_cls)
    own_order = [n for n in inspect.signature(own_validate).parameters if n != "cls"] if own_validate else []
    own_names = frozenset(own_order)
    own_execute = node_cls.__dict__["execute"].__func__
    parameters = inspect.signature(own_execute).parameters
    defaults = frozenset(n for n, p in parameters.items() if p.default is not p.empty)
    execute_order = [n for n in parameters if n != "cls"]

    # **values: ComfyUI then passes every input (linked ones as None) and skips its own range/combo checks
    def validate_inputs(cls, *args, **values) -> bool | str:
        values.update(zip(own_order, args))  # a node calling its own check positionally
        # a refused value was reported on its own input already: checked like a linked one
        values = {k: None if isinstance(v, RefusedValue) else v for k, v in values.items()}
        problems = schema_problems(cls.FINALIZE_SCHEMA(), values, complete=False, own=own_names)
        return problems[0] if problems else _call_own(cls, own_validate, own_names, values)

    def checked(cls, values: dict[str, Any]) -> None:
        problems = schema_problems(cls.FINALIZE_SCHEMA(), values, complete=True, own=own_names, defaults=defaults)
        verdict = True if problems else _call_own(cls, own_validate, own_names, values)
        if problems or verdict is not True:
            raise InputError(f"{cls.FINALIZE_SCHEMA().display_name or cls.__name__}: {' '.join(problems) or verdict}")

    if inspect.iscoroutinefunction(own_execute):
        @functools.wraps(own_execute)
        async def execute(cls, *args, **values) -> io.NodeOutput:
            values.update(zip(execute_order, args))
            checked(cls, values)
            return await own_execute(cls, **values)
    else:
        @functools.wraps(own_execute)
        def execute(cls, *args, **values) -> io.NodeOutput:
            values.update(zip(execute_order, args))
            checked(cls, values)
            return own_execute(cls, **values)

    node_cls.validate_inputs = classmethod(validate_inputs)
    node_cls.execute = classmethod(execute)
    setattr(node_cls, _GUARDED, True)
    return node_cls


# The widget types ComfyUI converts (int(), float(), str(), bool()) before any check, reporting a failure there
# on the input alone; combos and sockets have no such step, so their problems stay with the node's own check.
_CONVERTED = (io.Boolean.Input, io.Int.Input, io.Float.Input, io.String.Input)


class RefusedValue(str):
    """A widget value :func:`refuse_bad_widgets` refused: every conversion ComfyUI may apply to it raises
    the problem, so ComfyUI reports it as ``invalid_input_type`` on this input alone. It is text (the
    value as it arrived, as JSON) so that the error response, which echoes it, still serialises."""

    problem: str

    def __new__(cls, text: str, problem: str) -> Self:
        self = super().__new__(cls, text)
        self.problem = problem
        return self

    @classmethod
    def of(cls, raw: Any, problem: str) -> RefusedValue:
        return cls(json.dumps(raw, default=repr)[:200], problem)

    def _refuse(self, *_: Any) -> Any:
        raise InputError(self.problem)

    __str__ = __int__ = __float__ = __bool__ = _refuse

    def __format__(self, spec: str) -> str:  # ComfyUI writes the value into its error details
        return format(str.__str__(self), spec)

    def __reduce__(self) -> tuple:  # a copied prompt keeps the refusal
        return RefusedValue, (str.__str__(self), self.problem)


def _is_link(value: Any) -> bool:
    return isinstance(value, list)


def _input_at_fault(problem: str, names: Iterable[str]) -> str | None:
    """The input a problem is about: our messages begin with its name ("guidance must be ...")."""
    for name in sorted(names, key=len, reverse=True):
        rest = problem[len(name):len(name) + 1]
        if problem.startswith(name) and not (rest.isalnum() or rest == "_"):
            return name
    return None


def _widget_problems(cls: type, inputs: dict[str, Any]) -> dict[str, str]:
    """Input -> problem, for the INT / FLOAT / STRING / BOOLEAN widget values of one node as they arrived:
    their type and range, then the first problem of the node's whole check, when it is about one of them."""
    widgets = {spec.id: spec for spec in cls.FINALIZE_SCHEMA().inputs
               if isinstance(spec, _CONVERTED) and spec.id in inputs and not _is_link(inputs[spec.id])}
    found = {}
    for name, spec in widgets.items():
        raw = inputs[name]
        raw = raw["__value__"] if isinstance(raw, dict) and "__value__" in raw else raw  # ComfyUI unwraps these
        if isinstance(spec, io.Int.Input) and isinstance(raw, float) and raw.is_integer():
            raw = int(raw)  # 1e3 in JSON: ComfyUI's int() keeps it whole
        problem = "null" if raw is None else value_problem(spec, raw)
        if problem:
            found[name] = f"{name} is missing (null): give it a value." if raw is None else problem
    values = {k: None if _is_link(v) or k in found else v for k, v in inputs.items()}
    verdict = cls.validate_inputs(**values)
    name = _input_at_fault(verdict, widgets) if isinstance(verdict, str) else None
    if name is not None and name not in found:
        found[name] = verdict
    return found


def refuse_bad_widgets(json_data: dict, node_classes: dict[str, type]) -> dict:
    """``PromptServer`` on-prompt handler: each of our nodes' widget values that its checks refuse becomes a
    :class:`RefusedValue`, so ComfyUI's validation fails on that input alone, naming the problem.

    A non-boolean for a BOOLEAN (ComfyUI would make ``"false"`` True), a non-text for a STRING
    (``null`` would become ``"None"``), a bad number, or a value the node's own check refuses.
    """
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for entry in prompt.values():
        cls = node_classes.get(entry.get("class_type")) if isinstance(entry, dict) else None
        inputs = entry.get("inputs") if cls is not None else None
        if not isinstance(inputs, dict):
            continue
        for name, problem in _widget_problems(cls, inputs).items():
            inputs[name] = RefusedValue.of(inputs[name], problem)
    return json_data
