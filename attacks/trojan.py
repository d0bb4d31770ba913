"""TrojanNN (Liu et al. 2018) as BackdoorBench runs it (docs/methods/attacks.md).

Trigger generation, in `prepare` against the job's clean model:
1. neurons: the `num_neurons` inputs of `selected_layer` (default: the model's last Linear, BackdoorBench's
   `linear` / `classifier.6` / ...) with the largest sum over outputs of |W| ("most connected");
2. mask m in [0, 1] (an image resized like BackdoorBench, PIL bilinear); only pixels with m > 0 are free;
3. PGD from x0 = m: cost = sum_i (a_i(x * [m > 0]) - t_i)^2 over the selected layer's *input* a, step 0.1 along
   -sign(grad), |x - x0| <= 0.3, x in [0, 1], 1000 steps or until cost < 1e-3 (t_i = 100);
4. trigger T = uint8(255 x), truncated (ToPILImage).
Stamping: img + T, clipped. Label-flip poisoning as BadNets. The backdoored model is trained from scratch.

Compatibility switches (default = intended; the right-hand value is BackdoorBench's published behaviour):
  neuron_selection: trained | random_head   published: the 10-class head never loads into the 1000-class
                                            model, so the neurons come from a random 1000 x d matrix
  pgd_input: normalized | raw               published: PGD feeds un-normalised [0, 1] images
  stamp: saturate | wrap                    published: cast to uint8 before clipping, so img + T >= 256 wraps
The built-in mask (no `pattern_path`) is an apple-shaped silhouette in the bounding box of BackdoorBench's
apple4.png; pass apple4.png as `pattern_path` for the published mask.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from attacks.base import Attack, AttackConfigError, AttackResources, load_pattern_image, pil_resize
from bdcore.data import DatasetSpec, ImageSet

PUBLISHED_HEAD_CLASSES = 1000  # BackdoorBench builds the trigger model with 1000 classes


def builtin_apple_mask(size: int = 224) -> Image.Image:
    """A white apple-like silhouette (two lobes and a stalk) on black, in apple4.png's box (rows 120-203,
    cols 128-194 of 224); about 112 pixels > 0 at 32 x 32 (apple4.png: 117)."""
    img = Image.new("RGB", (224, 224))
    draw = ImageDraw.Draw(img)
    white = (255, 255, 255)
    draw.ellipse([130, 134, 168, 201], fill=white)
    draw.ellipse([154, 134, 192, 201], fill=white)
    draw.polygon([(159, 120), (163, 120), (165, 136), (158, 136)], fill=white)
    return img if size == 224 else img.resize((size, size), Image.BILINEAR)


def mask_tensor(mask_hwc: np.ndarray) -> torch.Tensor:
    """uint8 H x W x C -> float (C, H, W) in [0, 1], as ToTensor."""
    return torch.from_numpy(mask_hwc.transpose(2, 0, 1).copy()).float() / 255


def last_linear_name(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise AttackConfigError("attack=trojan found no nn.Linear in the model; set attack.selected_layer to a "
                                "module name, e.g. attack.selected_layer=linear")
    return names[-1]


def most_connected_neurons(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` inputs with the largest sum over outputs of |W| (conv: spatial dims summed first)."""
    magnitude = weight.detach().abs()
    if magnitude.ndim == 4:
        magnitude = magnitude.flatten(2).sum(2)
    elif magnitude.ndim != 2:
        raise AttackConfigError(f"attack=trojan selects neurons of a linear or conv weight, got shape "
                                f"{tuple(weight.shape)}; set attack.selected_param to such a weight")
    return torch.argsort(magnitude.sum(0), descending=True)[:count]


def random_head_weight(in_features: int, seed: int) -> torch.Tensor:
    """The published selection matrix: a freshly initialised nn.Linear(in_features, 1000) weight
    (U(-1/sqrt(d), 1/sqrt(d)), torch's default), drawn from a generator seeded by `seed`."""
    bound = 1.0 / in_features ** 0.5
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(PUBLISHED_HEAD_CLASSES, in_features).uniform_(-bound, bound, generator=generator)


@contextmanager
def layer_input(model: nn.Module, layer: str):
    """Record the input of `model.<layer>` on every forward (TrojanNN's 'neurons' are that layer's inputs)."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handle = modules[layer].register_forward_hook(lambda _m, inputs, _o: seen.__setitem__("x", inputs[0]))
    try:
        yield seen
    finally:
        handle.remove()


def neuron_cost(features: torch.Tensor, neurons: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i sum_batch (features[:, n_i] - t_i)^2 (a conv layer's input also sums over its map)."""
    total = features.new_zeros(())
    for index, value in zip(neurons.tolist(), targets.tolist()):
        total = total + ((features[:, index] - value) ** 2).sum()
    return total


