"""Reference implementation of Monkey's vision encoder (Qwen-VL ViT-bigG with one LoRA per image tile).

This reproduces ``monkey_model/visual.py`` of the public Monkey release module for module, with the release's
state-dict names, as a transformers ``PreTrainedModel``:

- ``conv1`` (patch conv, no bias), ``positional_embedding`` (``[num_positions, width]``, bicubically
  interpolated to the tile's patch grid), ``ln_pre``;
- ``transformer.resblocks.{L}``: ``ln_1``, ``attn.in_proj`` (fused qkv, laid out per head as ``[q_h, k_h, v_h]``)
  with ``attn.in_proj_lora.{i}``, ``attn.out_proj`` with ``attn.out_proj_lora.{i}``, ``ln_2``,
  ``mlp.c_fc`` / ``mlp.gelu`` / ``mlp.c_proj`` and ``mlp_lora.{i}`` (LoRA on the residual stream before
  ``ln_2``, added after the MLP). Activations are ``[seq, batch, dim]`` inside the transformer;
- ``attn_pool`` (the resampler: learned queries, 2D sin-cos positions, one ``nn.MultiheadAttention``),
  ``ln_post``, ``proj``.

The forward is the release's Python loop: one encoder pass per tile with its adapter ``idx`` and one pass for
the global view without adapter, concatenated tile-major then global. ``monkey_kernels.patching.patch_model``
turns it into one batched pass over all views.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = [
    "MonkeyVisionConfig",
    "MonkeyVisionModel",
    "MonkeyVisionPreTrainedModel",
    "MonkeyLoraAdapter",
    "MonkeyVisualAttention",
    "MonkeyVisionBlock",
    "MonkeyVisionTransformer",
    "MonkeyResampler",
    "get_abs_pos",
    "get_2d_sincos_pos_embed",
    "release_vision_state_dict",
]

RELEASE_VISION_PREFIX = "transformer.visual."


@strict
class MonkeyVisionConfig(PreTrainedConfig):
    r"""Configuration of Monkey's vision encoder. The defaults are the released model's shapes.

    Args:
        tile_size: side in pixels of one square view (tile or global view); 448 in the release.
        image_size: default input resolution (side, px) the release resizes every image to; 896. Used when
            ``image_resolution`` is ``None``.
        image_resolution: optional non-square default input resolution ``[width, height]`` (px), e.g.
            ``[1344, 896]`` after growing to a 3x2 grid (``monkey_kernels.growth.grow_tile_adapters`` writes it);
            ``None`` (the default, so older configs load unchanged) means ``[image_size, image_size]``. Stored as a
            list so ``save_pretrained`` / ``from_pretrained`` (JSON) round-trip it unchanged.
        patch_size: patch conv kernel and stride (px); 14. ``tile_size`` must be a multiple of it.
        num_channels: image channels; 3.
        width: transformer width; 1664.
        layers: number of blocks; 48.
        heads: attention heads; 16 (head_dim 104).
        mlp_ratio: MLP width = ``int(width * mlp_ratio)``; 4.9231 -> 8192.
        layer_norm_eps: 1e-6.
        num_positions: rows of ``positional_embedding``; a square number (256 = 16x16 in the release).
        n_queries: resampler queries per view, a square number; 256.
        output_dim: resampler / output width; 4096.
        resampler_heads: heads of the resampler attention; ``None`` = ``output_dim // 128`` (32).
        lora_repeat_num: adapters per LoRA list (one per tile); 4.
        attn_lora_rank: rank of ``in_proj_lora`` / ``out_proj_lora``; 16.
        mlp_lora_rank: rank of ``mlp_lora``; 32.
        lora_dropout: dropout on the LoRA input, before ``lora_a``; 0.05.
    """

    model_type = "monkey_vision"

    tile_size: int = 448
    image_size: int = 896
    image_resolution: list[int] | tuple[int, ...] | None = None
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float | int = 4.9231
    layer_norm_eps: float = 1e-6
    num_positions: int = 256
    n_queries: int = 256
    output_dim: int = 4096
    resampler_heads: int | None = None
    lora_repeat_num: int = 4
    attn_lora_rank: int = 16
    mlp_lora_rank: int = 32
    lora_dropout: float | int = 0.05

    def __post_init__(self, **kwargs):
        if self.resampler_heads is None:
            self.resampler_heads = max(1, self.output_dim // 128)
        for name in ("tile_size", "image_size", "patch_size", "num_channels", "width", "layers", "heads",
                     "num_positions", "n_queries", "output_dim", "resampler_heads", "lora_repeat_num",
                     "attn_lora_rank", "mlp_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_resolution is not None:
            resolution = self.image_resolution
            if len(resolution) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                           for v in resolution):
                raise ValueError(f"image_resolution must be None or [width, height] of positive ints, "
                                 f"got {resolution!r}")
            self.image_resolution = [int(v) for v in resolution]  # a tuple would come back a list from JSON
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size={self.tile_size} must be a multiple of patch_size={self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.output_dim % self.resampler_heads:
            raise ValueError(
                f"output_dim={self.output_dim} must be divisible by resampler_heads={self.resampler_heads}"
            )
        for name in ("num_positions", "n_queries"):
            side = math.isqrt(getattr(self, name))
            if side * side != getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must be a square number")
        if self.output_dim % 4:
            raise ValueError(f"output_dim={self.output_dim} must be a multiple of 4 (2D sin-cos positions)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        super().__post_init__(**kwargs)

    @property
    def input_resolution(self) -> tuple:
        """Default input resolution ``(width, height)`` in px: ``image_resolution``, else ``image_size`` square."""
        if self.image_resolution is not None:
            return int(self.image_resolution[0]), int(self.image_resolution[1])
        return self.image_size, self.image_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """ViT tokens of one view: ``(tile_size / patch_size) ** 2`` (1024 in the release)."""
        return (self.tile_size // self.patch_size) ** 2


# ---------------------------------------------------------------------------------------------------------
# Positional helpers (the release's get_abs_pos and MAE's 2D sin-cos table, in torch)
# ---------------------------------------------------------------------------------------------------------
def get_abs_pos(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    """``abs_pos [L, C]`` (``L`` square) resized bicubically to ``[tgt_size, C]`` (``tgt_size`` square).

    Interpolates in fp32 like the release (bicubic is not implemented for every half dtype on CPU)."""
    src_size = math.isqrt(abs_pos.size(0))
    tgt_side = math.isqrt(tgt_size)
    if src_size == tgt_side:
        return abs_pos
    return F.interpolate(
        abs_pos.float().reshape(1, src_size, src_size, -1).permute(0, 3, 1, 2),
        size=(tgt_side, tgt_side), mode="bicubic", align_corners=False,
    ).permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2D sin-cos table ``[grid_size**2, embed_dim]`` (fp32), computed like the release's numpy code:
    the first half of the channels encodes the column index, the second half the row index."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # the release's np.meshgrid(w, h)

    def one_d(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # np.meshgrid(w, h) stacks [grid_w, grid_h]; the release encodes grid[0] (= w) first.
    return torch.cat([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], dim=1)


def release_vision_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = RELEASE_VISION_PREFIX):
    """The vision weights of a full released Monkey state dict (keys ``transformer.visual.*``) with the prefix
    stripped, ready for ``MonkeyVisionModel.load_state_dict``."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------
