"""The MLLM yes/no judge on tiny random LLaVA-NeXT and Qwen2-VL folders, loaded like real checkpoints."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from creative_generation.nodes.engine.mllm import FAMILIES, MLLMJudge, answer_token_ids, load_mllm, transformers_too_old
from creative_generation.nodes.testbed.tiny.mllm import (
    build_tiny_llava_next,
    build_tiny_qwen2_vl,
    word_tokenizer,
)
from PIL import Image

QUESTION = "Is this still a vehicle? Yes or No."
BUILDERS = {"llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl}


pytestmark = pytest.mark.usefixtures("one_thread")


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mllm")
    built = {"llava_next": build_tiny_llava_next(root / "llava_next", seed=0)}
    # transformers 5's Qwen2VLProcessor needs its torchvision video processor; 4.5x cannot run this judge
    if _torchvision_available() and not transformers_too_old(FAMILIES["qwen2_vl"]):
        built["qwen2_vl"] = build_tiny_qwen2_vl(root / "qwen2_vl", seed=0)
    return built


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, folders) -> str:
    if request.param not in folders:
        pytest.skip(f"{request.param}: {transformers_too_old(FAMILIES[request.param]) or 'needs torchvision'}")
    return request.param


@pytest.fixture(scope="module")
def judge(family, folders) -> MLLMJudge:
    return load_mllm(str(folders[family]))


def images(n: int = 3, size: tuple[int, int] = (48, 40)) -> torch.Tensor:
    """Black, white and noise: inputs no image processor can map to the same pixels."""
    batch = torch.rand(n, *size, 3, generator=torch.Generator().manual_seed(1))
    batch[0] = 0.0
    batch[1:2] = 1.0
    return batch


def by_hand(judge: MLLMJudge, image: torch.Tensor, question: str) -> float:
    """P(yes) without the judge's helpers: template as text, processor call, full forward."""
    processor, model = judge.processor, judge.model
    pil = Image.fromarray((image.numpy() * 255).round().astype(np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[pil], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].double()
    yes = logits[processor.tokenizer.convert_tokens_to_ids(["Yes", "yes"])].logsumexp(0)
    no = logits[processor.tokenizer.convert_tokens_to_ids(["No", "no"])].logsumexp(0)
    return float(torch.stack([yes, no]).softmax(0)[0])


def test_loads_the_family(judge, family):
    assert judge.family.name == {"llava_next": "LLaVA-NeXT", "qwen2_vl": "Qwen2-VL"}[family]
    assert not judge.model.training


def test_p_yes_shape_range_and_determinism(judge, family, folders):
    batch = images(3)
    first = judge.p_yes(batch, QUESTION)
    assert first.shape == (3,) and first.dtype == torch.float32
    assert ((first >= 0) & (first <= 1)).all()
    assert torch.equal(load_mllm(str(folders[family])).p_yes(batch, QUESTION), first)  # a fresh judge, no cache


def test_p_yes_equals_an_independent_computation(judge):
    batch = images(2)
    got = judge.p_yes(batch, QUESTION)
    for image, p in zip(batch, got):
        assert float(p) == pytest.approx(by_hand(judge, image, QUESTION), abs=1e-6)


def test_the_image_reaches_the_model(judge):
    p = judge.p_yes(images(3), QUESTION)
    gaps = [abs(float(p[i] - p[j])) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 1e-5, p


def test_the_question_reaches_the_model(judge):
    batch = images(1)
    assert float(judge.p_yes(batch, QUESTION)) != float(judge.p_yes(batch, "Is this still a cat? Yes or No."))


def test_large_and_odd_sized_images(judge):
    batch = torch.rand(1, 300, 517, 3, generator=torch.Generator().manual_seed(2))
    assert 0.0 <= float(judge.p_yes(batch, QUESTION)) <= 1.0


def test_rejects_a_non_image_tensor(judge):
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        judge.p_yes(torch.rand(1, 3, 32, 32), QUESTION)


def test_same_seed_same_model_other_seed_other_model(judge, family, tmp_path):
    again = load_mllm(str(BUILDERS[family](tmp_path / "same", seed=0)))
    other = load_mllm(str(BUILDERS[family](tmp_path / "other", seed=1)))
    batch = images(1)
    reference = judge.p_yes(batch, QUESTION)
    assert torch.equal(again.p_yes(batch, QUESTION), reference)
    assert not torch.equal(other.p_yes(batch, QUESTION), reference)


def test_answer_tokens_drop_unknown_and_shared_ids():
    class SentencePieceLike:  # " Yes" -> ["▁", "Yes"], " No" -> ["▁", "No"]; "yes"/"no" unknown
        unk_token_id = 0

        def encode(self, text, add_special_tokens=False):
            ids = {"Yes": [5], "No": [6], " Yes": [3, 5], " No": [3, 6], " yes": [3, 0], " no": [3, 0]}
            return ids.get(text, [0])

    assert answer_token_ids(SentencePieceLike()) == ([5], [6])


def test_refuses_a_text_only_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(("<s>", "</s>"), bos_token="<s>", eos_token="</s>")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot see images") as error:
        load_mllm(str(tmp_path))
    assert "LLaVA-NeXT" in str(error.value) and "Qwen2-VL" in str(error.value)


def test_refuses_a_file_and_a_missing_path(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        load_mllm(str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a folder"):
        load_mllm(str(tmp_path / "nowhere"))


def test_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="missing config.json"):
        load_mllm(str(tmp_path))


def _copy_without(folders, tmp_path, name: str) -> Path:
    copy = Path(shutil.copytree(folders["llava_next"], tmp_path / "copy"))
    (copy / name).unlink()
    return copy


def test_refuses_a_processor_without_chat_template(folders, tmp_path):
    with pytest.raises(ValueError, match="chat template"):
        # transformers 4.5x saves the template as chat_template.json, 5 as chat_template.jinja
        name = next(n for n in ("chat_template.jinja", "chat_template.json") if (folders["llava_next"] / n).is_file())
        load_mllm(str(_copy_without(folders, tmp_path, name)))


def test_refuses_pickled_weights_only(folders, tmp_path):
    copy = _copy_without(folders, tmp_path, "model.safetensors")
    (copy / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        load_mllm(str(copy))


@pytest.mark.parametrize("model_type, name", [("llava_next", "LLaVA-NeXT"), ("janus", "Janus"),
                                              ("llava", "image-text-to-text")])
def test_a_transformers_too_old_for_the_family_is_named_at_load(tmp_path, monkeypatch, model_type, name):
    """On ComfyUI's transformers 4.5x the judge refuses before touching the weights, naming the family and
    the release it needs (the rest of the pack runs on 4.5x); a release at the family's floor passes the check."""
    from creative_generation.nodes.engine import mllm
    from packaging.version import Version

    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    monkeypatch.setattr(mllm, "installed_version", lambda library: Version("4.50.2"))
    floor = re.escape(mllm.family_of(model_type).min_transformers)
    with pytest.raises(ValueError, match=rf"{tmp_path}: the {name} judge needs transformers>={floor} "
                                         r"\(installed: 4\.50\.2\)"):
        load_mllm(str(tmp_path))
    monkeypatch.setattr(mllm, "installed_version", lambda library: Version("5.0.0"))
    assert mllm.transformers_too_old(mllm.family_of(model_type)) is None
