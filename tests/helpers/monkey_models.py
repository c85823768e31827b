"""Tiny Monkey vision models for the tests: this package's ``MonkeyVisionModel`` with random non-trivial weights
and the release's trainable set, packed views, and a user's copy of the public Monkey code
(``monkey_model/visual.py``), written independently of the package, that ``patch_model`` must recognise."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel


def tiny_config(**overrides) -> MonkeyVisionConfig:
    values = dict(tile_size=56, image_size=112, patch_size=14, width=32, layers=2, heads=2, mlp_ratio=2,
                  num_positions=4, n_queries=4, output_dim=16, resampler_heads=2, lora_repeat_num=6,
                  attn_lora_rank=4, mlp_lora_rank=8, lora_dropout=0.0)
    values.update(overrides)
    return MonkeyVisionConfig(**values)


def randomize_(model: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (lora_b starts at zeros, scales at ones)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_scale"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("lora_b.weight"):
                p.normal_(0.0, 0.3)
            elif p.dim() >= 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


def release_trainable_(model: nn.Module) -> nn.Module:
    """The release's recipe: only parameters whose name contains "lora" and the resampler train."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("attn_pool"))
    return model


def make_model(device, dtype=torch.float32, **overrides) -> MonkeyVisionModel:
    model = MonkeyVisionModel(tiny_config(**overrides))
    return release_trainable_(randomize_(model)).to(device=device, dtype=dtype)


def views(batch: int, tiles: int, cfg: MonkeyVisionConfig, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, tiles + 1, 3, cfg.tile_size, cfg.tile_size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# A user's copy of the public Monkey code (monkey_model/visual.py), written independently of the package
# ---------------------------------------------------------------------------------------------------------
# A user's copy of the public Monkey code (monkey_model/visual.py), written independently of the package
class Lora_Adapter(nn.Module):
    def __init__(self, d_model=None, out_feat=None, r=16, dropout=0.05):
        super().__init__()
        self.lora_scale = nn.Parameter(torch.ones(1))
        self.lora_a = nn.Linear(d_model, r, bias=False)
        self.lora_b = nn.Linear(r, out_feat, bias=False)
        self.lora_dropout = nn.Dropout(p=dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.lora_b(self.lora_a(self.lora_dropout(x))) * self.lora_scale


class VisualAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, lora_repeat_num=4):
        super().__init__()
        self.hidden_size_per_attention_head = embed_dim // num_heads
        self.num_attention_heads_per_partition = num_heads
        self.hidden_size_per_partition = embed_dim
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.in_proj_lora = nn.ModuleList([Lora_Adapter(embed_dim, 3 * embed_dim) for _ in range(lora_repeat_num)])
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj_lora = nn.ModuleList([Lora_Adapter(embed_dim, embed_dim) for _ in range(lora_repeat_num)])
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head)

    def forward(self, query, key, value, attn_mask=None, idx=None):
        sq, b, _ = query.size()
        mixed_x_layer = self.in_proj(query)
        if idx is not None:
            mixed_x_layer += self.in_proj_lora[idx](query)
        np_, hn = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        mixed_x_layer = mixed_x_layer.view(sq, b, np_, 3 * hn)
        query_layer, key_layer, value_layer = mixed_x_layer.split(hn, dim=-1)
        query_layer = query_layer.reshape(sq, b * np_, hn).transpose(0, 1)
        key_layer = key_layer.reshape(sq, b * np_, hn).transpose(0, 1)
        attention_probs = torch.bmm(query_layer / self.norm_factor, key_layer.transpose(-2, -1)).softmax(dim=-1)
        value_layer = value_layer.reshape(sq, b * np_, hn).transpose(0, 1)
        context_layer = torch.bmm(attention_probs, value_layer).view(b, np_, sq, hn)
        context_layer = context_layer.permute(2, 0, 1, 3).contiguous().view(sq, b, self.hidden_size_per_partition)
        output = self.out_proj(context_layer)
        if idx is not None:
            output += self.out_proj_lora[idx](context_layer)
        return output


class VisualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, mlp_ratio=4.0, lora_repeat_num=4):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-6)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-6)
        mlp_width = int(d_model * mlp_ratio)
        self.attn = VisualAttention(d_model, n_head, lora_repeat_num=lora_repeat_num)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.mlp_lora = nn.ModuleList([Lora_Adapter(d_model, d_model, r=32) for _ in range(lora_repeat_num)])

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, idx=None):
        x = q_x + self.attn(self.ln_1(q_x), self.ln_1(q_x), self.ln_1(q_x), attn_mask=attn_mask, idx=idx)
        residual = x
        x = x + self.mlp(self.ln_2(x))
        if idx is not None:
            x += self.mlp_lora[idx](residual)
        return x


