"""Benchmark (not a test): one SD-path optimisation step at SD 1.5's real shapes, random weights.

    python tests/benchmarks/bench_sd_path.py --size 256 --render-steps 1
    python tests/benchmarks/bench_sd_path.py --size 512 --render-steps 1,4 --checkpointing off,on --steps 1
    python tests/benchmarks/bench_sd_path.py --size 256 --parts     # each part's peak with its backward

Core objects built through ComfyUI's own classes with random weights (nothing downloaded): an SD 1.5 UNet
(860 M, ``supported_models.SD15``), the SD ``AutoencoderKL`` (84 M), the CLIP-L text encoder (123 M) and
a CLIP ViT-L/14 vision model (``clip_vision_config_vitl.json``, 304 M). Measured per render-step count:
seconds per optimiser step (render with gradients, decode, CLIP vision, backward, AdamW; mean after the
first) and the live-tensor peak of a step beyond the weights (``LiveTensorBytes``), next to the node's
pre-flight estimate of the same (training activations + training state); a case whose estimate the machine's free
memory cannot hold is refused by the node's own pre-flight (``memory.check``) and reported instead of run.
``--parts``: the live-tensor peak of each part with its backward pass alone (one UNet render step, the VAE
decode, the CLIP vision pass) next to the host's number for it, the yardstick of ``budget.SD_UNET_GRAD`` /
``SD_DECODE_GRAD`` and ``vision_bytes``, and the self-attention maps counted apart (``attention_map_bytes``).
ComfyUI runs on the CPU here (the in-process harness sets ``--cpu``), so ComfyUI's non-flash-attention
working-memory formula is the one sized.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))

SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                 use_temporal_resblock=False)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def build(tmp: Path):
    """MODEL, CLIP, VAE, CLIP_VISION at SD 1.5's real shapes (random weights, ComfyUI's default dtypes)."""
    import comfy.clip_vision
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from comfy.ldm.models.autoencoder import AutoencoderKL

    import tiny_sd15
    from tiny_sdxl import _randomise

    tiny_sd15.UNET.clear()
    tiny_sd15.UNET.update(SD15_UNET)
    model = tiny_sd15.model(0)
    with torch.device("meta"):
        vae_skeleton = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    vae = comfy.sd.VAE(sd={k: v.float() for k, v in _randomise(vae_skeleton, 1).items()})
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target)
    clip.cond_stage_model.load_state_dict(_randomise(clip.cond_stage_model, 2), strict=False)
    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json").read_text())
    vision = tiny_sd15.clip_vision(tmp, 3, config)
    return model, clip, vae, vision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--render-steps", default="1")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--checkpointing", default="off", help="off, on or off,on: the optimiser's "
                                                             "gradient_checkpointing (recompute UNet calls and decode)")
    args = parser.parse_args()
    import comfy_harness

    tmp = Path(tempfile.mkdtemp())
    comfy_harness.import_comfy(tmp)

    from creative_generation.nodes import memory, run_inputs
    from creative_generation.nodes.engine.budget import InsufficientMemoryError
    from creative_generation.nodes.engine.bank import EmbeddingBank
    from creative_generation.nodes.engine.losses import CreativeTerm
    from creative_generation.nodes.engine.norm import GaussianNorm
    from creative_generation.nodes.sd_generator import RenderSettings, SDGenerator
    from creative_generation.nodes.testbed.live_bytes import LiveTensorBytes

    with torch.inference_mode():
        parts = build(tmp)
    print(f"UNet dtype {parts[0].model.get_dtype()}, size {args.size}")
    cases = [(int(r), c == "on") for r in args.render_steps.split(",") for c in args.checkpointing.split(",")]
    for render_steps, checkpointing in cases:
        gen = SDGenerator(*parts, "a photo of a car", "", RenderSettings(render_steps, 1.0, "euler", "sgm_uniform",
                                                                          args.size, args.size),
                          checkpointing=checkpointing)
        norm = GaussianNorm.from_bank(EmbeddingBank(torch.randn(64, 768), {"prior": gen.identity}), 16)
        run = run_inputs.build_run(gen, norm, "car", [CreativeTerm(norm)], steps=args.steps, lora_rank=10,
                                   train="LoRA")
        estimate = run.memory_estimate(on_gpu=False)
        work = sum(p.bytes for p in estimate.parts if not p.model)
        try:  # the node's own pre-flight: a case this machine cannot hold is refused, as the node refuses it
            memory.check(estimate, run.models())
        except InsufficientMemoryError as refused:
            print(f"render steps {render_steps}, checkpointing {'on' if checkpointing else 'off'}: estimate "
                  f"{work / 2**20:.0f} MiB beyond the weights; refused by the node's pre-flight: {refused}")
            continue
        training = gen.open_training(run)
        if args.parts:
            try:
                _parts(gen, training, args.size)
            finally:
                training.close()
            return
        opt = torch.optim.AdamW(training.params, lr=1e-4)
        times = []
        try:
            with LiveTensorBytes() as meter:  # an extra, untimed step
                _step(training, norm, opt, 0)
            peak = meter.peak
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                _step(training, norm, opt, step)
                times.append(time.perf_counter() - t0)
        finally:
            training.close()
        mean = sum(times) / len(times)
        print(f"render steps {render_steps}, checkpointing {'on' if checkpointing else 'off'}: {mean:.2f} s/step "
              f"over {len(times)} steps; measured peak beyond the "
              f"weights {peak / 2**20:.0f} MiB, estimate {work / 2**20:.0f} MiB (ratio {work / max(1, peak):.2f})")


def _parts(gen, training, size: int) -> None:
    from creative_generation.nodes.sd_generator import attention_map_bytes, unet_call_bytes, vision_bytes
    from creative_generation.nodes.testbed.live_bytes import LiveTensorBytes

    vae = gen.vae
    latent = gen.render.latent(gen.model)
    cases = [("UNet render step", lambda: training.latent(0).float().pow(2).mean(),
              unet_call_bytes(gen.model, latent.shape)),
             ("VAE decode", lambda: vae.process_output(vae.first_stage_model.decode(
                 torch.randn(latent.shape, requires_grad=True)).float()).mean(),
              vae.memory_used_decode(latent.shape, vae.vae_dtype)),
             ("CLIP vision", lambda: training.vision()(torch.rand(1, size, size, 3, requires_grad=True)).sum(),
              vision_bytes(training.vision(), 1))]
    for name, loss, host in cases:
        with LiveTensorBytes() as meter:
            loss().backward()
        print(f"{name} with its backward: {meter.peak / 2**20:.0f} MiB measured, host's number "
              f"{host / 2**20:.0f} MiB (ratio {meter.peak / max(1, host):.2f})")
    print(f"the UNet step's self-attention maps (counted apart in the estimate): "
          f"{attention_map_bytes(gen.model, latent.shape) / 2**20:.0f} MiB")


def _step(training, norm, opt, seed: int) -> None:
    from creative_generation.nodes.engine.losses import CreativeTerm

    loss = CreativeTerm(norm)(training.embed(seed))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


if __name__ == "__main__":
    import importlib.util

    spec = importlib.util.spec_from_file_location("creative_run", ROOT / "nodes" / "testbed" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    runner.import_pack()
    main()
