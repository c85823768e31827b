"""InternLM-XComposer's Partial LoRA (the ``plora_linear`` and ``plora_peft_linear`` rules): the LoRA that applies
to image tokens only, as ONE segmented multi-LoRA pass per linear, with a PEFT LoRA stacked on top in the same
pass.

What it recognises (by structure, so a copy of the public remote code is patched too):

- ``plora_linear``: InternLM-XComposer2 / 2-4KHD / 2.5's ``PLoRA``: an ``nn.Linear`` subclass holding
  ``Plora_A`` (``nn.Linear(in, r, bias=False)``), ``Plora_B`` (``nn.Linear(r, out, bias=False)``), a numeric
  ``lora_scaling`` and a ``lora_dropout`` (``nn.Dropout``, ``nn.Identity`` or an identity function), and no other
  submodule. Call contract: ``forward(x, im_mask=None)`` (checked on the class's signature; an instance-level
  forward or any other parameter is skipped with the reason), as InternLM2 calls it
  (``self.wqkv(h, im_mask)``, positional).
- ``plora_peft_linear``: a PEFT LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``) whose ``base_layer`` is such a
  PLoRA, with plain LoRA adapters (InternLM-XComposer's fine-tuning recipe: ``get_peft_model`` on
  ``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``). Call contract: PEFT's
  ``forward(x, *args, **kwargs)``, which hands ``im_mask`` (positional or keyword) to its base layer.

The reference forward (both public forms, see ``tests/helpers/internlm2_plora_double.py``)::

    res = x W^T + b
    res[im_mask] += Plora_B(Plora_A(dropout(x[im_mask]))) * lora_scaling      # a boolean gather and scatter
    (no image token in the batch: res[first token(s)] += 0 * Plora_B(Plora_A(dropout(...))), which keeps
     Plora_A / Plora_B in the graph: zero gradients, not None)

Fused forward (``plora_linear``): ONE :func:`~monkey_kernels.multi_lora_linear` over all rows, the runs of image
rows as segments of adapter 0 (``Plora_A.weight`` / ``Plora_B.weight`` as a one-adapter stack: views, no copy)
and the text runs as base-only segments (``-1``); no gather, no scatter, no host branch on ``im_mask.sum()``.

- Segments: :meth:`SegmentInfo.from_row_mask` of ``im_mask`` (device ops: change points, a cumulative sum, a
  scatter), built ONCE per mask and reused by every layer: cached per mask tensor (by identity, weakly: it goes
  with the mask) and checked against its version counter (an in-place edit of the mask rebuilds it). InternLM2
  hands the same ``im_mask`` object to every layer (and, under reentrant gradient checkpointing, the same object
  again in the recompute), so a model forward builds it once; the ``input_ids`` path makes a fresh all-False mask
  per forward, built once as well. Eager: trimmed to exactly the runs (one small read of the run count per mask;
  free on CPU). Under ``torch.compile`` (no cache: the compiler sees plain device ops) and CUDA-graph capture:
  no host read, ``B * N`` segments (the runs, then empty ones; what the kernels pay for the empty tail is in the
  README's PLoRA section). A mask made under ``torch.inference_mode`` has no version counter: it is not cached
  (built per layer, by device ops, ``B * N`` segments), so an in-place edit of it is never missed.
- Gradients: ``dW``, ``db``, ``dx`` over all rows; ``dPlora_A``, ``dPlora_B`` over the image rows only. A batch
  without an image token gives exact zero gradients (not ``None``) to ``Plora_A`` / ``Plora_B``, as the
  reference's zero-multiply branch does; unlike that branch, a NaN / inf of the LoRA on the first token does not
  reach the output (``0 * inf``): the text rows get exactly ``x W^T + b``.
- Dropout (``lora_dropout.p``, 0.05 in every released model, active in ``train()``): applied in the op on the
  image rows' LoRA input, each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``: the
  distribution of ``nn.Dropout`` on the gathered rows, from the op's own mask stream (a function of a seed drawn
  from PyTorch's CPU generator, so reentrant checkpointing's RNG replay gives the recompute the same masks). The
  torch RNG stream itself advances differently from the reference's (which draws on the gathered rows, or on
  the first token(s) of an all-text batch).
- Calls it does not serve run the class's own forward, unchanged: ``im_mask=None`` (the IXC2 form: a plain
  linear; the 2.5 form fails with ``AttributeError`` there, as the original), a mask that is not a bool tensor of
  shape ``x.shape[:-1]`` on ``x``'s device (e.g. an integer mask, which the reference reads as indices),
  operands that reach ``F.linear`` in different dtypes (e.g. a bf16 ``x`` over fp32 weights outside autocast),
  dropout ``p >= 1``. A 2-D ``x [T, C]`` with a mask ``[T]`` is served (flattened inputs); the 2.5 form's own
  forward only takes 3-D ``x``.
- ``torch.autocast`` (CPU or CUDA): served. The reference runs ``F.linear(x, W, b)`` in the autocast dtype, then
  adds ``Plora_B(Plora_A(dropout(x[im_mask]))) * lora_scaling``, each linear an autocast one (``H`` and the
  product rounded to that dtype, then the scaling and the add in it). The fused layer gets the op's autocast
  policy (README "Mixed precision"): ``x``, ``W``, ``b``, ``Plora_A``, ``Plora_B`` cast as ``F.linear`` casts them
  (float64 left alone), ``H`` rounded like the reference's, the base and LoRA products accumulated in fp32 and
  rounded once into the autocast dtype (the reference's output dtype); the gradients reach fp32 master weights in
  fp32. Its error is at most the reference's own (which rounds the base, the LoRA product, the scaling and the
  sum separately).

Fused forward (``plora_peft_linear``, one active adapter, no per-row selection): image rows need
``x W^T + b + s_p B_p A_p x + s_l B_l A_l x``, text rows ``x W^T + b + s_l B_l A_l x``. Both are ONE adapter of the
op: ``A = [A_l; A_p]``, ``B = [s_l B_l, s_p B_p]`` (:meth:`AdapterStack.concatenated`, the scales folded into
``B`` unless equal), used with rank ``r_l + r_p`` on image rows (adapter 0) and rank ``r_l`` -- its first
columns, PEFT's LoRA alone -- on text rows (adapter 1, the same tensors as a stride-0 second adapter: no copy).
Gradients reach PEFT's ``lora_A`` / ``lora_B`` (float32 over a bf16 base by default: the LoRA runs in the
activation dtype with float32 accumulation, like the ``peft_lora_linear`` rule) and the PLoRA's Parameters.
Under autocast PEFT casts ``x`` to its adapter's dtype and autocast casts both to the autocast dtype
(``lora_B(lora_A(x))`` and its scaling rounded there, added to the PLoRA's autocast output): the fused pass
computes both LoRAs in the autocast dtype with fp32 accumulation and returns the autocast dtype.
Dropout: the two LoRAs drop independently in the reference (PLoRA on the image rows, PEFT on all rows); one op
call has one mask per input element, so in training with either dropout ``p > 0`` the layer runs TWO op calls
chained through ``residual=`` (the PLoRA pass above, then PEFT's LoRA on all rows with its own mask and a
zero-width base GEMM): exact in distribution, one more pass over the output. Without dropout (eval, or both
``p = 0``) it is one pass. Several active adapters, ``adapter_names`` / :func:`adapter_selection`, disabled or
merged adapters and other calls run PEFT's own forward (whose base layer call is the fused PLoRA forward).

Patching is in place (:class:`~monkey_kernels.patching.InstanceForward`): same modules, Parameters, state-dict
keys; PEFT's ``save_pretrained`` / ``from_pretrained``, ``merge_adapter`` and ``merge_and_unload`` work unchanged
(the model ``merge_and_unload`` returns keeps its PLoRAs fused; call ``unpatch_model`` on the PEFT model first
for plain modules).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..adapter_stack import AdapterStack
from ..call_contract import class_forward, forward_parameters_problem
from ..ops.autocast import autocast_dtype
from ..ops.checks import FLOAT_DTYPES, accumulation_dtype
from ..ops.multi_lora import multi_lora_linear
from ..ops.segments import SegmentInfo
from ..patching import InstanceForward, PatchOptions, PatchRule, register_builtin_rule, rule_of
from .peft_lora import (adapter_dropout_p, adapter_unfusable, is_peft_lora_layer, peft_linear_problem,
                        single_adapter_segments)

__all__ = ["RULE_NAME", "PEFT_RULE_NAME", "plora_problem", "looks_like_plora", "mask_segments",
           "fused_plora_forward", "fused_peft_plora_forward"]

RULE_NAME = "plora_linear"
PEFT_RULE_NAME = "plora_peft_linear"
_BACKEND_ATTR = "_monkey_kernels_plora_backend"
_STACK_ATTR = "_monkey_kernels_plora_stack"  # the layer's AdapterStack (its constants and concatenation cache)
_EXPECTED = "forward(x, im_mask=None)"


# ---------------------------------------------------------------------------------------------------------
# Structure and call contract
# ---------------------------------------------------------------------------------------------------------
def looks_like_plora(module: nn.Module) -> bool:
    """An ``nn.Linear`` holding ``Plora_A`` and ``Plora_B``: what the rule recognises (and, when it cannot run it,
    reports with a reason)."""
    return isinstance(module, nn.Linear) and "Plora_A" in module._modules and "Plora_B" in module._modules


def _dropout_problem(dropout) -> Optional[str]:
    if isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    if isinstance(dropout, nn.Module) or not callable(dropout):
        return f"lora_dropout is a {type(dropout).__name__}, not nn.Dropout, nn.Identity or an identity function"
    probe = torch.zeros(1)
    try:
        same = dropout(probe) is probe  # the public code's `lambda x: x` when lora_dropout == 0
    except Exception as error:  # noqa: BLE001 -- any failure means: not an identity
        return f"lora_dropout is a function that fails on a tensor ({type(error).__name__})"
    return None if same else "lora_dropout is a function that is not the identity"


def plora_problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` is not a PLoRA the ``plora_linear`` rule can run (structure and call contract), or ``None``.

    A module the rule itself patched keeps fitting (its instance forward is the rule's)."""
    if not looks_like_plora(module):
        return "not an nn.Linear with Plora_A and Plora_B"
    lora_a, lora_b = module._modules["Plora_A"], module._modules["Plora_B"]
    for name, linear, fan_in, fan_out in (("Plora_A", lora_a, module.in_features, None),
                                         ("Plora_B", lora_b, None, module.out_features)):
        if type(linear) is not nn.Linear:
            return f"{name} is a {type(linear).__name__}, not a plain nn.Linear (wrapped or quantized)"
        if linear.bias is not None:
            return f"{name} has a bias (PLoRA's factors have none)"
        if fan_in is not None and linear.in_features != fan_in:
            return f"{name} takes {linear.in_features} features, the layer {fan_in}"
        if fan_out is not None and linear.out_features != fan_out:
            return f"{name} gives {linear.out_features} features, the layer {fan_out}"
    if lora_b.in_features != lora_a.out_features:
        return f"Plora_A has rank {lora_a.out_features} but Plora_B takes {lora_b.in_features}"
    others = sorted(set(module._modules) - {"Plora_A", "Plora_B", "lora_dropout"})
    if others:
        return f"it holds other submodules ({', '.join(others)}) that its forward may use"
    scaling = getattr(module, "lora_scaling", None)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        return f"lora_scaling is {scaling!r}, not a finite number"
    if not hasattr(module, "lora_dropout"):
        return "it has no lora_dropout"
    problem = _dropout_problem(module.lora_dropout)
    if problem is not None:
        return problem
    for name, weight in (("weight", module.weight), ("Plora_A.weight", lora_a.weight),
                         ("Plora_B.weight", lora_b.weight)):
        if weight.dtype not in FLOAT_DTYPES or type(weight.data) is not torch.Tensor:
            return f"{name} is a {type(weight.data).__name__} of {weight.dtype} (quantized?)"
    if rule_of(module) == RULE_NAME:
        function = type(module).forward
    else:
        function, problem = class_forward(module)
        if problem is not None:
            return problem
    return forward_parameters_problem(function, ("im_mask",), expected=_EXPECTED)


