"""Run the pack inside a real ComfyUI (0.3.75 core unpacked by ``.ci/setup-env``), offline.

Two levels, used by ``tests/comfy/conftest.py``:

* in-process: :func:`import_comfy` puts ComfyUI on ``sys.path`` in the order its ``main.py``
  needs (``utils.extra_config``/``utils.install_util`` before ``nodes``, ``args.cpu`` before
  ``comfy.model_management``) and points its folders at a scratch dir;
* a real server: :class:`ComfyServer` starts ``main.py`` on 127.0.0.1 with the pack symlinked
  into a temp ``custom_nodes/`` and talks to it over HTTP + the ``/ws`` websocket.

Plus :func:`ui_to_api`, the headless UI (litegraph) -> API workflow converter from comfy-cli.
See ``shared/docs/comfyui.md`` §12-§13 for the recipe and its pitfalls.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "creative_generation"  # name of the symlink under custom_nodes/
MODEL_FOLDERS = ("checkpoints", "clip_vision", "diffusers", "LLM", "loras", "creative_concepts", "creative_embeds")
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
BINARY_TEXT = 3  # protocol.BinaryEventTypes.TEXT (progress_text)


def comfyui_dir() -> Path:
    """ComfyUI checkout to use: ``$COMFYUI_DIR`` or the repo's ``.comfyui`` (from setup-env)."""
    return Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()


def comfyui_missing_reason() -> str | None:
    """None when a usable ComfyUI is there, else why not (used as the skip reason)."""
    d = comfyui_dir()
    if not (d / "main.py").is_file() or not (d / "nodes.py").is_file():
        return f"ComfyUI not found at {d} (run `bash .ci/setup-env` or set COMFYUI_DIR)"
    return None


# --------------------------------------------------------------------------- in-process


_COMFY: SimpleNamespace | None = None


def import_comfy(scratch: Path | None = None) -> SimpleNamespace:
    """Import ComfyUI core into this process (idempotent) and return its main modules.

    ``scratch``: a dir whose ``output/``, ``temp/``, ``input/``, ``user/`` replace ComfyUI's own
    (first call only), so in-process tests never write into the checkout.
    """
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    reason = comfyui_missing_reason()
    if reason:
        raise RuntimeError(reason)
    root = str(comfyui_dir())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    # Pitfall: once `nodes` is imported ComfyUI's `comfy/` dir shadows the `utils` package,
    # so import ComfyUI's utils submodules first, as main.py does.
    import utils.extra_config  # noqa: F401
    import utils.install_util  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management, else "Torch not compiled with CUDA"
    args.disable_api_nodes = True
    import comfy.model_management as model_management
    import folder_paths

    if scratch is not None:
        dirs = {k: Path(scratch) / k for k in ("output", "temp", "input", "user")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(dirs["output"]))
        folder_paths.set_temp_directory(str(dirs["temp"]))
        folder_paths.set_input_directory(str(dirs["input"]))
        folder_paths.set_user_directory(str(dirs["user"]))
    import comfy.utils
    import nodes

    from comfy_api.latest import ComfyExtension, io, ui

    _COMFY = SimpleNamespace(
        dir=Path(root),
        args=args,
        comfy=sys.modules["comfy"],
        comfy_utils=comfy.utils,
        model_management=model_management,
        folder_paths=folder_paths,
        nodes=nodes,
        io=io,
        ui=ui,
        ComfyExtension=ComfyExtension,
    )
    return _COMFY


def execute_node(node_cls, unique_id: str, **inputs):
    """Run a V3 node as ComfyUI's executor does: a class clone carrying the hidden unique id, under
    inference mode; returns the outputs tuple."""
    import torch
    from comfy_api.latest._io import Hidden

    cls = node_cls.PREPARE_CLASS_CLONE({Hidden.unique_id: unique_id})
    with torch.inference_mode():
        out = cls.execute(**inputs)
    return out.result if hasattr(out, "result") else out


