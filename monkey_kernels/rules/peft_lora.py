"""HuggingFace PEFT LoRA towers (the ``peft_lora_linear`` rule): every PEFT LoRA ``Linear`` runs the fused
multi-LoRA op with its adapters stacked, and one call of the whole model can use a different adapter per batch
row, in training too.

What it recognises: ``peft.tuners.lora.layer.Linear`` layers (by class: PEFT is never imported here; without
PEFT loaded no such layer exists) over a plain ``nn.Linear`` with only plain LoRA adapters. Call contract: PEFT's
``forward(x, *args, **kwargs)``, kept whole: the fused forward serves exactly the calls it can (no extra
arguments, the input in the base weight's dtype, adapters not merged, one active adapter or a per-row
selection) and hands every other call to PEFT's own ``forward``. Its fused forward:
``x [B, ..., K] -> [B, ..., N]``, one ``multi_lora_linear`` over all rows with each row's adapter.

Usage::

    report = patch_model(peft_model)          # report.skipped lists what stays a plain PEFT layer, and why
    with adapter_selection(peft_model, ["a", "__base__", "b"]):   # one entry per batch row (names or ids)
        out = peft_model(pixel_values=pixel_values)               # [3, ...] rows use a / base only / b
    peft_model.save_pretrained(path)          # unchanged: the PEFT Parameters are the trained ones

Design:

- Patching is done ON THE INSTANCE: the PEFT ``lora.Linear`` object stays in the model (same class, same
  children, same Parameters), only an instance ``forward`` is installed. So ``state_dict`` keys, PEFT's
  ``save_pretrained`` / ``set_adapter`` / ``add_adapter`` / ``delete_adapter``, and optimizers built before or
  after patching are all unaffected; ``unpatch_model`` removes the instance ``forward``.
- The fused ``forward`` stacks the ``lora_A`` / ``lora_B`` weights of the adapters used by the current batch
  (:class:`~monkey_kernels.adapter_stack.AdapterStack`, zero-padding ranks to the largest one; cached without
  autograd while the weights are unchanged), so gradients flow to PEFT's own Parameters and
  adapters not used by a batch get no gradient at all (``None``, as with PEFT). ``scale[a]`` is PEFT's
  ``scaling[a]`` (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA; also after ``set_scale``), read every call.
- Row selection: :func:`set_adapter_rows` / :func:`adapter_selection` store ONE :class:`AdapterRows` holder on
  every fused layer of the model. It caches one :class:`SegmentInfo` per (layer adapter set, rows per batch
  entry, device), so a whole model call builds it once per sequence length, not once per layer. Adapter ids
  (``int``) index the model's adapters in load order (:func:`peft_adapter_names`); ``-1``, ``None`` and
  ``"__base__"`` mean base model only. An adapter that a layer does not have (other ``target_modules``) is
  base-only in that layer, as in PEFT's ``adapter_names`` path.
- PEFT LoRA layers that cannot be fused (DoRA or another LoRA variant, ``lora_bias``, merged adapters,
  quantized or non-``nn.Linear`` base layers, ``fan_in_fan_out``, LoRA on conv / embedding layers) stay PEFT
  layers and are listed in ``PatchReport.skipped``. While a selection is active they get PEFT's own
  ``adapter_names`` kwarg through a forward pre-hook, so they apply the same per-row adapters (PEFT's masked
  loop) or raise PEFT's error (e.g. a DoRA adapter in ``adapter_names``, or LoRA on a position embedding whose
  input is not one row per image, where PEFT's ``adapter_names`` fails too) -- never silently the wrong adapter.
- The selection is read when a layer runs. With gradient checkpointing the forward is recomputed during
  ``backward()``: call ``backward()`` inside the ``adapter_selection`` block (or use :func:`set_adapter_rows`
  for the training loop), else the recomputation would not see the rows. Clear a selection before
  ``unpatch_model`` (its hooks on unfused layers belong to the selection).
- Without a selection, a fused layer with exactly one active adapter runs fused on all rows; anything else
  (several active adapters, ``disable_adapter()``, merged weights, other call arguments, an input that reaches
  the base ``F.linear`` in another dtype than its weight) calls PEFT's own ``forward``, so behaviour is PEFT's.
- ``torch.autocast`` (CPU or CUDA) is served fused: PEFT's forward runs ``base_layer(x)`` in the autocast dtype,
  casts ``x`` to ``lora_A``'s dtype and adds ``lora_B(lora_A(dropout(x))) * scaling``, each linear an autocast
  one (``H`` and the LoRA product rounded to the autocast dtype, the scaling and the sum in it). The fused layer
  stacks the adapters in the autocast dtype and the op casts ``x``, ``W`` and ``b`` as ``F.linear`` does (float64
  left alone), rounds ``H`` as the reference does, accumulates the base and LoRA products in fp32 and rounds
  once into the autocast dtype (the reference's output dtype); gradients reach fp32 master Parameters in fp32.
- Dropout: PEFT has one ``lora_dropout`` per adapter. When all adapters used by a batch share one ``p``, the op
  applies it in-kernel (its own mask stream: same distribution as ``nn.Dropout``, not the same mask); when they
  differ, the per-row dropout is applied to a separate LoRA input (``lora_input``) in PyTorch and the op runs
  with ``dropout_p=0``. Dropout is only applied in training mode, as by ``nn.Dropout``.
- LoRA weights are cast to the activation dtype for the op (PEFT keeps adapters in float32 over a bf16 base by
  default and computes the LoRA branch in float32; here it is computed in the activation dtype with float32
  accumulation), gradients still reach the float32 Parameters.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..adapter_stack import AdapterStack, remap_adapter_ids
from ..ops.autocast import autocast_dtype
from ..ops.checks import FLOAT_DTYPES, accumulation_dtype
from ..ops.multi_lora import multi_lora_linear
from ..ops.segments import SegmentInfo
from ..patching import InstanceForward, PatchOptions, PatchRule, register_builtin_rule, rule_of

__all__ = ["AdapterRows", "adapter_selection", "set_adapter_rows", "clear_adapter_rows", "peft_adapter_names",
           "fused_peft_linear_forward", "BASE_NAME", "RULE_NAME", "is_peft_lora_layer", "peft_linear_problem",
           "adapter_unfusable", "adapter_dropout_p", "single_adapter_segments"]

BASE_NAME = "__base__"  # PEFT's adapter_names entry for "base model only"
RULE_NAME = "peft_lora_linear"
_ROWS_ATTR = "_monkey_kernels_peft_rows"  # AdapterRows holder on fused layers
_BACKEND_ATTR = "_monkey_kernels_peft_backend"
_SELECTION_ATTR = "_monkey_kernels_peft_selection"  # on the model: (rows, hook handles, layers)
_STACK_ATTR = "_monkey_kernels_peft_stack"  # the layer's AdapterStack (its caches)

# Bumped whenever this rule patches or unpatches a layer: cached layer lists of a model are then stale.
_generation = 0
# model -> (structure key, fused layers, unfused LoRA layers); weak, so a dropped model leaves nothing behind
_LAYER_LISTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

RowsLike = Union[Sequence[Union[str, int, None]], torch.Tensor]


def _lora_module():
    """``peft.tuners.lora.layer`` when PEFT was imported, else ``None``: no PEFT layer can exist without it, and
    this keeps ``patch_model`` from importing PEFT (an optional dependency) for unrelated models."""
    return sys.modules.get("peft.tuners.lora.layer")


def is_peft_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (any kind); ``False`` without PEFT imported."""
    lora = _lora_module()
    return lora is not None and isinstance(module, lora.LoraLayer)