class TransformerBlock(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0, lora_repeat_num=4):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [VisualAttentionBlock(width, heads, mlp_ratio, lora_repeat_num=lora_repeat_num) for _ in range(layers)]
        )

    def forward(self, x, attn_mask=None, idx=None):
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask, idx=idx)
        return x


class UserTower(nn.Module):
    """Just enough of a user's vision tower around the copied transformer."""

    def __init__(self):
        super().__init__()
        self.transformer = TransformerBlock(width=64, layers=2, heads=4, mlp_ratio=2.0, lora_repeat_num=4)

    def forward(self, x, idx=None):
        return self.transformer(x, idx=idx)


# ---------------------------------------------------------------------------------------------------------
# Structure-alike variants: Monkey's modules, other call contracts. patch_model must leave them alone.
# ---------------------------------------------------------------------------------------------------------
class TextMonkeyStyleBlock(VisualAttentionBlock):
    """TextMonkey's block (reference §6): Monkey's modules, the adapter keyword is ``lora_idx``."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None):
        return super().forward(q_x, attn_mask=attn_mask, idx=lora_idx)


class TextMonkeyStyleTransformer(nn.Module):
    """TextMonkey's ``TransformerBlock`` (reference §6, without the cross-window attention): given windows
    ``x[i][j]`` (row i, column j, each ``[seq, batch, width]``) the window loop runs INSIDE every layer; with
    ``lora_idx`` None or 0 every window uses it, otherwise window k (row-major) uses adapter k."""

    def __init__(self, width, layers, heads, mlp_ratio=2.0, lora_repeat_num=4):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [TextMonkeyStyleBlock(width, heads, mlp_ratio, lora_repeat_num=lora_repeat_num) for _ in range(layers)]
        )

    def forward(self, x, attn_mask=None, lora_idx=None, image_size=(64, 64)):
        if isinstance(x, list):
            for r in self.resblocks:
                k = 0
                for i in range(len(x)):
                    for j in range(len(x[i])):
                        window_idx = lora_idx if lora_idx is None or lora_idx == 0 else k
                        x[i][j] = r(x[i][j], attn_mask=attn_mask, lora_idx=window_idx)
                        k += 1
            return x
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class WindowLoopTransformer(TransformerBlock):
    """Monkey's blocks and signature, but the forward loops over windows itself: ``x`` is a list of windows
    ``[seq, batch, width]``; with ``idx`` given, window k uses adapter ``idx + k``."""

    def forward(self, x, attn_mask=None, idx=None):
        out = []
        for k, window in enumerate(x):
            for r in self.resblocks:
                window = r(window, attn_mask=attn_mask, idx=None if idx is None else idx + k)
            out.append(window)
        return out


class ExtraKeywordBlock(VisualAttentionBlock):
    """A Monkey block whose forward takes one more keyword (a user's extension)."""

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, idx=None, residual_scale=1.0):
        return q_x + residual_scale * (super().forward(q_x, attn_mask=attn_mask, idx=idx) - q_x)


def structure_alike(variant: str, width=32, layers=2, heads=2, adapters=4):
    """``(model, call)``: a structure-alike ``variant`` ("textmonkey", "window_loop", "extra_keyword" or
    "bare_blocks": Monkey blocks in an ``nn.Sequential``) and a function running a model of that variant (or a
    copy, in any dtype) on the same fresh inputs (two windows ``[seq 5, batch 2, width]``), returning one tensor."""
    drawn = [torch.randn(5, 2, width) for _ in range(2)]

    def windows_for(m):
        dtype = next(m.parameters()).dtype
        return [w.to(dtype) for w in drawn]

    if variant == "textmonkey":
        model = TextMonkeyStyleTransformer(width, layers, heads, lora_repeat_num=adapters)

        def call(m):
            windows = windows_for(m)
            out = m([[w.clone() for w in windows]], lora_idx=adapters)
            return torch.cat(out[0] + [m(windows[0], lora_idx=None)])
    elif variant == "window_loop":
        model = WindowLoopTransformer(width, layers, heads, mlp_ratio=2.0, lora_repeat_num=adapters)

        def call(m):
            windows = windows_for(m)
            return torch.cat(m(windows, idx=1) + m(windows))
    elif variant == "extra_keyword":
        model = TransformerBlock(width, layers, heads, mlp_ratio=2.0, lora_repeat_num=adapters)
        model.resblocks = nn.ModuleList(
            [ExtraKeywordBlock(width, heads, 2.0, lora_repeat_num=adapters) for _ in range(layers)])

        def call(m):
            return torch.cat([m(w, idx=k) for k, w in enumerate(windows_for(m))])
    elif variant == "bare_blocks":
        model = nn.Sequential(*[VisualAttentionBlock(width, heads, 2.0, lora_repeat_num=adapters)
                                for _ in range(layers)])

        def call(m):
            return torch.cat([m(w) for w in windows_for(m)])
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return randomize_(model).eval(), call
