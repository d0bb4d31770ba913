"""i-BAU (baselines/ibau.py) against a transcription of BackdoorBench's defense/i-bau.py (fixed_point et al.)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines.ibau import defend, implicit_hypergradient, universal_perturbation
from bdcore.data import DefenseData, ImageSet, normalize, random_crop_flip
from test_defense_anp import CLEAN_CODES, SPEC, coded_defense_data, state_equal, tiny_model


def batches(count: int, size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(normalize(torch.randint(0, 256, (size, 3, 16, 16), generator=gen, dtype=torch.uint8), SPEC),
             torch.randint(0, 4, (size,), generator=gen)) for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# transcription of the published hypergradient (hypertorch's fixed_point as BackdoorBench calls it)
# --------------------------------------------------------------------------------------------------

def grad_unused_zero(output, inputs, retain_graph=False):
    grads = torch.autograd.grad(output, inputs, allow_unused=True, retain_graph=retain_graph)
    return tuple(torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs))


def published_fixed_point(params, hparams, K, fp_map, outer_loss, tol=1e-10):
    params = [w.detach().requires_grad_(True) for w in params]
    o_loss = outer_loss(params, hparams)
    grad_outer_w = grad_unused_zero(o_loss, params, retain_graph=True)
    grad_outer_hparams = grad_unused_zero(o_loss, hparams, retain_graph=True)
    w_mapped = fp_map(params, hparams)
    vs = [torch.zeros_like(w) for w in params]
    vs_vec = torch.cat([xx.reshape([-1]) for xx in vs])
    for _ in range(K):
        vs_prev_vec = vs_vec
        vs = torch.autograd.grad(w_mapped, params, grad_outputs=vs, retain_graph=True)
        vs = [v + gow for v, gow in zip(vs, grad_outer_w)]
        vs_vec = torch.cat([xx.reshape([-1]) for xx in vs])
        if float(torch.norm(vs_vec - vs_prev_vec)) < tol:
            break
    grads = torch.autograd.grad(w_mapped, hparams, grad_outputs=vs, allow_unused=True)
    grads = [g + v if g is not None else v for g, v in zip(grads, grad_outer_hparams)]
    for l, g in zip(hparams, grads):   # update_tensor_grads
        if l.grad is None:
            l.grad = torch.zeros_like(l)
        if g is not None:
            l.grad += g


def published_hypergradient(model, pert, images_list, labels_list, batchnum, rand_idx, K=5):
    """defense/i-bau.py's loss_inner / loss_outer / GradientDescent(0.1) / fixed_point(pert, params, K, ...)."""
    def loss_inner(perturb, model_params):
        per_logits = model.forward(images_list[0] + perturb[0])
        loss = F.cross_entropy(per_logits, labels_list[0].long(), reduction="none")
        return torch.mean(-loss) + 0.001 * torch.pow(torch.norm(perturb[0]), 2)

    def loss_outer(perturb, model_params):
        images, labels = images_list[batchnum], labels_list[batchnum].long()
        patching = torch.zeros_like(images)
        patching[rand_idx] = perturb[0]
        return nn.CrossEntropyLoss()(model(images + patching), labels)

    def gd_step(params, hparams):   # GradientDescent(loss_inner, 0.1) with create_graph
        loss = loss_inner(params, hparams)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return [w - 0.1 * g for w, g in zip(params, grads)]

    model.zero_grad(set_to_none=True)
    published_fixed_point(pert, list(model.parameters()), K, gd_step, loss_outer)
    return [p.grad.clone() for p in model.parameters()]


def published_perturbation(model, batch_list, shape):
    batch_pert = torch.zeros([1, *shape], requires_grad=True)
    batch_opt = torch.optim.SGD(params=[batch_pert], lr=10)
    for images, _ in batch_list:
        ori_lab = torch.argmax(model.forward(images), axis=1).long()
        loss = F.cross_entropy(model.forward(images + batch_pert), ori_lab, reduction="mean")
        loss_regu = torch.mean(-loss) + 0.001 * torch.pow(torch.norm(batch_pert), 2)
        batch_opt.zero_grad()
        loss_regu.backward(retain_graph=True)
        batch_opt.step()
    return batch_pert.detach()


# --------------------------------------------------------------------------------------------------
# oracle tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [[1, 4], [0]])
def test_hypergradient_equals_published_fixed_point(rows):
    model = tiny_model(0).eval()
    cached = batches(2, 8, seed=1)
    delta = 0.3 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    ours, steps, _ = implicit_hypergradient(model, delta, cached[0], cached[1], rows, fixed_point_steps=5,
                                            inner_step=0.1, l2_weight=0.001)
    expected = published_hypergradient(copy.deepcopy(model), delta.unsqueeze(0), [b[0] for b in cached],
                                       [b[1] for b in cached], 1, rows)
    assert steps == 5   # the 1e-10 tolerance is never met: the K-term truncated series
    for g, e in zip(ours, expected):
        assert torch.equal(g, e)


