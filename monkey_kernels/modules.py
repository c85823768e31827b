"""``nn.Module`` wrappers of the fused ops: :class:`MultiLoRALinear` and :class:`FusedSLPEmbedding`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from monkey_kernels.ops.segments import SegmentInfo

from .ops.multi_lora import multi_lora_linear, normalize_ranks
from .ops.slp import SLPEmbeddingRef, SpatialLayoutProjector, slp_embed
from .ops.slp.checks import as_id_tuple

__all__ = ["MultiLoRALinear", "FusedSLPEmbedding"]


class MultiLoRALinear(nn.Module):
    """A linear layer with ``num_adapters`` stacked LoRA adapters, one chosen per segment of rows.

    Parameters:
        weight ``[out_features, in_features]``, bias ``[out_features]`` (optional),
        lora_a ``[num_adapters, r_max, lora_in_features]`` (kaiming-uniform like ``nn.Linear``),
        lora_b ``[num_adapters, out_features, r_max]`` (zeros), lora_scale ``[num_adapters]`` (ones;
        learnable unless ``learnable_scale=False``, then a buffer).
    Buffer ``ranks`` (int32 ``[num_adapters]``): columns of ``lora_a``/``lora_b`` past an adapter's rank are
    kept at zero and contribute nothing.

    ``forward(x [..., in], segments, lora_input=None [..., lora_in], residual=None [..., out])`` returns
    ``[..., out]``; dropout (``lora_dropout``) is active in training mode only.

    It owns its adapters already stacked, as Parameters: it is the op's module for new models, not a patch of a
    model holding one module per adapter, so it does not use :class:`~monkey_kernels.adapter_stack.AdapterStack`
    (which stacks such per-adapter Parameters per forward) -- nothing to stack, copy or cache.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_adapters: int,
        rank: Union[int, Sequence[int]],
        *,
        bias: bool = True,
        lora_in_features: Optional[int] = None,
        lora_dropout: float = 0.0,
        learnable_scale: bool = True,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        ranks = [rank] * num_adapters if isinstance(rank, int) and not isinstance(rank, bool) else list(rank)
        if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
            raise ValueError(f"rank must be an int or a sequence of ints, got {rank!r}")
        if len(ranks) != num_adapters:
            raise ValueError(f"rank must be an int or have num_adapters={num_adapters} entries, got {ranks}")
        if any(r < 1 for r in ranks):
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        factory = {"device": device, "dtype": dtype}
        r_max = max(ranks) if ranks else 1
        lora_in = in_features if lora_in_features is None else lora_in_features
        self.in_features, self.out_features, self.num_adapters = in_features, out_features, num_adapters
        self.lora_in_features, self.lora_dropout, self.backend = lora_in, float(lora_dropout), backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.lora_a = nn.Parameter(torch.empty(num_adapters, r_max, lora_in, **factory))
        self.lora_b = nn.Parameter(torch.zeros(num_adapters, out_features, r_max, **factory))
        scale = torch.ones(num_adapters, **factory)
        if learnable_scale:
            self.lora_scale = nn.Parameter(scale)
        else:
            self.register_buffer("lora_scale", scale)
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.int32, device=device))
        self._checked_ranks = None  # (tensor, version) of the ranks buffer last validated
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        for adapter, rank in enumerate(self.ranks.tolist()):
            self.lora_a[adapter].zero_()
            nn.init.kaiming_uniform_(self.lora_a[adapter, :rank], a=math.sqrt(5))
        self.lora_b.zero_()

    def forward(
        self,
        x: torch.Tensor,
        segments: Union[SegmentInfo, torch.Tensor, Sequence[int]],
        lora_input: Optional[torch.Tensor] = None,
        residual: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        return multi_lora_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.lora_scale, segments,
            ranks=self.ranks, lora_input=lora_input, residual=residual,
            dropout_p=self.lora_dropout if self.training else 0.0, seed=seed, backend=self.backend,
            ranks_checked=self._ranks_validated(),
        )

    def _ranks_validated(self) -> bool:
        """Validates the ``ranks`` buffer (one device read) the first time and whenever it changed since: a new
        tensor or an in-place write (``load_state_dict`` copies into it), so a rank above ``r_max`` loaded from
        a checkpoint is an error, while steady-state calls never synchronise."""
        ranks = self.ranks
        if ranks.is_meta or torch.compiler.is_compiling() or (ranks.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False  # no values to read (the op's own checks then apply), or no host read allowed
        checked = self._checked_ranks
        if checked is not None and checked[0] is ranks and checked[1] == ranks._version:
            return True
        normalize_ranks(ranks, self.num_adapters, self.lora_a.shape[1], ranks.device)
        self._checked_ranks = (ranks, ranks._version)
        return True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_adapters={self.num_adapters}, ranks={self.ranks.tolist()}, lora_dropout={self.lora_dropout}"
        )