def optimise_trigger(features_of: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor,
                     neurons: torch.Tensor, targets: torch.Tensor, *, eps: float = 0.3, step: float = 0.1,
                     iterations: int = 1000, tolerance: float = 1e-3,
                     progress: bool = True) -> tuple[torch.Tensor, int]:
    """BackdoorBench's pgd_with_mask_to_selected_neuron on a (1, C, H, W) mask in [0, 1]: signed-gradient descent
    on the neuron cost of x * [mask > 0], projected to |x - mask| <= eps and [0, 1]. Returns (x, steps)."""
    keep = (mask > 0).to(mask.dtype)
    start = mask.detach()
    x = start.clone()
    steps = 0
    for _ in tqdm(range(iterations), desc="TrojanNN trigger", disable=not progress, mininterval=2.0, leave=False):
        x.requires_grad_(True)
        cost = neuron_cost(features_of(x * keep), neurons, targets)
        (grad,) = torch.autograd.grad(cost, x)
        moved = x.detach() - step * grad.sign()
        x = (start + (moved - start).clamp(-eps, eps)).clamp(0, 1)
        steps += 1
        if float(cost.detach()) < tolerance:
            break
    return x.detach(), steps


def trigger_from_image(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (C, H, W) -> uint8 by x * 255 truncated (torchvision's ToPILImage)."""
    return (x * 255).to(torch.uint8)


def stamp_trigger(images: torch.Tensor, trigger: torch.Tensor, mode: str = "saturate") -> torch.Tensor:
    """img + T: saturated at 255, or wrapped modulo 256 (BackdoorBench casts to uint8 before it clips)."""
    trigger = trigger.to(images.device)
    if mode == "wrap":
        return images + trigger  # uint8 arithmetic wraps modulo 256
    return (images.to(torch.int16) + trigger.to(torch.int16)).clamp_(0, 255).to(torch.uint8)


class TrojanNN(Attack):
    def __init__(self, spec: DatasetSpec, target: int = 0, poison_ratio: float = 0.1,
                 label_transform: str = "all2one", pattern_path: str | None = None,
                 selected_layer: str | None = None, selected_param: str | None = None, num_neurons: int = 2,
                 neuron_target: float | Sequence[float] = 100.0, iterations: int = 1000, step: float = 0.1,
                 eps: float = 0.3, tolerance: float = 1e-3, seed: int = 0, neuron_selection: str = "trained",
                 pgd_input: str = "normalized", stamp: str = "saturate", progress: bool = True,
                 train_overrides: dict | None = None):
        super().__init__(spec, target, poison_ratio, label_transform, train_overrides)
        for key, value, allowed in (("neuron_selection", neuron_selection, ("trained", "random_head")),
                                    ("pgd_input", pgd_input, ("normalized", "raw")),
                                    ("stamp", stamp, ("saturate", "wrap"))):
            if value not in allowed:
                raise AttackConfigError(f"attack.{key}={value!r}; use one of {' | '.join(allowed)} "
                                        f"(e.g. attack.{key}={allowed[0]})")
        if int(num_neurons) < 1 or int(iterations) < 1:
            raise AttackConfigError(f"attack.num_neurons={num_neurons} and attack.iterations={iterations} must be "
                                    ">= 1; BackdoorBench uses 2 and 1000")
        targets = [float(neuron_target)] * int(num_neurons) if isinstance(neuron_target, (int, float)) \
            else [float(t) for t in neuron_target]
        if len(targets) != int(num_neurons):
            raise AttackConfigError(f"attack.neuron_target has {len(targets)} values for attack.num_neurons="
                                    f"{num_neurons}; give one number or {num_neurons} numbers")
        mask = load_pattern_image(pattern_path, spec) if pattern_path else pil_resize(builtin_apple_mask(), spec)
        self.mask = mask_tensor(mask)  # (C, H, W) in [0, 1]
        if not bool((self.mask > 0).any()):
            raise AttackConfigError(f"attack.pattern_path={pattern_path} is an all-black mask; the trigger needs "
                                    "white (> 0) pixels, e.g. BackdoorBench's apple4.png")
        self.selected_layer, self.selected_param = selected_layer, selected_param
        self.settings = {"num_neurons": int(num_neurons), "neuron_target": targets, "iterations": int(iterations),
                         "step": float(step), "eps": float(eps), "tolerance": float(tolerance),
                         "neuron_selection": neuron_selection, "pgd_input": pgd_input}
        self.stamp_mode, self.seed, self.progress = stamp, int(seed), bool(progress)
        self.trigger: torch.Tensor | None = None  # uint8 (C, H, W)
        self.generation_seconds: float | None = None
        self.diagnostics: dict = {}

    def material(self) -> dict:
        """What the trigger depends on besides the data set, the clean model and the seed."""
        mask_digest = hashlib.sha256(self.mask.numpy().tobytes()).hexdigest()
        return {"generator": "backdoorbench-trojannn-v1", "seed": self.seed, "mask_sha256": mask_digest,
                "selected_layer": self.selected_layer, "selected_param": self.selected_param, **self.settings}

    def select_neurons(self, model: nn.Module, layer: str) -> torch.Tensor:
        param_name = self.selected_param or f"{layer}.weight"
        params = dict(model.named_parameters())
        if param_name not in params:
            raise AttackConfigError(f"attack.selected_param={param_name!r} is not a parameter of the model; "
                                    f"e.g. attack.selected_param={layer}.weight")
        weight = params[param_name]
        if self.settings["neuron_selection"] == "random_head" and weight.ndim == 2:
            weight = random_head_weight(weight.shape[1], self.seed)
        return most_connected_neurons(weight, self.settings["num_neurons"])

    def features_fn(self, model: nn.Module, seen: dict) -> Callable[[torch.Tensor], torch.Tensor]:
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        raw = self.settings["pgd_input"] == "raw"

        def features(x: torch.Tensor) -> torch.Tensor:
            model(x if raw else (x - mean.to(x.device)) / std.to(x.device))
            return seen["x"]
        return features

    def generate(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        s = self.settings
        model = model.to(device).eval()
        layer = self.selected_layer or last_linear_name(model)
        if layer not in dict(model.named_modules()):
            raise AttackConfigError(f"attack.selected_layer={layer!r} is not a module of the model; e.g. "
                                    f"attack.selected_layer={last_linear_name(model)}")
        neurons = self.select_neurons(model, layer)
        targets = torch.tensor(s["neuron_target"])
        mask = self.mask[None].to(device)
        with layer_input(model, layer) as seen:
            features = self.features_fn(model, seen)
            x, steps = optimise_trigger(features, mask, neurons, targets, eps=s["eps"], step=s["step"],
                                        iterations=s["iterations"], tolerance=s["tolerance"],
                                        progress=self.progress)
            with torch.no_grad():
                keep = (mask > 0).to(mask.dtype)
                before = torch.stack([features(mask * keep)[:, n].mean() for n in neurons.tolist()])
                after = torch.stack([features(x * keep)[:, n].mean() for n in neurons.tolist()])
        seconds = time.perf_counter() - start
        return {"trigger": trigger_from_image(x[0].cpu()), "neurons": neurons.cpu(),
                "activation_before": before.cpu(), "activation_after": after.cpu(),
                "steps": torch.tensor(steps), "generation_seconds": torch.tensor(seconds, dtype=torch.float64)}

    def prepare(self, train: ImageSet, resources: AttackResources) -> None:
        if self.trigger is not None:
            return
        result = resources.cached("trojannn_trigger", self.material(),
                                  lambda: self.generate(resources.clean_model(), resources.device))
        self.trigger = result["trigger"].clone()
        self.generation_seconds = float(result["generation_seconds"])
        self.diagnostics = {"neurons": result["neurons"].tolist(), "steps": int(result["steps"]),
                            "activation_before": result["activation_before"].tolist(),
                            "activation_after": result["activation_after"].tolist()}

    def apply_trigger(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("attack=trojan has no trigger yet: call prepare(train, resources) first")
        return stamp_trigger(images, self.trigger, self.stamp_mode)

    def state_dict(self) -> dict:
        if self.trigger is None:
            return {}
        state = {"trigger": self.trigger.clone(), "wrap": torch.tensor(self.stamp_mode == "wrap")}
        if self.generation_seconds is not None:
            state["generation_seconds"] = torch.tensor(self.generation_seconds, dtype=torch.float64)
        if self.diagnostics:  # plain lists and ints: loadable with weights_only
            state["diagnostics"] = dict(self.diagnostics)
        return state

    def load_state_dict(self, state: dict) -> None:
        if "trigger" in state:
            self.trigger = state["trigger"].clone()
        if "wrap" in state:
            self.stamp_mode = "wrap" if bool(state["wrap"]) else "saturate"
        if "generation_seconds" in state:
            self.generation_seconds = float(state["generation_seconds"])
        if "diagnostics" in state:
            self.diagnostics = dict(state["diagnostics"])

    def trigger_report(self) -> dict:
        """The selected neurons, the PGD steps taken and their mean activations before / after the trigger."""
        return dict(self.diagnostics)
