"""The MLLM judge across families, its vision check, its answer cache and its refusal of remote code.

Every family is a tiny random model built from its transformers config and saved with the
family's chat template and special tokens, then loaded through ``load_mllm`` like a download.
The hand computation writes each family's prompt layout out literally (image tokens expanded
by hand), runs the family's image processor and a full forward, and pools yes/no itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from creative_generation.nodes.engine.mllm import (
    FAMILIES,
    PROBE_COLOURS,
    PROBE_QUESTION,
    MLLMJudge,
    MLLMVisionError,
    load_mllm,
    pixel_sha256,
    to_uint8,
    transformers_too_old,
)
from creative_generation.nodes.testbed.tiny import mllm as tiny
from PIL import Image

QUESTION = "Is this still a dog? Yes or No."
SIDE = 64  # square test images keep each family's image-token count simple to write down


def _has(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def _torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


# family -> (builder, what its processor needs beyond transformers, or "" when nothing)
BUILDS = {
    "llava_next": (tiny.build_tiny_llava_next, ""),
    "qwen2_vl": (tiny.build_tiny_qwen2_vl, "" if _torchvision() else "torchvision (its video processor)"),
    "qwen2_5_vl": (tiny.build_tiny_qwen2_5_vl, "" if _torchvision() else "torchvision (its video processor)"),
    "janus": (tiny.build_tiny_janus, ""),
    "idefics3": (tiny.build_tiny_idefics3, ""),
    "smolvlm": (tiny.build_tiny_smolvlm,
                "" if _torchvision() and _has("num2words") else "torchvision and num2words (its processor)"),
}

JANUS_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                "the user provides, and assist the user with a variety of tasks using natural language.\n\n")


def _idefics3_image(n: int) -> str:
    """A 64 px image at 32 px tiles: 2x2 tiles, then the global view; ``n`` image tokens each."""
    tiles = "".join("".join(f"<fake_token_around_image><row_{r}_col_{c}>" + "<image>" * n for c in (1, 2)) + "\n"
                    for r in (1, 2))
    return tiles + "\n<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>"


# The prompt each family's released template + processor produce for one 64 px image, by hand.
LAYOUTS = {
    # 16 base tokens (4x4 patches of the 32 px view) + a 2x2 grid of 32 px crops = 8x8 features,
    # plus one newline token per feature row: 16 + 64 + 8 = 88.
    "llava_next": lambda q: "<s>USER: " + "<image>" * 88 + "\n" + q + " ASSISTANT:",
    # 64 px is shrunk to 32 px (max_pixels), 8x8 patches of 4 px, merged 2x2: 16 tokens.
    "qwen2_vl": lambda q: ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>" + q
                           + "<|im_end|>\n<|im_start|>assistant\n"),
    # Fixed 16 tokens (32 px / 8 px patches) between begin/end of image; default system prompt on.
    "janus": lambda q: ("<\uff5cbegin\u2581of\u2581sentence\uff5c>" + JANUS_SYSTEM + "<|User|>: <begin_of_image>"
                        + "<image_placeholder>" * 16 + "<end_of_image>\n" + q + "\n\n<|Assistant|>:"),
    # 4x4 patches per 32 px tile, pixel-shuffled by 2: 4 tokens per tile.
    "idefics3": lambda q: "<|begin_of_text|>User:" + _idefics3_image(4) + q + "<end_of_utterance>\nAssistant:",
    "smolvlm": lambda q: "<|im_start|>User:" + _idefics3_image(4) + q + "<end_of_utterance>\nAssistant:",
}
LAYOUTS["qwen2_5_vl"] = LAYOUTS["qwen2_vl"]
M_ROPE = ("qwen2_vl", "qwen2_5_vl")

NAMES = {"llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "janus": "Janus",
         "idefics3": "Idefics3", "smolvlm": "SmolVLM"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mllm_families")


@pytest.fixture(scope="module", params=sorted(BUILDS))
def family(request, root) -> tuple[str, Path]:
    build, missing = BUILDS[request.param]
    missing = transformers_too_old(FAMILIES[request.param]) or missing
    if missing:
        pytest.skip(f"{request.param}: transformers needs {missing}")
    return request.param, build(root / request.param, seed=0)


@pytest.fixture(scope="module")
def judge(family) -> MLLMJudge:
    return load_mllm(str(family[1]))


def square(seed: int) -> np.ndarray:
    """A 64 px noise image, 8-bit like everything the judge sees."""
    image = torch.rand(SIDE, SIDE, 3, generator=torch.Generator().manual_seed(seed))
    return to_uint8(image)


def plain(colour: str, side: int = SIDE) -> np.ndarray:
    """The vision check's plain image, built the way ``check_vision`` builds it."""
    return to_uint8(torch.tensor(PROBE_COLOURS[colour]).expand(side, side, 3))


