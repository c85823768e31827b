"""The backend list, what a backend of each op implements, and the registry the implementations join.

Light on purpose (no torch, no Triton at import): the command line, the settings and the benchmarks' option
parsers read :data:`BACKENDS` from here without paying for ``import torch``;
:mod:`monkey_kernels.ops.backends` re-exports it with the rule that picks a backend.

Each op declares its backend contract as a :class:`typing.Protocol` (:class:`MultiLoRABackend`,
:class:`SLPBackend`): the methods (shapes in their docstrings) and the capability attributes. An implementation
module (``monkey_kernels/ops/<op>/<backend>_impl.py``) registers its class with :func:`register_backend` when
it is imported; a missing member, or a capability that is not a ``bool``, is an error there, naming the backend
and the member, so the op's code uses the members directly and never asks ``hasattr`` at call time.

To add a backend: its name in :data:`BACKENDS`, one ``<backend>_impl.py`` per op calling
:func:`register_backend`, and its device rule in :mod:`monkey_kernels.ops.backends`.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Tuple

if TYPE_CHECKING:  # annotations only: this module must import without torch
    import torch

    from monkey_kernels.ops.segments import SegmentInfo

__all__ = ["BACKENDS", "OPS", "MultiLoRABackend", "SLPBackend", "PROTOCOLS", "register_backend", "registered",
           "requires_capability", "contract_members"]

#: Every backend, in the order the command line, the benchmarks and the test matrices list them.
BACKENDS: Tuple[str, ...] = ("triton", "native", "torch")


def requires_capability(flag: str) -> Callable:
    """Marks a protocol method as required only from backends whose capability attribute ``flag`` is true."""

    def mark(method: Callable) -> Callable:
        method.__required_with__ = flag
        return method

    return mark


class MultiLoRABackend(Protocol):
    """The primitives of the segmented multi-LoRA linear (see :mod:`monkey_kernels.ops.multi_lora.op` for how
    forward and backward combine them). ``M`` rows; segment ``g`` uses adapter ``a = adapter_ids[g]`` (``-1``:
    no LoRA term); ``ranks`` int32 ``[A]``; ``drop`` the backend's dropout mask of ``(seed, p)``, scaled by
    ``1 / (1 - p)``. Half dtypes accumulate in fp32, fp64 in fp64."""

    #: the backend's name, one of :data:`BACKENDS`
    name: str
    #: ``outer(..., ranks=)`` writes exact zeros past each adapter's rank and for adapters that own no rows
    #: (otherwise the op selects those zeros itself)
    outer_zeroes_unowned: bool
    #: the backend has ``merged_linear`` / ``merge_worthwhile`` (each adapter's merged weight ``W + s B A``)
    supports_merged_weights: bool

    @staticmethod
    def shrink(x: "torch.Tensor", weight: "torch.Tensor", segments: "SegmentInfo", ranks: "torch.Tensor",
               r_block: int, dropout_p: float = 0.0, seed: int = 0) -> "torch.Tensor":
        """``H [M, r_block]`` (fp32; fp64 for fp64 ``x``) ``= drop(x) @ weight[a][:rank_a]^T`` per row; zero
        past the rank, past ``R`` and on base-only rows. ``x [M, K]``, ``weight [A, R, K]`` (any strides)."""

    @staticmethod
    def fused_gemm(x: Optional["torch.Tensor"], weight: Optional["torch.Tensor"], bias: Optional["torch.Tensor"],
                   h: Optional["torch.Tensor"], expand: Optional["torch.Tensor"], scale: Optional["torch.Tensor"],
                   residual: Optional["torch.Tensor"], segments: "SegmentInfo", ranks: "torch.Tensor", *,
                   out_features: int, out_dtype: "torch.dtype", dropout_p: float = 0.0,
                   seed: int = 0) -> "torch.Tensor":
        """``[M, N = out_features]`` of ``out_dtype``: ``x @ weight^T + bias + drop(scale[a] * h[:, :rank_a] @
        expand[a][:, :rank_a]^T) + residual``. ``x [M, K]`` with ``weight [N, K]``, or both ``None`` (no base
        GEMM); ``bias [N]``; ``h [M, >= R]`` (fp32 / fp64) with ``expand [A, N, R]``, or both ``None`` (no LoRA
        term); ``scale [A]`` or ``None`` (1); ``residual [M, N]``; the dropout mask is over the ``[M, N]``
        output (the input gradient through a dropped LoRA input)."""

    @staticmethod
    def outer(x: "torch.Tensor", y: "torch.Tensor", segments: "SegmentInfo", out: "torch.Tensor",
              scale: Optional["torch.Tensor"] = None, dropout_p: float = 0.0, seed: int = 0) -> "torch.Tensor":
        """Writes ``out[a] = scale[a] * sum over rows of a of drop(x)^T @ y[:, :R]`` into ``out [A, N, R]`` (any
        strides) and returns it; adapters without rows get zeros. ``x [M, N]``, ``y [M, >= R]`` (fp32 / fp64).
        A backend with ``outer_zeroes_unowned`` also takes ``ranks=`` (int32 ``[A]``) and writes exact zeros
        past each rank and for adapters without rows."""

    @staticmethod
    def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device: "torch.device") -> "torch.Tensor":
        """The bool keep-mask ``[rows, cols]`` this backend applies for ``(seed, p)``: a pure function of them."""

    @staticmethod
    @requires_capability("supports_merged_weights")
    def merge_worthwhile(segments: "SegmentInfo") -> bool:
        """Whether :meth:`merged_linear` pays off for this layout (long enough segments)."""

    @staticmethod
    @requires_capability("supports_merged_weights")
    def merged_linear(x: "torch.Tensor", weight: "torch.Tensor", bias: Optional["torch.Tensor"],
                      down: "torch.Tensor", up: "torch.Tensor", scale: "torch.Tensor",
                      residual: Optional["torch.Tensor"], segments: "SegmentInfo", ranks: "torch.Tensor", *,
                      out_dtype: "torch.dtype", r_block: int = 0,
                      outer_y: Optional["torch.Tensor"] = None) -> Tuple["torch.Tensor", "torch.Tensor",
                                                                         "torch.Tensor"]:
        """``(out, shrink, outer)`` with each adapter's merged weight (no dropout; the LoRA reads ``x``):
        ``out [M, N] = x @ (weight + scale[a] * up[a] @ down[a])^T + bias + residual``, ``shrink [M, r_block]
        = x @ down[a]^T`` when ``r_block > 0``, ``outer [A, K, R] = scale[a] * sum x^T @ outer_y`` when
        ``outer_y`` is given (else empty). ``x [M, K]``, ``weight [N, K]``, ``down [A, R, K]``, ``up [A, N, R]``."""


class SLPBackend(Protocol):
    """The SLP embedding assembly on flattened tokens (see :mod:`monkey_kernels.ops.slp.torch_impl` for the
    shapes): ``kind`` int32 ``[T]``, ``src`` int64 ``[T]``, ``table [V, H]``, ``boxes [B, N, 4]``, ``page_sizes
    [B, 2]`` or ``None``, ``weight [H, 4]``, ``bias [H]`` or ``None``, ``image_features [B, n_image, H]`` or
    ``None``."""

    #: the backend's name, one of :data:`BACKENDS`
    name: str

    @staticmethod
    def forward(kind: "torch.Tensor", src: "torch.Tensor", table: "torch.Tensor", boxes: "torch.Tensor",
                page_sizes: Optional["torch.Tensor"], weight: "torch.Tensor", bias: Optional["torch.Tensor"],
                image_features: Optional["torch.Tensor"], box_dtype: Optional["torch.dtype"] = None) -> "torch.Tensor":
        """``[T, H]`` in the table's dtype: the table row, the projected box or the image feature of each token.
        ``box_dtype`` (autocast: the dtype of the reference's ``nn.Linear`` output): the box rows are rounded to it
        before they are written."""

    @staticmethod
    def backward(dy: "torch.Tensor", kind: "torch.Tensor", src: "torch.Tensor", boxes: "torch.Tensor",
                 page_sizes: Optional["torch.Tensor"], weight: "torch.Tensor", num_embeddings: int,
                 padding_idx: int, n_image: int, needs: List[bool],
                 box_dtype: Optional["torch.dtype"] = None) -> List[Optional["torch.Tensor"]]:
        """The gradients of ``table [V, H], weight [H, 4], bias [H], boxes, page_sizes, image rows [B * n_image,
        H]`` that ``needs`` asks for, in that order (``None`` for the others). ``dy [T, H]`` contiguous. With
        ``box_dtype`` the box rows of ``dy`` are rounded to it first (the gradient the reference's ``nn.Linear``
        receives under autocast)."""


#: op -> its backend contract
PROTOCOLS: Dict[str, type] = {"multi_lora": MultiLoRABackend, "slp": SLPBackend}
OPS: Tuple[str, ...] = tuple(PROTOCOLS)

_registry: Dict[Tuple[str, str], type] = {}


def contract_members(protocol: type) -> Tuple[Dict[str, type], Dict[str, Optional[str]]]:
    """``(attributes, methods)`` a protocol declares: attribute name -> annotated type (``str`` or ``bool``), and
    method name -> the capability flag that makes it required (``None``: always required)."""
    attributes = {name: (bool if kind in ("bool", bool) else str)
                  for name, kind in protocol.__dict__.get("__annotations__", {}).items()}
    methods = {}
    for name, member in vars(protocol).items():
        function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if not name.startswith("_") and inspect.isfunction(function):
            methods[name] = getattr(function, "__required_with__", None)
    return attributes, methods


def _contract_violations(op: str, backend: str, implementation) -> List[str]:
    attributes, methods = contract_members(PROTOCOLS[op])
    problems = []
    for name, kind in attributes.items():
        if not hasattr(implementation, name):
            problems.append(f"lacks the attribute {name}")
        elif kind is bool and not isinstance(getattr(implementation, name), bool):
            problems.append(f"has {name} = {getattr(implementation, name)!r}, expected True or False")
    if hasattr(implementation, "name") and implementation.name != backend:
        problems.append(f"has name = {implementation.name!r}, expected {backend!r}")
    for name, flag in methods.items():
        if flag is not None and getattr(implementation, flag, False) is not True:
            continue  # required only with that capability
        if not callable(getattr(implementation, name, None)):
            problems.append(f"lacks the method {name}" + (f" (required with {flag} = True)" if flag else ""))
    return problems


def register_backend(op: str, backend: str, implementation):
    """Registers ``implementation`` (a class, or any object with the members) as ``backend``'s implementation
    of ``op``, after checking it against the op's protocol; returns it (each ``*_impl`` module keeps it as
    ``IMPLEMENTATION``). Raises ``ValueError`` naming the backend and every missing or malformed member; an
    earlier registration stays in place then."""
    if op not in PROTOCOLS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (add a new one to monkey_kernels.ops.registry."
                         f"BACKENDS and its device rule to monkey_kernels.ops.backends), got {backend!r}")
    problems = _contract_violations(op, backend, implementation)
    if problems:
        label = getattr(implementation, "__name__", type(implementation).__name__)
        raise ValueError(f"the {op} backend {backend!r} ({label}) does not implement "
                         f"{PROTOCOLS[op].__name__}: it " + "; it ".join(problems))
    _registry[(op, backend)] = implementation
    return implementation


def registered(op: str, backend: str):
    """The implementation registered for ``(op, backend)``, or ``None`` (its module not imported yet)."""
    return _registry.get((op, backend))
