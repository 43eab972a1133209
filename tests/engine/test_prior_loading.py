"""Loading priors from diffusers folders: layouts, refusals, offline-only, identity."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from creative_generation.nodes.engine.prior import PriorFolderError, detect_layout, load_prior
from creative_generation.nodes.testbed.tiny.prior import build_tiny_prior


def test_layout_and_family(tiny_prior_dir, tiny_prior21_dir):
    assert detect_layout(tiny_prior_dir) == ("kandinsky", "kandinsky-2.2")
    assert detect_layout(tiny_prior21_dir) == ("kandinsky", "kandinsky-2.1")


def test_karlo_layout(tiny_prior_dir, tmp_path):
    karlo = tmp_path / "karlo"
    shutil.copytree(tiny_prior_dir, karlo)
    (karlo / "scheduler").rename(karlo / "prior_scheduler")
    shutil.rmtree(karlo / "image_encoder")
    (karlo / "model_index.json").write_text(json.dumps({"_class_name": "UnCLIPPipeline"}))
    assert detect_layout(karlo) == ("karlo", "karlo")
    p = load_prior(str(karlo))
    assert p.image_encoder is None and p.family == "karlo"
    with pytest.raises(PriorFolderError, match="image_encoder"):
        p.encode_images(torch.zeros(1, 8, 8, 3))


@pytest.mark.parametrize("missing", ["prior/config.json", "prior/diffusion_pytorch_model.safetensors",
                                     "text_encoder/model.safetensors", "tokenizer/vocab.json",
                                     "scheduler/scheduler_config.json"])
def test_missing_part_is_named(tiny_prior_dir, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_prior_dir, broken)
    (broken / missing).unlink()
    if missing == "tokenizer/vocab.json":
        (broken / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(PriorFolderError, match=f"missing {missing}"):
        load_prior(str(broken))


def test_no_network_without_permission(tmp_path):
    with pytest.raises(PriorFolderError, match="is not a folder"):  # the engine never downloads: a repo id is no folder
        load_prior("kandinsky-community/kandinsky-2-1-prior")
    with pytest.raises(PriorFolderError, match="not a folder"):
        detect_layout(tmp_path / "nope")


def test_identity_is_content_based(tiny_prior_dir, tmp_path):
    a, b = load_prior(str(tiny_prior_dir)), load_prior(str(tiny_prior_dir))
    assert a.identity == b.identity and a.identity.startswith("kandinsky-2.2:")
    other = load_prior(str(build_tiny_prior(tmp_path / "other", seed=7)))
    assert other.identity != a.identity
    shutil.copytree(tiny_prior_dir, tmp_path / "moved" / "elsewhere")
    assert load_prior(str(tmp_path / "moved" / "elsewhere")).identity == a.identity, "the load path is not identity"


def test_encode_images(prior):
    images = torch.rand(3, 40, 50, 3)
    e = prior.encode_images(images)
    assert e.shape == (3, prior.embedding_dim) and torch.isfinite(e).all()
    assert not torch.allclose(e[0], e[1])
    assert prior.zero_image_embed().shape == (1, prior.embedding_dim)


def test_requested_dtype_reaches_every_module(tiny_prior_dir):
    """``dtype`` goes to each library under the keyword its installed release knows (transformers <4.56 and
    diffusers <0.40 only know ``torch_dtype`` and ignore or choke on ``dtype``)."""
    prior = load_prior(tiny_prior_dir, dtype=torch.float64)
    for module in (prior.transformer, prior.text_encoder, prior.image_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float64}
