"""The ComfyUI-free engine: every algorithm of the paper, importable without ComfyUI."""
