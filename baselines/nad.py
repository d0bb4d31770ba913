"""NAD — Neural Attention Distillation (Li et al., ICLR 2021) as BackdoorBench runs it (``defense/nad.py``).

1. Teacher: a copy of the backdoored model fine-tuned on the clean budget for ``te_epochs`` (10) epochs
   with FT's optimiser and a cosine schedule (T_max 100, per epoch; Tiny-ImageNet ReduceLROnPlateau and
   batch 128). It then stays in eval mode, frozen.
2. Student: another copy, trained on the same budget for ``te_epochs`` epochs as well (the published call
   passes ``te_epochs``; ``student_epochs`` overrides it) with loss
   ``CE + sum_i beta_i * MSE(a(f_i^student), a(f_i^teacher))``, the attention map of a feature map f being
   ``a(f) = sum_c |f_c|^p / (|| sum_c |f_c|^p ||_2 + 1e-6)`` over the spatial positions (the paper's
   attention transfer, p = 2). The distillation term is the loop's ``extra_loss`` hook. The student's lr
   is set per epoch by the published rule: ``lr`` for epochs 0-1, 0.01 for 2-19, 1e-4 afterwards.

Which feature maps (``layers``; null = chosen by the rule below; else 1-3 module names, shallow to deep,
paired with the last betas so the deepest gets ``beta3``):

* default: the outputs of the last three child modules with parameters whose output is a spatial map
  (H x W > 1) — for PreAct-ResNet18 ``layer2``, ``layer3``, ``layer4`` with beta1, beta2, beta3 — taken by
  forward hooks during the student's own forward pass.
* ``published_bugs: true`` (BackdoorBench): the outputs of ``children[:-3]``, ``children[:-2]``,
  ``children[:-1]`` — for PreAct-ResNet18 ``layer3``, ``layer4`` and the 1 x 1 ``avgpool`` output, whose
  attention map normalises to 1 for any network, so its beta3 term is exactly 0 (other architectures: only
  ``children[:-1]`` with beta3, equally degenerate after global pooling). Each is recomputed by an extra
  forward pass of the student in train mode, which moves BatchNorm running statistics 3-4 times per
  batch instead of once (docs/methods/defenses.md).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.base import defense
from baselines.finetune import (Stopwatch, check, finetune_settings, history_summary,
                                require_clean_data, require_finite, resolve_device, steps_per_epoch,
                                train_on_clean, validate_schedule)
from bdcore.data import normalize
from bdcore.models import PreActResNet18
from bdcore.train import TrainingHooks

ATTENTION_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------

def attention_map(features: torch.Tensor, p: float = 2.0, eps: float = ATTENTION_EPS) -> torch.Tensor:
    """``sum_c |f|^p`` (N x 1 x H x W) divided by its spatial L2 norm + eps."""
    am = torch.pow(torch.abs(features), p).sum(dim=1, keepdim=True)
    return am / (torch.norm(am, dim=(2, 3), keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean squared difference of the two attention maps."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def student_learning_rate(epoch: int, lr: float) -> float:
    """BackdoorBench's ``adjust_learning_rate`` for NAD's student (epoch counted from 0)."""
    if epoch < 2:
        return lr
    if epoch < 20:
        return 0.01
    return 0.0001


def published_attention_depths(model: nn.Module) -> list[int]:
    """k of the published ``nn.Sequential(children[:-k])`` feature extractors, shallow to deep."""
    return [3, 2, 1] if isinstance(model, PreActResNet18) else [1]


def spatial_children(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, output shape)`` of the direct children, except the last (the classifier), that hold
    parameters and output a 4-D map with H x W > 1, in forward order (probed on ``sample``, eval mode)."""
    children = list(model.named_children())[:-1]
    shapes, handles = {}, []
    for name, child in children:
        if any(True for _ in child.parameters()):
            handles.append(child.register_forward_hook(
                lambda module, inputs, output, name=name: shapes.__setitem__(name, tuple(output.shape))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(name, shapes[name]) for name, _ in children
            if name in shapes and len(shapes[name]) == 4 and shapes[name][2] * shapes[name][3] > 1]


def default_attention_layers(model: nn.Module, sample: torch.Tensor) -> list[str]:
    names = [name for name, _ in spatial_children(model, sample)][-3:]
    if not names:
        raise ValueError(f"nad found no child module of {type(model).__name__} with a spatial output to "
                         "distil; set defense.layers to 1-3 module names (e.g. [layer2, layer3, layer4])")
    return names


class Capture:
    """Forward hooks keeping the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: self.outputs.__setitem__(name, output)) for name in names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AttentionDistillation:
    """The ``extra_loss`` hook: ``sum_i beta_i * AT(student_i, teacher_i)`` on the current batch.

    Default: the student's maps come from hooks on its own forward pass (``student_capture``). Published:
    each map is recomputed by ``nn.Sequential(children[:-k])(x)`` in train mode (``depths``). The teacher
    (eval mode, no grad) always runs once with hooks: in eval mode the extra passes would give the same maps.
    """

    def __init__(self, teacher: nn.Module, teacher_capture: Capture, names: list[str], betas: list[float],
                 p: float, student_capture: Capture | None = None, depths: list[int] | None = None):
        self.teacher, self.teacher_capture = teacher, teacher_capture
        self.names, self.betas, self.p = names, betas, p
        self.student_capture, self.depths = student_capture, depths
        self.last_terms: list[float] = []

    def student_maps(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if self.depths is None:
            return [self.student_capture.outputs[name] for name in self.names]
        children = list(model.children())
        return [nn.Sequential(*children[:-k])(x) for k in self.depths]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, epoch: int):
        with torch.no_grad():
            self.teacher(x)
        teacher_maps = [self.teacher_capture.outputs[name].detach() for name in self.names]
        terms = [beta * attention_loss(s, t, self.p)
                 for beta, s, t in zip(self.betas, self.student_maps(model, x), teacher_maps)]
        self.last_terms = [float(t.detach()) for t in terms]
        return sum(terms)


# --------------------------------------------------------------------------------------------------
# defense entry point
# --------------------------------------------------------------------------------------------------

def validate(te_epochs: int = 10, student_epochs: int | None = None, batch_size: int = 256, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, teacher_scheduler: str = "cosine",
             t_max: int = 100, beta1: float = 500.0, beta2: float = 1000.0, beta3: float = 1000.0,
             p: float = 2.0, layers: list[str] | None = None, published_bugs: bool = False) -> None:
    validate_schedule(epochs=te_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                      weight_decay=weight_decay, scheduler=teacher_scheduler, t_max=t_max)
    check(student_epochs is None or (isinstance(student_epochs, int) and student_epochs >= 0), "student_epochs",
          student_epochs, "null (= te_epochs, as published) or an integer >= 0")
    for key, beta in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        check(isinstance(beta, (int, float)) and beta >= 0, key, beta, "a number >= 0 (e.g. 1000)")
    check(isinstance(p, (int, float)) and p > 0, "p", p, "a number > 0 (e.g. 2.0)")
    check(layers is None or (isinstance(layers, (list, tuple)) and 1 <= len(layers) <= 3
                             and all(isinstance(n, str) for n in layers)),
          "layers", layers, "null or 1-3 module names, shallow to deep (e.g. [layer2, layer3, layer4])")
    check(isinstance(published_bugs, bool), "published_bugs", published_bugs, "true or false")
    check(not (published_bugs and layers is not None), "layers", layers,
          "null with published_bugs=true (BackdoorBench picks the feature maps itself)")


@defense(data_free=False, validate=validate)
def defend(model: nn.Module, data, *, seed: int = 0, device=None, progress: bool = True, te_epochs: int = 10,
           student_epochs: int | None = None, batch_size: int = 256, lr: float = 0.01, momentum: float = 0.9,
           weight_decay: float = 5e-4, teacher_scheduler: str = "cosine", t_max: int = 100, beta1: float = 500.0,
           beta2: float = 1000.0, beta3: float = 1000.0, p: float = 2.0, layers: list[str] | None = None,
           published_bugs: bool = False) -> tuple[nn.Module, dict]:
    """NAD on deep copies of ``model`` (teacher and student); the input model is not modified.

    Diagnostics: ``layers`` with their betas and map sizes, ``final_attention_terms`` (each beta-weighted
    term on the last batch), teacher / student histories, ``teacher_seconds``, ``student_seconds`` and
    ``nad_seconds``.
    """
    data = require_clean_data(data, "nad")
    validate(te_epochs, student_epochs, batch_size, lr, momentum, weight_decay, teacher_scheduler, t_max,
             beta1, beta2, beta3, p, None if layers is None else list(layers), published_bugs)
    device = resolve_device(model, device)
    augment = data.augment is not None
    epochs = te_epochs if student_epochs is None else student_epochs
    with Stopwatch() as total:
        teacher = copy.deepcopy(model)
        with Stopwatch() as teacher_clock:
            teacher_history = train_on_clean(
                teacher, data,
                finetune_settings(epochs=te_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                  weight_decay=weight_decay, scheduler=teacher_scheduler, t_max=t_max,
                                  augment=augment),
                device=device, seed=seed, progress=progress, description="nad teacher")
        teacher.eval().requires_grad_(False)

        student = copy.deepcopy(model).to(device)
        sample = normalize(data.clean.images[:2].to(device), data.spec)
        all_betas = [float(beta1), float(beta2), float(beta3)]
        if published_bugs:
            depths = published_attention_depths(student)
            children = [name for name, _ in student.named_children()]
            names = [children[-k - 1] for k in depths]
        else:
            depths = None
            names = list(layers) if layers is not None else default_attention_layers(student, sample)
            for name in names:
                try:
                    student.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"defense.layers names {name!r}, which {type(student).__name__} does not "
                                     "have; use module names such as layer2, layer3, layer4") from None
        betas = all_betas[-len(names):]
        shapes = _output_shapes(student, names, sample)
        teacher_capture = Capture(teacher, names)
        student_capture = None if published_bugs else Capture(student, names)
        distil = AttentionDistillation(teacher, teacher_capture, names, betas, float(p),
                                       student_capture=student_capture, depths=depths)
        steps = steps_per_epoch(len(data.clean), batch_size)
        rates = [student_learning_rate(step // steps, lr) for step in range(epochs * steps)]
        settings = finetune_settings(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, scheduler="constant", t_max=t_max, augment=augment)
        try:
            with Stopwatch() as student_clock:
                student_history = train_on_clean(student, data, settings, device=device, seed=seed + 2,
                                                 hooks=TrainingHooks(extra_loss=distil, learning_rates=rates),
                                                 progress=progress, description="nad student")
        finally:
            teacher_capture.remove()
            if student_capture is not None:
                student_capture.remove()
    student.eval()
    require_finite(student, "nad")
    return student, {
        "defense": "nad",
        "clean_samples": len(data.clean),
        "published_bugs": published_bugs,
        "layers": [{"name": n, "beta": b, "map": list(shapes[n][2:])} for n, b in zip(names, betas)],
        "p": float(p),
        "te_epochs": te_epochs, "student_epochs": epochs, "batch_size": batch_size, "lr": lr,
        "teacher_scheduler": teacher_scheduler,
        "final_attention_terms": distil.last_terms,
        "teacher_history": history_summary(teacher_history),
        "student_history": history_summary(student_history),
        "teacher_seconds": teacher_clock.seconds,
        "student_seconds": student_clock.seconds,
        "nad_seconds": total.seconds,
    }


def _output_shapes(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    capture = Capture(model, names)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        capture.remove()
        model.train(was_training)
    return {name: tuple(out.shape) for name, out in capture.outputs.items()}
