"""ComfyUI V3 nodes (thin wrappers) and the ComfyUI-free engine in ``engine/``."""
