"""Engine-level hardening (issue 10): files that are damaged or not ours, saves that never
overwrite, a failed concept load that leaves nothing behind, a bounded number of concept
adapters on a shared prior, and cancel points inside the prior's denoising loop."""

from __future__ import annotations

import os
import pickle
import threading
import time

import pytest
import torch
from creative_generation.nodes.engine import cancel, sampling
from creative_generation.nodes.engine.bank import EmbeddingBank
from creative_generation.nodes.engine.concept import (
    MAX_CONCEPT_ADAPTERS,
    Concept,
    ConceptMismatchError,
    activate_concept,
    add_lora,
    lora_state,
)
from creative_generation.nodes.engine.safetensors_io import (
    DamagedFileError,
    remove_leftovers,
    save_tensors,
)


def _good_bank(tmp_path):
    return EmbeddingBank(torch.randn(6, 8), {"prior": "p"}).save(tmp_path / "bank.safetensors", numbered=True)


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "random", "pickle", "non-json-header"])
def test_damaged_files_name_the_file_and_what_to_do(tmp_path, damage):
    path = _good_bank(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif damage == "zero-byte":
        bad.write_bytes(b"")
    elif damage == "random":
        bad.write_bytes(os.urandom(4096))
    elif damage == "pickle":
        bad.write_bytes(pickle.dumps({"embeds": [1.0, 2.0]}))
    else:
        from safetensors.torch import save_file
        save_file({"embeds": torch.zeros(2, 2)}, str(bad), metadata={"creative_generation": "{not json"})
    with pytest.raises(DamagedFileError, match=rf"{damage}\.safetensors .*(damaged|not written).*(Delete|Move)"):
        EmbeddingBank.load(bad)
    with pytest.raises(DamagedFileError, match=rf"{damage}\.safetensors"):
        Concept.load(bad)


@pytest.mark.parametrize("embeds, fragment", [(torch.arange(12).view(6, 2), "torch.int64"),
                                              (torch.randn(6), "shape \\(6,\\)"),
                                              (torch.full((3, 2), float("nan")), "NaN")])
def test_bank_of_wrong_kind_is_refused(tmp_path, embeds, fragment):
    path = save_tensors(tmp_path / "b.safetensors", {"embeds": embeds}, {"format": "creative-bank/1"})
    with pytest.raises(ValueError, match=fragment):
        EmbeddingBank.load(path)


def test_concept_with_nan_token_embedding_is_refused(tmp_path):
    path = Concept("<tok>", torch.full((8,), float("nan"))).save(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="token embedding is not a finite"):
        Concept.load(path)


# --------------------------------------------------------------------------- saving


def test_numbered_saves_never_overwrite_also_at_once(tmp_path):
    base = tmp_path / "out" / "probe.safetensors"
    first = Concept("<a>", torch.zeros(4)).save(base, numbered=True)
    second = Concept("<b>", torch.ones(4)).save(base, numbered=True)
    assert (first.name, second.name) == ("probe_00001.safetensors", "probe_00002.safetensors")
    assert Concept.load(first).token == "<a>" and Concept.load(second).token == "<b>"
    made, errors = [], []

    def save(i):
        try:
            made.append(Concept(f"<t{i}>", torch.full((4,), float(i))).save(base, numbered=True))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({p.name for p in made}) == 8
    assert sorted(Concept.load(p).token for p in made) == sorted(f"<t{i}>" for i in range(8))
    assert not [p for p in base.parent.iterdir() if p.name.endswith(".tmp")]


def test_our_old_leftovers_are_removed_and_nothing_else(tmp_path):
    old, young = tmp_path / ".concept_00001.safetensors.ab12cd_3.tmp", tmp_path / ".bank.safetensors.zz99yy88.tmp"
    foreign = [tmp_path / ".other.tmp", tmp_path / "notes.safetensors.ab12cd34.tmp", tmp_path / ".cache"]
    for p in (old, young, *foreign):
        p.write_bytes(b"")
    stale = time.time() - 3600
    for p in (old, *foreign):
        os.utime(p, (stale, stale))
    assert remove_leftovers(tmp_path) == [old]
    assert young.exists() and all(p.exists() for p in foreign)
    os.utime(young, (stale, stale))
    EmbeddingBank(torch.randn(3, 2)).save(tmp_path / "bank.safetensors", numbered=True)  # writing cleans too
    assert not young.exists()


# --------------------------------------------------------------------------- concepts on a shared prior


def _lora_concept(prior, seed: int, rank: int = 2) -> Concept:
    tf = prior.transformer
    add_lora(tf, "tmp_lora", rank, float(rank), ("to_q", "to_k", "to_v", "to_out.0"), seed)
    state = {k: torch.randn_like(v) * 0.01 for k, v in lora_state(tf, "tmp_lora").items()}
    tf.delete_adapters("tmp_lora")
    return Concept("", None, state, rank, float(rank), meta={"base_prior": prior.identity})


def _adapters(prior) -> set[str]:
    return set(getattr(prior.transformer, "peft_config", None) or {})


def test_lora_of_wrong_shape_fails_every_time_and_leaves_nothing(prior):
    good = _lora_concept(prior, 0)
    bad = Concept("", None, {k: v[..., :1] if v.shape[-1] > 1 else v[:1] for k, v in good.lora_state.items()},
                  2, 2.0, meta={"base_prior": prior.identity})
    before = _adapters(prior)
    for _ in range(3):
        with pytest.raises(ConceptMismatchError, match="does not fit this prior"):
            activate_concept(prior.transformer, bad)
        assert _adapters(prior) == before
    activate_concept(prior.transformer, None)


def test_concept_adapters_stay_bounded(prior):
    activate_concept(prior.transformer, None)
    counts = []
    for seed in range(3 * MAX_CONCEPT_ADAPTERS):
        concept = _lora_concept(prior, seed)
        sampling.sample_embeddings(prior.with_concept(concept), "a photo", 2, batch_size=2, steps=2)
        counts.append(len([n for n in _adapters(prior) if n.startswith("creative_") and "train" not in n]))
    assert max(counts) == MAX_CONCEPT_ADAPTERS and counts[-1] == MAX_CONCEPT_ADAPTERS, counts
    again = sampling.sample_embeddings(prior.with_concept(concept), "a photo", 2, batch_size=2, steps=2, seed=5)
    first = _lora_concept(prior, 0)  # evicted long ago: loads again and gives the same samples as fresh
    a = sampling.sample_embeddings(prior.with_concept(first), "a photo", 2, batch_size=2, steps=2, seed=5)
    b = sampling.sample_embeddings(prior.with_concept(first), "a photo", 2, batch_size=2, steps=2, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, again)
    activate_concept(prior.transformer, None)


# --------------------------------------------------------------------------- cancel


class Cancelled(Exception):
    pass


def test_every_denoising_step_of_a_batch_is_a_cancel_point(prior):
    """One batch of 1,000 steps: the cancel check runs at each step, so it stops at once."""
    seen = []

    def check():
        seen.append(1)
        if len(seen) >= 3:
            raise Cancelled

    cancel.set_check(check)
    try:
        with pytest.raises(Cancelled):
            sampling.sample_embeddings(prior, "a photo", 64, batch_size=64, steps=1000)
    finally:
        cancel.set_check(None)
    assert len(seen) == 3


def test_saved_files_are_readable_by_others(tmp_path):
    """The temporary file is owner-only (mkstemp); the published file must not stay so, or a concept saved by a
    ComfyUI service cannot be read by the user who shares it."""
    import stat
    from pathlib import Path

    from creative_generation.nodes.engine.safetensors_io import write_atomic

    saved = write_atomic(tmp_path / "concept.safetensors", lambda p: Path(p).write_bytes(b"x"), numbered=True)
    assert stat.S_IMODE(saved.stat().st_mode) & 0o044 == 0o044
