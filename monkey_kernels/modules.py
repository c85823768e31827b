"""``nn.Module`` wrappers of the fused ops."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from triton_kernels.segments import SegmentInfo

from .multi_lora import multi_lora_linear

__all__ = ["MultiLoRALinear"]


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
        ranks = [int(rank)] * num_adapters if isinstance(rank, int) else [int(r) for r in rank]
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
            ranks_checked=True,  # validated in __init__; the buffer is not meant to change
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_adapters={self.num_adapters}, ranks={self.ranks.tolist()}, lora_dropout={self.lora_dropout}"
        )
