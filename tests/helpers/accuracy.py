"""How the tests judge low-precision results (shared by every op's tests).

The flash-attention rule: an op's error against a float64 reference may be at most ``factor`` times the error
of the plain PyTorch computation in the same dtype, plus a small floor.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from monkey_kernels._triton.env import interpreter_active


def tolerance_factor(backend: str, dtype: torch.dtype) -> float:
    # Triton 3.9's interpreter casts fp32 -> bf16 by truncation (round toward zero), which doubles the
    # rounding error of every bf16 output compared with the GPU's round-to-nearest-even (measured on
    # N(0,1) data: 3.3e-3 vs 1.6e-3 relative error).
    if backend == "triton" and dtype == torch.bfloat16 and interpreter_active():
        return 3.0
    return 2.0


def error_floor(dtype: torch.dtype) -> float:
    # fp32 reductions in another order differ from PyTorch's by a few ulps times sqrt(terms); a floor of
    # ~16 ulps keeps that noise from failing a test while any real fault is orders of magnitude larger.
    # float64 is judged against itself (PyTorch's own error is 0): summation order only, while a single
    # float32 step anywhere would show as ~1e-7.
    if dtype == torch.float64:
        return 1e-13
    return 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps / 4


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def assert_within_pytorch_error(
    backend: str,
    dtype: torch.dtype,
    output: torch.Tensor,
    plain_output: torch.Tensor,
    reference_output: torch.Tensor,
    grads: Dict[str, torch.Tensor],
    plain_grads: Dict[str, torch.Tensor],
    reference_grads: Dict[str, torch.Tensor],
    magnitudes: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Output and every gradient of the op (``output``, ``grads``) against float64 (``reference_*``), allowed
    ``tolerance_factor`` times the error of the same-dtype PyTorch computation (``plain_*``).

    ``magnitudes`` (``"output"`` and the gradient names): the float64 results of the same computation on the
    inputs' absolute values, i.e. the sums of |terms|. PyTorch's own error can be small by luck when a few
    rounded terms cancel; one unit roundoff of the dtype times ``|terms| / |result|`` is then allowed too, the
    size rounding errors have there whatever their signs (nothing more where the terms do not cancel)."""
    assert set(grads) == set(reference_grads), "a trainable input got no gradient"
    factor, floor = tolerance_factor(backend, dtype), error_floor(dtype)
    checks = [("output", output, plain_output, reference_output)] + [
        (f"grad {name}", grads[name], plain_grads[name], reference_grads[name]) for name in reference_grads
    ]
    unit = 0.5 * torch.finfo(dtype).eps if dtype != torch.float64 else 0.0
    for label, value, plain_value, reference in checks:
        assert torch.isfinite(value).all(), f"{label}: non-finite (unwritten?) entries"
        err, plain_err = rel_err(value, reference), rel_err(plain_value, reference)
        name = "output" if label == "output" else label[len("grad "):]
        if magnitudes is not None and name in magnitudes:
            terms = magnitudes[name].detach().double().cpu().norm().item()
            conditioning = terms / max(reference.detach().double().norm().item(), 1e-30)  # 1: no cancellation
            floor_here = max(floor, unit * (conditioning - 1.0))
        else:
            floor_here = floor
        assert err <= factor * plain_err + floor_here, (
            f"{label}: error {err:.3e} vs fp64 exceeds {factor}x PyTorch's own {dtype} error {plain_err:.3e} "
            f"+ {floor_here:.1e}"
        )


def non_finite_pattern(t: torch.Tensor) -> torch.Tensor:
    """``[3, *t.shape]`` bool: where ``t`` is NaN, +inf and -inf (compares which entries a NaN / inf reached)."""
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


