"""Stage 2 — pruned-to-backdoored OT-based fusion (paper Eq. 3-4, Algorithm 1; docs/methods/otbr.md).

For each layer of the fusion chain (:func:`otbr.layers.fusion_chain`; source = pruned model ``W_p``,
target = backdoored model ``W_b``, ``n`` output filters):

1. incoming-edge alignment ``W^_p[:, :, s] = W_p[:, :, s] . P`` with ``P = T_prev diag(1/nu_prev)``
   (identity for the first chain layer and for a layer that restarts the alignment);
2. masses (Eq. 4): ``mu`` uniform over the source filters, ``nu`` the normalised NWCs of the target;
3. cost ``C_ij = ||W_p[i] - W_b[j]||_2`` (``torch.cdist``, float32) on the *untransformed* pruned rows
   (``cost_on="raw"``, official; the paper's prose suggests the aligned rows, ``cost_on="aligned"``);
4. exact OT plan ``T = ot.emd(mu, nu, C)`` (Eq. 3);
5. outgoing transport ``W~ = diag(1/nu) T^T . flatten(W^_p)`` (target filter j becomes the
   nu-normalised barycentre of the source filters sending mass to it);
6. fusion ``W_f = lambda W~ + (1 - lambda) W_b``; carry ``T`` and ``nu`` to the next layer.

``P`` and ``diag(1/nu) T^T`` are built in float64 numpy and cast to float32 before the matmuls, as in
the official code. Zero-mass guard (docs/methods/otbr.md): the official ``1/nu`` turns a filter with NWC
0.0000 into ``inf`` and the model into NaN; here ``1/nu_j`` is used only where ``nu_j > 0`` (else 0, so
that target's transported row is 0) and a layer whose NWCs are all 0 gets a uniform target. No epsilon
is added anywhere, so every other number is the official one. Each firing is logged and recorded.
"""
from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import ot
import torch
import torch.nn as nn

from .layers import fusion_chain, prunable_conv_layers

logger = logging.getLogger(__name__)

FUSION_MODES = ("ot", "vanilla", "none")
TARGET_DISTRIBUTIONS = ("nwc", "uniform", "random")
COST_INPUTS = ("raw", "aligned")
SOURCE_SUPPORTS = ("all", "surviving")


def uniform_masses(n: int) -> np.ndarray:
    """``1/n`` for each of ``n`` neurons (float64), as the official ``to_probalility('uniform')``."""
    return np.ones(n) / n


def target_masses(nwc: torch.Tensor, target_dist: str = "nwc",
                  generator: torch.Generator | None = None) -> tuple[np.ndarray, bool]:
    """Eq. 4's target distribution ``nu`` over the backdoored layer's filters (float64).

    ``"nwc"``: NWCs / their sum (``u2n``, default); ``"uniform"`` (``u2u``); ``"random"`` (``u2r``):
    ``torch.rand(n)`` from ``generator`` normalised in float32, as the official helper does.
    Returns ``(nu, fell_back)``; ``fell_back`` is True when all NWCs are 0 and ``nu`` is uniform.
    """
    n = len(nwc)
    if target_dist == "uniform":
        return uniform_masses(n), False
    if target_dist == "random":
        draws = torch.rand(n, generator=generator)
        return (draws / draws.sum()).numpy().astype(np.float64), False
    if target_dist != "nwc":
        raise ValueError(f"fusion.target_dist must be one of {TARGET_DISTRIBUTIONS}, got {target_dist!r}")
    values = np.array(torch.as_tensor(nwc, dtype=torch.float64).tolist(), dtype=np.float64)
    if not values.sum() > 0:
        return uniform_masses(n), True
    return values / values.sum(), False


def reciprocal_masses(masses: np.ndarray) -> np.ndarray:
    """Zero-mass guard: ``1/m_j`` where ``m_j > 0``, else 0 (no epsilon; docs/methods/otbr.md)."""
    inverse = np.zeros_like(masses, dtype=np.float64)
    positive = masses > 0
    inverse[positive] = 1.0 / masses[positive]
    return inverse


