"""A structural test double of the public TextMonkey (``monkey_model/text_monkey/`` and
``monkey_model/modeling_textmonkey.py`` of Yuliang-Liu/Monkey), written from the facts in the session's research
notes (classes, state-dict names, shapes, initialisation, the forward and ``encode`` step by step).

The public code cannot ship, so the tests of the TextMonkey patch rules run against this double. What it keeps,
because the rules depend on it or must reproduce it:

- the module tree and state-dict names: ``conv1``, ``positional_embedding``, ``ln_pre``,
  ``transformer.window_attention.{k}`` (registered BEFORE ``transformer.resblocks``; always one module per
  ``window_pos`` entry, used or not) with ``position_embedding`` and ``shift_attn.{downsample, norm1,
  attn.{relative_position_bias_table, qkv, proj}, norm2, mlp.{scale, fc1, fc2}}``, ``transformer.resblocks.{L}``
  (``ln_1``, ``attn.in_proj`` / ``in_proj_lora.{i}``, ``attn.out_proj`` / ``out_proj_lora.{i}``, ``ln_2``,
  ``mlp.c_fc`` / ``gelu`` / ``c_proj``, ``mlp_lora.{i}``), ``attn_pool`` (``pos_embed`` a Parameter, ``query``,
  ``kv_proj``, ``attn`` an ``nn.MultiheadAttention``, ``ln_q``, ``ln_kv``), ``ln_post``, ``proj`` and, with
  ``resampler=True``, ``downresampler.{downsample, layers.0.0.*, layers.0.1.*}``; non-persistent buffers
  ``attn_mask`` and ``relative_position_index``;
- every initialisation (zero ``lora_b``, zero ``mlp.fc2`` of the cross-window attention: the identity at init,
  zero Perceiver ``fc2``, trunc-normal tables) and every numeric quirk: the ViT's per-head interleaved qkv and its
  division by ``sqrt(head_dim)``, the ``query is key`` self-attention check, LayerNorm eps 1e-6 (ViT, pool) vs
  1e-5 (Swin, Perceiver), Swin's multiplication by ``head_dim ** -0.5``, the -100 shifted-window mask built on
  the PADDED grid (roll on the unpadded grid, zero pad after ``norm1``, crop, roll back), the cross-window MLP
  without residual and its residual around the whole module from the input WITHOUT the position embedding,
  the hard-coded ``Dropout(0.05)`` of its MLP, the square-grid reshape ``(G, G)``, the bicubic tables computed
  in float32, the token filter (``self_soft_matching``: cosine in the model dtype, minus an fp32 ``2 * tril``,
  the ``r`` tokens with the lowest best-later-similarity, kept in token order) and the Perceiver without a
  residual on the latents;
- ``TransformerBlock.forward(x, attn_mask=None, lora_idx=None, image_size=(64, 64))``: for a nested window list
  the window loop INSIDE every layer, the windows stitched into the whole grid before the layers of
  ``window_pos`` (``window_attention[k]``, in order), ``lora_idx`` None or 0 -> that value for every window,
  any other value -> window ``k`` (row-major) with adapter ``k``; for a tensor the plain loop without adapters;
- ``VisionTransformer.forward(x, lora_idx=None, add_window=False)`` (one conv over the whole image, windows cut
  from the patch grid, positions and ``ln_pre`` per window, ``attn_pool`` / ``ln_post`` / ``proj`` per window,
  row-major concatenation) and ``encode(image_paths, lora_idx=None, input_image=None)`` (PIL loading, the JPEG
  re-encoding with ``random.randint(20, 100)`` in training, ``image_transform``, the bicubic global view of the
  normalised tensor, ``lora_idx == 1`` -> 0, the token filter, the global features last);
- ``TextMonkeyModel.forward``: on a first step with image spans, ONE ``encode`` of every path with
  ``lora_idx=visual.lora_repeat_num`` when that is > 0 (else none), then Qwen's in-place write
  (``monkey_vlm_double.QWenModel``, reused).

What differs (test conveniences; none changes what the original computes at its own sizes):

- the constants the original hard-codes are constructor arguments with the original's values as defaults, so
  the tests run tiny models: ``window_patches`` (32: the window side in patches; the double also stores it as
  ``visual.window_patches`` and ``transformer.window_patches``, the attributes the patch rule reads, defaulting
  to 32 like the original), ``global_view_size`` (448, stored as ``visual.global_view_size``),
  ``num_positions`` (256), ``pool_queries`` (256), ``pool_heads`` (``output_dim // 128``), ``window_pos``
  ((2, 6, 24, 46)), ``window_dim`` ((128, 256, 512, 1024)), ``window_head`` ((4, 8, 16, 32)), ``swin_window``
  (12, shift half of it), the Perceiver's ``perceiver_dim`` (1024), ``perceiver_dim_head`` (128),
  ``perceiver_heads`` (8), the adapters' ``attn_lora_rank`` (16), ``mlp_lora_rank`` (32), ``lora_dropout``
  (0.05);
- the width: the original writes 1664 into the cross-window attention (its position table, the Swin block's
  ``dim`` and its MLP's output). Here those take the ViT's ``width``, which equals 1664 in the original, so at
  the original's width nothing changes;
- ``image_transform`` is PIL's bicubic resize + ``[0, 1]`` scaling + normalisation written with PIL and numpy
  (torchvision's ``Resize`` / ``ToTensor`` / ``Normalize`` on a PIL image do exactly these steps; torchvision is
  not installed here);
- the language-model double builds the TextMonkey tower directly (the original builds a Monkey tower first and
  replaces it), does not cast itself to bf16, and its ``_init_weights`` leaves the tower as its constructors made
  it (Qwen's ``_init_weights`` is a no-op), recomputing only the non-persistent buffers when transformers asks.
"""
from __future__ import annotations