# ---------------------------------------------------------------------------------------------------------
# Whole models under torch.autocast: per-layer output dtypes, and errors against float64 judged by the
# unpatched model's own error under the same autocast
# ---------------------------------------------------------------------------------------------------------
def record_output_dtypes(model: torch.nn.Module, names: Optional[set] = None):
    """Forward hooks on every module of ``model`` (or those named in ``names``) recording the dtype of each call's
    tensor output: ``(seen {name: set of dtypes}, handles)``; remove the handles when done."""
    seen: Dict[str, set] = {}

    def hook(name):
        def record(_module, _args, out):
            if isinstance(out, torch.Tensor):
                seen.setdefault(name, set()).add(out.dtype)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if name and (names is None or name in names)]
    return seen, handles


def assert_within_reference_error(label: str, value: torch.Tensor, base: torch.Tensor, reference: torch.Tensor,
                                  factor: float = 2.0, floor: float = 1e-3) -> None:
    """The flash-attention rule for a whole model: ``value``'s relative error against the float64 ``reference``
    at most ``factor`` times the error of ``base`` (the unpatched model under the same autocast) plus ``floor``."""
    assert torch.isfinite(value).all(), f"{label}: non-finite entries"
    err, base_err = rel_err(value, reference), rel_err(base, reference)
    assert err <= factor * base_err + floor, (
        f"{label}: error {err:.3e} vs float64 exceeds {factor}x the unpatched model's {base_err:.3e} + {floor:.0e}")


def assert_grads_within_reference_error(grads: Dict[str, Optional[torch.Tensor]],
                                        base_grads: Dict[str, Optional[torch.Tensor]],
                                        reference_grads: Dict[str, Optional[torch.Tensor]],
                                        factor: float = 2.0, floor: float = 1e-3,
                                        family: Optional[Callable[[str], str]] = None,
                                        per_parameter_factor: float = 4.0) -> None:
    """:func:`assert_within_reference_error` for the gradients (``None`` where the reference has none).

    The one-element parameters (per-adapter scales: sums over every token, with cancellation) are judged together
    as one vector. ``family(name)``: the parameters of one role with several members (e.g. every ``lora_a`` of
    every attention input projection) are judged together at ``factor``, so is the whole gradient (each
    parameter's gradient but the one-element ones divided by its reference's norm, concatenated), and each
    parameter alone at ``per_parameter_factor``: in a tiny model each small gradient's error is one noisy draw
    (a bias gradient is a sum over every token, with cancellation; the ratios to the unpatched model's error
    scatter around 1 with a tail to ~3 over dozens of parameters and seeds), a family's is an average; a real
    fault is far beyond both. Without ``family`` each parameter is judged alone at ``factor``."""
    assert set(grads) == set(reference_grads) == set(base_grads)
    scalars = [n for n, g in reference_grads.items() if g is not None and g.numel() == 1]
    alone = {n: [n] for n in reference_grads if n not in scalars}
    checks = [(alone, factor if family is None else per_parameter_factor)]
    if family is not None:
        families: Dict[str, list] = {}
        for n in reference_grads:
            if n not in scalars and reference_grads[n] is not None:
                families.setdefault(f"family {family(n)}", []).append(n)
        checks.append(({k: v for k, v in families.items() if len(v) > 1}, factor))
        present = [n for n, g in reference_grads.items() if g is not None and n not in scalars]
        assert all(grads[n] is not None for n in present), "a parameter got no gradient"

        def whole(source):
            return torch.cat([(source[n].detach().double().cpu()
                               / reference_grads[n].detach().double().norm().cpu().clamp_min(1e-30)).reshape(-1)
                              for n in present])

        assert_within_reference_error("the whole gradient (each parameter's relative to its norm)",
                                      whole(grads), whole(base_grads), whole(reference_grads), factor, floor)
    if scalars:
        checks.append(({"the one-element parameters": scalars}, factor))
    for groups, limit in checks:
        for label, names in groups.items():
            if reference_grads[names[0]] is None:
                assert grads[names[0]] is None, f"{label}: the reference leaves no gradient, the patched model gave one"
                continue
            assert all(grads[n] is not None for n in names), f"{label}: no gradient"

            def flat(source):
                return torch.cat([source[n].detach().double().cpu().reshape(-1) for n in names])

            assert_within_reference_error(f"grad {label}", flat(grads), flat(base_grads), flat(reference_grads),
                                          limit, floor)
