"""Mix Concepts: two or three learned concepts of one prior combined with weights into a new concept."""

from __future__ import annotations

from comfy_api.latest import io

from . import comfy_bridge as cb
from . import memory
from . import sockets as s
from .engine.mixing import mix_concepts, normalised_weights

WEIGHT = dict(default=1.0, min=0.0, max=100.0, step=0.05)


def _token_problem(token: str | None) -> str | None:
    """A mix token must be one word in angle brackets (or empty: named after the subjects); None = linked."""
    token = token.strip() if isinstance(token, str) else ""
    if token and (any(c.isspace() for c in token) or not token.startswith("<") or not token.endswith(">")):
        return f"token {token!r}: write one word in angle brackets, e.g. <creative-mix>, or leave it empty."
    return None


class MixConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CreativeMixConcepts", display_name="Mix Concepts (Creative)", category=s.CATEGORY,
            description="Combines learned concepts of the same prior into a new one: the weighted mean of their "
                        "token vectors and peft's weighted adapter combination of their LoRAs (exact: the mixed "
                        "update is the weighted sum of the parents'). Weights are normalised to sum to 1. Save and "
                        "load the result like any concept.",
            inputs=[s.Prior.Input("prior", tooltip="The prior the concepts were trained on (checked)."),
                    s.Concept.Input("concept_a", tooltip="First concept (Load Concept or an optimiser's output)."),
                    s.Concept.Input("concept_b", tooltip="Second concept, trained on the same prior."),
                    io.Float.Input("weight_a", **WEIGHT, tooltip="Share of the first concept (1 and 0: the first "
                                   "concept unchanged)."),
                    io.Float.Input("weight_b", **WEIGHT, tooltip="Share of the second concept."),
                    s.Concept.Input("concept_c", optional=True, tooltip="Optional third concept."),
                    io.Float.Input("weight_c", **WEIGHT, optional=True,
                                   tooltip="Share of the third concept (ignored without one)."),
                    io.String.Input("token", default="", optional=True,
                                    tooltip="Placeholder token of the mix; empty = <creative-mix-{subjects}>.")],
            outputs=[s.Prior.Output(display_name="prior"), s.Concept.Output(display_name="concept"),
                     io.String.Output(display_name="token")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, weight_a=1.0, weight_b=1.0, token=None):
        if isinstance(weight_a, (int, float)) and isinstance(weight_b, (int, float)) and weight_a + weight_b <= 0:
            return "weight_a and weight_b are both 0: give at least one concept a positive weight."
        return _token_problem(token) or True

    @classmethod
    @cb.training_mode
    def execute(cls, prior, concept_a, concept_b, weight_a=1.0, weight_b=1.0, concept_c=None, weight_c=1.0,
                token=""):
        concepts = [concept_a, concept_b] + ([concept_c] if concept_c is not None else [])
        weights = [weight_a, weight_b] + ([weight_c] if concept_c is not None else [])
        normalised_weights(weights)  # refuses negative / all-zero weights before any model work
        token = str(token or "").strip()  # its format was checked with the other inputs, before any upstream work
        progress = cb.Progress(cls.hidden.unique_id, 2)
        progress(0, "mixing token vectors and LoRAs")
        memory.use(prior)
        mixed = mix_concepts(prior, concepts, weights, token)
        shares = ", ".join(f"{p['token'] or p['subject']} {p['weight']:.2f}" for p in mixed.meta["mixed_from"])
        progress(2, f"mixed {shares} -> {mixed.token or 'LoRA only'} (rank {mixed.lora_rank})")
        return io.NodeOutput(prior.with_concept(mixed), mixed, mixed.token)


NODES = [MixConcepts]
