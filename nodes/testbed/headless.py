"""Run workflows on real, headless ComfyUI servers with this pack loaded: one, or several at once.

Nothing here imports ComfyUI: a server is a separate ``main.py`` process (the pack symlinked
into a private ``custom_nodes/``), driven over HTTP the way the frontend drives it. The UI
workflow is converted to the API format against the live ``/object_info`` with comfy-cli's
converter (the frontend's own rules), so a saved workflow runs exactly as a user would queue it.

One ComfyUI server per GPU is how ComfyUI scales: :func:`run_spread` hands independent prompts
to whichever of several servers (started here, :class:`HeadlessComfy`, or already running
elsewhere, :class:`ComfyClient`) is free, through each server's own ``POST /prompt`` queue, and
returns every prompt's ``/history`` entry in the order given. The test harness starts its
servers with the same command line (:func:`server_command`, :func:`server_env`, :func:`free_port`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "creative_generation"


class WorkflowError(RuntimeError):
    """The server refused or failed the prompt; the message says which node and why."""


def default_comfyui() -> Path:
    """``$COMFYUI_DIR`` or the repo's ``.comfyui`` (made by ``bash .ci/setup-env``)."""
    return Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, extra_model_paths: Path, output: Path, temp: Path, input_dir: Path, user: Path, *,
                   cpu: bool, python: str = sys.executable) -> list[str]:
    """ComfyUI's ``main.py`` on 127.0.0.1:``port`` with private folders, offline, no browser, no API nodes."""
    cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port),
           "--extra-model-paths-config", str(extra_model_paths), "--output-directory", str(output),
           "--temp-directory", str(temp), "--input-directory", str(input_dir), "--user-directory", str(user),
           "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    return cmd + ["--cpu"] * cpu


