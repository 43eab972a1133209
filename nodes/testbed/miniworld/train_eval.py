"""Stage 6 of the mini world: accuracies on held-out world images through the real loaders, the table
of ``models/miniworld/README.md`` and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world as W
from .train_decoder import render_embeds
from .train_setup import Config, Split


def measure_models(cfg: Config, out: Path, test: Split) -> dict:
    """Accuracies of every saved model on held-out world images, loaded through the pack's real loaders."""
    from ...engine.mllm import load_mllm
    from ...engine.prior import load_prior
    from ...engine.render import load_decoder
    from ...engine.sampling import sample_embeddings
    from .judge import load_judge

    metrics: dict[str, dict] = {}
    prior = load_prior(str(out / "prior"))
    judge = load_judge(out / "judge")
    truth = [s.labels() for s in test.scenes]
    # CLIP zero-shot: nearest caption embedding.
    with torch.no_grad():
        img = F.normalize(prior.encode_images(test.images()), dim=-1)
        kind_txt = F.normalize(prior.encode_prompt([f"a photo of {W.article(k)} {k}" for k in W.KINDS]).text_embeds, dim=-1)
        kind_pred = (img @ kind_txt.T).argmax(1).numpy()
        colour_acc, bg_acc = [], []
        for i, s in enumerate(test.scenes):
            if i >= 300:
                break
            col = F.normalize(prior.encode_prompt([W.caption_for({"kind": s.kind, "colour": c}, 2)
                                                   for c in W.COLOURS]).text_embeds, dim=-1)
            colour_acc.append(list(W.COLOURS)[int((img[i] @ col.T).argmax())] == s.colour)
            bg = F.normalize(prior.encode_prompt([W.caption_for({"kind": s.kind, "background": b}, 4)
                                                  for b in W.BACKGROUNDS]).text_embeds, dim=-1)
            bg_acc.append(W.BACKGROUNDS[int((img[i] @ bg.T).argmax())] == s.background)
        cat_txt = F.normalize(prior.encode_prompt([f"a photo of {W.article(c)} {c}" for c in W.CATEGORIES]).text_embeds, dim=-1)
        cat_pred = (img @ cat_txt.T).argmax(1).numpy()
    metrics["clip_zero_shot"] = {
        "kind": float((kind_pred == test.labels["kind"]).mean()),
        "category": float((cat_pred == test.labels["category"]).mean()),
        "colour_given_kind": float(np.mean(colour_acc)), "background_given_kind": float(np.mean(bg_acc)),
        "n": len(test.scenes)}
    # Prior: sampled embeddings (5 steps, guidance 4, the paper's settings) classified by nearest text.
    correct, colour_ok, n = 0, 0, 0
    samples_by_kind = {}
    for k in W.KINDS:
        e = F.normalize(sample_embeddings(prior, f"a photo of {W.article(k)} {k}", cfg.eval_prior_samples,
                                          steps=5, guidance=4.0, seed=cfg.seed), dim=-1)
        samples_by_kind[k] = e
        correct += int(((e @ kind_txt.T).argmax(1) == W.KINDS.index(k)).sum())
        n += len(e)
    for k in ("car", "boat", "flower"):
        col = F.normalize(prior.encode_prompt([W.caption_for({"kind": k, "colour": c}, 2) for c in W.COLOURS]).text_embeds, dim=-1)
        for ci, c in enumerate(W.COLOURS):
            e = F.normalize(sample_embeddings(prior, W.caption_for({"kind": k, "colour": c}, 2), 20, steps=5,
                                              guidance=4.0, seed=cfg.seed), dim=-1)
            colour_ok += int(((e @ col.T).argmax(1) == ci).sum())
    metrics["prior"] = {"kind": correct / n, "colour_given_kind": colour_ok / (3 * len(W.COLOURS) * 20),
                        "samples_per_prompt": cfg.eval_prior_samples, "steps": 5, "guidance": 4.0}
    # Decoder: render embeddings of held-out images; the judge reads the renders.
    decoder = load_decoder(out / "decoder")
    idx = np.arange(cfg.eval_render)
    with torch.no_grad():
        emb = prior.encode_images(test.images(idx))
    renders = render_embeds(prior, decoder, emb, cfg)
    acc = judge.accuracy(renders, [truth[i] for i in idx])
    metrics["decoder"] = {**{f"judge_{k}": v for k, v in acc.items()}, "n": len(idx), "steps": cfg.render_steps,
                          "guidance": cfg.render_guidance, "size": cfg.res}
    # End to end: prior samples for "a photo of a {kind}" rendered and judged.
    e2e = torch.cat([sample_embeddings(prior, f"a photo of {W.article(k)} {k}", 10, steps=5, guidance=4.0,
                                       seed=cfg.seed + 1) for k in W.KINDS])
    e2e_img = render_embeds(prior, decoder, e2e, cfg)
    e2e_pred = judge.predict(e2e_img)
    metrics["text_to_image"] = {"judge_kind": float(np.mean([p["kind"] == W.KINDS[i // 10] for i, p in enumerate(e2e_pred)])),
                                "n": len(e2e_pred)}
    W.contact_sheet((renders.numpy() * 255).round().astype(np.uint8)[:48], columns=8, scale=2).save(out / "renders.png")
    W.contact_sheet((e2e_img.numpy() * 255).round().astype(np.uint8), columns=10, scale=2).save(out / "text_to_image.png")
    # MLLM through the real judge path.
    mllm = load_mllm(str(out / "mllm"))
    rng = np.random.default_rng(cfg.seed + 7)
    hits, hits_render, n_q = 0, 0, cfg.eval_mllm
    for q in range(n_q):
        i = q % len(test.scenes)
        s = test.scenes[i]
        w = [s.kind, s.category, W.KINDS[int(rng.integers(len(W.KINDS)))], W.CATEGORIES[int(rng.integers(4))]][q % 4]
        question = f"Is this still {W.article(w)} {w}? Yes or No." if q % 2 else f"Is this {W.article(w)} {w}? Yes or No."
        truth_yes = w in (s.kind, s.category)
        hits += int((float(mllm.p_yes(test.images([i]), question)[0]) > 0.5) == truth_yes)
        if i < len(renders):
            hits_render += int((float(mllm.p_yes(renders[i:i + 1], question)[0]) > 0.5) == truth_yes)
    vision = mllm.check_vision()
    metrics["mllm"] = {"yes_no": hits / n_q, "yes_no_on_renders": hits_render / min(n_q, len(renders)),
                       "n": n_q, "vision_check_passed": bool(vision.sees)}
    # Judge on held-out (clean) world images.
    metrics["judge"] = {**judge.accuracy(test.images(), truth), "n": len(test.scenes)}
    return metrics


def metrics_table(metrics: dict) -> str:
    """The accuracies as a Markdown table."""
    rows = [("CLIP zero-shot kind (9-way)", metrics["clip_zero_shot"]["kind"]),
            ("CLIP zero-shot category (4-way)", metrics["clip_zero_shot"]["category"]),
            ("CLIP zero-shot colour given kind (8-way)", metrics["clip_zero_shot"]["colour_given_kind"]),
            ("CLIP zero-shot background given kind (5-way)", metrics["clip_zero_shot"]["background_given_kind"]),
            ("prior samples -> nearest kind text", metrics["prior"]["kind"]),
            ("prior samples -> nearest colour text given kind", metrics["prior"]["colour_given_kind"]),
            ("decoder renders of image embeds: judge kind", metrics["decoder"]["judge_kind"]),
            ("decoder renders of image embeds: judge colour", metrics["decoder"]["judge_colour"]),
            ("text -> prior -> decoder: judge kind", metrics["text_to_image"]["judge_kind"]),
            ("MLLM yes/no (world images)", metrics["mllm"]["yes_no"]),
            ("MLLM yes/no (decoder renders)", metrics["mllm"]["yes_no_on_renders"]),
            ("judge kind (held-out images)", metrics["judge"]["kind"]),
            ("judge colour", metrics["judge"]["colour"]),
            ("judge background", metrics["judge"]["background"]),
            ("judge size", metrics["judge"]["size"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'metric'.ljust(width)} | accuracy |", f"|{'-' * (width + 2)}|---------:|"]
    lines += [f"| {name.ljust(width)} | {value:8.3f} |" for name, value in rows]
    check = "passed" if metrics["mllm"]["vision_check_passed"] else "FAILED"
    lines += ["", f"MLLM vision check (plain red/blue images, `MLLMJudge.check_vision`): {check}"]
    return "\n".join(lines)


README = """# Mini-world models

Small models trained only on the procedural mini world (`nodes/testbed/miniworld/world.py`), so the
whole creative pipeline runs offline, on a CPU, with no downloaded weights. Made by

    python nodes/testbed/run.py train --out models/miniworld

(seeded; {wall:.0f} s on a shared 2-core CPU; see `metrics.json` for the configuration and stage times).

| folder | what | loads with |
|---|---|---|
| `prior/` | Kandinsky 2.2 prior layout: `PriorTransformer` (x0 prediction, `clip_mean`/`clip_std` from the data), mini CLIP text tower (`text_encoder/`, real CLIP BPE `tokenizer/`) and vision tower (`image_encoder/`), `UnCLIPScheduler` | `nodes.engine.prior.load_prior` |
| `decoder/` | Kandinsky 2.2 decoder layout: `UNet2DConditionModel` (image-embedding conditioning, x0 prediction), `VQModel` movq (32 px <-> 8x8x4), `DDIMScheduler`; render at {size} px, {steps} steps, guidance {guidance} | `nodes.engine.render.load_decoder` |
| `mllm/` | tiny LLaVA-NeXT (vision tower initialised from the mini CLIP's) answering yes/no questions | `nodes.engine.mllm.load_mllm` |
| `judge/` | independent CNN classifier of kind / colour / background / size, for evaluation only | `nodes.testbed.miniworld.judge.load_judge` |
{judge_balanced}| `sd/` | the world in Stable Diffusion 1.5 form: UNet, VAE, text encoder, CLIP vision (below) | `nodes.miniworld_sd.load_miniworld_sd`, node `CreativeMiniWorldSDLoader` |

Embeddings are {width}-d (use PCA dims < {width}). Weights are float16; the loaders upcast. Only the
CLIP token-table rows of words the world's captions use are non-zero.

## Accuracy on held-out world images

{table}

{readings}

{sd}

Licences: weights are this project's own (same licence as the code); the CLIP BPE vocabulary in
`prior/tokenizer/` is OpenAI's (MIT, see `nodes/testbed/tiny/CLIP_BPE_LICENSE`).
"""


SD_README = """## The mini world in SD 1.5 form (`sd/`)

Made by `python nodes/testbed/run.py train --out models/miniworld --stages sd` (needs ComfyUI on the
path: `COMFYUI_DIR` or `.comfyui`; reuses `prior/`'s mini CLIP and `judge/`): {train:.0f} s of training
({timings}) on the shared 2-core CPU, one thread, load average {load:.1f} at the end.

Loaded by the node **Load Mini-World SD (Creative)** (`CreativeMiniWorldSDLoader`), or outside a
node by `nodes.miniworld_sd.load_miniworld_sd()`, as ComfyUI's own objects (core's checkpoint
detection only knows full-size text encoders and CLIP vision models, so the loader builds them
from the small configs in `config.json`):

| file | what | core object |
|---|---|---|
| `unet.safetensors` | `openaimodel.UNetModel`, SD 1.5 layout (spatial transformers, 8 heads, no adm), channels {channels}, context {context}; epsilon prediction, SD 1.5 schedule | MODEL: `ModelPatcher` over `model_base.BaseModel` with `supported_models.SD15` |
| `vae.safetensors` | `AutoencoderKL`, {res} px <-> {lat}x{lat}x4 (8x, as SD), channels {vae_channels} per level, latents scaled to SD 1.5's spread | VAE: `comfy.sd.VAE(sd, config=...)` |
| `text_encoder.safetensors` | the mini CLIP text tower ({width}-d, core's CLIP BPE tokenizer); pooled output = its projected embedding | CLIP: `comfy.sd.CLIP` over `sd1_clip.SD1ClipModel` |
| `clip_vision.safetensors` + `clip_vision_config.json` | the mini CLIP vision tower with projection ({width}-d `image_embeds`) | CLIP_VISION: `comfy.clip_vision.ClipVisionModel` |

Render at {res}x{res} (EmptyLatentImage {res}x{res}). Judge kind accuracy of text -> image renders
("a photo of a {{kind}}", {n} seeds per kind, 9 kinds, chance 0.111) through core's sampler:

{renders}

VAE reconstructions of held-out world images, judged: kind {vae_kind:.3f}, colour {vae_colour:.3f},
background {vae_bg:.3f} (MSE {vae_mse:.4f}). CLIP vision through core vs the transformers tower: cosine
>= {cos:.4f}; zero-shot kind with core CLIP text pooled vs core CLIP vision embeds: {zs:.3f}.
Recommended: sampler `{rec[sampler]}`, scheduler `{rec[scheduler]}`, {rec[steps]} steps, cfg {rec[cfg]}."""


def sd_section(sd: dict, config: dict) -> str:
    """The README's section on the SD bundle, from ``sd/metrics.json`` and ``sd/config.json``."""
    rows = ["| sampler | scheduler | steps | cfg | judge kind |", "|---|---|---:|---:|---:|"]
    rows += [f"| {r['sampler']} | {r['scheduler']} | {r['steps']} | {r['cfg']} | {r['judge_kind']:.3f} |"
             for r in sd["renders"]]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in sd["timings_s"].items() if k != "train_total")
    unet = config["unet"]
    return SD_README.format(
        train=sd["timings_s"]["train_total"], timings=timings, load=sd["load_average"][0],
        channels="/".join(str(unet["model_channels"] * m) for m in unet["channel_mult"]),
        context=config["text_encoder"]["hidden_size"],
        vae_channels="/".join(str(config["vae"]["ddconfig"]["ch"] * m) for m in config["vae"]["ddconfig"]["ch_mult"]),
        res=config["resolution"], lat=config["resolution"] // 8,
        width=sd["clip_vision"]["width"], n=sd["n_per_kind"], renders="\n".join(rows),
        vae_kind=sd["vae_reconstruction"]["kind"], vae_colour=sd["vae_reconstruction"]["colour"],
        vae_bg=sd["vae_reconstruction"]["background"], vae_mse=sd["vae_reconstruction"]["mse"],
        cos=sd["clip_vision"]["cosine_core_vs_transformers"], zs=sd["clip_vision"]["zero_shot_kind_core_objects"],
        rec=sd["recommended"])


JUDGE_BALANCED_ROW = ("| `judge_balanced/` | the same classifier trained on scenes whose colour and background are "
                      "independent of the kind, so it reads a rare combination's kind (below); evaluation only | "
                      "`nodes.testbed.miniworld.judge.load_judge` |\n")

READINGS_README = """## Can the judges read the world's rare combinations? (`readings.json`)

Made by `python nodes/testbed/run.py train --out models/miniworld --stages balanced_decoder balanced_judge`
(also trains `decoder_balanced/`, the world's decoder UNet trained again on uniform scenes; not kept, as
its rows show: it draws the rare combinations hardly better and the common ones worse). Scenes: {world} of
the world's test scenes and {rare} rare combinations (16 scenes of each kind with each of its rare or unseen
colours and backgrounds forced), drawn, and as each decoder renders their mini CLIP image embeddings; last,
how the mini CLIP's own image embeddings read the drawn scenes zero-shot. Shares of scenes read right:

{table}
"""


def readings_section(readings: dict) -> str:
    """The README's table of ``readings.json``: per judge and image set, kind / colour / background read right
    and the share called a rare combination."""
    rows = ["| judge | images | kind | colour | background | called rare |", "|---|---|---:|---:|---:|---:|"]
    for judge, by in readings.items():
        name = judge if judge.startswith("mini CLIP") else f"`{judge}`"
        rows += [f"| {name} | {what} | {r['kind']:.3f} | {r['colour']:.3f} | {r['background']:.3f} | "
                 + (f"{r['called_rare']:.3f} |" if "called_rare" in r else "- |") for what, r in by.items()]
    first = next(iter(readings.values()))
    return READINGS_README.format(world=first["world test scenes, drawn"]["n"],
                                  rare=first["rare combinations, drawn"]["n"], table="\n".join(rows)).rstrip()


def write_readme(out: Path) -> None:
    """``out/README.md`` from ``out/metrics.json`` and, when built, ``out/sd/metrics.json`` and
    ``out/readings.json``."""
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    sd_metrics, sd_config = out / "sd" / "metrics.json", out / "sd" / "config.json"
    sd = (sd_section(json.loads(sd_metrics.read_text()), json.loads(sd_config.read_text()))
          if sd_metrics.is_file() and sd_config.is_file() else
          "The SD 1.5 form (`sd/`) is not built: `python nodes/testbed/run.py train --out <dir> --stages sd`.")
    readings = (readings_section(json.loads((out / "readings.json").read_text())) if (out / "readings.json").is_file()
                else "The balanced judge's readings are not measured: `--stages balanced_judge`.")
    (out / "README.md").write_text(README.format(
        wall=metrics["wall_s"], size=cfg["res"], steps=cfg["render_steps"], guidance=cfg["render_guidance"],
        width=cfg["width"], table=metrics_table(metrics), readings=readings, sd=sd,
        judge_balanced=JUDGE_BALANCED_ROW if (out / "judge_balanced").is_dir() else ""))


def print_table(metrics: dict) -> None:
    print(metrics_table(metrics))