def by_hand(judge: MLLMJudge, pixels: np.ndarray, model_type: str) -> tuple[torch.Tensor, float]:
    """Token ids and P(yes) from the hand-written prompt, the image processor and a full forward."""
    processor, model = judge.processor, judge.model
    text = processor.tokenizer(LAYOUTS[model_type](QUESTION), add_special_tokens=False, return_tensors="pt")
    if model_type in M_ROPE:  # 3-D positions for the image tokens, 1-D for the text
        text["mm_token_type_ids"] = (text["input_ids"] == model.config.image_token_id).long()
    vision = processor.image_processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    vision = {key: value for key, value in vision.items() if key not in ("rows", "cols")}
    with torch.no_grad():
        logits = model(**text, **vision).logits[0, -1].double()
    token = processor.tokenizer.convert_tokens_to_ids
    yes, no = logits[token(["Yes", "yes"])].logsumexp(0), logits[token(["No", "no"])].logsumexp(0)
    return text["input_ids"][0], float(torch.stack([yes, no]).softmax(0)[0])


def test_loads_natively_as_its_family(judge, family):
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = family[0]
    assert judge.family.name == NAMES[model_type] and FAMILIES[model_type] is judge.family
    # transformers' own class through AutoModelForImageTextToText (Janus too), no remote code
    assert type(judge.model).__name__ == MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
    assert type(judge.model).__module__.startswith(f"transformers.models.{model_type}.")


def test_prompt_has_the_family_layout(judge, family):
    pixels = square(3)
    ids, _ = by_hand(judge, pixels, family[0])
    got = judge.inputs(Image.fromarray(pixels), QUESTION)["input_ids"][0]
    assert got.tolist() == ids.tolist(), judge.processor.tokenizer.decode(got)
    assert judge.processor.tokenizer.unk_token_id not in got[-4:]  # the prompt ends on the family's own tokens


def test_p_yes_equals_the_hand_computation(judge, family):
    for seed in (4, 5):
        pixels = square(seed)
        _, expected = by_hand(judge, pixels, family[0])
        got = judge.p_yes(torch.from_numpy(pixels)[None].float() / 255, QUESTION)
        assert float(got[0]) == pytest.approx(expected, abs=1e-6)


def test_image_and_question_reach_the_model(judge):
    batch = torch.from_numpy(np.stack([square(6), square(7)])).float() / 255
    p = judge.p_yes(batch, QUESTION)
    assert abs(float(p[0] - p[1])) > 1e-6
    assert float(judge.p_yes(batch[:1], "Is this still a cat? Yes or No.")) != float(p[0])


def test_odd_sized_image(judge):
    batch = torch.rand(1, 70, 33, 3, generator=torch.Generator().manual_seed(8))
    assert 0.0 <= float(judge.p_yes(batch, QUESTION)) <= 1.0


def test_a_random_model_fails_the_vision_check(judge):
    check = judge.check_vision()
    assert set(check.p_yes) == {(s, a) for s in PROBE_COLOURS for a in PROBE_COLOURS}
    assert not check.sees
    with pytest.raises(MLLMVisionError, match="cannot see images") as error:
        check.raise_if_blind()
    assert error.value.check is check


