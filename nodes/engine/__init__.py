"""The ComfyUI-free engine: every algorithm of the paper, importable without ComfyUI."""

__version__ = "0.1.0"