import math
import random
from collections import OrderedDict
from io import BytesIO
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from helpers.monkey_vlm_double import QWenConfig, QWenLMHeadModel, QWenModel
from monkey_kernels.models.monkey_vision import get_2d_sincos_pos_embed

__all__ = [
    "VisionTransformer",
    "TransformerBlock",
    "VisualAttentionBlock",
    "CrossWindowAttention",
    "SwinTransformerBlock",
    "PerceiverResampler",
    "TextMonkeyModel",
    "TextMonkeyLMHeadModel",
    "tiny_textmonkey_visual",
    "randomize_textmonkey_",
    "reconstruct_matrix",
    "sliding_window",
    "self_soft_matching",
    "CLIP_MEAN",
    "CLIP_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_textmonkey_visual(**overrides) -> dict:
    """``config.visual`` of a tiny TextMonkey: 112x112 images, windows of 4x4 patches (56 px, 2x2 windows), an
    8x8 patch grid under a 3x3 shifted window (shift 1: padded to 9x9, so the -100 mask and the padding quirks
    are exercised), stitches before blocks 1 and 3 of 4 (the other two cross-window modules exist unused, as in a
    shallow original), 4 resampler queries, the token filter keeping 8 of the 16 window tokens, the global view."""
    visual = dict(image_start_id=260, image_size=[112, 112], patch_size=14, width=16, layers=4, heads=2,
                  mlp_ratio=2.0, n_queries=12, output_dim=32, lora_repeat_num=4, add_window=True, use_global=True,
                  resampler=True, r=8, window_patches=4, global_view_size=56, num_positions=4, pool_queries=4,
                  pool_heads=2, window_pos=(1, 3, 24, 46), window_dim=(8, 8, 16, 16), window_head=(2, 2, 4, 4),
                  swin_window=3, perceiver_dim=8, perceiver_dim_head=4, perceiver_heads=2, attn_lora_rank=4,
                  mlp_lora_rank=8, lora_dropout=0.0)
    visual.update(overrides)
    return visual


def randomize_textmonkey_(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Non-trivial values in every parameter, the zero-initialised ones included (``lora_b``, the cross-window
    ``fc2``, the Perceiver ``fc2``, biases): at init those paths contribute exactly nothing, and a test could not
    see a bug in them. ``lora_scale`` / ``scale`` in [0.5, 1.5]; the frozen sin-cos table stays."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            if name.endswith("lora_scale") or name.endswith(".scale"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("lora_b.weight") or name.endswith("fc2.weight"):
                p.normal_(0.0, 0.3 / math.sqrt(p.shape[-1]))
            else:
                p.add_(scale * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------------------------------
# visual_text.py helpers
# ---------------------------------------------------------------------------------------------------------
def reconstruct_matrix(windows: List[List[torch.Tensor]]) -> torch.Tensor:
    """Rows of windows ``[B, C, h, w]`` -> the whole grid: each row's windows along the width, rows along the
    height."""
    return torch.cat([torch.cat(row, dim=3) for row in windows], dim=2)


def sliding_window(matrix: torch.Tensor, window: Tuple[int, int], stride: int) -> List[List[torch.Tensor]]:
    """``window[i][j] = matrix[:, :, i*s : i*s + wh, j*s : j*s + ww]`` (views; a short last window when the size is
    not a multiple), ``ceil((H - wh) / s) + 1`` rows."""
    _, _, height, width = matrix.shape
    rows = math.ceil((height - window[0]) / stride) + 1
    cols = math.ceil((width - window[1]) / stride) + 1
    return [[matrix[:, :, i * stride:i * stride + window[0], j * stride:j * stride + window[1]]
             for j in range(cols)] for i in range(rows)]


def get_abs_pos(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    """``abs_pos [L, C]`` bicubically resized (in float32, cast back) to ``int(sqrt(tgt_size))**2`` rows; the
    table itself when the sides agree (truncating square roots, as the original)."""
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


def get_abs_pos_window(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    """window.py's variant for a ``(1, L, C)`` table: the sides are read from ``size(1)``; the table itself (still
    ``(1, L, C)``) when they agree."""
    src = int(math.sqrt(abs_pos.size(1)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


class ImageTransform:
    """torchvision's ``Compose([Resize(size, BICUBIC), ToTensor(), Normalize(mean, std)])`` on a PIL image: a
    2-sequence ``size = (h, w)`` resizes exactly, an int resizes the SHORT side keeping the aspect ratio."""

    def __init__(self, size, mean=CLIP_MEAN, std=CLIP_STD) -> None:
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)  # floats: transformers builds models on the meta device

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if isinstance(self.size, (tuple, list)):
            height, width = int(self.size[0]), int(self.size[1])
        else:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = int(self.size), int(self.size * long / short)
            width, height = (new_short, new_long) if w <= h else (new_long, new_short)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.BICUBIC)
        array = np.asarray(image, dtype=np.uint8).copy()
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (tensor - mean) / std


# ---------------------------------------------------------------------------------------------------------
# The ViT (visual_text.py)
# ---------------------------------------------------------------------------------------------------------
class Lora_Adapter(nn.Module):
    """``lora_b(lora_a(dropout(x))) * lora_scale``; ``lora_b`` zero at init, ``lora_scale`` learnable."""

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


class VisualAttention(nn.Module):
    """Self-attention on ``[s, b, dim]``; qkv laid out per head as ``[q_h | k_h | v_h]``."""

    def __init__(self, embed_dim: int, num_heads: int, lora_repeat_num: int = 4, lora_rank: int = 16,
                 lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.hidden_size_per_attention_head = embed_dim // num_heads
        self.num_attention_heads_per_partition = num_heads
        self.hidden_size_per_partition = embed_dim
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.in_proj_lora = nn.ModuleList(Lora_Adapter(embed_dim, 3 * embed_dim, lora_rank, lora_dropout)
                                          for _ in range(lora_repeat_num))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj_lora = nn.ModuleList(Lora_Adapter(embed_dim, embed_dim, lora_rank, lora_dropout)
                                           for _ in range(lora_repeat_num))
        self.norm_factor = math.sqrt(self.hidden_size_per_attention_head)

    def forward(self, query, key, value, attn_mask=None, lora_idx=None):
        sq, b, _ = query.size()
        assert query is key, "Only Support Self-Attention Currently"
        heads, hd = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        mixed = self.in_proj(query)
        if lora_idx is not None:
            mixed += self.in_proj_lora[lora_idx](query)
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
        context = torch.bmm(probs, v).view(b, heads, sq, hd).permute(2, 0, 1, 3).contiguous()
        context = context.view(sq, b, self.hidden_size_per_partition)
        output = self.out_proj(context)
        if lora_idx is not None:
            output += self.out_proj_lora[lora_idx](context)
        return output


class VisualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0, lora_repeat_num: int = 4,
                 attn_lora_rank: int = 16, mlp_lora_rank: int = 32, lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-6)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-6)
        mlp_width = int(d_model * mlp_ratio)
        self.attn = VisualAttention(d_model, n_head, lora_repeat_num, attn_lora_rank, lora_dropout)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))
        self.mlp_lora = nn.ModuleList(Lora_Adapter(d_model, d_model, mlp_lora_rank, lora_dropout)
                                      for _ in range(lora_repeat_num))

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x, v_x, attn_mask=attn_mask, lora_idx=lora_idx)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None, lora_idx=None):
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        x = q_x + self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask, lora_idx=lora_idx)
        residual = x
        x = x + self.mlp(self.ln_2(x))
        if lora_idx is not None:
            x += self.mlp_lora[lora_idx](residual)
        return x