# ---------------------------------------------------------------- vision check, on one family


@pytest.fixture(scope="module")
def llava(root) -> Path:
    return tiny.build_tiny_llava_next(root / "llava_vision", seed=0)


def rig_to_see_colour(judge: MLLMJudge) -> None:
    """Set the yes/no rows of the LM head so that the answer follows the picture's colour.

    The last hidden state already depends on image and question; a least-squares direction
    ``d`` over the four probes makes yes - no = h . d = +-6 (agree / disagree). The head is
    untied from the input embeddings here, so the hidden states themselves do not move.
    """
    head = judge.model.get_output_embeddings()  # lm_head sits elsewhere in transformers 4.5x
    assert head.weight.data_ptr() != judge.model.get_input_embeddings().weight.data_ptr()
    states: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: states.append(args[0][0, -1].double()))
    probes = [(shown, asked) for shown in PROBE_COLOURS for asked in PROBE_COLOURS]
    for shown, asked in probes:
        judge.next_token_logits(Image.fromarray(plain(shown)), PROBE_QUESTION.format(colour=asked))
    hook.remove()
    target = torch.tensor([[6.0 if shown == asked else -6.0] for shown, asked in probes], dtype=torch.float64)
    direction = torch.linalg.lstsq(torch.stack(states), target).solution[:, 0].float()
    with torch.no_grad():
        head.weight[judge.yes_ids] = direction / 2
        head.weight[judge.no_ids] = -direction / 2


def test_load_with_sanity_check_refuses_a_blind_model(llava):
    with pytest.raises(MLLMVisionError) as error:
        load_mllm(str(llava), sanity_check=True)
    message = str(error.value)
    assert "cannot see images" in message and "plain red image" in message and "plain blue image" in message
    for p in error.value.check.p_yes.values():
        assert f"P(yes) = {p:.3f}" in message
    assert isinstance(error.value, ValueError)  # reported like every other unusable-model refusal


def test_a_model_that_sees_colour_passes(llava, tmp_path):
    judge = load_mllm(str(llava))
    rig_to_see_colour(judge)
    check = judge.check_vision()
    assert check.sees, check.describe()
    assert check.p_yes[("red", "red")] > 0.99 and check.p_yes[("red", "blue")] < 0.01
    check.raise_if_blind()  # no error
    saved = Path(shutil.copytree(llava, tmp_path / "sees"))
    judge.model.save_pretrained(saved, safe_serialization=True)
    reloaded = load_mllm(str(saved), sanity_check=True)
    assert reloaded.check_vision() == check


# ---------------------------------------------------------------- cache and history


def count_forwards(judge: MLLMJudge) -> list[int]:
    calls = [0]
    judge.model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_answers_are_cached_by_pixels_and_question(llava):
    judge = load_mllm(str(llava))
    calls = count_forwards(judge)
    a, b = square(10), square(11)
    batch = torch.from_numpy(np.stack([a, b, a])).float() / 255
    first = judge.p_yes(batch, QUESTION)
    assert calls[0] == 2 and first[0] == first[2]
    again = judge.p_yes(batch, QUESTION)
    assert calls[0] == 2 and torch.equal(first, again)
    judge.p_yes(batch[:1], "Is this still a cat? Yes or No.")
    assert calls[0] == 3
    fresh = load_mllm(str(llava))  # another judge computes, and agrees
    assert torch.equal(fresh.p_yes(batch, QUESTION), first)


def test_history_logs_every_answer(llava):
    judge = load_mllm(str(llava))
    pixels = square(12)
    image = torch.from_numpy(pixels)[None].float() / 255
    p = float(judge.p_yes(image, QUESTION))
    judge.p_yes(image, QUESTION)
    entry = {"question": QUESTION, "image_sha256": pixel_sha256(pixels), "p_yes": p}
    assert list(judge.history) == [{**entry, "cached": False}, {**entry, "cached": True}]