class FusedSLPEmbedding(nn.Module):
    """Drop-in for :class:`monkey_kernels.ops.slp.SLPEmbeddingRef`: same submodules, same state dict.

    Holds ``embed_tokens`` (the model's ``nn.Embedding``, shared, not copied) and ``projector`` (a
    :class:`SpatialLayoutProjector`; its ``proj`` Linear is the SLP), so the keys are ``embed_tokens.weight``,
    ``projector.proj.weight`` and ``projector.proj.bias``. ``forward(input_ids [B, S], boxes=None [B, N, 4],
    page_sizes=None [B, 2], image_features=None [B, n_image, H], num_boxes=None [B],
    num_image_tokens=None [B])`` returns ``[B, S, H]`` through :func:`slp_embed`.
    """

    def __init__(
        self,
        embed_tokens: nn.Embedding,
        projector: SpatialLayoutProjector,
        box_token_id: int = 0,
        image_token_id: Union[int, Sequence[int], None] = None,
        *,
        image_span_unit: Optional[int] = None,
        strict_boxes: bool = False,
        validate: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(embed_tokens, nn.Embedding):
            raise ValueError(f"embed_tokens must be an nn.Embedding, got {type(embed_tokens).__name__}")
        proj = getattr(projector, "proj", None)
        if not isinstance(proj, nn.Linear) or proj.in_features != 4 or proj.out_features != embed_tokens.embedding_dim:
            raise ValueError(
                f"projector must hold proj = nn.Linear(4, {embed_tokens.embedding_dim}) (a SpatialLayoutProjector), "
                f"got {type(projector).__name__} with proj={proj!r}"
            )
        self.embed_tokens = embed_tokens
        self.projector = projector
        self.box_token_id = int(box_token_id)
        self.image_token_id = as_id_tuple(image_token_id)
        self.image_span_unit = image_span_unit
        self.strict_boxes = bool(strict_boxes)
        self.validate = bool(validate)
        self.backend = backend

    @classmethod
    def from_reference(
        cls,
        embedding: Union[nn.Embedding, SLPEmbeddingRef],
        projector: Optional[SpatialLayoutProjector] = None,
        box_token_id: Optional[int] = None,
        image_token_id: Union[int, Sequence[int], None] = None,
        **kwargs,
    ) -> "FusedSLPEmbedding":
        """From an ``SLPEmbeddingRef`` or from the reference ``(embedding, projector)`` pair (shared modules)."""
        if isinstance(embedding, SLPEmbeddingRef):
            ref = embedding
            return cls(
                ref.embed_tokens, ref.projector,
                ref.box_token_id if box_token_id is None else box_token_id,
                ref.image_token_id if image_token_id is None else image_token_id, **kwargs,
            )
        if projector is None:
            raise ValueError("projector is required when embedding is an nn.Embedding")
        return cls(embedding, projector, 0 if box_token_id is None else box_token_id, image_token_id, **kwargs)

    def to_reference(self) -> SLPEmbeddingRef:
        """The reference module over the same (shared) embedding and projector."""
        return SLPEmbeddingRef(self.embed_tokens, self.projector, self.box_token_id, self.image_token_id)

    def forward(self, input_ids, boxes=None, page_sizes=None, image_features=None, num_boxes=None,
                num_image_tokens=None):
        proj = self.projector.proj
        return slp_embed(
            input_ids, self.embed_tokens.weight, proj.weight, proj.bias, boxes,
            box_token_id=self.box_token_id, page_sizes=page_sizes, num_boxes=num_boxes,
            image_features=image_features, image_token_id=self.image_token_id,
            num_image_tokens=num_image_tokens, image_span_unit=self.image_span_unit,
            strict_boxes=self.strict_boxes, padding_idx=self.embed_tokens.padding_idx,
            validate=self.validate, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"box_token_id={self.box_token_id}, image_token_id={list(self.image_token_id)}, "
                f"validate={self.validate}, backend={self.backend}")