class MonkeyLoraAdapter(nn.Module):
    """The release's ``Lora_Adapter``: ``lora_b(lora_a(dropout(x))) * lora_scale``.

    ``lora_a``: Linear ``d_model -> r`` (no bias), ``lora_b``: Linear ``r -> out_feat`` (no bias, zeros at init),
    ``lora_scale``: learnable ``[1]`` (init 1). ``x [..., d_model] -> [..., out_feat]``."""

    def __init__(self, d_model: int, out_feat: int, r: int = 16, dropout: float = 0.05) -> None:
        super().__init__()
        self.d_model, self.out_feat, self.r = d_model, out_feat, r
        self.lora_scale = nn.Parameter(torch.ones(1))
        self.lora_a = nn.Linear(d_model, r, bias=False)
        self.lora_b = nn.Linear(r, out_feat, bias=False)
        self.lora_dropout = nn.Dropout(p=dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_b(self.lora_a(self.lora_dropout(x))) * self.lora_scale


class MonkeyVisualAttention(nn.Module):
    """The release's ``VisualAttention``: self-attention on ``[seq, batch, dim]`` with bmm + softmax.

    ``in_proj`` output columns are grouped per head as ``[q_h | k_h | v_h]`` (``view(s, b, heads, 3 * hd)``
    then split), which the fused module reproduces."""

    def __init__(self, embed_dim: int, num_heads: int, lora_repeat_num: int = 4, lora_rank: int = 16,
                 lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.norm_factor = math.sqrt(self.head_dim)
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.in_proj_lora = nn.ModuleList(
            MonkeyLoraAdapter(embed_dim, 3 * embed_dim, lora_rank, lora_dropout) for _ in range(lora_repeat_num)
        )
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj_lora = nn.ModuleList(
            MonkeyLoraAdapter(embed_dim, embed_dim, lora_rank, lora_dropout) for _ in range(lora_repeat_num)
        )

    def forward(self, query: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                idx: Optional[int] = None) -> torch.Tensor:
        """``query [s, b, dim]`` -> ``[s, b, dim]``; ``idx``: adapter index or ``None`` (base weights only)."""
        sq, b, _ = query.shape
        heads, hd = self.num_heads, self.head_dim
        mixed = self.in_proj(query)
        if idx is not None:
            mixed = mixed + self.in_proj_lora[idx](query)
        q, k, v = mixed.view(sq, b, heads, 3 * hd).split(hd, dim=-1)
        q = q.reshape(sq, b * heads, hd).transpose(0, 1)
        k = k.reshape(sq, b * heads, hd).transpose(0, 1)
        v = v.reshape(sq, b * heads, hd).transpose(0, 1)
        q_scaled = q / self.norm_factor
        if attn_mask is not None:
            probs = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            probs = torch.bmm(q_scaled, k.transpose(-2, -1))
        probs = probs.softmax(dim=-1)
        context = torch.bmm(probs, v).view(b, heads, sq, hd).permute(2, 0, 1, 3).reshape(sq, b, heads * hd)
        output = self.out_proj(context)
        if idx is not None:
            output = output + self.out_proj_lora[idx](context)
        return output


class MonkeyVisionBlock(GradientCheckpointingLayer):
    """The release's ``VisualAttentionBlock`` on ``[seq, batch, dim]``::

        x = x + attn(ln_1(x), idx);  res = x;  x = x + mlp(ln_2(x));  x = x + mlp_lora[idx](res)
    """

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float, layer_norm_eps: float = 1e-6,
                 lora_repeat_num: int = 4, attn_lora_rank: int = 16, mlp_lora_rank: int = 32,
                 lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.ln_2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        mlp_width = int(d_model * mlp_ratio)
        self.attn = MonkeyVisualAttention(d_model, n_head, lora_repeat_num, attn_lora_rank, lora_dropout)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.mlp_lora = nn.ModuleList(
            MonkeyLoraAdapter(d_model, d_model, mlp_lora_rank, lora_dropout) for _ in range(lora_repeat_num)
        )

    def forward(self, q_x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                idx: Optional[int] = None) -> torch.Tensor:
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        x = q_x + self.attn(self.ln_1(q_x), attn_mask=attn_mask, idx=idx)
        residual = x
        x = x + self.mlp(self.ln_2(x))
        if idx is not None:
            x = x + self.mlp_lora[idx](residual)
        return x


class MonkeyVisionTransformer(nn.Module):
    """The release's ``TransformerBlock``: ``resblocks`` applied in order to ``x [seq, batch, width]``."""

    def __init__(self, config: MonkeyVisionConfig) -> None:
        super().__init__()
        self.width, self.layers = config.width, config.layers
        self.resblocks = nn.ModuleList(
            MonkeyVisionBlock(config.width, config.heads, config.mlp_ratio, config.layer_norm_eps,
                              config.lora_repeat_num, config.attn_lora_rank, config.mlp_lora_rank,
                              config.lora_dropout)
            for _ in range(config.layers)
        )

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def get_cast_device(self) -> torch.device:
        return self.resblocks[0].mlp.c_fc.weight.device

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, idx: Optional[int] = None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask, idx=idx)
        return x


class MonkeyResampler(nn.Module):
    """The release's ``Resampler`` (``attn_pool``): ``n_queries`` learned queries cross-attend to the view.

    ``x [N, L, kv_dim] -> [N, n_queries, embed_dim]``. ``pos_embed`` is a frozen 2D sin-cos table (a Parameter
    with ``requires_grad=False`` as in the release, so it is in the state dict)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int, layer_norm_eps: float) -> None:
        super().__init__()
        self.num_queries = grid_size ** 2
        self.grid_size = grid_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, grid_size)).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(
            q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1).to(q.dtype),
            x + pos_embed.unsqueeze(1).to(x.dtype),
            x,
            attn_mask=attn_mask,
        )[0]
        return out.permute(1, 0, 2)


class MonkeyVisionPreTrainedModel(PreTrainedModel):
    config_class = MonkeyVisionConfig
    config: MonkeyVisionConfig
    base_model_prefix = "visual"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MonkeyVisionBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The release's initialisation: PyTorch defaults for the ViT linears and conv, kaiming/zeros/ones for
        the adapters, trunc-normal(0.02) for the resampler's query and ``kv_proj``, sin-cos ``pos_embed``,
        normal ``positional_embedding`` (std ``width**-0.5``) and ``proj`` (std ``output_dim**-0.5``)."""
        if isinstance(module, MonkeyLoraAdapter):
            init.kaiming_uniform_(module.lora_a.weight, a=math.sqrt(5))
            init.zeros_(module.lora_b.weight)
            init.ones_(module.lora_scale)
        elif isinstance(module, MonkeyResampler):
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.embed_dim, module.grid_size))
            init.trunc_normal_(module.query, std=0.02)
            if isinstance(module.kv_proj, nn.Linear):
                init.trunc_normal_(module.kv_proj.weight, std=0.02)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            # nn.Linear / nn.Conv2d.reset_parameters, through the guarded init functions
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MonkeyVisionModel):
            init.normal_(module.positional_embedding, std=module.config.width ** -0.5)
            init.normal_(module.proj, std=module.config.output_dim ** -0.5)


