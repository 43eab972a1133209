"""Benchmark (not a test): per-step costs at the paper's real model sizes, random weights.

    python tests/benchmarks/bench_real_shapes.py                  # auto: CUDA if available, else CPU
    python tests/benchmarks/bench_real_shapes.py --device cpu --dtypes fp32,bf16
    python tests/benchmarks/bench_real_shapes.py --device cuda --dtypes bf16,fp16,fp32   # sized for < 4 min

Models are built from configs with random weights (nothing is downloaded or saved):

* **prior**: diffusers ``PriorTransformer`` in Kandinsky 2.1's shape (20 layers, width 2048 =
  32 heads x 64, CLIP embedding 768, 77 text positions; ~1.0 B params) and a CLIP ViT-L/14
  text encoder with a 768-d projection (123 M), the real CLIP BPE tokenizer,
  ``UnCLIPScheduler``. The prior's CLIP *image* encoder is left out: no measured step uses it.
* **MLLM**: Qwen2-VL-2B's shape with the language model cut to 20 of 28 layers and the vision
  tower to 16 of 32 blocks (widths unchanged) -> ~1.5 B params, with a Qwen2-VL processor at
  the real image settings (14 px patches merged 2x2) over a word-level tokenizer.

Measured, per dtype (CPU: small counts so it ends in minutes; GPU: the paper's counts):

* prior sampling of one batch with 5 steps and CFG 4: our sampler (prompt prefix computed
  once) vs diffusers' ``KandinskyV22PriorPipeline`` on the same modules (on GPU the pipeline
  draws ``--ref-count`` embeddings, fewer than ours: it is slow, and throughputs are compared);
* one optimiser step: token + rank-10 LoRA, 5 prior steps with gradients, CFG, creative +
  anchor loss, AdamW: the mean of the steps after the first, (T(N steps) - T(1 step)) / (N - 1)
  with the device synchronised (the optimiser waits for the device only at checks and at the
  end, so single steps are not timed apart); beside it a bare, eager forward + backward of the
  same 5 prior steps through diffusers' ``PriorTransformer.forward`` (batch 2 for CFG, gradient
  to the input only, text encoded beforehand): what the step costs beyond the transformer;
* one gate check: the no-grad prior sample of the concept plus one MLLM yes/no forward on a
  512x512 image (the decoder render is left out: a fixed random image stands in);
* memory next to ``engine/budget.py``'s estimate: on GPU ``torch.cuda.max_memory_allocated``;
  on CPU the peak of live tensors (``LiveTensorBytes``, in an extra untimed pass: what a
  device allocator would hold beyond the weights) and the process's peak RSS;
* GPU only: a 5,000-embedding bank in batches of 500 (paper: under 1 min on an A100) and 50
  optimisation steps with 2 validity checks (paper: under 2 min), MLLM kept on the GPU.

The MLLM is on the device only for the gate rows (and the gated run): the sampling and optimiser
memory rows measure the prior alone, as their estimates do.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import importlib.util
_RUN = importlib.util.spec_from_file_location(
    "creative_run", Path(__file__).resolve().parents[2] / "nodes" / "testbed" / "run.py")
run = importlib.util.module_from_spec(_RUN)
_RUN.loader.exec_module(run)
run.import_pack()  # the pack as `creative_generation`, never as top-level `nodes`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from creative_generation.nodes.engine import budget, model_shapes
from creative_generation.nodes.engine.bank import PAPER_TEMPLATE
from creative_generation.nodes.engine.gate import GateCheck, ValidityGate
from creative_generation.nodes.engine.losses import AnchorTerm, CreativeTerm
from creative_generation.nodes.engine.norm import GaussianNorm
from creative_generation.nodes.engine.optimizer import CreativeRun, OptimConfig
from creative_generation.nodes.engine.prior import Prior
from creative_generation.nodes.engine.sampling import sample_embeddings
from creative_generation.nodes.testbed.live_bytes import LiveTensorBytes

PROMPT = PAPER_TEMPLATE.format(subject="vehicle")
QUESTION = "Is this still a vehicle? Yes or No."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- models


def build_prior(layers: int = 20, seed: int = 0) -> Prior:
    """Kandinsky 2.1 prior shape, random weights (``clip_std`` = 1 so samples are not all equal)."""
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from creative_generation.nodes.testbed.tiny.tokenizer import save_clip_tokenizer

    torch.manual_seed(seed)
    transformer = PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=layers, embedding_dim=768,
                                   num_embeddings=77, additional_embeddings=4, dropout=0.0)
    with torch.no_grad():
        for p in transformer.parameters():
            if not p.any():  # zero-initialised tensors (positional embedding, clip stats, ...) would hide work
                p.normal_(0.0, 0.02)
        transformer.clip_std.fill_(1.0)
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1))
    folder = save_clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                clip_sample_range=5.0)
    for m in (transformer, text):
        m.requires_grad_(False).eval()
    return Prior(transformer, text, tokenizer, scheduler, None, family="kandinsky-2.1", source="random (benchmark)")


def build_mllm(text_layers: int = 20, vision_depth: int = 16, seed: int = 0):
    """Qwen2-VL-2B shape, depth-cut to ~1.5 B params, as an ``MLLMJudge`` with a real-geometry processor."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    from creative_generation.nodes.engine.mllm import MLLMJudge, family_of
    from creative_generation.nodes.testbed.tiny.mllm import (
        QWEN2_VL_SPECIALS,
        QWEN2_VL_TEMPLATE,
        word_tokenizer,
    )

    tokenizer = word_tokenizer(QWEN2_VL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    # Qwen2-VL-2B-Instruct's widths; the vocabulary stays 151,936 (the tokenizer only uses a few ids).
    config = Qwen2VLConfig(
        vision_config={"depth": vision_depth, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": text_layers, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     "bos_token_id": None, "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>")},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    pixels = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 56 * 56,
              "max_pixels": 28 * 28 * 1280}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_VL_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval().requires_grad_(False)
    return MLLMJudge(model, processor, family_of("qwen2_vl"))


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1):
    """Best of ``repeats`` wall-clock runs (the minimum is the least disturbed by other processes)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def gpu_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def diffusers_bank(prior: Prior, count: int, batch: int, steps: int, guidance: float, seed: int) -> torch.Tensor:
    from diffusers import KandinskyV22PriorPipeline

    pipe = KandinskyV22PriorPipeline(prior=prior.transformer, text_encoder=prior.text_encoder,
                                     tokenizer=prior.tokenizer, scheduler=prior.scheduler, image_encoder=None,
                                     image_processor=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, count, batch):
            out.append(pipe(PROMPT, negative_prompt="", num_images_per_prompt=min(batch, count - i),
                            num_inference_steps=steps, guidance_scale=guidance, generator=g,
                            output_type="pt").image_embeds.float().cpu())
    return torch.cat(out)


def bare_forward_backward(prior: Prior, steps: int = 5, guidance: float = 4.0, seed: int = 0):
    """A function running the prior's ``steps`` denoising steps eagerly through diffusers' ``PriorTransformer.forward``
    (unconditional and text rows in one batch of 2) and a backward to the starting latent only: the transformer's
    own cost, with no LoRA, token, text encoder, loss or optimiser."""
    from creative_generation.nodes.engine.sampling import initial_latents

    ids = prior.tokenizer(["", PROMPT], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = prior.text_encoder(ids.input_ids.to(prior.device))
    mask = ids.attention_mask.bool().to(prior.device)
    sched = prior.scheduler

    def step() -> None:
        g = torch.Generator().manual_seed(seed)
        lat = start = initial_latents(prior, 1, g).requires_grad_(True)
        sched.set_timesteps(steps)
        for i, t in enumerate(sched.timesteps):
            pred = prior.transformer(torch.cat([lat, lat]), timestep=t, proj_embedding=out.text_embeds,
                                     encoder_hidden_states=out.last_hidden_state,
                                     attention_mask=mask).predicted_image_embedding
            u, c = pred.chunk(2)
            prev = None if i + 1 == len(sched.timesteps) else sched.timesteps[i + 1]
            lat = sched.step(u + guidance * (c - u), t, lat, generator=g, prev_timestep=prev).prev_sample
        prior.transformer.post_process_latents(lat).float().pow(2).sum().backward()
        assert start.grad is not None

    return step


class StandInRenderer:
    """Stands in for the decoder (left out of the timings): a fresh random image per call, never
    repeated in the process, so the judge's answer cache (by pixel hash) never hits."""

    calls = 0  # shared by every instance

    def __init__(self, size: int):
        self.size = size

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    def memory_estimate(self, count: int, *, on_gpu: bool) -> None:
        """Not sized: the benchmark leaves the render out."""
        return None

    def __call__(self, embeds: torch.Tensor, progress=None) -> torch.Tensor:
        StandInRenderer.calls += 1
        g = torch.Generator().manual_seed(StandInRenderer.calls)
        return torch.rand(embeds.shape[0], self.size, self.size, 3, generator=g)


def random_norm(prior: Prior, n: int = 256, dims: int = 16) -> GaussianNorm:
    """A norm over random embeddings: its values do not change the cost of a step (CPU runs)."""
    g = torch.Generator().manual_seed(0)
    return GaussianNorm.from_bank(torch.randn(n, prior.embedding_dim, generator=g) * 0.05, dims)


def optimiser(prior, norm, steps, gate=None, renderer=None, check_every=25) -> CreativeRun:
    terms = [CreativeTerm(norm), AnchorTerm.from_prior(prior, PROMPT)]
    cfg = OptimConfig(steps=steps, lr=1e-4, train="both", rank=10, lora_alpha=10.0, prior_steps=5, guidance=4.0,
                      seed=0)
    g = ValidityGate(gate, every=check_every, threshold=0.0) if gate is not None else None
    return CreativeRun(prior, norm, "vehicle", tuple(terms), cfg, GateCheck.of(g, renderer))


def estimate_for(prior: Prior, norm: GaussianNorm, judge, size: int) -> budget.Estimate:
    """The run's own estimate (training, and with a judge the gate's question; the stand-in render is not sized)."""
    renderer = None if judge is None else StandInRenderer(size)
    return optimiser(prior, norm, 1, judge, renderer).memory_estimate(on_gpu=False)


# --------------------------------------------------------------------------- the run


def live_peak(fn) -> int:
    """Peak bytes of tensors ``fn`` allocates (an untimed pass: tracking costs a little per op)."""
    with LiveTensorBytes() as live:
        fn()
    return live.peak


def run_dtype(name: str, prior: Prior, judge, device: torch.device, args, rows: dict) -> None:
    dtype = DTYPES[name]
    prior.to(device, dtype)
    if judge is not None:
        judge.model.to("cpu", dtype)  # on the device only for the gate rows
    gc.collect()
    gpu_peak_reset(device)
    rows.setdefault("_cols", []).append(name)
    cuda = device.type == "cuda"
    mib = budget.MIB

    def put(key, value):
        rows.setdefault(key, {})[name] = value

    def memory(key, measured: int, estimate: int, unit: int = mib) -> None:
        fmt = (lambda n: f"{n / unit:.2f}") if unit == budget.GIB else (lambda n: f"{n / unit:.0f}")
        put(key, f"{fmt(measured)} ({fmt(estimate)})")

    shape = model_shapes.PriorShape.of(prior)
    put("weights in memory: prior + text encoder (+ MLLM) [GiB]", f"{shape.weight_bytes / budget.GIB:.2f}" + (
        f" + {model_shapes.module_bytes(judge.model)[1] / budget.GIB:.2f}" if judge is not None else ""))

    # --- sampling: one batch (CPU) or the whole bank (GPU)
    sample_embeddings(prior, PROMPT, 1, batch_size=1, steps=2)  # warm-up (allocations, kernels)
    gpu_peak_reset(device)
    t_ours, bank = timed(lambda: sample_embeddings(prior, PROMPT, args.count, batch_size=args.batch, steps=5,
                                                   guidance=4.0, seed=0), device, args.repeats)
    est = budget.prior_sampling_activation_bytes(
        width=shape.width, layers=shape.layers, heads=shape.heads, ff_width=shape.ff_width,
        prompt_tokens=budget.prompt_token_count(prior.tokenizer, PROMPT, ""), batch=args.batch, dtype=dtype,
        embed_dim=shape.embed_dim)
    what = f"{args.count} emb" + (f" in batches of {args.batch}" if args.count != args.batch else "")
    put(f"prior sampling, ours: {what}, 5 steps, CFG 4 [s]", f"{t_ours:.2f}")
    if cuda:
        memory("  peak GPU memory, sampling [GiB] (estimate)", gpu_peak(device), shape.weight_bytes + est, budget.GIB)
    else:
        measured = live_peak(lambda: sample_embeddings(prior, PROMPT, args.batch, batch_size=args.batch, steps=5))
        memory("  tensors alive at the peak, sampling [MiB] (estimate)", measured, est)
    if not args.no_diffusers:
        n_ref = args.ref_count
        t_ref, ref = timed(lambda: diffusers_bank(prior, n_ref, args.batch, 5, 4.0, 0), device, args.repeats)
        ref_what = f"{n_ref} emb" + (f" in batches of {args.batch}" if n_ref != args.batch else "")
        put(f"prior sampling, diffusers KandinskyV22PriorPipeline: {ref_what} [s]", f"{t_ref:.2f}")
        # one generator drives the batches in turn: the first rows agree when the batches split alike
        same = n_ref <= args.count and (n_ref % args.batch == 0 or n_ref == args.count)
        rel = f"{float((ref - bank[:n_ref]).abs().max() / bank[:n_ref].abs().max()):.0e}" if same else "n/a"
        put("  speed-up of ours per embedding (max |diff| / max |value| after 5 steps*)",
            f"{(t_ref / n_ref) / (t_ours / args.count):.1f}x ({rel})")

    # --- optimiser steps (token + LoRA, 5 prior steps with gradients, CFG), no gate
    norm = GaussianNorm.from_bank(bank, 50) if len(bank) > 100 else random_norm(prior)
    gpu_peak_reset(device)
    t_one, _ = timed(lambda: optimiser(prior, norm, 1).run(), device, 2)  # the first is the warm-up
    t_all, _ = timed(lambda: optimiser(prior, norm, args.opt_steps).run(), device)
    per_step = (t_all - t_one) / max(args.opt_steps - 1, 1)
    put(f"optimiser step: token + LoRA r10, 5 prior steps, CFG [ms]: mean of steps 2..{args.opt_steps}",
        f"{per_step * 1e3:.0f}")
    opt_est = estimate_for(prior, norm, None, args.image_size)
    work = opt_est.part("training state").bytes + opt_est.part("training activations").bytes
    if cuda:
        memory("  peak GPU memory, optimiser [GiB] (estimate)", gpu_peak(device), opt_est.peak(), budget.GIB)
    else:  # two steps: the second runs with AdamW's moments and the first step's gradients alive
        measured = live_peak(lambda: optimiser(prior, norm, 2).run())
        memory("  tensors alive at the peak, optimiser [MiB] (estimate)", measured, work)
    bare = bare_forward_backward(prior)
    bare()  # warm-up
    t_bare, _ = timed(bare, device, args.repeats)
    put("  bare eager fwd + bwd of the prior's 5 steps (diffusers forward, CFG batch 2, grad to input) [ms]",
        f"{t_bare * 1e3:.0f}")
    put("  optimiser step / bare fwd + bwd", f"{per_step / t_bare:.2f}x")

    # --- one gate check: the concept's no-grad prior sample + one MLLM yes/no (render left out)
    if judge is not None:
        judge.model.to(device, dtype)
        standin = StandInRenderer(args.image_size)
        judge.p_yes(standin(torch.zeros(1, 1)), QUESTION)  # warm-up
        t_prior, e = timed(lambda: sample_embeddings(prior, "a photo of a vehicle", 1, batch_size=1, steps=5,
                                                     seed=1), device, args.repeats)
        t_mllm, _ = timed(lambda: judge.p_yes(standin(e), QUESTION), device, args.repeats)  # a new image each time
        full = estimate_for(prior, norm, judge, args.image_size)
        tokens = full.part("MLLM forward").detail.split(" (")[0]
        put(f"gate check: prior sample + MLLM yes/no on {args.image_size}px (render excluded) [s]",
            f"{t_prior + t_mllm:.2f}")
        put(f"  of which the MLLM forward ({tokens}) [s]", f"{t_mllm:.2f}")
        if not cuda:
            measured = live_peak(lambda: judge.p_yes(standin(e), QUESTION))
            memory("  tensors alive at the peak, MLLM forward [MiB] (estimate)", measured,
                   full.part("MLLM forward").bytes)
        if cuda or args.paper_run:  # the paper's run: 50 steps, a check every 25, MLLM kept on the device
            gpu_peak_reset(device)
            t_run, res = timed(lambda: optimiser(prior, norm, args.run_steps, judge, StandInRenderer(args.image_size),
                                                 args.check_every).run(), device)
            checks = sum(r.gate is not None for r in res.records)
            put(f"{args.run_steps} optimisation steps with {checks} validity checks [s]", f"{t_run:.1f}")
            if cuda:
                memory("  peak GPU memory of that run [GiB] (estimate, all models resident)", gpu_peak(device),
                       full.all_resident(), budget.GIB)
        judge.model.to("cpu")
    if not cuda:
        put("peak RSS of the process so far [GiB]", f"{_max_rss() / budget.GIB:.2f}")


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine(device: torch.device) -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = (f"{cpu}, {psutil.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
            f"{psutil.virtual_memory().total / budget.GIB:.0f} GiB RAM, load average {os.getloadavg()[0]:.1f}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name}, {props.total_memory / budget.GIB:.0f} GiB"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description="real-shape prior / optimiser / gate benchmark")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (all three fit one GPU "
                                                         "call: under 4 minutes is the aim on an H200)")
    p.add_argument("--count", type=int, default=None, help="embeddings to sample (CPU 4, GPU 5000)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch (CPU 4, GPU 500)")
    p.add_argument("--ref-count", type=int, default=None,
                   help="embeddings diffusers' pipeline samples for the comparison (CPU: --count, GPU 1000)")
    p.add_argument("--opt-steps", type=int, default=None, help="optimiser steps timed (CPU 3, GPU 10)")
    p.add_argument("--run-steps", type=int, default=50, help="GPU: steps of the gated run (paper: ~50)")
    p.add_argument("--check-every", type=int, default=25, help="GPU: gate check interval (paper: 25)")
    p.add_argument("--image-size", type=int, default=512, help="side of the image the MLLM judges")
    p.add_argument("--prior-layers", type=int, default=20)
    p.add_argument("--mllm-layers", type=int, default=20, help="language-model layers (Qwen2-VL-2B: 28)")
    p.add_argument("--mllm-vision-depth", type=int, default=16, help="vision blocks (Qwen2-VL-2B: 32)")
    p.add_argument("--paper-run", action="store_true",
                   help="also on CPU: the gated run of --run-steps (checks the GPU-only code path on small shapes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default). On a small machine shared with other work, 1 avoids "
                        "OpenMP threads waiting on each other (measured 2-5x slower with 2 threads on 2 busy cores)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measure; the best counts")
    p.add_argument("--no-mllm", action="store_true")
    p.add_argument("--no-diffusers", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    args.count = args.count or (5000 if gpu else 4)
    args.batch = args.batch or (500 if gpu else min(4, args.count))
    args.opt_steps = args.opt_steps or (10 if gpu else 3)
    args.ref_count = args.ref_count or (min(1000, args.count) if gpu else args.count)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    print(f"machine: {machine(device)}")
    print(f"device: {device}; command: {' '.join(sys.argv)}")
    t = time.perf_counter()
    prior = build_prior(args.prior_layers)
    judge = None if args.no_mllm else build_mllm(args.mllm_layers, args.mllm_vision_depth)
    n_tf = sum(x.numel() for x in prior.transformer.parameters())
    n_te = sum(x.numel() for x in prior.text_encoder.parameters())
    line = f"prior transformer {n_tf / 1e9:.3f} B + text encoder {n_te / 1e6:.0f} M params"
    if judge is not None:
        n_v = sum(x.numel() for x in judge.model.model.visual.parameters())
        n_all = model_shapes.module_bytes(judge.model)[0]
        line += f"; MLLM {n_all / 1e9:.3f} B params (vision {n_v / 1e6:.0f} M), Qwen2-VL-2B shape, depth-cut"
    print(f"{line}; built in {time.perf_counter() - t:.0f} s")

    rows: dict = {}
    for name in names:
        t = time.perf_counter()
        run_dtype(name, prior, judge, device, args, rows)
        print(f"[{name} done in {time.perf_counter() - t:.0f} s]", flush=True)
    cols = rows.pop("_cols")
    print("\n| measure | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for key, values in rows.items():
        print(f"| {key} | " + " | ".join(str(values.get(c, "")) for c in cols) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; total {time.perf_counter() - start:.0f} s")
    print(f"(best of {args.repeats} timed runs after a warm-up; estimates in parentheses from "
          "nodes/engine/budget.py; *random weights amplify float rounding over 5 guided steps: one prior step "
          "agrees to ~1e-6 in fp32)")


if __name__ == "__main__":
    main()