def optimal_transport_plan(source: np.ndarray, target: np.ndarray, cost: np.ndarray, *,
                           num_itermax: int = 100000) -> tuple[np.ndarray, list[str]]:
    """Eq. 3: exact OT plan ``T`` (``len(source) x len(target)``, float64) and POT's warning messages.

    ``ot.emd`` (network simplex) with default arguments except ``numItermax``; its warnings (e.g.
    "numItermax reached before optimality") are captured instead of printed.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = ot.emd(source, target, cost, numItermax=int(num_itermax))
    return np.asarray(plan, dtype=np.float64), [str(w.message) for w in caught]


def align_incoming(weight: torch.Tensor, incoming_map: np.ndarray | None) -> torch.Tensor:
    """Algorithm 1's incoming-edge alignment ``W^[:, :, s] = W[:, :, s] . P`` for every kernel position s.

    ``incoming_map`` is ``P = T_prev diag(1/nu_prev)`` (float64, ``in x in``), cast to float32;
    ``None`` means the identity (first chain layer / restart), where the official product is exact.
    """
    if incoming_map is None:
        return weight
    p = torch.tensor(incoming_map, dtype=torch.float32, device=weight.device)
    by_position = weight.flatten(2).permute(2, 0, 1).contiguous()  # (kernel positions, n, in)
    aligned = torch.bmm(by_position, p.unsqueeze(0).expand(by_position.shape[0], -1, -1))
    return aligned.permute(1, 2, 0).reshape(weight.shape)


def transport_outgoing(aligned: torch.Tensor, plan: np.ndarray, inverse_target: np.ndarray) -> torch.Tensor:
    """Algorithm 1's outgoing transport ``W~ = diag(1/nu) T^T . flatten(W^)``, shaped like the target.

    ``aligned`` holds the source rows (``n_source x ...``); the result has ``len(inverse_target)`` rows.
    """
    transport = torch.tensor(inverse_target[:, None] * plan.T, dtype=torch.float32, device=aligned.device)
    return torch.matmul(transport, aligned.flatten(1)).view(len(inverse_target), *aligned.shape[1:])


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"fusion.{name} must be one of {choices}, got {value!r}")


def first_pruned_layer(model: nn.Module, pruned: dict[str, list[int]]) -> str | None:
    """Algorithm 1's ``l_p``: the first prunable layer (network order) with at least one pruned filter."""
    return next((layer for layer in prunable_conv_layers(model) if len(pruned.get(layer, ()))), None)


def surviving_filters(n: int, pruned_indices) -> list[int] | None:
    """Source support for ``source_support="surviving"``: unpruned filter indices (None = all n survive)."""
    dropped = {int(i) for i in pruned_indices}
    return [i for i in range(n) if i not in dropped] if dropped else None


def _guard_event(diagnostics: dict, layer: str, event: str, message: str, **details) -> None:
    logger.warning("OTBR zero-mass guard, %s: %s", layer, message)
    diagnostics["zero_mass_guard"].append({"layer": layer, "event": event, **details})