def server_env(threads: int | None = None) -> dict[str, str]:
    """The environment a server runs in: offline Hugging Face, no telemetry; ``threads`` caps torch's CPU threads
    (several servers sharing one machine's cores)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class ComfyClient:
    """A running ComfyUI server reached over HTTP: queue API prompts, read their results from ``/history``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def check_alive(self) -> None:
        """Raise :class:`WorkflowError` when the server is known to be gone (a remote one is trusted)."""

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def _post(self, path: str, body: dict) -> Any:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise WorkflowError(f"{self.url} refused the workflow: {_node_errors(json.loads(err.read()))}") from None

    def to_api(self, workflow: dict) -> dict:
        """The UI workflow as an API prompt, converted against this server's node definitions."""
        from comfy_cli.workflow_to_api import convert_ui_to_api

        return convert_ui_to_api(workflow, self._get("/object_info"))

    def queue(self, prompt: dict) -> str:
        """``POST /prompt``: the prompt joins the server's queue; returns its id."""
        return self._post("/prompt", {"prompt": prompt})["prompt_id"]

    def finished(self, prompt_id: str) -> dict | None:
        """The prompt's ``/history`` entry once it succeeded, None while it waits or runs; raises if it failed."""
        entry = self._get(f"/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("completed") or status.get("status_str") == "error":
            if status.get("status_str") != "success":
                raise WorkflowError(f"{self.url}: {_execution_error(status)}")
            return entry
        self.check_alive()
        return None

    def run(self, prompt: dict, timeout: float = 1800.0, report=print) -> dict:
        """Queue an API prompt and wait for it; returns its /history entry (outputs per node)."""
        prompt_id = self.queue(prompt)
        t0, shown = time.monotonic(), 0.0
        while time.monotonic() - t0 < timeout:
            if (entry := self.finished(prompt_id)) is not None:
                return entry
            if time.monotonic() - shown > 15:
                shown = time.monotonic()
                report(f"  ... running ({shown - t0:.0f} s)")
            time.sleep(0.25)
        raise WorkflowError(f"the workflow did not finish within {timeout:.0f} s")


def run_spread(servers: list[ComfyClient], prompts: list[dict], timeout: float = 3600.0,
               report=print) -> list[dict]:
    """Run independent API prompts on several servers: each free server gets the next prompt (one at a time, so
    a slow server never holds a queue of its own); returns the /history entries in the order of ``prompts``, each
    with ``"server"`` (its URL) and ``"seconds"`` (queued to finished) added."""
    if not servers:
        raise ValueError("run_spread needs at least one server.")
    waiting, busy = list(enumerate(prompts)), {}  # busy: server index -> (prompt index, prompt id, start)
    results: list[dict] = [{} for _ in prompts]
    t0 = time.monotonic()
    while waiting or busy:
        for s, server in enumerate(servers):
            if s not in busy and waiting:
                i, prompt = waiting.pop(0)
                busy[s] = (i, server.queue(prompt), time.monotonic())
        for s, (i, prompt_id, started) in list(busy.items()):
            if (entry := servers[s].finished(prompt_id)) is not None:
                results[i] = {**entry, "server": servers[s].url, "seconds": time.monotonic() - started}
                report(f"  prompt {i + 1}/{len(prompts)} done on {servers[s].url} ({results[i]['seconds']:.1f} s)")
                del busy[s]
        if time.monotonic() - t0 > timeout:
            raise WorkflowError(f"{len(waiting) + len(busy)} prompts did not finish within {timeout:.0f} s")
        time.sleep(0.25)
    return results


class HeadlessComfy(ComfyClient):
    """A ComfyUI server for one job: private custom_nodes/user/temp dirs, a given output dir.

    ``threads`` caps its CPU threads (OMP_NUM_THREADS), for several servers on one machine.
    """

    def __init__(self, output_dir: Path, comfyui: Path | None = None, cpu: bool | None = None,
                 log_path: Path | None = None, threads: int | None = None) -> None:
        super().__init__("")
        self.comfyui = Path(comfyui or default_comfyui())
        if not (self.comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.comfyui}: run `bash .ci/setup-env` (it installs one into "
                                    ".comfyui/) or set COMFYUI_DIR to your ComfyUI folder.")
        self.output_dir = Path(output_dir).resolve()
        self.cpu = cpu
        self.threads = threads
        self.log_path = Path(log_path or self.output_dir / "comfyui.log").resolve()
        self._proc: subprocess.Popen | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="creative-headless-")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (start several, then :meth:`wait_ready` each)."""
        base = Path(self._scratch.name)
        custom_nodes = base / "custom_nodes"
        for sub in ("custom_nodes", "temp", "input", "user"):
            (base / sub).mkdir()
        (custom_nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        paths = base / "extra_model_paths.yaml"
        paths.write_text(f"creative_headless:\n  base_path: {json.dumps(str(base))}\n  custom_nodes: custom_nodes\n")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = server_command(port, paths, self.output_dir, base / "temp", base / "input", base / "user",
                             cpu=self.cpu if self.cpu is not None else not _has_cuda())
        # only this pack: another copy of it, or other packs in the user's ComfyUI, cannot interfere
        cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, cwd=self.comfyui, env=server_env(self.threads),
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self._proc.returncode}) while starting:\n{self.log_tail()}")
            try:
                self._get("/system_stats")
                return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._scratch.cleanup()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def import_failed(self) -> bool:
        """True when the server's start-up log says our pack failed to import."""
        return any("IMPORT FAILED" in line and PACK_NAME in line
                   for line in self.log_path.read_text(errors="replace").splitlines())

    def check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise WorkflowError(f"ComfyUI at {self.url} died while running the workflow:\n{self.log_tail()}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _node_errors(body: dict) -> str:
    parts = [body.get("error", {}).get("message", "")]
    for node_id, info in (body.get("node_errors") or {}).items():
        parts += [f"node {node_id} ({info.get('class_type')}): {e.get('message')} {e.get('details', '')}".strip()
                  for e in info.get("errors", [])]
    return "; ".join(p for p in parts if p)


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_type')}: "
                    f"{data.get('exception_message')}")
    return f"the workflow ended with status {status.get('status_str')!r}"
