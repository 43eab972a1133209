"""Creative Generation: a ComfyUI node pack for creative image generation with a diffusion prior.

Kept import-cheap on purpose: ComfyUI imports every pack at start-up, so nothing heavy (torch
models, diffusers pipelines) is touched here; the node classes load when ComfyUI asks for them.
"""

WEB_DIRECTORY = "./web"  # the curation grid and small display fixes (plain JavaScript, no build step)


async def comfy_entrypoint():
    """ComfyUI V3 registration hook: returns the extension that lists our nodes."""
    from .nodes.pack import CreativeExtension

    return CreativeExtension()