def _to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.__dict__[_BACKEND_ATTR] = options.backend
    module.forward = InstanceForward(fused_plora_forward, module)
    return module


def _to_reference(module: nn.Module) -> nn.Module:
    for attr in ("forward", _BACKEND_ATTR, _STACK_ATTR):
        module.__dict__.pop(attr, None)
    return module


# ---------------------------------------------------------------------------------------------------------
# Segments: one SegmentInfo per im_mask, shared by every layer
# ---------------------------------------------------------------------------------------------------------
# im_mask -> {(device, true id, false id, trimmed): (version, SegmentInfo)}; by identity and weak (a mask is
# a fresh tensor per forward, and its entry goes with it)
_MASK_SEGMENTS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _host_read_allowed(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def mask_segments(im_mask: torch.Tensor, device: torch.device, true_adapter: int = 0,
                  false_adapter: int = -1) -> SegmentInfo:
    """The :class:`SegmentInfo` of ``im_mask`` (bool, ``M`` entries) on ``device``: image runs use
    ``true_adapter``, text runs ``false_adapter``; built once per mask tensor and reused while the mask is
    unchanged (same object, same version counter).

    While compiling it is built afresh by device ops on every call (the compiler traces them; no Python cache
    inside a graph); under CUDA-graph capture it is built without a host read (``M`` segments) and cached for
    the captured region apart from the eager (trimmed) one. An inference tensor (made under
    ``torch.inference_mode``) has no version counter, so an in-place edit could not be seen: it is built afresh
    on every call, without a host read."""
    trim = _host_read_allowed(device)
    if torch.compiler.is_compiling() or im_mask.is_inference():
        return SegmentInfo.from_row_mask(im_mask, true_adapter=true_adapter, false_adapter=false_adapter,
                                         trim=False, device=device)
    key = (device, true_adapter, false_adapter, trim)
    entries = _MASK_SEGMENTS.get(im_mask)
    if entries is None:
        entries = _MASK_SEGMENTS[im_mask] = {}
    hit = entries.get(key)
    if hit is not None and hit[0] == im_mask._version:
        return hit[1]
    segments = SegmentInfo.from_row_mask(im_mask, true_adapter=true_adapter, false_adapter=false_adapter,
                                         trim=trim, device=device)
    entries[key] = (im_mask._version, segments)
    return segments


# ---------------------------------------------------------------------------------------------------------
# Fused forwards
# ---------------------------------------------------------------------------------------------------------
def _linear_dtype(tensor: torch.Tensor, amp: Optional[torch.dtype], device_type: str) -> torch.dtype:
    """The dtype ``F.linear`` computes ``tensor`` in: autocast's cast when it applies (``amp`` not ``None``; float64
    and tensors on another device type are left alone, as autocast leaves them), else its own."""
    if (amp is not None and tensor.is_floating_point() and tensor.dtype != torch.float64
            and tensor.device.type == device_type):
        return amp
    return tensor.dtype


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype the reference's linears of ``layer(x, ...)`` compute in (``x``'s, or under ``torch.autocast``
    the autocast dtype ``F.linear`` casts ``x``, the weights and the bias to), or ``None`` when the operands
    would reach ``F.linear`` in different dtypes (the reference then fails or promotes: its own forward runs)."""
    amp = autocast_dtype(x.device.type)
    operands = [x, layer.weight, layer.Plora_A.weight, layer.Plora_B.weight]
    if layer.bias is not None:
        operands.append(layer.bias)
    dtypes = {_linear_dtype(t, amp, x.device.type) for t in operands}
    if len(dtypes) != 1:
        return None
    dtype = dtypes.pop()
    return dtype if dtype in FLOAT_DTYPES else None


def _call_problem(layer: nn.Module, x, im_mask) -> Optional[str]:
    """Why ``layer(x, im_mask)`` runs the class's own forward instead of the fused one, or ``None``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return "x is not a tensor [..., C]"
    if not isinstance(im_mask, torch.Tensor):
        return "im_mask is not a tensor"
    if im_mask.dtype != torch.bool or tuple(im_mask.shape) != tuple(x.shape[:-1]) or im_mask.device != x.device:
        return "im_mask is not a bool mask of shape x.shape[:-1] on x's device"
    if compute_dtype(layer, x) is None:
        return "x, the weights and the bias reach F.linear in different dtypes"
    if _plora_dropout_p(layer) >= 1.0:
        return "dropout p >= 1"
    return None


