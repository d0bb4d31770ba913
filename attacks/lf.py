"""Low Frequency (LF, Zeng et al. 2021) as BackdoorBench runs it (docs/methods/attacks.md).

Trigger: an additive, non-negative, smooth pattern P (uint8 values 0..51): out = clip(img + P, 0, 255),
truncated to uint8. Label-flip poisoning as BadNets.

P comes from `pattern_path` (BackdoorBench's lowFrequency/<dataset>_<model>_0_255.npy) or, without a path,
from BackdoorBench's generator, run in `prepare` against the job's clean model: a universal perturbation
towards the target class, built from targeted DeepFool steps, each passed through a fixed Gaussian low-pass
filter (sigma 6 px, 30 taps, zero padding) and min-max scaled to [0, 0.2]; P = uint8(v * 255) (truncated,
no offset, as BackdoorBench's shipped files). The result is cached by the pipeline's resources and kept in
`state_dict()`.

Compatibility switches (published behaviour on the right, default = intended):
  search_input: normalized | raw           DeepFool sees un-normalised [0, 1] images in the published script
  eval_perturbation: pixel | normalized    the fooling rate adds v after normalisation in the published script
  float_pattern: rescale | as_is           float .npy files in [0, 1] (vgg19_bn, convnext, vit) are added
                                           unscaled in BackdoorBench, so their trigger vanishes
The fooling-rate images are 10 per class from the training set (never the test set), disjoint from the
search images.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attacks.base import Attack, AttackConfigError, AttackResources
from bdcore.data import DatasetSpec, ImageSet, normalize


# ---------------------------------------------------------------- the low-pass filter and the scaling

def gaussian_taps(sigma: float = 6.0, size_factor: float = 5.0) -> torch.Tensor:
    """BackdoorBench's 1-D Gaussian (float32): sigma * size_factor taps at spacing size_factor on a Gaussian of
    std sigma * size_factor, i.e. std `sigma` pixels; normalised to sum 1."""
    wide = sigma * size_factor
    taps = int(wide)
    grid = (np.arange(wide, dtype=np.float32) - (wide - 1.0) / 2.0) * size_factor
    kernel = 1.0 / (wide * math.sqrt(2.0 * math.pi)) * np.exp(-((grid / wide) ** 2) * 0.5)
    kernel = kernel / np.sum(kernel)
    assert kernel.shape == (taps,) and kernel.dtype == np.float32
    return torch.from_numpy(kernel)


def lowpass(v: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable depthwise Gaussian on (C, H, W) float32 with BackdoorBench's zero padding: (k//2 - even) before,
    k//2 after, on both axes; vertical pass first, then horizontal. Output size = input size."""
    k = len(taps)
    before, after = k // 2 - (1 - k % 2), k // 2
    c = v.shape[0]
    x = F.pad(v[None].float(), (before, after, before, after))
    taps = taps.to(v.device, torch.float32)
    x = F.conv2d(x, taps.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, taps.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    return x[0]


def minmax_scale(v: torch.Tensor, top: float = 0.2) -> torch.Tensor | None:
    """(v - min) / (max - min) * top over the whole tensor; None when v is constant (BackdoorBench divides by 0)."""
    lo, hi = v.min(), v.max()
    if not bool(hi > lo):
        return None
    return (v - lo) / (hi - lo) * top


def pattern_from_perturbation(v: torch.Tensor) -> torch.Tensor:
    """[0, 0.2] float perturbation -> uint8 0..51 pattern, truncated (BackdoorBench's shipped files)."""
    return (v.float() * 255).clamp(0, 255).to(torch.uint8)


def add_pattern(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's SimpleAdditiveTrigger: clip(img + P) in float64, truncated to uint8."""
    summed = images.to(torch.float64) + pattern.to(images.device, torch.float64)
    return summed.clamp_(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- the search

def targeted_deepfool(classifier: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, target: int,
                      overshoot: float = 0.02, max_iter: int = 200) -> tuple[torch.Tensor, int]:
    """BackdoorBench's tar_deepfool on one (C, H, W) image: linearise f_target - f_original (the class predicted
    at the start), step |f_t - f_o| / ||w|| along w / ||w||, accumulate r, re-test image + (1 + overshoot) r,
    until the prediction is the target or max_iter steps. Returns ((1 + overshoot) r, steps taken)."""
    x = image[None].detach()
    with torch.no_grad():
        original = int(classifier(x).argmax(1))
    r_total = torch.zeros_like(x)
    current = x.clone().requires_grad_(True)
    logits = classifier(current)
    steps = 0
    while int(logits.argmax(1)) != target and steps < max_iter:
        # two gradients, subtracted, as the published code does (not the gradient of the difference)
        (grad_target,) = torch.autograd.grad(logits[0, target], current, retain_graph=True)
        (grad_original,) = torch.autograd.grad(logits[0, original], current)
        w = grad_target - grad_original
        gap = (logits[0, target] - logits[0, original]).detach()
        norm = w.norm()
        r_step = gap.abs() / norm * w / norm
        if not bool(torch.isfinite(r_step).all()):
            r_step = torch.zeros_like(r_step)
        r_total = r_total + r_step
        current = (x + (1 + overshoot) * r_total).requires_grad_(True)
        logits = classifier(current)
        steps += 1
    return ((1 + overshoot) * r_total)[0].detach(), steps


def fooling_rate(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 perturb: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 100) -> float:
    """Fraction of images whose predicted class changes under `perturb` (BackdoorBench's stopping statistic)."""
    changed = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            changed += int((classifier(batch).argmax(1) != classifier(perturb(batch)).argmax(1)).sum())
    return changed / max(1, len(images))


def universal_lowpass_perturbation(classifier: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                                   target: int, rng: np.random.RandomState,
                                   fooling: Callable[[torch.Tensor], float], *, taps: torch.Tensor,
                                   max_value: float = 0.2, delta: float = 0.8, max_passes: int = 50,
                                   overshoot: float = 0.02, deepfool_max_iter: int = 200, patience: int = 5,
                                   min_change: float = 0.01, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """BackdoorBench's universal_perturbation on [0, 1] images (M, C, H, W).

    Each pass visits the images in a freshly shuffled order; where x and x + v get the same class, a targeted
    DeepFool step dr from x + v that converges (< max_iter - 1 steps) updates v <- scale(G(v + G(dr))).
    After each pass `fooling(v)` is measured; stop at >= 1 - delta, after max_passes, or when the last
    `patience` rates span < min_change. Returns v (C, H, W) in [0, max_value] and per-pass diagnostics.
    """
    v = torch.zeros_like(images[0])
    order = np.arange(len(images))
    rates: list[float] = []
    updates, constant_skips = 0, 0
    rate = 0.0
    bar = tqdm(total=max_passes * len(images), desc="LF search", disable=not progress, mininterval=2.0,
               leave=False)
    while rate < 1 - delta and len(rates) < max_passes:
        rng.shuffle(order)
        for k in order:
            x = images[k]
            with torch.no_grad():
                same = int(classifier(x[None]).argmax(1)) == int(classifier((x + v)[None]).argmax(1))
            if same:
                dr, steps = targeted_deepfool(classifier, x + v, target, overshoot, deepfool_max_iter)
                if steps < deepfool_max_iter - 1:
                    scaled = minmax_scale(lowpass(v + lowpass(dr, taps), taps), max_value)
                    if scaled is None:  # e.g. the first image is already the target: dr = 0, v = 0
                        constant_skips += 1
                    else:
                        v, updates = scaled, updates + 1
            bar.update(1)
        rate = fooling(v)
        rates.append(rate)
        bar.set_postfix(fooling=f"{rate:.3f}")
        last = rates[-patience:]
        if len(last) == patience and max(last) - min(last) < min_change:
            break
    bar.close()
    return v, {"fooling_rates": rates, "updates": updates, "constant_skips": constant_skips}


def draw_search_images(labels: torch.Tensor, count: int, eval_per_class: int,
                       rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """`count` training indices for the search (numpy choice without replacement, as BackdoorBench draws its
    100 images), then up to `eval_per_class` per class among the rest for the fooling rate."""
    n = len(labels)
    if count > n:
        raise AttackConfigError(f"attack.search_images={count} but the training set has {n} images; "
                                f"use attack.search_images<={n}")
    search = rng.choice(n, count, replace=False)
    rest = np.setdiff1d(np.arange(n), search)
    rest_labels = labels.cpu().numpy()[rest]
    evaluation = []
    for cls in np.unique(rest_labels):
        pool = rest[rest_labels == cls]
        evaluation.extend(rng.choice(pool, min(eval_per_class, len(pool)), replace=False).tolist())
    return search, np.asarray(evaluation, dtype=np.int64)


# ---------------------------------------------------------------- pattern files

def load_lf_pattern(path: str | Path, spec: DatasetSpec, float_pattern: str = "rescale") -> torch.Tensor:
    """A BackdoorBench LF .npy as a (C, H, W) tensor in 0..255 units: 4-D arrays use [0], 3-D as is (H, W, C),
    2-D is stacked to the data set's channels. Float files with max <= 1 are 255x too small (vgg19_bn / convnext / vit):
    `rescale` multiplies them by 255; `as_is` keeps BackdoorBench's behaviour (the trigger truncates away)."""
    path = Path(path)
    if not path.is_file():
        raise AttackConfigError(f"attack.pattern_path={path} does not exist; give a BackdoorBench "
                                "lowFrequency .npy file or null to generate the pattern")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise AttackConfigError(f"attack.pattern_path={path} is not a numpy .npy array ({err}); e.g. "
                                "cifar10_preactresnet18_0_255.npy") from None
    if arr.ndim == 4:
        arr = arr[0]
    elif arr.ndim == 2:
        arr = np.stack([arr] * spec.channels, axis=-1)  # BackdoorBench: 3 channels (its only case)
    expected = (spec.height, spec.width, spec.channels)
    if arr.shape != expected:
        raise AttackConfigError(f"attack.pattern_path={path} holds a {arr.shape} pattern but {spec.name} needs "
                                f"{expected} (H, W, C); use the file made for this data set")
    pattern = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if pattern.is_floating_point():
        pattern = pattern.to(torch.float64)
        if float_pattern == "rescale" and float(pattern.max()) <= 1.0:
            pattern = pattern * 255
    return pattern


# ---------------------------------------------------------------- the attack

class LowFrequency(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", pattern_path: str | None = None,
                 float_pattern: str = "rescale", seed: int = 0, search_images: int = 100,
                 eval_per_class: int = 10, max_passes: int = 50, delta: float = 0.8, overshoot: float = 0.02,
                 deepfool_max_iter: int = 200, sigma: float = 6.0, size_factor: float = 5.0,
                 max_value: float = 0.2, patience: int = 5, min_change: float = 0.01,
                 search_input: str = "normalized", eval_perturbation: str = "pixel", progress: bool = True,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        for key, value, allowed in (("float_pattern", float_pattern, ("rescale", "as_is")),
                                    ("search_input", search_input, ("normalized", "raw")),
                                    ("eval_perturbation", eval_perturbation, ("pixel", "normalized"))):
            if value not in allowed:
                raise AttackConfigError(f"attack.{key}={value!r}; use one of {' | '.join(allowed)} "
                                        f"(e.g. attack.{key}={allowed[0]})")
        for key, value, published in (("search_images", search_images, 100), ("max_passes", max_passes, 50),
                                      ("deepfool_max_iter", deepfool_max_iter, 200), ("patience", patience, 5)):
            if int(value) < 1:
                raise AttackConfigError(f"attack.{key}={value} must be >= 1; BackdoorBench uses "
                                        f"attack.{key}={published}")
        if int(sigma * size_factor) < 1 or not 0 < float(max_value) <= 1:
            raise AttackConfigError(f"attack.sigma={sigma}, attack.size_factor={size_factor}, attack.max_value="
                                    f"{max_value} give no filter or range; BackdoorBench uses 6, 5 and 0.2")
        self.float_pattern, self.seed, self.progress = float_pattern, int(seed), bool(progress)
        self.search = {"search_images": int(search_images), "eval_per_class": int(eval_per_class),
                       "max_passes": int(max_passes), "delta": float(delta), "overshoot": float(overshoot),
                       "deepfool_max_iter": int(deepfool_max_iter), "sigma": float(sigma),
                       "size_factor": float(size_factor), "max_value": float(max_value),
                       "patience": int(patience), "min_change": float(min_change),
                       "search_input": search_input, "eval_perturbation": eval_perturbation}
        self.pattern: torch.Tensor | None = None  # (C, H, W), uint8 when generated
        self.generation_seconds: float | None = None  # wall time of the search (also when loaded from the cache)
        self.perturbation: torch.Tensor | None = None  # the float [0, max_value] search result, before uint8
        self.search_diagnostics: dict = {}
        if pattern_path:
            self.pattern = load_lf_pattern(pattern_path, spec, float_pattern)

    # -- the search, wired to the resources
    def material(self) -> dict:
        """What the generated pattern depends on besides the data set, the clean model and the seed."""
        return {"generator": "backdoorbench-lf-v1", "target": self.target, "seed": self.seed,
                "shape": [self.spec.channels, self.spec.height, self.spec.width], **self.search}

    def classifier(self, model: torch.nn.Module, raw: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """[0, 1] pixel-scale images -> logits; `raw` feeds them un-normalised (the published script)."""
        if raw:
            return model
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return lambda x: model((x - mean.to(x.device)) / std.to(x.device))

    def generate(self, train: ImageSet, model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        s = self.search
        model = model.to(device).eval()
        rng = np.random.RandomState(self.seed)
        search_idx, eval_idx = draw_search_images(train.labels, s["search_images"], s["eval_per_class"], rng)
        images = train.images[torch.from_numpy(search_idx)].to(device).float() / 255
        eval_images = train.images[torch.from_numpy(eval_idx)].to(device)
        search_classifier = self.classifier(model, raw=s["search_input"] == "raw")
        eval_classifier = self.classifier(model, raw=False)
        if s["eval_perturbation"] == "normalized":  # published: v added to the normalised test inputs
            eval_inputs = normalize(eval_images, self.spec)
            fooling = lambda v: fooling_rate(model, eval_inputs, lambda b: b + v)  # noqa: E731
        else:
            eval_inputs = eval_images.float() / 255
            fooling = lambda v: fooling_rate(eval_classifier, eval_inputs, lambda b: b + v)  # noqa: E731
        v, diagnostics = universal_lowpass_perturbation(
            search_classifier, images, self.target, rng, fooling, taps=gaussian_taps(s["sigma"], s["size_factor"]),
            max_value=s["max_value"], delta=s["delta"], max_passes=s["max_passes"], overshoot=s["overshoot"],
            deepfool_max_iter=s["deepfool_max_iter"], patience=s["patience"], min_change=s["min_change"],
            progress=self.progress)
        seconds = time.perf_counter() - start
        return {"pattern": pattern_from_perturbation(v.cpu()), "perturbation": v.cpu(),
                "fooling_rates": torch.tensor(diagnostics["fooling_rates"], dtype=torch.float64),
                "updates": torch.tensor(diagnostics["updates"]),
                "constant_skips": torch.tensor(diagnostics["constant_skips"]),
                "generation_seconds": torch.tensor(seconds, dtype=torch.float64)}

    def prepare(self, train: ImageSet, resources: AttackResources) -> None:
        if self.pattern is not None:  # a pattern file, or already prepared
            return
        result = resources.cached("lf_perturbation", self.material(),
                                  lambda: self.generate(train, resources.clean_model(), resources.device))
        self.pattern = result["pattern"].clone()
        self.perturbation = result["perturbation"].clone()
        self.generation_seconds = float(result["generation_seconds"])
        self.search_diagnostics = {"fooling_rates": result["fooling_rates"].tolist(),
                                   "updates": int(result["updates"]),
                                   "constant_skips": int(result["constant_skips"])}

    # -- the trigger
    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.pattern is None:
            raise RuntimeError("attack=lf has no pattern yet: call prepare(train, resources) first, or set "
                               "attack.pattern_path to a BackdoorBench lowFrequency .npy")
        return add_pattern(images, self.pattern)

    def state_dict(self) -> dict:
        if self.pattern is None:
            return {}
        state = {"pattern": self.pattern.clone()}
        if self.generation_seconds is not None:
            state["generation_seconds"] = torch.tensor(self.generation_seconds, dtype=torch.float64)
        if self.search_diagnostics:  # plain lists and ints: loadable with weights_only
            state["search_diagnostics"] = dict(self.search_diagnostics)
        return state

    def load_state_dict(self, state: dict) -> None:
        if "pattern" in state:
            self.pattern = state["pattern"].clone()
        if "generation_seconds" in state:
            self.generation_seconds = float(state["generation_seconds"])
        if "search_diagnostics" in state:
            self.search_diagnostics = dict(state["search_diagnostics"])

    def trigger_report(self) -> dict:
        """The search's fooling rate after each pass and its update / skip counts (empty for a pattern file)."""
        return dict(self.search_diagnostics)