class MonkeyVisionModel(MonkeyVisionPreTrainedModel):
    """Monkey's vision encoder (the release's ``VisionTransformer``).

    ``forward(pixel_values [B, V, C, T, T])`` with ``V = n_tiles + 1`` views per image, tiles in row-major
    order then the global view (see :func:`monkey_kernels.models.image_prep.prepare_images`), returns
    ``[B, V * n_queries, output_dim]``: tile ``v`` runs with adapter ``v``, the global view with none.
    ``encode_views`` is the release's single-pass ``VisionTransformer.forward(x, idx)``.
    """

    def __init__(self, config: MonkeyVisionConfig) -> None:
        super().__init__(config)
        width = config.width
        self.conv1 = nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size,
                               stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(config.num_positions, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = MonkeyVisionTransformer(config)
        self.attn_pool = MonkeyResampler(math.isqrt(config.n_queries), config.output_dim, config.resampler_heads,
                                         kv_dim=width, layer_norm_eps=config.layer_norm_eps)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(config.output_dim ** -0.5 * torch.randn(config.output_dim, config.output_dim))
        self.post_init()

    def _check_views(self, pixel_values: torch.Tensor, name: str, dims: int) -> None:
        cfg = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != dims:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"{name} must be a {dims}-D tensor, got {shape}")
        if pixel_values.shape[0] == 0:  # the encoder's reshapes cannot infer sizes of an empty batch
            raise ValueError(f"{name} must hold at least one image, got shape {tuple(pixel_values.shape)}")
        if pixel_values.is_meta and not self.conv1.weight.is_meta:
            raise ValueError(f"{name} is on meta (no data), expected the model's device {self.conv1.weight.device}")
        if pixel_values.shape[-3] != cfg.num_channels:
            raise ValueError(f"{name} must have {cfg.num_channels} channels (dim -3), got {pixel_values.shape[-3]}")
        if tuple(pixel_values.shape[-2:]) != (cfg.tile_size, cfg.tile_size):
            raise ValueError(
                f"{name} views must be {cfg.tile_size}x{cfg.tile_size} (config.tile_size), "
                f"got {tuple(pixel_values.shape[-2:])}"
            )

    def embed_views(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, positions and ``ln_pre``: ``x [N, C, T, T] -> [N, grid**2, width]`` (batch-first)."""
        self._check_views(x, "x", 4)
        # conv1's dtype (the release reads resblocks[0]'s, equal in an unsharded model): under FSDP2 mixed
        # precision only the running unit's weights are gathered in the compute dtype, not resblocks[0]'s.
        x = x.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid**2, width]
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        return self.ln_pre(x)

    def pool_views(self, x: torch.Tensor) -> torch.Tensor:
        """The resampler, ``ln_post`` and ``proj``: ``x [N, grid**2, width] -> [N, Q, D]``."""
        return self.ln_post(self.attn_pool(x)) @ self.proj

    def encode_views(self, x: torch.Tensor, idx=None) -> torch.Tensor:
        """One encoder pass (the release's ``VisionTransformer.forward``): ``x [N, C, T, T] -> [N, Q, D]``.

        ``idx`` is handed to ``transformer``: an adapter index or ``None`` in the reference; once patched, also
        one adapter id per view (``-1`` = none)."""
        x = self.embed_views(x).permute(1, 0, 2)  # NLD -> LND, the release's layout
        x = self.transformer(x, idx=idx)
        return self.pool_views(x.permute(1, 0, 2))

    def check_view_adapters(self, adapter_ids, views_per_image=None):
        """``(ids, counts)``: the adapter id of every view as a host list (``-1`` = none) and the views per image,
        checked against this model (``ValueError`` naming the image and the count when an image needs more
        adapters than ``lora_repeat_num``)."""
        ids = adapter_ids.tolist() if isinstance(adapter_ids, torch.Tensor) else list(adapter_ids)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"adapter_ids must be integers (one per view, -1 = no adapter), got {ids!r}")
        counts = [len(ids)] if views_per_image is None else (
            views_per_image.tolist() if isinstance(views_per_image, torch.Tensor) else list(views_per_image))
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != len(ids):
            raise ValueError(f"views_per_image must be positive ints summing to the {len(ids)} views, got {counts!r}")
        limit = self.config.lora_repeat_num
        start = 0
        for image, count in enumerate(counts):
            own = ids[start:start + count]
            start += count
            if any(i < -1 for i in own):
                raise ValueError(f"adapter_ids of image {image} must be >= -1, got {own}")
            needed = max(own) + 1
            if needed > limit:
                raise ValueError(f"image {image} needs {needed} tile adapters but the model has {limit} "
                                 f"(config.lora_repeat_num); grow them with monkey_kernels.grow_tile_adapters")
        return ids, counts

    def forward_views(self, pixel_values: torch.Tensor, adapter_ids, views_per_image=None):
        """Views of images of any grids, packed: ``pixel_values [total_views, C, T, T]`` with ``adapter_ids
        [total_views]`` (row-major tile index, ``-1`` for a global view / thumbnail, as
        :class:`~monkey_kernels.MonkeyImageProcessor` returns them) and ``views_per_image [n]`` -> a list of ``n``
        per-image features ``[V_i * Q, D]`` (``None``: one image of all views). The reference runs one encoder
        pass per view, image by image; once patched, ONE pass over all views."""
        self._check_views(pixel_values, "pixel_values", 4)
        ids, counts = self.check_view_adapters(adapter_ids, views_per_image)
        if len(ids) != pixel_values.shape[0]:
            raise ValueError(f"adapter_ids must give one id per view ({pixel_values.shape[0]}), got {len(ids)}")
        feats = [self.encode_views(pixel_values[v:v + 1], idx=None if a < 0 else a)[0] for v, a in enumerate(ids)]
        out, start = [], 0
        for count in counts:
            out.append(torch.cat(feats[start:start + count], dim=0))
            start += count
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, V, C, T, T]`` (tiles row-major, then the global view) -> ``[B, V * Q, D]``."""
        self._check_views(pixel_values, "pixel_values", 5)
        num_tiles = pixel_values.shape[1] - 1
        if not 1 <= num_tiles <= self.config.lora_repeat_num:
            raise ValueError(
                f"pixel_values must hold 2 to lora_repeat_num + 1 = {self.config.lora_repeat_num + 1} views "
                f"(tiles then the global view), got {pixel_values.shape[1]}"
            )
        feats = [self.encode_views(pixel_values[:, tile], idx=tile) for tile in range(num_tiles)]
        feats.append(self.encode_views(pixel_values[:, num_tiles], idx=None))
        return torch.cat(feats, dim=1)



# The Auto classes resolve a saved folder's ``config.json`` (``model_type: monkey_vision``) to these classes once
# this module is imported (the processors in ``monkey_kernels.processing`` register against this config).
AutoConfig.register(MonkeyVisionConfig.model_type, MonkeyVisionConfig, exist_ok=True)
AutoModel.register(MonkeyVisionConfig, MonkeyVisionModel, exist_ok=True)
