"""Test-only ComfyUI custom nodes, loaded into the test server next to the pack; never shipped.

``TestSupportZeroConditioning`` stands in for ``CLIPTextEncode`` (and its SDXL variants) when a
workflow runs on a tiny test checkpoint: those are built without a text encoder (a real CLIP-H
text encoder alone would add ~700 MB, see shared/docs/comfyui.md §12), so their loader returns
``CLIP = None`` and ``CLIPTextEncode`` cannot run. This node returns the CONDITIONING such an
encoder would, with zeros: ``[[zeros(1, tokens, context_dim), {"pooled_output": zeros(1,
pooled_dim)}]]``. ``text`` is accepted (and ignored) so a rewrite can carry the original prompt.
"""

import torch


class TestSupportZeroConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "Ignored (kept from the replaced node)."}),
            "tokens": ("INT", {"default": 77, "min": 1, "max": 4096}),
            "context_dim": ("INT", {"default": 1024, "min": 1, "max": 16384,
                                    "tooltip": "Cross-attention width (SD2.x: 1024, SDXL: 2048)."}),
            "pooled_dim": ("INT", {"default": 1024, "min": 0, "max": 16384,
                                   "tooltip": "Pooled output width (SD2.x: 1024, SDXL: 1280); 0 = none."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/creative_generation"
    DESCRIPTION = "Test only: zero CONDITIONING in place of a text encoder the tiny test checkpoints lack."

    def encode(self, text, tokens, context_dim, pooled_dim):
        extra = {"pooled_output": torch.zeros(1, pooled_dim)} if pooled_dim else {}
        return ([[torch.zeros(1, tokens, context_dim), extra]],)


NODE_CLASS_MAPPINGS = {"TestSupportZeroConditioning": TestSupportZeroConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"TestSupportZeroConditioning": "Zero Conditioning (test support)"}
