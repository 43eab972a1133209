"""Tiny random models built from configs, in the same folder layouts real models use.

They exist so that the whole pipeline (and the test suite) runs on a machine with no model
downloads; they go through exactly the loaders users' real weights go through.
"""