@torch.no_grad()
def ot_fusion(pruned_model: nn.Module, backdoored_model: nn.Module, nwcs: dict[str, torch.Tensor],
              pruned: dict[str, list[int]], *, lambda_: float = 0.5, mode: str = "ot",
              target_dist: str = "nwc", cost_on: str = "raw", source_support: str = "all",
              num_itermax: int = 100000, seed: int = 0) -> tuple[nn.Module, dict]:
    """Algorithm 1: fuse ``pruned_model`` into a copy of ``backdoored_model`` (module docstring).

    ``mode="vanilla"``: ``lambda W_p + (1 - lambda) W_b`` on every chain layer, no OT (Table 2);
    ``mode="none"``: a copy of the pruned model. ``source_support="surviving"`` drops the pruned filters
    from the source (masses ``1/n_kept``; docs/methods/otbr.md). ``seed`` drives ``target_dist="random"``.
    Returns ``(fused model in eval mode, diagnostics)``; neither input is modified.
    """
    _check_choice("mode", mode, FUSION_MODES)
    _check_choice("target_dist", target_dist, TARGET_DISTRIBUTIONS)
    _check_choice("cost_on", cost_on, COST_INPUTS)
    _check_choice("source_support", source_support, SOURCE_SUPPORTS)
    first = first_pruned_layer(backdoored_model, pruned)
    chain = fusion_chain(backdoored_model, first) if mode != "none" else []
    diagnostics = {
        "mode": mode, "lambda_": float(lambda_), "target_dist": target_dist, "cost_on": cost_on,
        "source_support": source_support, "first_pruned_layer": first,
        "chain_layers": [layer for layer, _ in chain],
        "alignment_restarts": [layer for i, (layer, continues) in enumerate(chain) if i and not continues],
        "ot_warnings": [], "zero_mass_guard": [], "surviving_source_fallbacks": [],
    }
    if mode == "none":
        return copy.deepcopy(pruned_model).eval(), diagnostics
    if first is None:
        logger.warning("OTBR fusion: no filter was pruned, the fused model is the backdoored model")

    fused = copy.deepcopy(backdoored_model)
    fused_params = dict(fused.named_parameters())
    backdoored_params = dict(backdoored_model.named_parameters())
    pruned_params = dict(pruned_model.named_parameters())
    generator = torch.Generator("cpu").manual_seed(int(seed))
    previous_plan = previous_inverse = None  # T (n_prev x n_prev, rows of dropped sources 0) and 1/nu
    for layer, continues in chain:
        w_b = backdoored_params[layer].detach()
        w_p = pruned_params[layer].detach().to(w_b.device)
        if mode == "vanilla":
            fused_params[layer].copy_(lambda_ * w_p + (1 - lambda_) * w_b)
            continue

        incoming = previous_plan * previous_inverse[None, :] if continues else None
        w_hat = align_incoming(w_p, incoming)
        n = w_p.shape[0]
        kept = surviving_filters(n, pruned.get(layer, ())) if source_support == "surviving" else None
        if kept == []:  # every filter pruned: nothing would be transported, keep them all as the source
            diagnostics["surviving_source_fallbacks"].append(layer)
            kept = None
        source_index = None if kept is None else torch.as_tensor(kept, device=w_b.device)
        source_rows = w_hat if source_index is None else w_hat[source_index]

        mu = uniform_masses(n if kept is None else len(kept))
        nu, fell_back = target_masses(nwcs[layer], target_dist, generator)
        if fell_back:
            _guard_event(diagnostics, layer, "all_zero_nwc_uniform_target",
                         "all NWCs are 0, using a uniform target distribution")
        cost_rows = (w_p if cost_on == "raw" else w_hat)
        cost_rows = cost_rows if source_index is None else cost_rows[source_index]
        cost = torch.cdist(cost_rows.flatten(1), w_b.flatten(1), p=2)
        plan, messages = optimal_transport_plan(mu, nu, cost.cpu().numpy(), num_itermax=num_itermax)
        for message in messages:
            logger.warning("OTBR fusion, POT on %s: %s", layer, message)
            diagnostics["ot_warnings"].append({"layer": layer, "message": message})

        inverse = reciprocal_masses(nu)
        zero_mass = np.flatnonzero(nu <= 0).tolist()
        if zero_mass:
            _guard_event(diagnostics, layer, "zero_target_mass",
                         f"{len(zero_mass)} filter(s) with zero target mass (NWC 0), transported rows set to 0",
                         num_filters=len(zero_mass), filters=zero_mass)
        w_tilde = transport_outgoing(source_rows, plan, inverse)
        fused_params[layer].copy_(lambda_ * w_tilde + (1 - lambda_) * w_b)

        if kept is None:
            previous_plan = plan
        else:  # dropped source channels feed nothing into the next layer's aligned inputs
            previous_plan = np.zeros((n, n))
            previous_plan[kept] = plan
        previous_inverse = inverse
    return fused.eval(), diagnostics