# ---------------------------------------------------------------------------------------------------------
# The cross-window attention (window.py)
# ---------------------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window[0], window[1], c)


def window_reverse(windows: torch.Tensor, window: Tuple[int, int], h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def relative_position_index(win_h: int, win_w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += win_h - 1
    relative[:, :, 1] += win_w - 1
    relative[:, :, 0] *= 2 * win_w - 1
    return relative.sum(-1)


class Mlp(nn.Module):
    """``scale * fc2(drop1(gelu(fc1(x))))``, no biases, ``fc2`` zero at init; ``drop1`` is ``Dropout(0.05)``
    whatever ``drop`` says (the original ignores the argument)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.05)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.fc1.weight, a=math.sqrt(5))
            nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.drop1(self.act(self.fc1(x))))


class WindowAttention(nn.Module):
    """Swin's window attention with a relative position bias (q multiplied by ``head_dim ** -0.5``)."""

    def __init__(self, dim: int, num_heads: int, window_size: Tuple[int, int]) -> None:
        super().__init__()
        self.window_size = tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(win_h, win_w), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b_, n, -1)))


class SwinTransformerBlock(nn.Module):
    """``downsample`` (dim -> hidden, no bias), shifted-window attention with the -100 mask precomputed for
    ``input_resolution`` on the padded grid, then ``mlp`` (hidden -> 2 hidden -> dim) WITHOUT a residual."""

    def __init__(self, dim: int, hidden_dim: int, input_resolution: Tuple[int, int], num_heads: int = 4,
                 window_size: int = 7, shift_size: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.input_resolution = tuple(input_resolution)
        ws = tuple(r if r <= window_size else window_size for r in self.input_resolution)
        ss = tuple(0 if r <= w else shift_size for r, w in zip(self.input_resolution, ws))
        self.window_size, self.shift_size = ws, ss
        self.window_area = ws[0] * ws[1]
        self.downsample = nn.Linear(dim, hidden_dim, bias=False)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.attn = WindowAttention(hidden_dim, num_heads=num_heads, window_size=ws)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.mlp = Mlp(hidden_dim, 2 * hidden_dim, out_features=dim)
        self.drop_path2 = nn.Identity()
        self.register_buffer("attn_mask", self.calc_attn(self.input_resolution), persistent=False)

    def calc_attn(self, input_resolution) -> torch.Tensor:
        """``[num_windows, area, area]``: 0 within a region of the padded grid, -100 across regions."""
        h = math.ceil(input_resolution[0] / self.window_size[0]) * self.window_size[0]
        w = math.ceil(input_resolution[1] / self.window_size[1]) * self.window_size[1]
        labels = torch.zeros((1, h, w, 1))
        count = 0
        for hs in (slice(0, -self.window_size[0]), slice(-self.window_size[0], -self.shift_size[0]),
                   slice(-self.shift_size[0], None)):
            for wsl in (slice(0, -self.window_size[1]), slice(-self.window_size[1], -self.shift_size[1]),
                        slice(-self.shift_size[1], None)):
                labels[:, hs, wsl, :] = count
                count += 1
        windows = window_partition(labels, self.window_size).view(-1, self.window_area)
        mask = windows.unsqueeze(1) - windows.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        pad_h = (self.window_size[0] - h % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - w % self.window_size[1]) % self.window_size[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        attended = self.attn(windows, mask=self.attn_mask)
        attended = attended.view(-1, self.window_size[0], self.window_size[1], c)
        x = window_reverse(attended, self.window_size, hp, wp)[:, :h, :w, :].contiguous()
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(b, -1, c)
        x = self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, self.dim)


class CrossWindowAttention(nn.Module):
    """The stitched-grid attention: ``x [B, C, G, G]`` -> same shape, ``x + shift_attn(x + position_embedding)``
    (the residual is the input without the position table). ``dim`` is the ViT's width (1664 hard-coded in the
    original)."""

    def __init__(self, image_size, dim: int, hidden_dim: int, head: int, window_size: int = 12) -> None:
        super().__init__()
        self.image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.dim = dim
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.position_embedding = nn.Parameter(torch.zeros(1, self.image_size[0] * self.image_size[1], dim))
        trunc_normal_(self.position_embedding, std=0.02)
        self.shift_attn = SwinTransformerBlock(dim=dim, hidden_dim=hidden_dim, input_resolution=self.image_size,
                                               num_heads=head, window_size=window_size, shift_size=self.shift_size)

    def forward(self, x: torch.Tensor, image_size) -> torch.Tensor:
        b, c, g, _ = x.shape
        x = x.reshape(b, c, -1).permute(0, 2, 1)
        residual = x
        h, w = image_size
        x = x + get_abs_pos_window(self.position_embedding, x.size(1))
        x = self.shift_attn(x.view(b, h, w, c))
        x = x.view(b, -1, c) + residual
        return x.permute(0, 2, 1).reshape(b, c, g, g)  # the original's square assumption


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, lora_repeat_num: int = 4,
                 add_window: bool = False, image_size=(896, 896), patch_size: int = 14, window_patches: int = 32,
                 window_pos: Sequence[int] = (2, 6, 24, 46), window_dim: Sequence[int] = (128, 256, 512, 1024),
                 window_head: Sequence[int] = (4, 8, 16, 32), swin_window: int = 12, attn_lora_rank: int = 16,
                 mlp_lora_rank: int = 32, lora_dropout: float = 0.05) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.add_window = add_window
        self.window_pos = list(window_pos)
        self.window_dim = list(window_dim)
        self.window_head = list(window_head)
        self.window_patches = window_patches
        if isinstance(image_size, (tuple, list)):
            grid = tuple(size // patch_size for size in image_size)
        else:
            grid = image_size // patch_size
        if add_window:  # registered before resblocks: its keys come first in the state dict
            self.window_attention = nn.ModuleList(
                CrossWindowAttention(grid, width, self.window_dim[k], self.window_head[k], swin_window)
                for k in range(len(self.window_pos)))
        self.resblocks = nn.ModuleList(
            VisualAttentionBlock(width, heads, mlp_ratio, lora_repeat_num, attn_lora_rank, mlp_lora_rank,
                                 lora_dropout) for _ in range(layers))

    def get_cast_dtype(self) -> torch.dtype:
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def get_cast_device(self) -> torch.device:
        return self.resblocks[0].mlp.c_fc.weight.device

    def forward(self, x, attn_mask=None, lora_idx=None, image_size=(64, 64)):
        if isinstance(x, list):
            p = self.window_patches
            window_idx = 0
            for r_idx, r in enumerate(self.resblocks):
                if self.add_window and r_idx in self.window_pos:
                    for i in range(len(x)):
                        for j in range(len(x[i])):
                            t = x[i][j].permute(1, 0, 2).permute(0, 2, 1)
                            x[i][j] = t.reshape(t.shape[0], t.shape[1], p, p)
                    whole = self.window_attention[window_idx](reconstruct_matrix(x), image_size)
                    x = sliding_window(whole, (p, p), p)
                    for i in range(len(x)):
                        for j in range(len(x[i])):
                            t = x[i][j].reshape(x[i][j].shape[0], x[i][j].shape[1], -1)
                            x[i][j] = t.permute(0, 2, 1).permute(1, 0, 2)
                    window_idx += 1
                if lora_idx is None or lora_idx == 0:
                    for i in range(len(x)):
                        for j in range(len(x[i])):
                            x[i][j] = r(x[i][j], attn_mask=attn_mask, lora_idx=lora_idx)
                else:
                    k = 0
                    for i in range(len(x)):
                        for j in range(len(x[i])):
                            x[i][j] = r(x[i][j], attn_mask=attn_mask, lora_idx=k)
                            k += 1
            return x
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


# ---------------------------------------------------------------------------------------------------------
# attn_pool (visual_text.py), the token filter (merge.py) and the Perceiver resampler (resampler.py)
# ---------------------------------------------------------------------------------------------------------
class Resampler(nn.Module):
    """``grid_size ** 2`` learned queries cross-attending to the window (``x [N, L, kv_dim] -> [N, Q, dim]``)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: Optional[int] = None) -> None:
        super().__init__()
        self.num_queries = grid_size ** 2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, grid_size).float()).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        trunc_normal_(self.query, std=0.02)
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim is not None and kv_dim != embed_dim
                        else nn.Identity())
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1), x + pos_embed.unsqueeze(1),
                        x, attn_mask=attn_mask)[0]
        return out.permute(1, 0, 2)


def self_soft_matching(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """merge.py: a function selecting, from ``[n, t, c]``, the ``r`` tokens of ``metric`` whose best cosine
    similarity to a LATER token is lowest, in token order (nothing is merged)."""
    t = metric.shape[1]
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric @ metric.transpose(-1, -2)
        diagonal = (torch.tril(torch.ones(t, t)) * 2).expand(scores.shape[0], -1, -1).to(metric.device)
        scores = scores - diagonal
        node_max, _ = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        kept = edge_idx[..., t - r:, :]

    def merge(src: torch.Tensor) -> torch.Tensor:
        n, _, c = src.shape
        unmerged = src.gather(dim=-2, index=kept.expand(n, r, c))
        _, order = torch.sort(kept, dim=1)
        return unmerged.gather(dim=-2, index=order.expand(n, r, c))

    return merge


class FeedForward(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.fc1.weight, a=math.sqrt(5))
            nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t):
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = q @ k.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1))


class PerceiverResampler(nn.Module):
    """The token filter then one Perceiver layer on the kept tokens (no residual on them), a FeedForward back to
    ``out_dim`` added to the kept tokens: ``[N, t, out_dim] -> [N, r, out_dim]``."""

    def __init__(self, in_dim: int = 1024, out_dim: int = 4096, depth: int = 1, dim_head: int = 128,
                 heads: int = 8) -> None:
        super().__init__()
        self.downsample = nn.Linear(out_dim, in_dim, bias=False)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(in_dim, dim_head, heads),
                                                   FeedForward(in_dim, in_dim, out_dim)]) for _ in range(depth))

    def forward(self, x: torch.Tensor, r: int = 0) -> torch.Tensor:
        latents = self_soft_matching(x, r)(x)
        down_x = self.downsample(x)
        down_latents = self.downsample(latents)
        for attn, ff in self.layers:
            down_latents = attn(down_x, down_latents)
            latents = ff(down_latents) + latents
        return latents


# ---------------------------------------------------------------------------------------------------------
# VisionTransformer
# ---------------------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 n_queries: int = 256, output_dim: int = 512, lora_repeat_num: int = 0, add_window: bool = False,
                 use_global: bool = False, resampler: bool = False, r: int = 512, window_patches: int = 32,
                 global_view_size: int = 448, num_positions: int = 256, pool_queries: int = 256,
                 pool_heads: Optional[int] = None, window_pos: Sequence[int] = (2, 6, 24, 46),
                 window_dim: Sequence[int] = (128, 256, 512, 1024), window_head: Sequence[int] = (4, 8, 16, 32),
                 swin_window: int = 12, perceiver_dim: int = 1024, perceiver_dim_head: int = 128,
                 perceiver_heads: int = 8, attn_lora_rank: int = 16, mlp_lora_rank: int = 32,
                 lora_dropout: float = 0.05, **kwargs) -> None:
        super().__init__()
        if isinstance(image_size, (tuple, list)):
            self.image_size = image_size
            image_height, image_width = image_size
        else:
            self.image_size = (image_size, image_size)
            image_height, image_width = self.image_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (image_height // patch_size, image_width // patch_size)
        self.output_dim = output_dim
        self.add_window = add_window
        self.use_global = use_global
        self.resampler = resampler
        self.r = r
        self.window_patches = window_patches
        self.global_view_size = global_view_size
        self.image_transform = ImageTransform(self.image_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.lora_repeat_num = lora_repeat_num
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(num_positions, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio, lora_repeat_num, add_window, image_size,
                                            patch_size, window_patches, window_pos, window_dim, window_head,
                                            swin_window, attn_lora_rank, mlp_lora_rank, lora_dropout)
        self.attn_pool = Resampler(int(math.sqrt(pool_queries)), output_dim,
                                   pool_heads if pool_heads is not None else output_dim // 128, kv_dim=width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))
        if resampler:
            self.downresampler = PerceiverResampler(perceiver_dim, output_dim, 1, perceiver_dim_head,
                                                    perceiver_heads)
        for module in self.modules():  # see TextMonkeyPreTrainedModel._init_weights
            module.__dict__["_textmonkey_visual_part"] = True

    def forward(self, x: torch.Tensor, lora_idx=None, add_window=False):
        x = x.to(dtype=self.transformer.get_cast_dtype(), device=self.transformer.get_cast_device())
        x = self.conv1(x)
        _, _, h, w = x.shape
        p = self.window_patches
        if add_window:
            x = sliding_window(x, (p, p), p)
            for i in range(len(x)):
                for j in range(len(x[i])):
                    t = x[i][j].reshape(x[i][j].shape[0], x[i][j].shape[1], -1).permute(0, 2, 1)
                    t = t + get_abs_pos(self.positional_embedding, t.size(1))
                    x[i][j] = self.ln_pre(t).permute(1, 0, 2)
        else:
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            x = x + get_abs_pos(self.positional_embedding, x.size(1))
            x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x, lora_idx=lora_idx, image_size=(h, w))
        if add_window:
            for i in range(len(x)):
                for j in range(len(x[i])):
                    x[i][j] = self.ln_post(self.attn_pool(x[i][j].permute(1, 0, 2))) @ self.proj
            return torch.cat([torch.cat(row, dim=1) for row in x], dim=1)
        x = self.attn_pool(x.permute(1, 0, 2))
        return self.ln_post(x) @ self.proj

    def encode(self, image_paths: List[str], lora_idx=None, input_image=None):
        if input_image is None:
            from PIL import Image

            images = []
            for image_path in image_paths:
                if image_path.startswith("http://") or image_path.startswith("https://"):
                    import requests

                    image = Image.open(requests.get(image_path, stream=True).raw)
                else:
                    image = Image.open(image_path)
                image = image.convert("RGB")
                if self.training:  # the original imitates transmission loss
                    output = BytesIO()
                    image.save(output, format="JPEG", quality=random.randint(20, 100))
                    image = Image.open(BytesIO(output.getvalue()))
                images.append(self.image_transform(image))
            images = torch.stack(images, dim=0)
        else:
            images = input_image
        size = self.global_view_size
        images_global = F.interpolate(images, size=(size, size), mode="bicubic")
        if lora_idx == 1:
            local_feat = self(images, 0, add_window=True)
        else:
            local_feat = self(images, lora_idx, add_window=True)
        if self.resampler:
            local_feat = self.downresampler(local_feat, r=self.r)
        if self.use_global:
            global_feat = self(images_global, lora_idx=None, add_window=False)
            return torch.cat([local_feat, global_feat], dim=1)
        return local_feat


# ---------------------------------------------------------------------------------------------------------
# The VLM (modeling_textmonkey.py) on the Qwen double
# ---------------------------------------------------------------------------------------------------------
def _rebuild_buffers(module: nn.Module) -> None:
    """The non-persistent buffers, as the constructors computed them (for transformers' loading, which builds
    models without them)."""
    if isinstance(module, SwinTransformerBlock):
        module.attn_mask = module.calc_attn(module.input_resolution).to(module.downsample.weight.device)
    elif isinstance(module, WindowAttention):
        module.relative_position_index = relative_position_index(*module.window_size).to(
            module.qkv.weight.device)


class _TextMonkeyInit:
    def _init_weights(self, module: nn.Module) -> None:
        if module.__dict__.get("_textmonkey_visual_part"):
            _rebuild_buffers(module)
            return
        super()._init_weights(module)


class TextMonkeyModel(_TextMonkeyInit, QWenModel):
    """``TextMonkeyModel``: ``visual`` is TextMonkey's tower; on a first step with image spans, one ``encode`` of
    all the paths, then Qwen's forward with ``images=`` (the in-place write)."""

    def _build_visual(self, config: QWenConfig) -> nn.Module:
        return VisionTransformer(**config.visual)

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        start_id = self.config.visual["image_start_id"]
        if past_key_values is None and torch.any(input_ids == start_id):
            bos = torch.where(input_ids == start_id)
            eos = torch.where(input_ids == start_id + 1)
            assert (bos[0] == eos[0]).all()
            img_pos = torch.stack((bos[0], bos[1], eos[1]), dim=1)
            images = []
            for i, a, b in img_pos:
                image = input_ids[i][a + 1:b - 1].tolist()
                image = image[:image.index(start_id + 2)]
                images.append(bytes(image).decode("utf-8"))
            if self.visual.lora_repeat_num > 0:
                images = self.visual.encode(images, lora_idx=self.visual.lora_repeat_num)
            else:
                images = self.visual.encode(images)
            assert images.shape[0] == len(images)
        else:
            images = None
        return QWenModel.forward(self, input_ids, past_key_values, attention_mask, token_type_ids, position_ids,
                                 head_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask, use_cache,
                                 output_attentions, output_hidden_states, return_dict, images)


class TextMonkeyLMHeadModel(_TextMonkeyInit, QWenLMHeadModel):
    """``TextMonkeyLMHeadModel``: ``transformer`` is a :class:`TextMonkeyModel`."""

    _base_model_class = TextMonkeyModel