def adapter_unfusable(layer: nn.Module, name: str) -> Optional[str]:
    """Why adapter ``name`` of a PEFT LoRA layer cannot run in the fused op, or ``None``."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        return f"adapter {name!r} uses a LoRA variant ({type(variant).__name__}, e.g. DoRA)"
    if getattr(layer, "use_dora", {}).get(name, False):
        return f"adapter {name!r} uses DoRA"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return f"adapter {name!r} has lora_bias=True (a bias on lora_B)"
    if name in getattr(layer, "lora_magnitude_vector", {}):
        return f"adapter {name!r} has a magnitude vector (DoRA)"
    return None


def _plain_linear_base_problem(base: nn.Module) -> Optional[str]:
    """Why the base layer of a PEFT LoRA ``Linear`` is not the plain ``nn.Linear`` this rule fuses, or ``None``."""
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not a plain nn.Linear (quantized or wrapped)"
    return None


def peft_linear_problem(module: nn.Module, base_problem: Callable[[nn.Module], Optional[str]]) -> Optional[str]:
    """Why a PEFT LoRA layer stays a PEFT layer, or ``None`` when it can be fused: it must be a
    ``peft.tuners.lora.layer.Linear`` whose base layer ``base_problem`` accepts (``None``), with a float base
    weight, no ``fan_in_fan_out``, unmerged plain LoRA adapters (no DoRA / variant / ``lora_bias``). Shared by
    the rules fusing PEFT layers over different base layers (a plain ``nn.Linear`` here, InternLM-XComposer's
    PLoRA in :mod:`.plora`)."""
    lora = _lora_module()
    if type(module) is not lora.Linear:  # conv, embedding, bnb / torchao / hqq quantized, ...
        return f"{type(module).__module__}.{type(module).__name__} (only peft.tuners.lora.layer.Linear is fused)"
    base = module.base_layer
    problem = base_problem(base)
    if problem is not None:
        return problem
    if base.weight.dtype not in FLOAT_DTYPES or type(base.weight.data) is not torch.Tensor:
        return f"base weight is a {type(base.weight.data).__name__} of {base.weight.dtype} (quantized?)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed base weight)"
    if module.merged:
        return f"adapters {list(module.merged_adapters)} are merged into the base weight"
    if len(module.lora_A) == 0:
        return "no LoRA adapter loaded"
    for name in module.lora_A.keys():
        reason = adapter_unfusable(module, name)
        if reason is not None:
            return reason
    return None


def _unfusable_reason(module: nn.Module) -> Optional[str]:
    """Why a PEFT LoRA layer stays a PEFT layer under this rule, or ``None`` when it can be fused."""
    return peft_linear_problem(module, _plain_linear_base_problem)


def _to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    global _generation
    _generation += 1
    module.__dict__[_BACKEND_ATTR] = options.backend
    module.forward = InstanceForward(fused_peft_linear_forward, module)
    return module


def _to_reference(module: nn.Module) -> nn.Module:
    global _generation
    _generation += 1
    for attr in ("forward", _BACKEND_ATTR, _ROWS_ATTR, _STACK_ATTR):
        module.__dict__.pop(attr, None)
    return module


# ---------------------------------------------------------------------------------------------------------
# Row selection
# ---------------------------------------------------------------------------------------------------------
def peft_adapter_names(model: nn.Module) -> List[str]:
    """The adapter names of ``model`` in load order; ``ids`` in a selection index this list.

    Read from ``model.peft_config`` (a ``PeftModel`` or ``LoraModel``), else gathered from its PEFT LoRA layers
    in module order."""
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and config:
        return list(config.keys())
    names: Dict[str, None] = {}
    for module in model.modules():
        if is_peft_lora_layer(module):
            for name in module.lora_A.keys():
                names.setdefault(name, None)
            for name in getattr(module, "lora_embedding_A", {}).keys():
                names.setdefault(name, None)
    return list(names)


class AdapterRows:
    """The adapter of each batch row for one model call, shared by every fused layer (the "holder").

    Args:
        names: one entry per batch row: an adapter name (``str``), or ``None`` / ``"__base__"`` for the base
            model only. Built by :meth:`from_rows`, which also accepts ids.
    The per-layer :class:`SegmentInfo` is built lazily from an input ``[B, *rows, K]`` (``B == len(names)``;
    ``rows`` = the product of the middle dims, e.g. the sequence length) and cached by (the adapters the layer
    uses, rows, device), so all layers of one model call share it."""

    def __init__(self, names: Sequence[Optional[str]]) -> None:
        self.names: Tuple[Optional[str], ...] = tuple(None if n == BASE_NAME else n for n in names)
        self._cache: Dict[tuple, Tuple[Tuple[str, ...], SegmentInfo]] = {}

    @classmethod
    def from_rows(cls, rows: RowsLike, known: Sequence[str], argument: str = "rows") -> "AdapterRows":
        """Validates ``rows`` (names, ids into ``known``, ``-1`` / ``None`` / ``"__base__"`` = base only)."""
        if isinstance(rows, torch.Tensor):
            if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
                raise ValueError(f"{argument} as a tensor must be 1-D integer ids, got {rows.dtype} "
                                 f"{tuple(rows.shape)}")
            if rows.is_meta:
                raise ValueError(f"{argument} is a tensor on the meta device (no values); pass ids on the CPU")
            rows = rows.tolist()
        if isinstance(rows, str) or not isinstance(rows, Sequence):
            raise ValueError(f"{argument} must be a sequence with one adapter name or id per batch row, "
                             f"got {type(rows).__name__}")
        known = list(known)
        names: List[Optional[str]] = []
        for i, row in enumerate(rows):
            if row is None or row == BASE_NAME:
                names.append(None)
            elif isinstance(row, str):
                if row not in known:
                    raise ValueError(f"{argument}[{i}]={row!r} is not a loaded adapter; loaded: {known} "
                                     f"(or {BASE_NAME!r} for the base model)")
                names.append(row)
            elif isinstance(row, int) and not isinstance(row, bool):
                if not -1 <= row < len(known):
                    raise ValueError(f"{argument}[{i}]={row} is not an adapter id: ids are -1 (base model) or "
                                     f"0..{len(known) - 1} for {known}")
                names.append(None if row == -1 else known[row])
            else:
                raise ValueError(f"{argument}[{i}] must be an adapter name, id or None, got {row!r}")
        return cls(names)

    def __len__(self) -> int:
        return len(self.names)

    def segments_for(self, layer_adapters: Tuple[str, ...], x: torch.Tensor) -> Tuple[Tuple[str, ...], SegmentInfo]:
        """``(used, segments)`` for an input ``x [B, ..., K]`` of a layer holding ``layer_adapters``: ``used`` are
        the adapters to stack (in layer order; rows' ids index it), ``segments`` cover ``x``'s rows."""
        if x.dim() < 2 or x.shape[0] != len(self.names):
            raise ValueError(f"input has {x.shape[0] if x.dim() else 0} batch rows (shape {tuple(x.shape)}) but "
                             f"the adapter selection has {len(self.names)} rows")
        per_row = 1
        for d in x.shape[1:-1]:
            per_row *= int(d)
        key = (layer_adapters, per_row, x.device)
        hit = self._cache.get(key)
        if hit is None:
            index = {a: i for i, a in enumerate(layer_adapters)}
            ids = torch.tensor([index.get(n, -1) if n is not None else -1 for n in self.names], dtype=torch.int32)
            used, positions = remap_adapter_ids(ids)  # the layer's adapters some row uses, in layer order
            hit = (tuple(layer_adapters[i] for i in used), SegmentInfo.from_batch(positions, per_row).to(x.device))
            self._cache[key] = hit
        return hit


def _adapter_names_pre_hook(module, args, kwargs, *, names: List[str]):
    # What PEFT's own _enable_peft_forward_hooks does, but allowed in training too.
    kwargs["adapter_names"] = names
    return args, kwargs


def set_adapter_rows(model: nn.Module, rows: RowsLike) -> AdapterRows:
    """Selects the adapter of each batch row for the following calls of ``model`` (until
    :func:`clear_adapter_rows`). ``rows``: one adapter name or id per batch row (see :class:`AdapterRows`).

    Fused layers read the returned holder; PEFT LoRA layers that were not fused get PEFT's ``adapter_names``
    kwarg through a forward pre-hook. Raises ``ValueError`` naming ``rows`` for unknown names / ids."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    selection = AdapterRows.from_rows(rows, peft_adapter_names(model))
    clear_adapter_rows(model)
    peft_names = [BASE_NAME if n is None else n for n in selection.names]
    layers, unfused = _peft_layers(model)
    for module in layers:
        module.__dict__[_ROWS_ATTR] = selection
    handles = [module.register_forward_pre_hook(partial(_adapter_names_pre_hook, names=peft_names),
                                                with_kwargs=True) for module in unfused]
    model.__dict__[_SELECTION_ATTR] = (selection, handles, list(layers))
    return selection


def _peft_layers(model: nn.Module) -> Tuple[Tuple[nn.Module, ...], Tuple[nn.Module, ...]]:
    """``(fused layers, PEFT LoRA layers left unfused)`` of ``model``.

    Walking every module costs as much as a small layer's forward (a PEFT model with several adapters has
    hundreds of modules), so the lists are cached per model (weakly) under a key that changes whenever they can:
    the adapter names in ``peft_config`` (``add_adapter`` / ``load_adapter`` / ``delete_adapter`` -- how PEFT
    adds LoRA layers) and a counter bumped by every patch / unpatch of a layer. A model without
    ``peft_config`` is walked on every call."""
    config = getattr(model, "peft_config", None)
    key = (tuple(config.keys()), _generation) if isinstance(config, dict) else None
    cached = _LAYER_LISTS.get(model)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    fused, unfused = [], []
    for module in model.modules():
        if rule_of(module) == RULE_NAME:
            fused.append(module)
        elif is_peft_lora_layer(module):
            unfused.append(module)
    result = (tuple(fused), tuple(unfused))
    if key is not None:
        _LAYER_LISTS[model] = (key,) + result
    return result


def clear_adapter_rows(model: nn.Module) -> None:
    """Ends a selection made by :func:`set_adapter_rows` (no-op when there is none)."""
    state = model.__dict__.pop(_SELECTION_ATTR, None)
    if state is None:
        return
    _, handles, layers = state
    for handle in handles:
        handle.remove()
    for layer in layers:
        layer.__dict__.pop(_ROWS_ATTR, None)


@contextlib.contextmanager
def adapter_selection(model: nn.Module, rows: RowsLike) -> Iterator[AdapterRows]:
    """``with adapter_selection(model, ["a", "__base__", 1]): model(x)`` -- per-row adapters for the calls in
    the block (training or eval); the previous selection, if any, is restored afterwards."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    previous = model.__dict__.get(_SELECTION_ATTR)
    selection = set_adapter_rows(model, rows)
    try:
        yield selection
    finally:
        clear_adapter_rows(model)
        if previous is not None:
            set_adapter_rows(model, [n if n is not None else BASE_NAME for n in previous[0].names])


# ---------------------------------------------------------------------------------------------------------
# Fused forward
# ---------------------------------------------------------------------------------------------------------
_ALL_ROWS_CACHE: Dict[tuple, SegmentInfo] = {}
_ADAPTER_NAMES_CACHE: List = [None, None]  # (tuple of names, AdapterRows) of the last PEFT adapter_names call


def single_adapter_segments(num_rows: int, device: torch.device) -> SegmentInfo:
    """One segment: every row uses stacked adapter 0 (the single active adapter); cached per rows and device."""
    key = (num_rows, device)
    seg = _ALL_ROWS_CACHE.get(key)
    if seg is None:
        if len(_ALL_ROWS_CACHE) > 64:  # bounded: shapes vary (e.g. text lengths)
            _ALL_ROWS_CACHE.clear()
        seg = SegmentInfo.from_batch(torch.zeros(1, dtype=torch.int32), num_rows).to(device)
        _ALL_ROWS_CACHE[key] = seg
    return seg


def _rows_from_peft_names(layer: nn.Module, adapter_names: Sequence[str]) -> AdapterRows:
    # PEFT's hook hands the same list to every layer of one call: build the holder once per distinct list.
    key = tuple(adapter_names)
    if _ADAPTER_NAMES_CACHE[0] != key:
        for i, name in enumerate(adapter_names):
            if not isinstance(name, str):
                raise ValueError(f"adapter_names[{i}] must be a str, got {name!r}")
        _ADAPTER_NAMES_CACHE[0] = key
        _ADAPTER_NAMES_CACHE[1] = AdapterRows(adapter_names)
    return _ADAPTER_NAMES_CACHE[1]


def adapter_dropout_p(layer: nn.Module, name: str) -> float:
    """The dropout probability of PEFT adapter ``name`` of ``layer`` (0 without an ``nn.Dropout``)."""
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _stack(layer: nn.Module, used: Tuple[str, ...], dtype: torch.dtype):
    """``(A [n, r_max, K], B [n, N, r_max], scale [n], ranks [n])`` of the adapters ``used`` in ``dtype``; ranks are
    padded with zeros to ``r_max`` (the op also masks past ``ranks``), differentiable towards PEFT's Parameters;
    ``scale[a]`` is PEFT's ``scaling[a]``, read on every call, in the accumulation dtype (a float64 model keeps
    alpha / r exact, which it rarely is in float32)."""
    stack = layer.__dict__.get(_STACK_ATTR)
    if stack is None:
        stack = layer.__dict__[_STACK_ATTR] = AdapterStack()
    return stack([layer.lora_A[a].weight for a in used], [layer.lora_B[a].weight for a in used],
                 [float(layer.scaling[a]) for a in used], dtype=dtype, scale_dtype=accumulation_dtype(dtype),
                 with_ranks=True)


def _linear_dtype(tensor: torch.Tensor, amp: Optional[torch.dtype], device_type: str) -> torch.dtype:
    """The dtype ``F.linear`` computes ``tensor`` in: autocast's cast where it applies (``amp`` not ``None``;
    float64 and tensors on another device type are left alone, as autocast leaves them), else its own."""
    if (amp is not None and tensor.is_floating_point() and tensor.dtype != torch.float64
            and tensor.device.type == device_type):
        return amp
    return tensor.dtype


def compute_dtype(base: nn.Linear, x: torch.Tensor) -> Optional[torch.dtype]:
    """The one dtype the base ``F.linear`` of ``layer(x)`` computes in (``x``'s, or under ``torch.autocast`` the
    autocast dtype it casts ``x``, the weight and the bias to), or ``None`` when they would reach it in
    different dtypes (PEFT's own forward then runs, and fails or promotes as it does)."""
    amp = autocast_dtype(x.device.type)
    operands = [x, base.weight] + ([base.bias] if base.bias is not None else [])
    dtypes = {_linear_dtype(t, amp, x.device.type) for t in operands}
    return dtypes.pop() if len(dtypes) == 1 else None


def fused_peft_linear_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a patched PEFT ``lora.Linear``: ``x [B, ..., K] -> [B, ..., N]``.

    With a selection (:func:`adapter_selection`, or PEFT's ``adapter_names`` kwarg) each batch row uses its
    adapter; without one, the single active adapter applies to all rows. Falls back to PEFT's own forward where
    that is the behaviour asked for (see the module docstring)."""
    peft_forward = type(layer).forward
    adapter_names = kwargs.pop("adapter_names", None)
    rows = _rows_from_peft_names(layer, adapter_names) if adapter_names is not None else layer.__dict__.get(_ROWS_ATTR)
    extra = args or any(v is not None for v in kwargs.values())
    base = layer.base_layer
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names  # for a PEFT fallback below
    dtype = compute_dtype(base, x)
    if layer.disable_adapters or extra or dtype is None:
        if rows is not None and adapter_names is None and not layer.disable_adapters:
            kwargs["adapter_names"] = [BASE_NAME if n is None else n for n in rows.names]
        return peft_forward(layer, x, *args, **kwargs)
    layer_adapters = tuple(layer.lora_A.keys())
    if rows is None:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.merged or len(active) != 1 or adapter_unfusable(layer, active[0]) is not None:
            return peft_forward(layer, x, *args, **kwargs)
        used = (active[0],)
        segments = single_adapter_segments(x.numel() // x.shape[-1], x.device)
    else:
        if layer.merged:
            raise ValueError("cannot select adapters per row when adapters are merged into the base weight; "
                             "call unmerge_adapter() first")
        used, segments = rows.segments_for(layer_adapters, x)
        for name in used:
            reason = adapter_unfusable(layer, name)
            if reason is not None:
                raise ValueError(f"rows select {reason}, which cannot run per row; this layer was patched "
                                 "before that adapter was added: unpatch_model and patch_model again")
    if not used:  # every row is base-only in this layer
        return base(x)
    # PEFT casts x to lora_A's dtype and autocast casts both to its dtype: the LoRA runs in ``dtype`` (outside
    # autocast the base's: PEFT's fp32 adapters over a bf16 base run in bf16 here, fp32 accumulation)
    lora_a, lora_b, scale, ranks = _stack(layer, used, dtype)
    probs = [adapter_dropout_p(layer, a) for a in used] if layer.training else [0.0]
    lora_input, dropout_p = None, max(probs)
    if len(set(probs)) > 1:
        # One op call has one dropout p: apply PEFT's per-adapter p per row here instead (row_adapter -> p).
        p_row = torch.tensor([0.0] + probs, dtype=torch.float32, device=x.device)[segments.row_adapter + 1]
        flat = x.reshape(-1, x.shape[-1])
        keep = torch.rand_like(flat, dtype=torch.float32) >= p_row[:, None]
        lora_input = (flat * keep / (1.0 - p_row[:, None])).to(x.dtype).view_as(x)
        dropout_p = 0.0
    return multi_lora_linear(
        x, base.weight, base.bias, lora_a, lora_b, scale, segments, ranks=ranks, lora_input=lora_input,
        dropout_p=dropout_p, backend=layer.__dict__.get(_BACKEND_ATTR), ranks_checked=True,
    )


PEFT_RULE = register_builtin_rule(PatchRule.by_structure(
    RULE_NAME, is_peft_lora_layer, _unfusable_reason, _to_fused, _to_reference, kinds={"peft_lora_linear": 1},
    description="a PEFT LoRA Linear (peft.tuners.lora.layer.Linear) over an nn.Linear with plain LoRA adapters",
))
