"""The one adapter-stacking helper of every model family: per-adapter LoRA weights (the model's own Parameters)
-> the stacked tensors of :func:`~monkey_kernels.multi_lora_linear`, and a batch's adapter ids -> positions in
the stacked set.

Why stack per forward. Models hold one module per adapter (Monkey's ``Lora_Adapter`` lists, PEFT's ``lora_A`` /
``lora_B`` dicts), and those Parameters stay the source of truth: state-dict keys, optimizers built before
patching, ``save_pretrained``, growing the adapter lists and unpatching all keep working with no copy. So a fused
layer stacks, on every forward, the weights of the adapters its batch uses -- differentiably, so gradients land
on the per-adapter Parameters, and an adapter no row uses is not stacked and gets no gradient (``.grad`` stays
``None``, as in the reference loop: weight decay and momentum leave it alone). The cost is one copy of the used
adapters' weights per layer and forward (``n * r * (K + N)`` elements), small next to the layer's GEMMs.

- :func:`remap_adapter_ids`: ``(used, positions)``: the adapters a batch uses and its ids as positions in them.
- :class:`AdapterStack` (one per fused layer or adapter list; it holds caches, no Parameters):
  ``stack(lora_a, lora_b, scale, dtype=..., with_ranks=...) -> StackedLoRA(A [n, r_max, K], B [n, N, r_max],
  scale [n], ranks [n] | None)``; ``stack.concatenated(lora_a, lora_b, scales)`` -> ONE adapter of rank
  ``sum r_i`` (``A [sum r_i, K]``, ``B [N, sum r_i]``, scales folded into ``B``: two LoRAs on the same rows in one
  product). Ranks that differ are zero-padded to the largest (the op also masks past
  ``ranks``). Scales are tensors (Monkey's learnable ``lora_scale``: stacked differentiably) or floats (PEFT's
  ``alpha / r``: one constant tensor, cached per values). Without autograd (eval, ``no_grad``, frozen weights)
  the stacks are cached and reused while every weight is the same tensor with the same storage, version
  counter, dtype and shape (an optimizer step or any in-place write bumps the version).

``MultiLoRALinear`` (the op's own module) is not a user: it owns its adapters already stacked as Parameters.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["StackedLoRA", "AdapterStack", "remap_adapter_ids"]

_CONST_CACHE_LIMIT = 32  # scale / rank constants per stack; bounded: scales may change (PEFT's set_scale)


class StackedLoRA(NamedTuple):
    """The stacked adapters of one op call: ``lora_a [n, r_max, K]``, ``lora_b [n, N, r_max]``, ``scale [n]``,
    ``ranks`` (int32 ``[n]``, when asked for; else ``None``)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: torch.Tensor
    ranks: Optional[torch.Tensor]


def remap_adapter_ids(ids: torch.Tensor, used: Optional[Sequence[int]] = None
                      ) -> Tuple[Optional[List[int]], torch.Tensor]:
    """``(used, positions)``: the adapters the rows use (sorted host ints) and ``ids`` remapped to positions in
    ``used`` (``-1``, no adapter, stays).

    Args:
        ids: integer adapter id per row or batch entry (``-1`` = none), any device.
        used: the adapters ``ids`` use, when the caller knows them on the host (e.g. a fixed tile grid): no
            device read then; otherwise they are read from ``ids`` (one small read).
    Returns:
        ``used = None`` means "stack every adapter": while compiling or capturing a CUDA graph no host read (nor
        host-to-device copy) is allowed, so then, unless ``used`` is ``0 .. n-1`` (no remap needed), every
        adapter is stacked with the ids unchanged, and adapters no row uses get zero gradients instead of none.
    """
    capturing = torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing())
    if used is None:
        if capturing:
            return None, ids
        used = torch.unique(ids).tolist()
    used = sorted({int(a) for a in used if a >= 0})
    if used == list(range(len(used))):
        return used, ids  # the ids already index ``used``
    if capturing:
        return None, ids
    lut = torch.full((used[-1] + 2,), -1, dtype=ids.dtype, device=ids.device)  # slot 0 is id -1
    lut[torch.tensor(used, device=ids.device) + 1] = torch.arange(len(used), dtype=ids.dtype, device=ids.device)
    return used, lut[ids + 1]


