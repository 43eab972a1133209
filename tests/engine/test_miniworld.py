"""The mini world and its committed models: determinism, loading through the real loaders, quality.

The models in ``models/miniworld/`` come from ``python nodes/testbed/run.py train``; nothing
is trained here. The quality checks are small but can fail: a prior that ignores its prompt, a
decoder that draws noise, an MLLM that ignores the picture or a judge that guesses all fail them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from creative_generation.nodes.testbed.miniworld import world as W
from creative_generation.nodes.testbed.miniworld.judge import load_judge

MODELS = Path(__file__).resolve().parents[2] / "models" / "miniworld"
FRESH_SEED = 424242  # scenes no model was trained or evaluated on


def images_of(scenes: list[W.Scene]) -> torch.Tensor:
    return W.to_image_tensor(W.draw_many(scenes))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((MODELS / "metrics.json").read_text())


@pytest.fixture(scope="module")
def prior():
    from creative_generation.nodes.engine.prior import load_prior

    return load_prior(str(MODELS / "prior"))


@pytest.fixture(scope="module")
def judge():
    return load_judge(MODELS / "judge")


# ----------------------------------------------------------------------------------------- the world

def test_world_is_deterministic():
    a, b = W.sample_scenes(40, seed=7), W.sample_scenes(40, seed=7)
    assert a == b
    assert a != W.sample_scenes(40, seed=8)
    assert np.array_equal(W.draw_many(a), W.draw_many(b))
    caps = [W.caption(s, np.random.default_rng(3)) for s in a]
    assert caps == [W.caption(s, np.random.default_rng(3)) for s in b]


def test_world_draws_different_factors_differently():
    base = W.make_scene("car", "red", "road")
    pixels = W.draw(base)
    assert pixels.shape == (W.SIZE, W.SIZE, 3) and pixels.dtype == np.uint8
    for change in ({"kind": "tree"}, {"colour": "blue"}, {"background": "grass"}, {"size": "large"}):
        other = W.make_scene(**{**{"kind": "car", "colour": "red", "background": "road"}, **change})
        assert np.abs(W.draw(other).astype(int) - pixels.astype(int)).mean() > 2, change
    with pytest.raises(ValueError, match="unknown colour"):
        W.make_scene("car", "mauve", "road")


def test_world_distribution_has_rare_combinations():
    scenes = W.sample_scenes(6000, seed=11)
    kinds = Counter(s.kind for s in scenes)
    assert set(kinds) == set(W.KINDS) and min(kinds.values()) > 500
    vehicles = [s for s in scenes if s.is_vehicle]
    purple = sum(s.colour == "purple" for s in vehicles) / len(vehicles)
    flowers = [s for s in scenes if s.kind == "flower"]
    assert 0 < purple < 0.03 < sum(s.colour == "purple" for s in flowers) / len(flowers)
    boats = [s for s in scenes if s.kind == "boat"]
    assert sum(s.background == "grass" for s in boats) / len(boats) < 0.04
    assert W.is_rare(W.make_scene("boat", "white", "grass")) and W.is_rare(W.make_scene("car", "purple", "road"))
    assert not W.is_rare(W.make_scene("boat", "white", "water"))
    assert ("car", "colour", "purple", 0.01) in W.rare_combinations()


def test_uniform_scenes_make_every_combination_common():
    """``uniform``: colour and background independent of the kind, each value about equally likely."""
    cars = [s for s in W.sample_scenes(3000, seed=12, uniform=True) if s.kind == "car"]
    colours, backgrounds = Counter(s.colour for s in cars), Counter(s.background for s in cars)
    assert set(colours) == set(W.COLOURS) and set(backgrounds) == set(W.BACKGROUNDS)
    assert 0.08 < colours["purple"] / len(cars) < 0.17 and 0.13 < backgrounds["sky"] / len(cars) < 0.27
    assert W.sample_scenes(40, seed=7) != W.sample_scenes(40, seed=7, uniform=True)


def test_rare_scenes_force_each_rare_or_unseen_value():
    seen, every = W.rare_combinations(), W.rare_combinations(unseen=True)
    assert set(seen) < set(every) and ("tree", "colour", "purple", 0.0) in every
    assert W.rare_combinations(["bus"], unseen=True) == [c for c in every if c[0] == "bus"]
    scenes = W.rare_scenes(3, seed=FRESH_SEED)
    assert len(scenes) == 3 * len(every) and all(W.is_rare(s) for s in scenes)
    assert Counter((s.kind, s.colour) for s in scenes)[("bus", "purple")] == 3


def test_balanced_judge_reads_the_rare_combinations_the_world_judge_misreads(judge):
    """The world's judge learnt the world's correlations and reads a drawn purple bus or fish in the sky by its
    colour and background; the balanced judge (``judge_balanced``) reads the object. Both read common scenes."""
    from creative_generation.nodes.testbed.miniworld.train_judge import reading

    balanced = load_judge(MODELS / "judge_balanced")
    rare, common = W.rare_scenes(4, seed=FRESH_SEED), W.sample_scenes(200, seed=FRESH_SEED)
    on_rare = {name: reading(j, images_of(rare), rare) for name, j in (("world", judge), ("balanced", balanced))}
    assert on_rare["balanced"]["kind"] > 0.9 and on_rare["balanced"]["called_rare"] > 0.9, on_rare
    assert on_rare["world"]["kind"] < 0.6 and on_rare["world"]["called_rare"] < 0.6, on_rare
    for j in (judge, balanced):
        assert reading(j, images_of(common), common)["kind"] > 0.95


def test_mini_clip_loses_the_kind_of_a_rare_combination(prior):
    """What readings.json records of the world's CLIP: its image embedding names a common scene's kind but seldom a
    rare combination's (it learnt the world's correlations too), while keeping the colour; a rebuilt world should
    fail this test and say so."""
    from creative_generation.nodes.testbed.miniworld.train_judge import clip_reading

    rare, common = W.rare_scenes(2, seed=FRESH_SEED), W.sample_scenes(100, seed=FRESH_SEED)
    on_rare, on_common = clip_reading(prior, images_of(rare), rare), clip_reading(prior, images_of(common), common)
    assert on_common["kind"] > 0.9 and on_rare["kind"] < 0.6 and on_rare["colour"] > 0.8, (on_rare, on_common)


def test_train_settings_keep_their_field_types_and_refuse_the_unknown():
    """``train --set``: ``bool("False")`` is True, so a boolean field takes only the words True and False."""
    from creative_generation.nodes.testbed.miniworld.train import parse_setting

    assert parse_setting("balanced=False") == ("balanced", False)
    assert parse_setting("balanced=True") == ("balanced", True)
    assert parse_setting("unet_steps=1800") == ("unet_steps", 1800)
    assert parse_setting("clip_lr=0.001") == ("clip_lr", 0.001)
    for bad in ("balanced=false", "balanced=1", "no_such_field=3"):
        with pytest.raises(SystemExit):
            parse_setting(bad)


def test_captions_are_true_of_their_scene():
    rng = np.random.default_rng(0)
    for scene in W.sample_scenes(200, seed=5):
        text, stated = W.caption(scene, rng)
        assert W.matches(scene.labels(), stated) and text
    car = W.make_scene("car", "red", "road")
    assert W.caption_for(car.labels(), 0) == "Professional high-quality photo of a car. photorealistic, 4k, HQ."
    assert W.caption_for({"category": "vehicle"}, 6) == "a photo of a vehicle"
    assert W.caption_for({"kind": "airplane", "colour": "orange"}, 2) == "a photo of an orange airplane"
    assert not W.matches(car.labels(), {"category": "plant"})


# ----------------------------------------------------------------------------------------- the models

def test_metrics_were_recorded(metrics):
    for key in ("clip_zero_shot", "prior", "decoder", "mllm", "judge", "config"):
        assert key in metrics
    assert metrics["judge"]["kind"] > 0.9


def test_prior_loads_and_follows_its_prompt(prior):
    from creative_generation.nodes.engine.sampling import sample_embeddings

    assert prior.family == "kandinsky-2.2" and prior.image_encoder is not None
    samples = F.normalize(sample_embeddings(prior, "a photo of a red car", 32, steps=5, guidance=4.0, seed=0), dim=-1)
    red_cars = [W.make_scene("car", "red", bg, size, seed=i) for i, (bg, size) in
                enumerate([("road", "small"), ("road", "large"), ("grass", "medium"), ("road", "medium")])]
    blue_cars = [W.make_scene("car", "blue", s.background, s.size, seed=s.seed) for s in red_cars]
    trees = [W.make_scene("tree", "green", "grass", size, seed=i) for i, size in enumerate(W.SIZES)]
    emb = {name: F.normalize(prior.encode_images(images_of(sc)), dim=-1)
           for name, sc in (("red car", red_cars), ("blue car", blue_cars), ("tree", trees))}
    sim = {name: float((samples @ e.T).mean()) for name, e in emb.items()}
    assert sim["red car"] > sim["blue car"] > sim["tree"], sim
    # The anchor text the paper uses means "vehicle" here: closer to car images than to trees.
    vehicle = F.normalize(prior.encode_prompt(
        ["Professional high-quality photo of a vehicle. photorealistic, 4k, HQ."]).text_embeds, dim=-1)
    assert float((emb["red car"] @ vehicle.T).mean()) > float((emb["tree"] @ vehicle.T).mean())


def test_norm_of_prior_samples_ranks_rare_cars_below_typical_ones(prior):
    """The paper's premise holds here: the prior's own samples make rare combinations low-density."""
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.engine.sampling import sample_embeddings

    bank = sample_embeddings(prior, "Professional high-quality photo of a car. photorealistic, 4k, HQ.", 600,
                             steps=5, guidance=4.0, seed=0)
    norm = GaussianNorm.from_bank(bank, 50)

    def log_density(kind: str, colour: str, background: str) -> float:
        scenes = [W.make_scene(kind, colour, background, size, seed=i) for i, size in enumerate(W.SIZES)]
        return float(norm.log_prob(prior.encode_images(images_of(scenes))).mean())

    typical, purple, on_water = log_density("car", "red", "road"), log_density("car", "purple", "road"), \
        log_density("car", "red", "water")
    tree = log_density("tree", "green", "grass")
    assert typical > purple > tree and typical > on_water > tree, (typical, purple, on_water, tree)


def test_decoder_renders_embeddings_the_judge_recognises(prior, judge, metrics):
    from creative_generation.nodes.engine.render import load_decoder

    decoder = load_decoder(MODELS / "decoder")
    assert decoder.family == "kandinsky-2.2" and decoder.embed_dim == prior.embedding_dim
    scenes = [W.make_scene(k, c, b, "large", seed=i) for i, (k, c, b) in enumerate(
        [("car", "red", "road"), ("car", "blue", "road"), ("tree", "green", "grass"),
         ("boat", "white", "water"), ("house", "yellow", "grass"), ("airplane", "white", "sky")])]
    settings = metrics["decoder"]
    images = decoder.render(prior.encode_images(images_of(scenes)), negative_embeds=prior.zero_image_embed(),
                            seed=0, steps=settings["steps"], guidance=settings["guidance"],
                            height=settings["size"], width=settings["size"])
    assert images.shape == (6, settings["size"], settings["size"], 3)
    kinds = [p["kind"] for p in judge.predict(images)]
    assert kinds[0] == "car", kinds
    assert sum(k == s.kind for k, s in zip(kinds, scenes)) >= 5, kinds


@pytest.mark.transformers5
def test_mllm_answers_from_the_image():
    from creative_generation.nodes.engine.mllm import load_mllm

    mllm = load_mllm(str(MODELS / "mllm"))
    assert mllm.family.name == "LLaVA-NeXT"
    scenes = W.sample_scenes(12, seed=FRESH_SEED)
    images = images_of(scenes)
    right, wrong = [], []
    for i, scene in enumerate(scenes):
        other = W.KINDS[(W.KINDS.index(scene.kind) + 3) % len(W.KINDS)]
        right.append(float(mllm.p_yes(images[i:i + 1], f"Is this still a {scene.kind}? Yes or No.")[0]))
        wrong.append(float(mllm.p_yes(images[i:i + 1], f"Is this still a {other}? Yes or No.")[0]))
    right, wrong = np.array(right), np.array(wrong)
    assert right.mean() > wrong.mean() + 0.4, (right, wrong)
    assert ((right > 0.5).sum() + (wrong < 0.5).sum()) >= 20, (right, wrong)
    car = images_of([W.make_scene("car", "red", "road")])
    assert float(mllm.p_yes(car, "Is this still a vehicle? Yes or No.")[0]) > 0.5
    tree = images_of([W.make_scene("tree", "green", "grass")])
    assert float(mllm.p_yes(tree, "Is this still a vehicle? Yes or No.")[0]) < 0.5


def test_judge_classifies_fresh_world_images(judge):
    scenes = W.sample_scenes(300, seed=FRESH_SEED)
    acc = judge.accuracy(images_of(scenes), [s.labels() for s in scenes])
    assert acc["kind"] >= 0.9 and acc["colour"] >= 0.8 and acc["background"] >= 0.8, acc


def test_judge_loader_refuses_other_folders(tmp_path):
    with pytest.raises(ValueError, match="not a judge folder"):
        load_judge(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        load_judge(tmp_path)


# ----------------------------------------------------------------------------------------- the evaluation script

@pytest.mark.transformers5
def test_evaluation_studies_on_the_mini_world(prior, judge):
    """The script's three studies, tiny: labels and columns right, and the negative cluster really repels."""
    from argparse import Namespace

    from creative_generation.nodes.engine.gate import ValidityGate
    from creative_generation.nodes.testbed.miniworld import evaluate as E
    from creative_generation.nodes.testbed.miniworld.judge import KindJudge
    from creative_generation.nodes.engine.mllm import load_mllm
    from creative_generation.nodes.engine.render import DecoderRenderer, RenderSettings, load_decoder

    args = Namespace(bank=128, dims=8, samples=8, lr=1e-3, train="both", alpha=1.0, seeds=[0],
                     configs=["none", "gate"], steps={"wundt": [0, 2], "train": [0, 4], "negative": [0, 4]})
    renderer = DecoderRenderer(load_decoder(str(MODELS / "decoder")), RenderSettings(2, 2.0, 32, 32, 0),
                               prior.zero_image_embed())
    gate = ValidityGate(load_mllm(str(MODELS / "mllm")), every=25)
    subject, typical = E.prepare(prior, renderer, KindJudge(judge), "car", args)
    assert typical["config"] == "typical bank" and typical["validity"] is not None

    wundt = E.wundt(prior, gate, subject, args)
    assert [(r["config"], r["step"]) for r in wundt] == [("none", 0), ("none", 2), ("gate", 0), ("gate", 2)]
    assert all(r["steps_run"] == 2 and r["stop_reason"] in ("max_steps", "gate_rejected") for r in wundt)

    train = E.train(prior, gate, subject, args)
    assert sorted({(r["config"], r["step"]) for r in train}) == sorted(
        (c, s) for c in ("token", "LoRA", "token + LoRA") for s in (0, 4))

    rows = {(r["config"], r["step"]): r for r in E.negative(prior, gate, subject, args)}
    assert set(rows) == {(c, s) for c in ("without negative", "with negative") for s in (0, 4)}
    assert rows[("with negative", 0)]["cluster_distance"] == rows[("without negative", 0)]["cluster_distance"]
    start = rows[("with negative", 0)]["cluster_distance"]
    assert rows[("without negative", 4)]["cluster_distance"] < start < rows[("with negative", 4)]["cluster_distance"]
    assert "cluster_distance" in E.table(list(rows.values()), "negative").splitlines()[0]
