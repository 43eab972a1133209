"""Run a workflow file on a real, headless ComfyUI server with this pack loaded.

Nothing here imports ComfyUI: the server is a separate ``main.py`` process (the pack symlinked
into a private ``custom_nodes/``), driven over HTTP the way the frontend drives it. The UI
workflow is converted to the API format against the live ``/object_info`` with comfy-cli's
converter (the frontend's own rules), so a saved workflow runs exactly as a user would queue it.
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

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "creative_generation"


class WorkflowError(RuntimeError):
    """The server refused or failed the prompt; the message says which node and why."""


def default_comfyui() -> Path:
    """``$COMFYUI_DIR`` or the repo's ``.comfyui`` (made by ``bash .ci/setup-env``)."""
    return Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadlessComfy:
    """A ComfyUI server for one job: private custom_nodes/user/temp dirs, a given output dir."""

    def __init__(self, output_dir: Path, comfyui: Path | None = None, cpu: bool | None = None,
                 log_path: Path | None = None) -> None:
        self.comfyui = Path(comfyui or default_comfyui())
        if not (self.comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.comfyui}: run `bash .ci/setup-env` (it installs one into "
                                    ".comfyui/) or set COMFYUI_DIR to your ComfyUI folder.")
        self.output_dir = Path(output_dir).resolve()
        self.cpu = cpu
        self.log_path = Path(log_path or self.output_dir / "comfyui.log").resolve()
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="creative-headless-")

    def __enter__(self) -> HeadlessComfy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300.0) -> None:
        base = Path(self._scratch.name)
        custom_nodes = base / "custom_nodes"
        for sub in ("custom_nodes", "temp", "input", "user"):
            (base / sub).mkdir()
        (custom_nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        paths = base / "extra_model_paths.yaml"
        paths.write_text(f"creative_headless:\n  base_path: {json.dumps(str(base))}\n  custom_nodes: custom_nodes\n")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(paths), "--output-directory", str(self.output_dir),
               "--temp-directory", str(base / "temp"), "--input-directory", str(base / "input"),
               "--user-directory", str(base / "user"), "--disable-auto-launch", "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:",
               # only this pack: another copy of it, or other packs in the user's ComfyUI, cannot interfere
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME]
        if self.cpu if self.cpu is not None else not _has_cuda():
            cmd.append("--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
        env.pop("PYTHONPATH", None)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
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

    def _get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def _post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise WorkflowError(f"the server refused the workflow: {_node_errors(json.loads(err.read()))}") from None

    def to_api(self, workflow: dict) -> dict:
        """The UI workflow as an API prompt, converted against this server's node definitions."""
        from comfy_cli.workflow_to_api import convert_ui_to_api

        return convert_ui_to_api(workflow, self._get("/object_info"))

    def run(self, prompt: dict, timeout: float = 1800.0, report=print) -> dict:
        """Queue an API prompt and wait for it; returns its /history entry (outputs per node)."""
        prompt_id = self._post("/prompt", {"prompt": prompt})["prompt_id"]
        t0, shown = time.monotonic(), 0.0
        while time.monotonic() - t0 < timeout:
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                if status.get("status_str") != "success":
                    raise WorkflowError(_execution_error(status))
                return entry
            if self._proc.poll() is not None:
                raise WorkflowError(f"ComfyUI died while running the workflow:\n{self.log_tail()}")
            if time.monotonic() - shown > 15:
                shown = time.monotonic()
                report(f"  ... running ({shown - t0:.0f} s)")
            time.sleep(0.25)
        raise WorkflowError(f"the workflow did not finish within {timeout:.0f} s")


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