class _StackPadded(torch.autograd.Function):
    """``[n, *shape]`` from ``n`` weights, each zero-padded at the end of dim ``dim`` to ``size``, in ``dtype``:
    one allocation and one copy per weight (``F.pad`` + ``torch.stack`` cost two of each per adapter and layer,
    as much as the layer's GEMMs at small sizes); the backward hands each weight its slice of the gradient."""

    @staticmethod
    def forward(ctx, dim: int, size: int, dtype: torch.dtype, *weights: torch.Tensor) -> torch.Tensor:
        first = weights[0]
        shape = list(first.shape)
        shape[dim] = size
        padded = any(w.shape[dim] != size for w in weights)
        out = (first.new_zeros if padded else first.new_empty)((len(weights), *shape), dtype=dtype)
        for i, w in enumerate(weights):
            out[i].narrow(dim, 0, w.shape[dim]).copy_(w)
        ctx.dim = dim
        ctx.meta = [(w.shape[dim], w.dtype) for w in weights]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = tuple(grad[i].narrow(ctx.dim, 0, size).to(dtype) for i, (size, dtype) in enumerate(ctx.meta))
        return (None, None, None) + grads


def _traceable_stack(weights: Sequence[torch.Tensor], dim: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The same as :class:`_StackPadded` with plain differentiable ops (for ``torch.compile``, which fuses them)."""
    out = []
    for w in weights:
        missing = size - w.shape[dim]
        if missing:
            pad = [0, 0] * (w.dim() - 1 - dim) + [0, missing]
            w = torch.nn.functional.pad(w, pad)
        out.append(w if w.dtype == dtype else w.to(dtype))
    return torch.stack(out)


ScaleLike = Union[Sequence[torch.Tensor], Sequence[float]]


class AdapterStack:
    """Stacks chosen adapters' weights for one fused layer (or one adapter list), per forward; see the module
    docstring. Holds caches only (dropped when pickled or deep-copied), never Parameters."""

    def __init__(self) -> None:
        self._stacked: Optional[tuple] = None  # (stamp, held tensors, StackedLoRA without ranks)
        self._consts: Dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {}  # caches only: a copy rebuilds them

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scale: ScaleLike, *,
                 dtype: Optional[torch.dtype] = None, scale_dtype: Optional[torch.dtype] = None,
                 with_ranks: bool = False) -> StackedLoRA:
        """Stacks ``n >= 1`` adapters.

        Args:
            lora_a: ``n`` weights ``[r_i, K]``; lora_b: ``n`` weights ``[N, r_i]`` (ranks may differ).
            scale: ``n`` one-element tensors (stacked differentiably, in their dtype unless ``scale_dtype``) or
                ``n`` floats (a constant tensor in ``scale_dtype``, default ``dtype``).
            dtype: dtype of the stacked weights (default: the weights'); gradients reach the weights in theirs.
            with_ranks: also return the ranks as an int32 ``[n]`` tensor (cached).
        """
        if len(lora_a) == 0 or len(lora_a) != len(lora_b) or len(lora_a) != len(scale):
            raise ValueError(f"lora_a, lora_b and scale must hold the same number (>= 1) of adapters, got "
                             f"{len(lora_a)}, {len(lora_b)}, {len(scale)}")
        dtype = lora_a[0].dtype if dtype is None else dtype
        device = lora_a[0].device
        ranks = tuple(int(w.shape[0]) for w in lora_a)
        tensors = isinstance(scale[0], torch.Tensor)
        weights = list(lora_a) + list(lora_b) + (list(scale) if tensors else [])
        stacked = self._weights_and_scales(lora_a, lora_b, scale if tensors else None, weights, max(ranks), dtype,
                                           scale_dtype)
        scale_tensor = stacked[2] if tensors else self._const(
            tuple(float(s) for s in scale), scale_dtype or dtype, device)
        rank_tensor = self._const(ranks, torch.int32, device) if with_ranks else None
        return StackedLoRA(stacked[0], stacked[1], scale_tensor, rank_tensor)

    def _weights_and_scales(self, lora_a, lora_b, scales, weights, r_max, dtype, scale_dtype):
        def build():
            if all(w.shape[0] == r_max and w.dtype == dtype for w in lora_a) and all(w.dtype == dtype for w in lora_b):
                # Nothing to pad nor cast: torch.stack is one allocation and one copy per weight too, without a
                # Python autograd node.
                a, b = torch.stack(list(lora_a)), torch.stack(list(lora_b))
            elif torch.compiler.is_compiling():  # traced: plain ops, which the compiler fuses anyway
                a = _traceable_stack(lora_a, 0, r_max, dtype)
                b = _traceable_stack(lora_b, 1, r_max, dtype)
            else:
                a = _StackPadded.apply(0, r_max, dtype, *lora_a)
                b = _StackPadded.apply(1, r_max, dtype, *lora_b)
            s = None
            if scales is not None:
                s = torch.cat([v.reshape(1) for v in scales])
                s = s if scale_dtype is None else s.to(scale_dtype)
            return a, b, s

        return self._build_or_reuse(weights, ("stack", dtype, scale_dtype), build)

    def _build_or_reuse(self, weights: Sequence[torch.Tensor], key: tuple, build):
        """``build()`` under autograd (or while compiling, or for inference tensors); otherwise the result of the
        last ``build`` when ``key`` and every weight (same tensor, storage, version counter, dtype, shape) are
        unchanged, else a fresh ``build()`` (without autograd), kept for the next call."""
        differentiable = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        if differentiable or torch.compiler.is_compiling() or any(w.is_inference() for w in weights):
            return build()
        stamp = key + tuple((id(w), w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.device) for w in weights)
        cached = self._stacked
        if cached is not None and cached[0] == stamp:
            return cached[2]
        with torch.no_grad():
            stacks = build()
        # Holding the tensors (and so their storages) keeps every id / data_ptr of the stamp unique while cached.
        self._stacked = (stamp, [w.detach() for w in weights] + list(weights), stacks)
        return stacks

    def concatenated(self, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scale: Sequence[float],
                     *, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """ONE adapter made of ``n >= 1`` adapters side by side along the rank: ``(A [sum r_i, K], B [N, sum r_i])``
        with ``A = cat_i A_i`` and ``B = cat_i (s_i B_i)``, so that ``B A x = sum_i s_i B_i A_i x`` in one rank
        ``sum r_i`` product (e.g. InternLM-XComposer's PLoRA and a PEFT LoRA on the same image rows). Its first
        ``r_0`` rank columns are adapter 0 alone, which an op call can address with ``ranks``.

        Args:
            lora_a: ``n`` weights ``[r_i, K]``; lora_b: ``n`` weights ``[N, r_i]``.
            scale: ``n`` floats, folded into ``B``: multiplied only where ``s_i != 1`` (a power of two stays exact
                in any dtype; other values round once in ``dtype``).
            dtype: of the result (default: the first weight's); gradients reach the weights in theirs.
        Differentiable; cached without autograd like the stacks (see the class)."""
        if len(lora_a) == 0 or len(lora_a) != len(lora_b) or len(lora_a) != len(scale):
            raise ValueError(f"lora_a, lora_b and scale must hold the same number (>= 1) of adapters, got "
                             f"{len(lora_a)}, {len(lora_b)}, {len(scale)}")
        for i, value in enumerate(scale):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"scale[{i}] must be a float, got {value!r}")
        dtype = lora_a[0].dtype if dtype is None else dtype
        scales = tuple(float(s) for s in scale)

        def build():
            a = torch.cat([w.to(dtype) for w in lora_a])
            b = torch.cat([w.to(dtype) if s == 1.0 else w.to(dtype) * s for w, s in zip(lora_b, scales)], dim=1)
            return a, b

        return self._build_or_reuse(list(lora_a) + list(lora_b), ("concatenated", dtype, scales), build)

    def constant(self, values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``torch.tensor(values, dtype, device)``, cached per values (a scale or rank vector of an op call:
        created once, not copied to the device on every forward)."""
        return self._const(tuple(values), dtype, torch.device(device))

    def _const(self, values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (values, dtype, device)
        tensor = self._consts.get(key)
        if tensor is None:
            if len(self._consts) > _CONST_CACHE_LIMIT:
                self._consts.clear()
            tensor = torch.tensor(values, dtype=dtype, device=device)
            self._consts[key] = tensor
        return tensor
