"""Torch-only building blocks shared by attacks, baselines and experiments (DESIGN.md §2).

Nothing in bdcore/ knows about Hydra, run folders or the artifact store.
"""