def test_answer_cache_and_history_stay_bounded(llava, monkeypatch):
    """A judge ComfyUI keeps cached on a long-running server: its answers and history keep the newest only
    (the answer cache drops the least recently used answer; one asked again counts as used)."""
    from creative_generation.nodes.engine import mllm

    monkeypatch.setattr(mllm, "ANSWER_CACHE_LIMIT", 2)
    monkeypatch.setattr(mllm, "HISTORY_LIMIT", 3)
    judge = load_mllm(str(llava))
    images = {seed: torch.from_numpy(square(seed))[None].float() / 255 for seed in (20, 21, 22)}

    def ask(seed: int) -> bool:
        """Asks about image ``seed``; whether the answer came from the cache."""
        judge.p_yes(images[seed], QUESTION)
        return judge.history[-1]["cached"]

    assert [ask(20), ask(21), ask(20)] == [False, False, True]
    assert ask(22) is False  # evicts 21, the least recently used
    assert [ask(20), ask(22), ask(21)] == [True, True, False]
    assert len(judge.history) == 3 and [h["cached"] for h in judge.history] == [True, True, False]


def test_pixel_hash_sees_every_pixel_and_the_shape():
    pixels = square(13)
    changed = pixels.copy()
    changed[5, 7, 1] ^= 1
    assert pixel_sha256(pixels) == pixel_sha256(pixels.copy()) != pixel_sha256(changed)
    assert pixel_sha256(pixels.reshape(32, 128, 3)) != pixel_sha256(pixels)
    # float inputs that round to the same 8 bits are the same image to the model, and to the cache
    image = torch.from_numpy(pixels).float() / 255
    assert pixel_sha256(to_uint8(image + 1e-4)) == pixel_sha256(pixels)


# ---------------------------------------------------------------- remote code


def test_remote_code_is_not_run_without_trust(tmp_path):
    """A folder whose config points at its own Python: refused, and the Python never imported."""
    marker = tmp_path / "ran"
    (tmp_path / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_vlm'\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil_vlm",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForImageTextToText": "modeling_evil.EvilModel"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json could not be read"):
        load_mllm(str(tmp_path))
    assert not marker.exists()


def test_deepseeks_original_janus_layout_gets_a_way_out(tmp_path):
    """deepseek-ai/Janus-1.3B's config.json (abridged): model_type "multi_modality", no auto_map."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality",
                                                      "language_config": {"model_type": "llama"}}))
    with pytest.raises(ValueError, match="janus.*deepseek-community/Janus-Pro-1B"):
        load_mllm(str(tmp_path), trust_remote_code=True)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json could not be read"):
        load_mllm(str(tmp_path))


# ---------------------------------------------------------------- folders a user may have


@pytest.mark.transformers5  # builds the old layout from transformers 5's nested processor_config.json
def test_a_llava_next_snapshot_without_processor_config_is_refused_at_load(llava, tmp_path):
    """Older llava-hf snapshots: the image processor in preprocessor_config.json, no processor_config.json
    (patch_size). transformers loads it, and the first question failed with a TypeError on patch_size."""
    folder = shutil.copytree(llava, tmp_path / "llava-no-processor-config")
    processor = json.loads((folder / "processor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"]))
    (folder / "processor_config.json").unlink()
    with pytest.raises(ValueError, match="LLaVA-NeXT model needs processor_config.json"):
        load_mllm(str(folder))


def test_a_tokenizer_transformers_cannot_build_is_refused_naming_the_file(llava, tmp_path):
    """Only an XLM-R style sentencepiece.bpe.model: transformers' message was about tiktoken."""
    folder = shutil.copytree(llava, tmp_path / "llava-spm-only")
    (folder / "tokenizer.json").unlink()
    (folder / "sentencepiece.bpe.model").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"no tokenizer file .*needs tokenizer\.json .*found sentencepiece\.bpe\.model"):
        load_mllm(str(folder))
