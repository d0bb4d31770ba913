"""bdcore: the torch-only building blocks shared by attacks, baselines, otbr and experiments: models, data
sources, augmentation, the one training loop, the one evaluation routine, budgets, precision and I/O helpers.

Nothing in bdcore/ knows about Hydra, run folders or the artifact store (docs/architecture.md).
"""
