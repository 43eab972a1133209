"""Loaders (prior, decoder, multimodal LLM), concept application and rendering nodes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from comfy_api.latest import io

from . import comfy_bridge as cb
from . import inputs, memory
from . import sockets as s
from .engine import budget
from .engine.mllm import load_mllm
from .engine.prior import load_prior
from .engine.render import DecoderRenderer, RenderSettings, load_decoder

DOWNLOAD_TIP = ("Off (default): load only from local model folders, never touching the network. "
                "On: download 'hf_repo_id' from Hugging Face into the model folder first.")


def _download_inputs(example: str) -> list:
    return [io.Boolean.Input("allow_download", default=False, tooltip=DOWNLOAD_TIP),
            io.String.Input("hf_repo_id", default="", tooltip=f"Hugging Face repo id to download, e.g. {example}. "
                            "Used only when allow_download is on.")]


@dataclass(frozen=True)
class ModelKind:
    """One kind of model a loader node lists and loads: its name, ComfyUI folder, finder, an example repo,
    the engine's loader and the kind ComfyUI's model management knows it as."""

    what: str
    folder: str
    find: Callable[[], dict[str, Path]]
    example: str
    loader: Callable[..., memory.Managed]
    kind: str

    def options(self) -> list[str]:
        return sorted(self.find())

    def check(self, choice: str | None, allow_download: bool | None, hf_repo_id: str | None) -> bool | str:
        if allow_download is True and (hf_repo_id is None or hf_repo_id.strip()):
            return inputs.repo_id_problem(hf_repo_id, self.example) or True  # None: linked, checked before it runs
        if choice is None:
            return True  # linked: checked again with the real values before the node runs
        if isinstance(choice, str) and choice in self.find():
            return True
        return (f"No {self.what} '{choice}' found in models/{self.folder}. Download e.g. {self.example} into "
                f"models/{self.folder}/ (a diffusers/transformers folder) and refresh, or switch on allow_download "
                "with hf_repo_id.")

    def load(self, choice: str, dtype: str, allow_download: bool, hf_repo_id: str, **options: object) -> memory.Managed:
        """Resolve the folder (downloading only when allowed), load it on ComfyUI's offload device in the dtype
        chosen for its compute device, and register it: ComfyUI moves it in when a node uses it."""
        folder = self.resolve(choice, allow_download, hf_repo_id)
        _, torch_dtype = cb.device_and_dtype(dtype)
        _, offload = memory.devices(self.kind)
        return memory.register(self.loader(str(folder), device=offload, dtype=torch_dtype, **options), self.kind)

    def fingerprint(self, choice: str) -> str:
        return cb.folder_fingerprint(self.find().get(choice))

    def resolve(self, choice: str, allow_download: bool, hf_repo_id: str) -> Path:
        if allow_download is True and hf_repo_id.strip():  # only a real True downloads
            return cb.download(hf_repo_id, self.folder)
        return cb.resolve(choice, self.find(), self.what, self.folder)


PRIOR = ModelKind("prior", cb.DIFFUSERS, cb.prior_folders, "kandinsky-community/kandinsky-2-1-prior", load_prior,
                  budget.PRIOR)
DECODER = ModelKind("decoder", cb.DIFFUSERS, cb.decoder_folders, "kandinsky-community/kandinsky-2-2-decoder",
                    load_decoder, budget.DECODER)
MLLM = ModelKind("multimodal LLM", cb.LLM, cb.mllm_folders, "llava-hf/llava-v1.6-mistral-7b-hf", load_mllm,
                 budget.MLLM)  # kept off the GPU except while it answers


class LoadPrior(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoadPrior", display_name="Load Diffusion Prior (Creative)", category=f"{s.CATEGORY}/loaders",
            description="Loads a text-to-image-embedding diffusion prior (Kandinsky 2.1/2.2 prior, Karlo) from a "
                        "diffusers folder in models/diffusers.",
            inputs=[io.Combo.Input("prior", options=PRIOR.options(),
                                   tooltip="A diffusers prior folder under models/diffusers, e.g. "
                                           "kandinsky-2-1-prior (the paper's model)."),
                    io.Combo.Input("dtype", options=s.DTYPES, default="auto",
                                   tooltip="auto: bf16/fp16 on GPU, fp32 on CPU."),
                    *_download_inputs(PRIOR.example)],
            outputs=[s.Prior.Output(display_name="prior")])

    @classmethod
    def validate_inputs(cls, prior=None, allow_download=False, hf_repo_id="") -> bool | str:
        return PRIOR.check(prior, allow_download, hf_repo_id)

    @classmethod
    def fingerprint_inputs(cls, prior, dtype, allow_download=False, hf_repo_id="") -> str:
        return PRIOR.fingerprint(prior)

    @classmethod
    @cb.training_mode
    def execute(cls, prior, dtype, allow_download=False, hf_repo_id="") -> io.NodeOutput:
        return io.NodeOutput(PRIOR.load(prior, dtype, allow_download, hf_repo_id))


class LoadDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoadDecoder", display_name="Load Kandinsky Decoder (Creative)",
            category=f"{s.CATEGORY}/loaders",
            description="Loads the decoder that pairs with a prior (Kandinsky 2.1 or 2.2) from models/diffusers.",
            inputs=[io.Combo.Input("decoder", options=DECODER.options(),
                                   tooltip="A diffusers decoder folder under models/diffusers, e.g. kandinsky-2-1 or "
                                           "kandinsky-2-2-decoder."),
                    io.Combo.Input("dtype", options=s.DTYPES, default="auto", tooltip="auto: bf16/fp16 on GPU, fp32 on CPU."),
                    *_download_inputs(DECODER.example)],
            outputs=[s.Decoder.Output(display_name="decoder")])

    @classmethod
    def validate_inputs(cls, decoder=None, allow_download=False, hf_repo_id="") -> bool | str:
        return DECODER.check(decoder, allow_download, hf_repo_id)

    @classmethod
    def fingerprint_inputs(cls, decoder, dtype, allow_download=False, hf_repo_id="") -> str:
        return DECODER.fingerprint(decoder)

    @classmethod
    @cb.training_mode
    def execute(cls, decoder, dtype, allow_download=False, hf_repo_id="") -> io.NodeOutput:
        return io.NodeOutput(DECODER.load(decoder, dtype, allow_download, hf_repo_id))


class LoadMLLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeLoadMLLM", display_name="Load Multimodal LLM (Creative)", category=f"{s.CATEGORY}/loaders",
            description="Loads an image-text-to-text model (LLaVA-NeXT, Qwen2-VL, ...) from models/LLM for the "
                        "validity gate. Text-only models are refused.",
            inputs=[io.Combo.Input("model", options=MLLM.options(),
                                   tooltip="A transformers folder under models/LLM, e.g. llava-v1.6-mistral-7b-hf."),
                    io.Combo.Input("dtype", options=s.DTYPES, default="auto", tooltip="auto: bf16/fp16 on GPU, fp32 on CPU."),
                    io.Boolean.Input("trust_remote_code", default=False,
                                     tooltip="Run Python code shipped with the model folder. Off unless you trust it."),
                    *_download_inputs(MLLM.example),
                    io.Boolean.Input("vision_check", default=True, optional=True,
                                     tooltip="On load, ask about a plain red and a plain blue image and refuse a "
                                             "model that cannot tell them apart (it would answer blind).")],
            outputs=[s.MLLM.Output(display_name="mllm")])

    @classmethod
    def validate_inputs(cls, model=None, allow_download=False, hf_repo_id="") -> bool | str:
        return MLLM.check(model, allow_download, hf_repo_id)

    @classmethod
    def fingerprint_inputs(cls, model, dtype, trust_remote_code, allow_download=False, hf_repo_id="",
                           vision_check=True) -> str:
        return MLLM.fingerprint(model)

    @classmethod
    @cb.training_mode
    def execute(cls, model, dtype, trust_remote_code, allow_download=False, hf_repo_id="",
                vision_check=True) -> io.NodeOutput:
        judge = MLLM.load(model, dtype, allow_download, hf_repo_id, trust_remote_code=trust_remote_code is True)
        if vision_check is not False:  # on unless truly off
            memory.use(judge)
            try:
                judge.check_vision().raise_if_blind()
            finally:
                memory.offload(judge)
        return io.NodeOutput(judge)


class DecoderRendererNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeDecoderRenderer", display_name="Decoder Renderer (Creative)", category=f"{s.CATEGORY}/render",
            description="Fixes how embeddings are drawn (steps, guidance, size, seed). Feed it to the optimiser "
                        "(for the validity gate) and to Render Embeddings.",
            inputs=[s.Decoder.Input("decoder", tooltip="The decoder that pairs with the prior (Load Kandinsky Decoder)."),
                    io.Int.Input("steps", default=25, min=1, max=200, tooltip="Decoder denoising steps."),
                    io.Float.Input("guidance", default=4.0, min=1.0, max=30.0, step=0.1,
                                   tooltip="Decoder classifier-free guidance."),
                    io.Int.Input("width", default=512, min=16, max=2048, step=16, tooltip="Image width in pixels."),
                    io.Int.Input("height", default=512, min=16, max=2048, step=16, tooltip="Image height in pixels."),
                    io.Int.Input("seed", **s.SEED, tooltip="Noise seed of the decoder."),
                    s.Prior.Input("prior", optional=True,
                                  tooltip="Optional: the prior, whose black-image embedding becomes the decoder's "
                                          "negative (Kandinsky's default). Without it the negative is zeros.")],
            outputs=[s.Renderer.Output(display_name="renderer")])

    @classmethod
    @cb.training_mode
    def execute(cls, decoder, steps, guidance, width, height, seed, prior=None) -> io.NodeOutput:
        memory.use(prior)
        negative = prior.zero_image_embed() if prior is not None else None
        renderer = DecoderRenderer(decoder, RenderSettings(steps, guidance, height, width, seed), negative)
        memory.check_renderer(renderer)  # refuse a size that cannot be drawn here, not at the first render
        return io.NodeOutput(renderer)


class RenderEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeRenderEmbeds", display_name="Render Embeddings (Creative)", category=f"{s.CATEGORY}/render",
            description="Draws embeddings (a bank or a concept's samples) with a renderer.",
            inputs=[s.Renderer.Input("renderer", tooltip="How to draw (Decoder Renderer)."),
                    s.Embeds.Input("embeds", tooltip="The embeddings to draw (a bank or a concept's samples)."),
                    io.Int.Input("start", default=0, min=0, tooltip="First embedding of the bank to draw."),
                    io.Int.Input("count", default=4, min=1, max=256, tooltip="How many embeddings to draw.")],
            outputs=[io.Image.Output(display_name="images")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    @cb.training_mode
    def execute(cls, renderer, embeds, start, count) -> io.NodeOutput:
        chosen = embeds.embeds[start:start + count]
        if not len(chosen):
            raise ValueError(f"start={start} is past the end of the bank ({len(embeds)} embeddings).")
        memory.prepare_rendering(renderer, len(chosen))  # refuses a render that cannot fit, then loads it
        progress = cb.Progress(cls.hidden.unique_id, renderer.settings.steps)
        return io.NodeOutput(renderer(chosen, progress=lambda i, n: progress(i, total=n)))


class ApplyConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CreativeApplyConcept", display_name="Apply Concept to Prior (Creative)", category=f"{s.CATEGORY}",
            description="A prior that understands a learned concept's token; sample it with a prompt using the token.",
            inputs=[s.Prior.Input("prior", tooltip="The prior the concept was trained on (checked)."),
                    s.Concept.Input("concept", tooltip="A learned concept (Load Concept or the optimiser's output).")],
            outputs=[s.Prior.Output(display_name="prior"), io.String.Output(display_name="token")])

    @classmethod
    def execute(cls, prior, concept) -> io.NodeOutput:
        return io.NodeOutput(prior.with_concept(concept), concept.token)


NODES = [LoadPrior, LoadDecoder, LoadMLLM, DecoderRendererNode, RenderEmbeds, ApplyConcept]