def _plora_dropout_p(layer: nn.Module) -> float:
    dropout = layer.lora_dropout
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _stack(layer: nn.Module) -> AdapterStack:
    stack = layer.__dict__.get(_STACK_ATTR)
    if stack is None:
        stack = layer.__dict__[_STACK_ATTR] = AdapterStack()
    return stack


def _backend(layer: nn.Module) -> Optional[str]:
    return layer.__dict__.get(_BACKEND_ATTR)


def _plora_pass(layer: nn.Module, x: torch.Tensor, im_mask: torch.Tensor, backend: Optional[str],
                stack: AdapterStack) -> torch.Tensor:
    """``x W^T + b`` on every row, plus the PLoRA of ``layer`` on the image rows: one op call (under autocast the
    op casts the operands as ``F.linear`` does and returns the autocast dtype)."""
    segments = mask_segments(im_mask, x.device)
    scale = stack.constant((float(layer.lora_scaling),), accumulation_dtype(compute_dtype(layer, x)), x.device)
    return multi_lora_linear(
        x, layer.weight, layer.bias, layer.Plora_A.weight.unsqueeze(0), layer.Plora_B.weight.unsqueeze(0), scale,
        segments, dropout_p=_plora_dropout_p(layer), backend=backend,
    )


def fused_plora_forward(layer: nn.Module, x: torch.Tensor, im_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward of a patched PLoRA: ``x [..., C_in]``, ``im_mask`` bool ``x.shape[:-1]`` -> ``[..., C_out]``, the
    reference's values and gradients in one segmented pass; other calls run the class's forward (module
    docstring)."""
    if _call_problem(layer, x, im_mask) is not None:
        return type(layer).forward(layer, x, im_mask)
    return _plora_pass(layer, x, im_mask, _backend(layer), _stack(layer))


def _mask_argument(args: tuple, kwargs: dict) -> Tuple[bool, Optional[torch.Tensor]]:
    """``(True, im_mask)`` when PEFT's ``*args, **kwargs`` are exactly the mask (positional or ``im_mask=``)."""
    if len(args) == 1 and not kwargs:
        return True, args[0]
    if not args and len(kwargs) == 1 and "im_mask" in kwargs:
        return True, kwargs["im_mask"]
    return False, None


def fused_peft_plora_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a patched PEFT LoRA ``Linear`` over a PLoRA: ``layer(x, im_mask)`` -> ``[..., C_out]`` with the
    PLoRA on the image rows and the single active PEFT adapter on every row, in one op call (two with dropout in
    training); other calls run PEFT's forward (module docstring)."""
    served, im_mask = _mask_argument(args, kwargs)
    base = layer.base_layer
    active = [a for a in layer.active_adapters if a in layer.lora_A] if served else []
    if (not served or layer.disable_adapters or layer.merged or len(active) != 1
            or adapter_unfusable(layer, active[0]) is not None or _call_problem(base, x, im_mask) is not None):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    peft_scale, plora_scale = float(layer.scaling[name]), float(base.lora_scaling)
    peft_p = adapter_dropout_p(layer, name) if layer.training else 0.0
    backend = _backend(layer)
    stack = _stack(layer)
    # PEFT casts x to its adapter's dtype, autocast then casts both to the autocast dtype: one compute dtype
    # (outside autocast the base's: PEFT's fp32 adapters over a bf16 base run in bf16 here)
    dtype = compute_dtype(base, x)
    if peft_p >= 1.0:
        return type(layer).forward(layer, x, *args, **kwargs)
    if peft_p > 0.0 or _plora_dropout_p(base) > 0.0:
        # Independent masks for the two LoRAs: the PLoRA pass, then PEFT's LoRA on all rows over its output.
        out = _plora_pass(base, x, im_mask, backend, stack)
        rows = x.numel() // x.shape[-1]
        return multi_lora_linear(
            x.new_empty((*x.shape[:-1], 0)), x.new_empty((base.out_features, 0)), None,
            lora_a.to(dtype).unsqueeze(0), lora_b.to(dtype).unsqueeze(0),
            stack.constant((peft_scale,), accumulation_dtype(dtype), x.device),
            single_adapter_segments(rows, x.device), lora_input=x, residual=out, dropout_p=peft_p, backend=backend,
        )
    # One pass: [A_l; A_p] with rank r_l + r_p on image rows (adapter 0), its first r_l columns on text rows (1).
    same_scale = peft_scale == plora_scale
    folded = (1.0, 1.0) if same_scale else (peft_scale, plora_scale)
    down, up = stack.concatenated([lora_a, base.Plora_A.weight], [lora_b, base.Plora_B.weight], folded,
                                  dtype=dtype)
    rank = down.shape[0]
    op_scale = peft_scale if same_scale else 1.0
    return multi_lora_linear(
        x, base.weight, base.bias, down.unsqueeze(0).expand(2, -1, -1), up.unsqueeze(0).expand(2, -1, -1),
        stack.constant((op_scale, op_scale), accumulation_dtype(dtype), x.device),
        mask_segments(im_mask, x.device, true_adapter=0, false_adapter=1),
        ranks=stack.constant((rank, lora_a.shape[0]), torch.int32, x.device), ranks_checked=True, backend=backend,
    )


# ---------------------------------------------------------------------------------------------------------
# PEFT over PLoRA
# ---------------------------------------------------------------------------------------------------------
def _plora_base_problem(base: nn.Module) -> Optional[str]:
    if not looks_like_plora(base):
        return f"base layer is {type(base).__name__}, not a PLoRA"
    problem = plora_problem(base)
    return None if problem is None else f"base layer PLoRA: {problem}"


def _peft_problem(module: nn.Module) -> Optional[str]:
    return peft_linear_problem(module, _plora_base_problem)


def _peft_over_plora(module: nn.Module) -> bool:
    base = getattr(module, "base_layer", None)
    return is_peft_lora_layer(module) and isinstance(base, nn.Module) and looks_like_plora(base)


def _peft_to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    module.__dict__[_BACKEND_ATTR] = options.backend
    module.forward = InstanceForward(fused_peft_plora_forward, module)
    return module


PLORA_RULE = register_builtin_rule(PatchRule.by_structure(
    RULE_NAME, looks_like_plora, plora_problem, _to_fused, _to_reference, kinds={"plora_linear": 1},
    description="InternLM-XComposer's PLoRA: an nn.Linear with Plora_A, Plora_B, lora_scaling, lora_dropout and "
                "forward(x, im_mask=None)",
))

PEFT_PLORA_RULE = register_builtin_rule(PatchRule.by_structure(
    PEFT_RULE_NAME, _peft_over_plora, _peft_problem, _peft_to_fused, _to_reference,
    kinds={"plora_peft_linear": 1}, after=(RULE_NAME,),
    description="a PEFT LoRA Linear whose base layer is a PLoRA, with plain LoRA adapters",
))