def register_tiny_models(folder_paths, root: Path, priors: dict[str, int], decoder: str, mllm: str) -> Path:
    """Tiny priors (name -> seed), a Kandinsky 2.2 decoder and a LLaVA-NeXT built under ``root`` and registered in
    ComfyUI's ``diffusers`` / ``LLM`` folders under the given names, so the pack's loader nodes list them."""
    from creative_generation.nodes.testbed.tiny.decoder import build_tiny_k22_decoder
    from creative_generation.nodes.testbed.tiny.mllm import build_tiny_llava_next
    from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior

    for name, seed in priors.items():
        build_tiny_prior(root / "diffusers" / name, seed=seed)
    build_tiny_k22_decoder(root / "diffusers" / decoder)
    build_tiny_llava_next(root / "LLM" / mllm)
    folder_paths.add_model_folder_path("diffusers", str(root / "diffusers"))
    folder_paths.add_model_folder_path("LLM", str(root / "LLM"))
    return root


def run_async(coro_or_value):
    """Await ``coro_or_value`` if it is awaitable (comfy_entrypoint/get_node_list may be async)."""
    import asyncio
    import inspect

    if inspect.isawaitable(coro_or_value):
        return asyncio.run(_await(coro_or_value))
    return coro_or_value


async def _await(x):
    return await x


def pack_extension():
    """The pack's ``ComfyExtension``, via its ``comfy_entrypoint()`` (needs :func:`import_comfy`)."""
    return run_async(import_pack().comfy_entrypoint())


