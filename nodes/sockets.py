"""Our custom socket types, namespaced so they never collide with other packs' types."""

from comfy_api.latest import io

from .engine.bank import PAPER_TEMPLATE

Prior = io.Custom("CREATIVE_PRIOR")
Embeds = io.Custom("CREATIVE_EMBEDS")
Norm = io.Custom("CREATIVE_NORM")
Loss = io.Custom("CREATIVE_LOSS")
Gate = io.Custom("CREATIVE_GATE")
MLLM = io.Custom("CREATIVE_MLLM")
Decoder = io.Custom("CREATIVE_DECODER")
Renderer = io.Custom("CREATIVE_RENDERER")
Concept = io.Custom("CREATIVE_CONCEPT")
Log = io.Custom("CREATIVE_LOG")

CATEGORY = "creative"
DTYPES = ["auto", "fp32", "bf16", "fp16"]
TRAIN_CHOICES = {"token + LoRA": "both", "token": "token", "LoRA": "lora"}  # shown -> OptimConfig.train
PAPER_PROMPT = PAPER_TEMPLATE.format(subject="vehicle")  # the paper's template, for the default subject
SEED = dict(default=0, min=0, max=2**63 - 1)  # a seed widget's range: any 63-bit seed
