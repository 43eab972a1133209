"""A procedural image world and the small models trained on it, for a fully offline pipeline.

``world`` draws seeded 64x64 scenes (vehicles and non-vehicles in colours, sizes, positions and
backgrounds, some combinations deliberately rare) with captions and ground-truth labels;
``train`` trains, from that world only, a small CLIP, a diffusion prior, a Kandinsky-2.2-style
decoder and a tiny LLaVA-NeXT yes/no judge, saved in the folder layouts real models use; and
``judge`` is an independent classifier of the world's labels, for evaluation only (the
optimiser never sees it).
"""
