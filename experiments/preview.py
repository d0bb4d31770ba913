"""Trigger preview: a PNG grid of clean test images, the same images poisoned, and the residual magnified.

    python -m experiments.preview attack=blended dataset=cifar10 [n=8] [out=preview.png] [store=true] [attack.alpha=0.3 ...]
    python -m experiments.preview experiment=quickstart attack=ssba threads=1   # the quickstart's own trigger

Any other key=value is a Hydra override of the project's config (conf/), presets included. The preview
keys everything like the pipeline does (run.py), so it shows the trigger a job of the same config uses:
if that job's backdoored model is in the artifact store (`paths.store_dir`), the attack state stored with
it (Input-aware's generator is trained with the classifier, so only that state shows its real trigger);
otherwise the attack is prepared with the store's resources, generating them (LF pattern, TrojanNN
trigger and their clean model, SSBA encoder, Input-aware mask) where a job would, and leaving them there
for it. CPU results and keys depend on the thread count: pass the sweep's `threads=`. `store=false` uses
no store (attacks that generate a trigger then stop with one line); `preview(..., resources=...)` takes
any object with `cached` / `clean_model` / `device` (attacks.base.AttackResources).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from attacks.base import Attack, AttackConfigError
from bdcore.data import ImageSet

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class NoResources:
    """Stands in for the resources when none were given: a one-line error as soon as an attack needs them."""

    device = torch.device("cpu")

    def __init__(self, attack_name: str):
        self.attack_name = attack_name

    def _missing(self, *_args, **_kwargs):
        raise AttackConfigError(f"attack={self.attack_name} generates its trigger from a clean model, which the "
                                "preview was not given; pass resources to experiments.preview.preview(), or set "
                                "attack.pattern_path where the attack accepts a pattern file")

    cached = clean_model = _missing


def preview_images(attack: Attack, test: ImageSet, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n non-target test images (the images bd_test holds) and the same images triggered."""
    keep = torch.nonzero(test.labels != attack.target).flatten()[:n]
    clean = test.images[keep]
    return clean, attack.apply_trigger(clean, test.labels[keep])


def residual_view(clean: torch.Tensor, poisoned: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(poisoned - clean) mapped to [0, 1] around grey 0.5, magnified so the largest |residual| reaches the
    edge; returns the image batch and the magnification."""
    residual = poisoned.to(torch.float32) - clean.to(torch.float32)
    peak = float(residual.abs().max())
    gain = 127.5 / peak if peak > 0 else 1.0
    return (0.5 + residual * gain / 255).clamp(0, 1), gain


def write_grid(clean: torch.Tensor, poisoned: torch.Tensor, out: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    residual, gain = residual_view(clean, poisoned)
    rows = [("clean", clean.float() / 255), ("poisoned", poisoned.float() / 255),
            (f"residual x{gain:.1f}", residual)]
    n = len(clean)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 0.8, 4.3), squeeze=False)
    for r, (name, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = batch[c].permute(1, 2, 0).numpy()
            if img.shape[2] == 1:
                ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def preview(attack: Attack, train: ImageSet, test: ImageSet, n: int = 8, out: str | Path = "preview.png",
            resources=None, name: str = "attack", state: dict | None = None) -> Path:
    """Write the grid of the attack's trigger: with `state` (what a backdoored model was trained with) that
    one, else the attack prepared with `resources` (generating its trigger if it needs to)."""
    if state is not None:
        attack, origin = attack.restored(state), "stored backdoored model's trigger"
    else:
        attack.prepare(train, resources if resources is not None else NoResources(name))
        origin = "trigger prepared for training"
    clean, poisoned = preview_images(attack, test, n)
    if len(clean) == 0:
        raise AttackConfigError(f"the test set has no image outside attack.target={attack.target} to preview")
    return write_grid(clean, poisoned, out,
                      f"{name} on {attack.spec.name}: {len(clean)} non-target test images ({origin})")


def store_context(cfg, data, make_model, settings) -> tuple[dict | None, object]:
    """The pipeline's view of this config's store: (the stored attack state of its backdoored model or None,
    the resources a job of this config would prepare the attack with)."""
    from bdcore.device import select_device
    from bdcore.precision import resolve_precision
    from experiments import pipeline as P
    from experiments.stages import safe_load
    from experiments.store import ArtifactStore, config_key

    device = select_device(cfg.device, 0)
    try:
        precision = resolve_precision(str(cfg.precision), device)
    except ValueError as err:
        raise AttackConfigError(str(err)) from None
    # a one-job run's default (run.py: usable cores / 1 parallel job); the store key counts it on CPUs
    threads = int(cfg.threads) if cfg.threads is not None else len(os.sched_getaffinity(0))
    if threads < 1:
        raise AttackConfigError(f"threads={cfg.threads} must be >= 1 (or null for the usable cores)")
    torch.set_num_threads(threads)
    store = ArtifactStore(cfg.paths.store_dir)
    material = P.backdoor_material(cfg, data, precision, threads, device)
    found = store.load("backdoor", config_key(material))
    state = safe_load(found[0] / "attack.pt", "store artifact") if found is not None else None
    return state, P.attack_resources(cfg, store, material, data, make_model, settings, device, precision)


def parse_args(argv: list[str]) -> tuple[list[str], int, str | None, bool]:
    """Split `n=`, `out=` and `store=` from the Hydra overrides."""
    overrides, n, out, use_store = [], 8, None, True
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "n":
            n = int(value)
        elif key == "out":
            out = value
        elif key == "store":
            if value.lower() not in ("true", "false"):
                raise AttackConfigError(f"store={value}: use store=true (the artifact store) or store=false")
            use_store = value.lower() == "true"
        else:
            overrides.append(arg)
    if n < 1:
        raise AttackConfigError(f"n={n}: the preview needs at least one image, e.g. n=8")
    return overrides, n, out, use_store


def main(argv: list[str] | None = None, resources=None) -> Path:
    from hydra import compose, initialize_config_dir

    from experiments import build as B

    overrides, n, out, use_store = parse_args(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    attack_name = cfg.hydra.runtime.choices.attack
    source = B.build_source(cfg)
    attack = B.build_attack(cfg, source.spec)
    data = B.load_data(source)
    state = None
    if resources is None and use_store:
        state, resources = store_context(cfg, data, B.model_factory(cfg, source.spec), B.train_settings(cfg))
    out = out or f"preview_{attack_name}_{source.spec.name}.png"
    path = preview(attack, data.train, data.test, n=n, out=out, resources=resources, name=attack_name, state=state)
    print(path)
    return path


if __name__ == "__main__":
    from hydra.errors import HydraException

    try:
        main()
    except (AttackConfigError, HydraException, ValueError, RuntimeError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
