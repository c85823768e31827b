"""How the tests judge low-precision results (shared by every op's tests).

The flash-attention rule: an op's error against a float64 reference may be at most ``factor`` times the error
of the plain PyTorch computation in the same dtype, plus a small floor.
"""
from __future__ import annotations

from typing import Dict, Optional

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