def test_batches_under_100_images_get_plain_cross_entropy_gradients():
    """int(0.01 * n) = 0 patched rows: the hypergradient is the clean CE gradient (i-BAU = fine-tuning)."""
    model = tiny_model(1).eval()
    cached = batches(2, 16, seed=3)
    delta = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(4))
    ours, _, _ = implicit_hypergradient(model, delta, cached[0], cached[1], [], fixed_point_steps=5,
                                        inner_step=0.1, l2_weight=0.001)
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(cached[1][0]), cached[1][1]).backward()
    for g, p in zip(ours, reference.parameters()):
        assert torch.equal(g, p.grad)


def test_perturbation_equals_published_and_is_unbounded_by_default():
    model = tiny_model(2).eval()
    batch_list = batches(3, 8, seed=5)
    ours = universal_perturbation(model, batch_list, (3, 16, 16), lr=10.0, l2_weight=0.001, l2_bound=None,
                                  device=torch.device("cpu"))
    expected = published_perturbation(model, batch_list, (3, 16, 16))
    assert torch.equal(ours, expected[0]) and float(torch.norm(ours)) > 0


def test_perturbation_l2_bound_holds():
    model = tiny_model(2).eval()
    batch_list = batches(3, 8, seed=5)
    free = universal_perturbation(model, batch_list, (3, 16, 16), lr=10.0, l2_weight=0.001, l2_bound=None,
                                  device=torch.device("cpu"))
    bound = 0.5 * float(torch.norm(free))
    bounded = universal_perturbation(model, batch_list, (3, 16, 16), lr=10.0, l2_weight=0.001, l2_bound=bound,
                                     device=torch.device("cpu"))
    assert float(torch.norm(bounded)) <= bound * (1 + 1e-6)
    torch.testing.assert_close(bounded, free * bound / float(torch.norm(free)))   # rescaled, same direction
    loose = universal_perturbation(model, batch_list, (3, 16, 16), lr=10.0, l2_weight=0.001,
                                   l2_bound=10 * bound, device=torch.device("cpu"))
    assert torch.equal(loose, free)   # inside the ball: untouched


# --------------------------------------------------------------------------------------------------
# behaviour of defend()
# --------------------------------------------------------------------------------------------------

def test_ibau_keeps_bn_statistics_reads_only_the_budget_and_leaves_input_alone():
    model = tiny_model(3)
    before = copy.deepcopy(model)
    reads, augmented = set(), set()
    data = coded_defense_data(evaluate=lambda m: pytest.fail("i-BAU selects nothing"), reads=reads)
    pipeline_augment = data.augment

    def watched_augment(x, generator):
        augmented.update(x[:, 0, 8, 8].long().tolist())
        return pipeline_augment(x, generator)

    data.augment = watched_augment
    defended, diagnostics = defend(model, data, seed=0, n_rounds=2, batch_size=16, progress=False)
    assert state_equal(model, before) and not defended.training
    assert reads == {"clean"} and augmented <= set(CLEAN_CODES) and augmented
    new, old = defended.state_dict(), model.state_dict()
    for key in old:
        if "running" in key or "num_batches" in key:
            assert torch.equal(new[key], old[key]), key   # eval mode throughout: BN statistics frozen
    assert any(not torch.equal(new[k], old[k]) for k in old if k.endswith("weight"))
    assert all(torch.isfinite(v).all() for v in new.values() if v.is_floating_point())
    assert diagnostics["perturbation_never_applied"] and diagnostics["unperturbed_batches"] == 2 * 3
    json.dumps(diagnostics)
    # no perturbed row: dL_out/d delta = 0, so v stays 0 and the published tolerance stops after one step
    assert diagnostics["ibau_seconds"] > 0 and diagnostics["fixed_point_steps_run"] == [1]


def test_ibau_perturbs_one_row_per_100_images():
    gen = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (120, 3, 16, 16), generator=gen, dtype=torch.uint8),
                     torch.randint(0, 4, (120,), generator=gen))
    data = DefenseData(clean=clean, spec=SPEC, augment=lambda x, g: random_crop_flip(x, SPEC, g))
    _, diagnostics = defend(tiny_model(4), data, seed=0, n_rounds=1, batch_size=120, progress=False)
    assert diagnostics["perturbed_rows"] == 1 and not diagnostics["perturbation_never_applied"]


def test_ibau_without_clean_data_raises_one_line():
    with pytest.raises(ValueError) as info:
        defend(tiny_model(), None)
    assert str(info.value) == "ibau needs clean data: use budget=ratio (the default) or budget=spc"


def test_config_file_matches_the_defense_signature_and_validates():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from baselines.base import traits_of

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "defense" / "ibau.yaml")
    hyper = {k: v for k, v in OmegaConf.to_container(cfg).items() if not k.startswith("_") and k != "seed"}
    signature = inspect.signature(defend.__wrapped__).parameters
    assert set(hyper) == set(signature) - {"model", "data", "seed", "device", "progress"}
    for key, value in hyper.items():   # the yaml restates the code's defaults
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, key
    traits = traits_of(instantiate(OmegaConf.merge(cfg, {"seed": 0})))
    assert not traits.data_free
    traits.validate(**hyper)
    with pytest.raises(ValueError, match=r"^ibau batch_size=0 must be an integer >= 1"):
        traits.validate(**{**hyper, "batch_size": 0})
