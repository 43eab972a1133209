"""Fixtures that run the pack inside a real ComfyUI (see comfy_harness.py for the machinery).

Everything here is skipped with a clear reason when ComfyUI is absent (no ``.comfyui``; run
``bash .ci/setup-env`` or set ``COMFYUI_DIR``), so the engine tests still run anywhere; with
``CI=true`` a missing ComfyUI fails instead (setup-env must have provided it).

Fixtures (all session-scoped, built on first use):

* ``comfy_inprocess`` -> SimpleNamespace of ComfyUI imported in-process with ``args.cpu = True``:
  ``.dir``, ``.args``, ``.comfy``, ``.comfy_utils``, ``.model_management``, ``.folder_paths``,
  ``.nodes``, ``.io``, ``.ui``, ``.ComfyExtension``; output/temp/input/user dirs point at a
  session temp dir.
* ``pack_nodes`` -> ``{node_id: V3 class}`` from the pack's ``comfy_entrypoint()``
  extension's ``get_node_list()`` (imports ComfyUI in-process first).
* ``comfy_server`` -> a started :class:`comfy_harness.ComfyServer` (one per session) on
  127.0.0.1 with the pack symlinked as ``custom_nodes/creative_generation`` and the test-only
  pack ``test_support_pack/`` as ``custom_nodes/creative_generation_test_support``. Use
  ``.post_prompt(api) -> prompt_id | 400-body dict``, ``.wait(prompt_id, timeout) ->
  RunResult``, ``.run(api)``, ``.interrupt()``, ``.object_info()``, ``.history(id)``,
  ``.log_text()``, ``.import_times()``; model folders ``.models["checkpoints" | "clip_vision" |
  "diffusers" | "LLM" | "loras"]``, ``.output_dir``, ``.input_dir``, ``.user_dir``.
* ``comfyui_available`` -> nothing; skips (fails under CI) without a ComfyUI, for tests whose
  code under test starts its own server (the main job).
* ``object_info`` -> the server's ``/object_info`` (fetched once).
* ``ui_to_api`` -> ``f(workflow_dict) -> api_prompt`` converting a UI workflow with the
  server's object_info (comfy-cli's ``convert_ui_to_api``).
* ``tiny_models`` -> :class:`example_models.TinyModels`: tiny stand-in models built once per
  session, straight into ``comfy_server``'s model folders (``.install(server, model) -> name``,
  ``.path(model)``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works under any --import-mode
import comfy_harness  # noqa: E402

_MISSING = comfy_harness.comfyui_missing_reason()
SUPPORT_PACK = Path(__file__).resolve().parent / "test_support_pack"
SUPPORT_PACK_DIR_NAME = "creative_generation_test_support"


def _require_comfyui():
    if _MISSING:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            # .ci/run always runs setup-env first: a missing ComfyUI there is a broken setup,
            # not a reason to skip the integration tests silently.
            pytest.fail(_MISSING, pytrace=False)
        pytest.skip(_MISSING)


@pytest.fixture(scope="session")
def comfyui_available():
    """Skip (or, under CI, fail) when there is no ComfyUI to start: for tests that start their own."""
    _require_comfyui()


@pytest.fixture(scope="session")
def comfy_inprocess(tmp_path_factory):
    _require_comfyui()
    return comfy_harness.import_comfy(tmp_path_factory.mktemp("comfy_inprocess"))


@pytest.fixture(scope="session")
def pack_nodes(comfy_inprocess):
    return comfy_harness.pack_node_classes()


@pytest.fixture
def run(pack_nodes, comfy_inprocess):
    """``run(node_id, **inputs)`` -> outputs tuple, executed like ComfyUI's executor does (hidden id ``test-<id>``)."""
    return lambda node_id, **inputs: comfy_harness.execute_node(pack_nodes[node_id], f"test-{node_id}", **inputs)


@pytest.fixture
def progress_log(comfy_inprocess):
    """Every ProgressBar update in this process: ``(node_id, value, total)``."""
    utils = comfy_inprocess.comfy_utils
    seen: list[tuple] = []
    old = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((node_id, value, total)))
    yield seen
    utils.set_progress_bar_global_hook(old)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    _require_comfyui()
    server = comfy_harness.ComfyServer(tmp_path_factory.mktemp("comfy_server"),
                                       extra_packs={SUPPORT_PACK_DIR_NAME: SUPPORT_PACK})
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="session")
def ui_to_api(object_info):
    try:
        import comfy_cli.workflow_to_api  # noqa: F401
    except ImportError as e:  # pragma: no cover - setup-env installs it
        pytest.skip(f"comfy-cli not installed ({e}); run `bash .ci/setup-env`")

    def convert(workflow: dict) -> dict:
        return comfy_harness.ui_to_api(workflow, object_info)

    return convert


@pytest.fixture(scope="session")
def tiny_models(comfy_server, comfy_inprocess):
    import example_models

    return example_models.TinyModels(comfy_server.models)
