"""The pack's test bed, apart from the paper's engine: tiny-model builders for tests, the bundled mini
world (its world, training, independent judge, evaluation and report), a headless ComfyUI runner and
the main job. It depends on the engine; no node module imports it.

Run its commands with ``python nodes/testbed/run.py COMMAND`` (see ``run.py``).
"""
