"""Everything that talks to ComfyUI itself: model folders, progress, interruption, grad mode.

Kept in one module so the nodes stay declarative and the engine never imports ComfyUI.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

import folder_paths

from .engine import threads
from .engine.safetensors_io import remove_leftovers_below

BUNDLED = "creative_bundled"  # the pack's own models/ (the mini world), listed next to the user's
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "models"
CONCEPTS = "creative_concepts"
EMBEDS = "creative_embeds"
LLM = "LLM"
DIFFUSERS = "diffusers"


def register_folders() -> None:
    """Model folders we read: the community ``LLM`` folder, and where saved concepts/banks appear."""
    models = folder_paths.models_dir
    output = Path(folder_paths.get_output_directory()) / "creative"
    if LLM not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(LLM, os.path.join(models, LLM))
    folder_paths.add_model_folder_path(BUNDLED, str(BUNDLED_DIR))
    for name, sub in ((CONCEPTS, "concepts"), (EMBEDS, "embeds")):
        folder_paths.add_model_folder_path(name, os.path.join(models, name))
        folder_paths.add_model_folder_path(name, str(output / sub))
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, {".safetensors"})


def output_folder(kind: str) -> Path:
    return Path(folder_paths.get_output_directory()) / "creative" / kind


def _model_dirs(kinds: tuple[str, ...], marker: Callable[[Path], bool], depth: int = 2) -> dict[str, Path]:
    """Sub-folders (up to ``depth`` levels) of every model path of ``kinds`` that satisfy ``marker``."""
    found: dict[str, Path] = {}
    for kind in kinds:
        for base in folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []:
            root = Path(base)
            if not root.is_dir():
                continue
            frontier = [root]
            for _ in range(depth):
                frontier = [c for d in frontier for c in sorted(d.iterdir()) if c.is_dir() and not c.name.startswith(".")]
                for folder in frontier:
                    if marker(folder):
                        found.setdefault(folder.relative_to(root).as_posix(), folder)
    return found


def prior_folders() -> dict[str, Path]:
    return _model_dirs((DIFFUSERS, BUNDLED), lambda p: (p / "prior" / "config.json").is_file())


def decoder_folders() -> dict[str, Path]:
    return _model_dirs((DIFFUSERS, BUNDLED), lambda p: (p / "movq" / "config.json").is_file())


def _has_processor(folder: Path) -> bool:
    """A bundled transformers folder with a processor (the mini world's judge classifier has none)."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json"))


def mllm_folders() -> dict[str, Path]:
    """Every transformers folder in models/LLM (text-only ones too, so the loader can say why it refuses
    them), plus the bundled mini world's MLLM."""
    return {**_model_dirs((LLM,), lambda p: (p / "config.json").is_file()), **_model_dirs((BUNDLED,), _has_processor)}


def _kind_folders(kind: str) -> list[str]:
    return folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []


def file_options(kind: str) -> list[str]:
    """The files a loader lists; what killed saves of ours left there (sub-folders too) is cleaned first."""
    for folder in _kind_folders(kind):
        remove_leftovers_below(folder)
    return folder_paths.get_filename_list(kind)


def clean_leftovers() -> None:
    """At start-up: what killed saves of ours left in every folder we write or list files from."""
    folders = {str(Path(folder_paths.get_output_directory()) / "creative"), *_kind_folders(CONCEPTS),
               *_kind_folders(EMBEDS)}
    for folder in sorted(folders):
        remove_leftovers_below(folder)


_installed: dict[str, bool] = {}


def install_checks(node_classes: dict[str, type]) -> None:
    """Once per process: interruption as the engine's cancel point, and the server's raw widget-value check."""
    from . import inputs
    from .engine import cancel

    cancel.set_check(_throw_if_interrupted)
    server = _prompt_server()
    if server is not None and not _installed.get("on_prompt"):
        server.add_on_prompt_handler(lambda data: inputs.refuse_bad_widgets(data, node_classes))
        _installed["on_prompt"] = True


def _throw_if_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def resolve(choice: str, options: dict[str, Path], what: str, folder: str) -> Path:
    if choice in options:
        return options[choice]
    raise ValueError(f"No {what} named '{choice}' in ComfyUI's models/{folder} folder(s). "
                     f"Found: {sorted(options) or 'none'}. Download one into models/{folder}/ and refresh.")


def folder_fingerprint(path: Path | None) -> str:
    """Changes when the files of a model folder (or the one file: a concept, a bank) change, so ComfyUI
    reloads it."""
    if path is None or not path.exists():
        return ""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stamps = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return str(hash(tuple(stamps)))


def time_left(seconds: float) -> str:
    """A remaining time as a person reads it: "about 40 s", "about 3 min 05 s", "about 1 h 02 min"."""
    whole = max(1, round(seconds))
    if whole < 60:
        return f"about {whole} s"
    if whole < 3600:
        return f"about {whole // 60} min {whole % 60:02d} s"
    return f"about {whole // 3600} h {whole % 3600 // 60:02d} min"


class Progress:
    """A ComfyUI progress bar plus progress text for one node; every update is a cancel point. From the second
    update on, the text ends with the time left at the pace since the first update (so loading the models
    before it does not count)."""

    def __init__(self, node_id: str | None, total: int, clock: Callable[[], float] = time.perf_counter):
        import comfy.utils

        self.node_id, self.total, self.clock = node_id, total, clock
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.first: tuple[int, float] | None = None

    def __call__(self, done: int, text: str | None = None, preview: torch.Tensor | None = None,
                 total: int | None = None) -> None:
        """``preview``: an image ``[H, W, 3]`` (0..1) shown as the node's progress preview, enlarged."""
        _throw_if_interrupted()
        self.total = total or self.total
        self.bar.update_absolute(done, self.total, None if preview is None else progress_preview(preview))
        left = self._left(done)
        if text:
            self.text(f"{text}; {left} left" if left else text)

    def _left(self, done: int) -> str | None:
        now = self.clock()
        if self.first is None:
            self.first = (done, now)
        start, then = self.first
        if done <= start or done >= self.total or now <= then:
            return None
        return time_left((now - then) / (done - start) * (self.total - done))

    def text(self, text: str) -> None:
        server = _prompt_server()
        if server is not None and self.node_id is not None:
            server.send_progress_text(text, self.node_id)


PREVIEW_SIDE = 256  # small renders (the mini world's 32 px) are shown at least this big


def enlarged(images: torch.Tensor, side: int = PREVIEW_SIDE) -> torch.Tensor:
    """Images ``[B, H, W, C]`` scaled up by a whole factor (nearest neighbour, so pixels stay sharp) until
    the shorter side reaches ``side``; for previews only, never for images that flow downstream."""
    factor = -(-side // max(1, min(images.shape[1:3])))
    if factor <= 1:
        return images
    return images.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def progress_preview(image: torch.Tensor) -> tuple:
    """The ``("JPEG", PIL image, max size)`` ComfyUI's progress hook sends as a node's preview."""
    from PIL import Image

    pixels = enlarged(image.detach().float().cpu().reshape(1, *image.shape[-3:]))[0]
    array = (pixels.clamp(0, 1).numpy() * 255).round().astype("uint8")
    return "JPEG", Image.fromarray(array[..., :3]), 512


def _prompt_server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _modules_of(value: object) -> list[torch.nn.Module]:
    """The torch modules a node input computes with: engine models, core MODELs inside renderers."""
    if isinstance(value, torch.nn.Module):
        return [value]
    managed = getattr(value, "managed_modules", None)
    if callable(managed):
        return list(managed().values())
    core = getattr(getattr(value, "model", None), "model", None)  # a CoreRenderer's ModelPatcher
    return [core] if isinstance(core, torch.nn.Module) else []


def cpu_threads_for(values: list) -> contextlib.AbstractContextManager:
    """One CPU thread while a node works with small models only (engine/threads.py says why);
    ComfyUI's own thread setting is restored for every other node."""
    return threads.cpu_threads(threads.threads_for(m for v in values for m in _modules_of(v)))


def training_mode(fn):
    """Run a node body outside ComfyUI's inference mode.

    ComfyUI executes nodes under ``torch.inference_mode()``; tensors created there can never
    take part in autograd, and the optimiser backpropagates through the prior, the norm and the
    loss terms. So every node that creates or uses them runs with inference mode off, and
    GPU memory is released when it ends, on success, error or cancel alike. On the CPU there is
    nothing to hand back (reference counting already freed the tensors), and a full
    ``gc.collect()`` costs ~0.4 s per node in a ComfyUI process's heap, so it runs only with CUDA.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with torch.inference_mode(False), cpu_threads_for([*args, *kwargs.values()]):
                return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                gc.collect()
                torch.cuda.empty_cache()

    return wrapper


def device_and_dtype(choice: str) -> tuple[torch.device, torch.dtype]:
    """ComfyUI's compute device and a dtype for it.

    "auto" asks ComfyUI (which honours --force-fp32/--force-fp16): bf16 where it is fast, else
    fp16, else fp32; always fp32 on the CPU. An explicit choice overrides.
    """
    import comfy.model_management as mm

    device = mm.get_torch_device()
    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if choice in named:
        return device, named[choice]
    if device.type == "cpu":
        return device, torch.float32
    if mm.should_use_bf16(device):
        return device, torch.bfloat16
    if mm.should_use_fp16(device):
        return device, torch.float16
    return device, torch.float32


def download(repo_id: str, kind: str) -> Path:
    """Fetch a Hugging Face repo into the first ``kind`` model folder (only when the user allows it)."""
    from huggingface_hub import snapshot_download

    target = Path(folder_paths.get_folder_paths(kind)[0]) / repo_id.strip().split("/")[-1]
    snapshot_download(repo_id.strip(), local_dir=str(target),
                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "*.jinja", "*.tiktoken"])
    return target