def import_pack():
    """The pack as package ``creative_generation`` (tests/conftest.py registers it; done here
    too so the harness also works outside pytest)."""
    import importlib.util

    if "creative_generation" not in sys.modules:
        spec = importlib.util.spec_from_file_location("creative_generation", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["creative_generation"] = module
        spec.loader.exec_module(module)
    return sys.modules["creative_generation"]


def pack_node_classes() -> dict[str, type]:
    """``{node_id: class}`` for every node the pack's extension lists (needs :func:`import_comfy`)."""
    ext = pack_extension()
    classes = run_async(ext.get_node_list())
    if not isinstance(classes, list):
        raise TypeError(f"get_node_list() returned {type(classes).__name__}, expected list")
    out: dict[str, type] = {}
    for cls in classes:
        node_id = cls.GET_SCHEMA().node_id
        if node_id in out:
            raise ValueError(f"duplicate node_id {node_id!r} ({out[node_id]} and {cls})")
        out[node_id] = cls
    return out


def node_info_v1(cls) -> dict:
    """``/object_info``-shaped dict of a V3 node class, JSON round-tripped like the server does."""
    return json.loads(json.dumps(cls.GET_NODE_INFO_V1(), default=str))


def schema_signature(info: dict) -> dict:
    """What must agree between a class and ``/object_info``: input names (by section, in
    order) with their types, output types/names/list flags, and the node's identity fields.
    Widget option values (e.g. file lists) are left out: they depend on the model folders."""

    def input_type(spec):
        t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
        return "COMBO" if isinstance(t, list) else t

    inputs = {
        section: [(name, input_type(spec)) for name, spec in (info.get("input", {}).get(section) or {}).items()]
        for section in ("required", "optional", "hidden")
    }
    return {
        "name": info.get("name"),
        "display_name": info.get("display_name"),
        "category": info.get("category"),
        "output_node": bool(info.get("output_node")),
        "inputs": inputs,
        "input_order": info.get("input_order"),
        "output": list(info.get("output") or []),
        "output_name": list(info.get("output_name") or []),
        "output_is_list": list(info.get("output_is_list") or []),
    }


# --------------------------------------------------------------------------- UI -> API


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI (litegraph) workflow to the API prompt format, as the frontend would.

    Wraps ``comfy_cli.workflow_to_api.convert_ui_to_api`` (comfy-cli, installed by setup-env).
    """
    from comfy_cli.workflow_to_api import convert_ui_to_api

    return convert_ui_to_api(workflow, object_info)


# --------------------------------------------------------------------------- server


def headless():
    """The pack's headless-server module (``nodes/testbed/headless.py``): the one place that knows how a
    ComfyUI server is started (command line, environment, port); :class:`ComfyServer` adds the test folders."""
    import_pack()
    from creative_generation.nodes.testbed import headless as module

    return module


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the server if the test process dies without tearing it down."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class RunResult:
    """What :meth:`ComfyServer.wait` saw for one prompt."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted" | "timeout"
    messages: list[dict] = field(default_factory=list)  # JSON ws messages {"type", "data"} of this prompt
    history: dict = field(default_factory=dict)  # /history/<id>[<id>] ({} if not written)
    elapsed: float = 0.0  # seconds spent in wait()

    @property
    def duration(self) -> float | None:
        """Seconds from ``execution_start`` to the terminal message (None if either is missing)."""
        ts = {m["type"]: m["t"] for m in self.messages if "t" in m}
        end = next((ts[k] for k in TERMINAL_EVENTS if k in ts), None)
        return end - ts["execution_start"] if end is not None and "execution_start" in ts else None

    @property
    def outputs(self) -> dict:
        """``{node_id: ui_dict}`` from /history."""
        return self.history.get("outputs", {})

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    @property
    def error(self) -> dict | None:
        """The ``execution_error`` data (exception_message, exception_type, traceback, node_id, …)."""
        errs = self.of_type("execution_error")
        return errs[-1] if errs else None

    @property
    def progress(self) -> list[dict]:
        """``progress`` messages: ``{"value", "max", "prompt_id", "node"}``."""
        return self.of_type("progress")

    @property
    def progress_text(self) -> list[tuple[str, str]]:
        """``(node_id, text)`` from binary progress_text frames (type 3) during this prompt."""
        return [(m["data"]["node"], m["data"]["text"]) for m in self.messages if m["type"] == "progress_text"]

    @property
    def executed_nodes(self) -> list[str]:
        """Node ids in the order ``executing`` announced them (nodes that really ran)."""
        return [d["node"] for d in self.of_type("executing") if d.get("node") is not None]

    @property
    def cached_nodes(self) -> list[str]:
        return [n for d in self.of_type("execution_cached") for n in d.get("nodes", [])]

    def __str__(self) -> str:
        err = self.error
        extra = f": {err.get('exception_type')}: {err.get('exception_message')}" if err else ""
        return f"RunResult({self.prompt_id}, {self.status}{extra}, {len(self.messages)} msgs, {self.elapsed:.1f}s)"


class ComfyServer:
    """A ComfyUI server in a temp dir, with the pack symlinked into ``custom_nodes/``.

    Attributes: ``root`` (temp base dir), ``url`` (http://127.0.0.1:PORT), ``port``,
    ``custom_nodes_dir``, ``pack_dir`` (the symlink), ``user_dir``, ``output_dir``,
    ``temp_dir``, ``input_dir``, ``models`` (``{"checkpoints"|"clip_vision"|"diffusers"|"LLM"|
    "loras"|"creative_concepts"|"creative_embeds": Path}``: drop model files there before queuing), ``extra_paths_yaml``,
    ``log_path``, ``client_id``, ``startup_seconds``.
    """

    def __init__(self, root: Path, comfyui: Path | None = None, python: str | None = None,
                 extra_args: list[str] | None = None, pack_source: Path = REPO,
                 extra_packs: dict[str, Path] | None = None, share_from: "ComfyServer | None" = None):
        """``extra_packs``: ``{dir_name: source}`` more custom node packs to symlink next to ours
        (test-only helpers). ``share_from``: another server whose model folders and output dir
        this one uses (a second process over the same files; user/temp/custom_nodes stay its own)."""
        self.root = Path(root)
        self.comfyui = Path(comfyui or comfyui_dir())
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.extra_args = list(extra_args or [])
        self.custom_nodes_dir = self.root / "custom_nodes"
        self.pack_dir = self.custom_nodes_dir / PACK_DIR_NAME
        self.user_dir = self.root / "user"
        self.output_dir = share_from.output_dir if share_from else self.root / "output"
        self.temp_dir = self.root / "temp"
        self.input_dir = self.root / "input"
        self.models = dict(share_from.models) if share_from else {
            name: self.root / "models" / name for name in MODEL_FOLDERS}
        self.extra_paths_yaml = self.root / "extra_model_paths.yaml"
        self.log_path = self.root / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = 0.0
        self._http = requests.Session()
        self._ws = None
        self._ws_thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._messages: list[dict] = []  # every ws message, in arrival order
        self._current_prompt: str | None = None
        self._log_file = None

        for d in (self.custom_nodes_dir, self.user_dir, self.output_dir, self.temp_dir, self.input_dir,
                  *self.models.values()):
            d.mkdir(parents=True, exist_ok=True)
        if not self.pack_dir.exists():
            self.pack_dir.symlink_to(Path(pack_source).resolve(), target_is_directory=True)
        for dir_name, source in (extra_packs or {}).items():
            link = self.custom_nodes_dir / dir_name
            if not link.exists():
                link.symlink_to(Path(source).resolve(), target_is_directory=True)
        lines = ["creative_generation_tests:", f"  base_path: {json.dumps(str(self.root))}", "  is_default: true",
                 "  custom_nodes: custom_nodes"]
        lines += [f"  {name}: {json.dumps(str(path))}" for name, path in self.models.items()]
        self.extra_paths_yaml.write_text("\n".join(lines) + "\n")

    # ---- lifecycle

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        """Start ``main.py`` and block until ``/system_stats`` answers (RuntimeError with the
        log tail if the process exits or the timeout passes). Retries once on a port clash."""
        for attempt in range(2):
            self._spawn()
            try:
                self._wait_ready(timeout)
                break
            except RuntimeError:
                if attempt == 0 and self.proc.poll() is not None and "address already in use" in self.log_text().lower():
                    continue
                self.stop()
                raise
        self._connect_ws()
        return self

    def _spawn(self) -> None:
        server = headless()
        self.port = server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*server.server_command(self.port, self.extra_paths_yaml, self.output_dir, self.temp_dir,
                                      self.input_dir, self.user_dir, cpu=True, python=self.python), *self.extra_args]
        env = server.server_env()
        if self._log_file:
            self._log_file.close()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if self._http.get(self.url + "/system_stats", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - self._t0
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"ComfyUI not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
            self._ws = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if self._ws_thread is not None:
            self._ws_thread.join(5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_times(self) -> dict[str, tuple[float, bool]]:
        """The "Import times for custom nodes" block: ``{module_path: (seconds, imported_ok)}``."""
        out, inside = {}, False
        for line in self.log_text().splitlines():
            if "Import times for custom nodes:" in line:
                inside, out = True, {}
                continue
            if inside:
                s = line.strip()
                if " seconds" not in s or ": " not in s:
                    if out:
                        inside = False
                    continue
                head, path = s.split(": ", 1)
                try:
                    secs = float(head.split()[0])
                except ValueError:
                    continue
                out[path.strip()] = (secs, "IMPORT FAILED" not in head)
        return out

    # ---- HTTP

    def get(self, path: str, **kw) -> requests.Response:
        return self._http.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, json_body: Any = None, **kw) -> requests.Response:
        return self._http.post(self.url + path, json=json_body, timeout=kw.pop("timeout", 30), **kw)

    def get_json(self, path: str) -> Any:
        r = self.get(path)
        r.raise_for_status()
        return r.json()

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all node types) or ``/object_info/<class>`` (``{class: info}``)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def submit(self, api_prompt: dict, extra_data: dict | None = None) -> requests.Response:
        """Raw ``POST /prompt`` with this client's id (so its ws gets the execution messages)."""
        body = {"prompt": api_prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        return self.post("/prompt", body)

    def post_prompt(self, api_prompt: dict, extra_data: dict | None = None) -> str | dict:
        """Queue an API-format prompt. Returns the ``prompt_id`` (str) when accepted, or the
        400 body (dict: ``{"error": {...}, "node_errors": {...}}``) when validation rejects it."""
        r = self.submit(api_prompt, extra_data)
        if r.status_code == 400:
            return r.json()
        r.raise_for_status()
        return r.json()["prompt_id"]

    def run(self, api_prompt: dict, timeout: float = 120.0) -> RunResult:
        """``post_prompt`` + ``wait``; AssertionError with the 400 body if validation fails."""
        pid = self.post_prompt(api_prompt)
        if isinstance(pid, dict):
            raise AssertionError(f"prompt rejected: {json.dumps(pid, indent=1)[:4000]}")
        return self.wait(pid, timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """``POST /interrupt`` (global, or only if ``prompt_id`` is the running prompt)."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()

    def history(self, prompt_id: str) -> dict:
        """``/history/<id>`` entry for the prompt, ``{}`` while it is not written yet."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def queue(self) -> dict:
        return self.get_json("/queue")

    # ---- websocket

    def _connect_ws(self) -> None:
        import websocket  # websocket-client

        self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                               timeout=10)
        self._ws.settimeout(None)
        self._ws_thread = threading.Thread(target=self._ws_reader, name="comfy-ws", daemon=True)
        self._ws_thread.start()

    def _ws_reader(self) -> None:
        import websocket

        ws = self._ws
        while True:
            try:
                opcode, data = ws.recv_data()
            except Exception:
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            now = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_TEXT:
                try:
                    msg = json.loads(data)
                except ValueError:
                    continue
                d = msg.get("data") if isinstance(msg.get("data"), dict) else {}
                if msg.get("type") == "execution_start":
                    self._current_prompt = d.get("prompt_id")
                msg["prompt_id"] = d.get("prompt_id")
            elif opcode == websocket.ABNF.OPCODE_BINARY and len(data) >= 4:
                (event,) = struct.unpack(">I", data[:4])
                payload = data[4:]
                if event == BINARY_TEXT and len(payload) >= 4:
                    (n,) = struct.unpack(">I", payload[:4])
                    node = payload[4:4 + n].decode("utf-8", "replace")
                    text = payload[4 + n:].decode("utf-8", "replace")
                    msg = {"type": "progress_text", "data": {"node": node, "text": text},
                           "prompt_id": self._current_prompt}
                else:  # previews (types 1, 2, 4): keep the raw bytes
                    msg = {"type": f"binary_{event}", "data": {"event": event, "bytes": bytes(payload)},
                           "prompt_id": self._current_prompt}
            else:
                continue
            msg["t"] = now
            with self._cond:
                self._messages.append(msg)
                self._cond.notify_all()

    def messages(self, prompt_id: str | None = None) -> list[dict]:
        """Websocket messages received so far (all, or those of one prompt)."""
        with self._cond:
            return [m for m in self._messages if prompt_id is None or m.get("prompt_id") == prompt_id]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> RunResult:
        """Wait until the prompt ends (``execution_success``/``_error``/``_interrupted`` on the
        ws, or its /history entry completes), then return its messages and /history entry.
        ``status`` is "timeout" if neither happens within ``timeout`` seconds."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        status = "timeout"
        next_poll = t0 + 1.0
        while time.monotonic() < deadline:
            with self._cond:
                ended = [m for m in self._messages if m.get("prompt_id") == prompt_id and m["type"] in TERMINAL_EVENTS]
                if not ended:
                    self._cond.wait(0.1)
            if ended:
                status = ended[-1]["type"].split("_", 1)[1]
                break
            if time.monotonic() >= next_poll:  # ws fallback: a prompt can end without us seeing it
                next_poll = time.monotonic() + 1.0
                h = self.history(prompt_id)
                st = h.get("status") or {}
                if st.get("completed") or st.get("status_str") == "error":
                    status = _status_from_history(st)
                    break
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (code {self.proc.returncode}) while running {prompt_id}:\n"
                                   f"{self.log_tail()}")
        # History race: execution_success arrives before /history is written.
        hist: dict = {}
        if status != "timeout":
            end = time.monotonic() + 10
            while time.monotonic() < end:
                hist = self.history(prompt_id)
                if hist.get("status", {}).get("completed") is not None or hist.get("status", {}).get("status_str"):
                    break
                time.sleep(0.05)
        else:
            hist = self.history(prompt_id)
        return RunResult(prompt_id, status, self.messages(prompt_id), hist, time.monotonic() - t0)


def _status_from_history(st: dict) -> str:
    if st.get("status_str") == "success":
        return "success"
    kinds = [m[0] for m in st.get("messages", []) if isinstance(m, (list, tuple)) and m]
    return "interrupted" if "execution_interrupted" in kinds else "error"
