"""A structural test double of the public Monkey VLM (``MonkeyLMHeadModel`` of Yuliang-Liu/Monkey's remote code
on top of Qwen-VL's ``QWenLMHeadModel``), written from the facts of ``shared/docs/reference-models.md`` §1 and §4.

The public code cannot ship, so the tests of the ``monkey_vlm`` patch rule run against this double. What it
keeps from the public code, because the rule depends on it:

- the attribute names and nesting: ``model.transformer`` (a ``MonkeyModel``, subclass of ``QWenModel``) with
  ``wte``, ``drop``, ``h`` (Qwen blocks with a KV cache), ``ln_f`` and ``visual``; ``model.lm_head``;
  ``config.visual`` a dict holding ``image_start_id`` (end marker ``+ 1``, pad ``+ 2``) and the ViT's
  constructor arguments;
- the span format ``<start> path bytes <pad>... <end>`` with exactly ``(windows + 1) * n_queries`` positions
  between the markers;
- ``MonkeyModel.forward``: only when ``past_key_values is None``, finds the spans with ``torch.where``, decodes
  the paths, calls ``visual.encode(paths)`` (windows as a nested list, row by row, each ``[N, C, T, T]``, and
  the bicubic global view ``[N, C, T, T]``), runs ``self.visual(window, idx=i)`` ONCE PER WINDOW and
  ``self.visual(global_view)``, concatenates window-major then global and hands the result to
  ``QWenModel.forward(images=...)``;
- ``QWenModel.forward``: ``wte`` -> ``drop`` -> the IN-PLACE write ``hidden_states[i][a + 1 : b] = images[k]``
  -> the blocks -> ``ln_f``; like the real code it cannot take ``inputs_embeds`` on a first step (it compares
  ``input_ids`` with the start id: ``torch.any(None == id)`` raises ``TypeError``);
- the vision tower ``visual`` with the public ``VisionTransformer``'s names (``conv1``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks`` with per-tile adapter lists, ``attn_pool``, ``ln_post``, ``proj``) and
  ``forward(x, idx=None)``.

What differs (test conveniences, none of them on the path the rule replaces):

- ``visual.encode`` reads synthetic, already normalized image tensors from ``visual.image_bank`` (a plain dict
  ``path -> [C, H, W]``, not in the state dict) instead of opening files; ``window_size`` (448 in the release)
  and ``num_positions`` (256) are config entries so the tests can run at tiny sizes. With
  ``visual.per_image_windows = True`` it returns one nested window list per image (images of different sizes,
  hence different window counts), a format the public forward cannot consume but the patched one can.
- transformers 5 generation: the cache travels as the output's ``cache`` field (a tuple of per-layer
  ``(key, value)`` tuples, as Qwen's ``presents``) and ``prepare_inputs_for_generation`` hands it back as
  ``past_key_values``; the model opts out of transformers' default ``DynamicCache`` so the first step has
  ``past_key_values is None``, as with the transformers version the release pins.
- no flash attention, no dynamic NTK / logn scaling; ``chat`` takes and returns token ids. The tokenizer
  (:class:`QWenTokenizer`) is byte-level: it keeps Qwen-VL's image span format (``<img>path</img>`` becomes the
  start id, the path's bytes, pads up to the span length, the end id) and its end-of-text token, not its BPE.
- ``save_pretrained`` after ``register_for_auto_class`` gives a ``trust_remote_code`` checkpoint (this file is
  copied into it, as the release ships its modeling files), which ``AutoModelForCausalLM`` / ``AutoTokenizer``
  load.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizer
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionTransformer
from monkey_kernels.models.monkey_vision import MonkeyLoraAdapter, MonkeyResampler, get_2d_sincos_pos_embed, get_abs_pos

__all__ = [
    "QWenConfig",
    "QWenTokenizer",
    "VisionTransformer",
    "QWenModel",
    "MonkeyModel",
    "QWenLMHeadModel",
    "MonkeyLMHeadModel",
    "sliding_window",
    "tiny_visual_config",
]

def tiny_visual_config(**overrides) -> dict:
    """``config.visual`` of a tiny model: 28 px windows of 2x2 patches, 4 queries per view, 56 px images
    (2x2 windows); ``image_size=[56, 84]`` gives 2 rows x 3 columns = 6 windows."""
    visual = dict(image_start_id=260, image_size=56, patch_size=14, width=16, layers=2, heads=2, mlp_ratio=2.0,
                  n_queries=4, output_dim=32, lora_repeat_num=6, window_size=28, num_positions=4,
                  attn_lora_rank=4, mlp_lora_rank=8, lora_dropout=0.0)
    visual.update(overrides)
    return visual


class QWenConfig(PreTrainedConfig):
    """Qwen-VL's ``QWenConfig`` at what the double needs; ``visual`` is the dict handed to
    ``VisionTransformer(**visual)`` plus ``image_start_id``."""

    model_type = "qwen_monkey_double"

    def __init__(self, vocab_size: int = 300, hidden_size: int = 32, num_hidden_layers: int = 2,
                 num_attention_heads: int = 2, intermediate_size: int = 64, emb_dropout_prob: float = 0.0,
                 attn_dropout_prob: float = 0.0, layer_norm_epsilon: float = 1e-6, rotary_emb_base: float = 10000.0,
                 initializer_range: float = 0.02, use_cache: bool = True, visual: Optional[dict] = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.visual = dict(visual) if visual is not None else tiny_visual_config(output_dim=hidden_size)
        super().__init__(**kwargs)


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level stand-in for Qwen-VL's tokenizer: ids ``0..255`` are bytes; ``image_start_id`` + 0, 1, 2, 3 are
    ``<img>``, ``</img>``, the image pad and ``<|endoftext|>`` (``eod_id``, also the pad token). Text between
    ``<img>`` and ``</img>`` is an image path: ``<img>`` + its UTF-8 bytes + pads up to ``image_span_length``
    positions + ``</img>``, the span ``MonkeyModel.forward`` finds and fills with ``(windows + 1) * n_queries``
    image features."""

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: Dict[str, str] = {}
    SPECIAL = ("<img>", "</img>", "<imgpad>", "<|endoftext|>")

    def __init__(self, image_start_id: int = 260, image_span_length: int = 20, **kwargs) -> None:
        self.image_start_id = image_start_id
        self.image_span_length = image_span_length
        kwargs.setdefault("pad_token", "<|endoftext|>")
        kwargs.setdefault("eos_token", "<|endoftext|>")
        # Passed on so that save_pretrained writes them to tokenizer_config.json.
        super().__init__(image_start_id=image_start_id, image_span_length=image_span_length, **kwargs)

    @property
    def eod_id(self) -> int:
        return self.image_start_id + 3

    @property
    def vocab_size(self) -> int:
        return self.image_start_id + len(self.SPECIAL)

    def get_vocab(self) -> Dict[str, int]:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> List[str]:
        tokens: List[str] = []
        for k, part in enumerate(re.split(r"<img>(.*?)</img>", text)):
            body = [f"<0x{b:02X}>" for b in part.encode("utf-8")]
            if k % 2:  # an image path
                if len(body) >= self.image_span_length:
                    raise ValueError(f"image path {part!r} is longer than the image span "
                                     f"({self.image_span_length - 1} bytes at most)")
                body = ["<img>"] + body + ["<imgpad>"] * (self.image_span_length - len(body)) + ["</img>"]
            tokens += body
        return tokens

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.SPECIAL:
            return self.image_start_id + self.SPECIAL.index(token)
        return int(token[3:-1], 16)

    def _convert_id_to_token(self, index: int) -> str:
        if index >= self.image_start_id:
            return self.SPECIAL[index - self.image_start_id]
        return f"<0x{index:02X}>"

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None):
        return ()  # no vocabulary file: the vocabulary is the bytes


# ---------------------------------------------------------------------------------------------------------
# Vision tower (the public visual.py's VisionTransformer, built from the package's replica of its blocks)
# ---------------------------------------------------------------------------------------------------------
def sliding_window(images: torch.Tensor, window: int, stride: int) -> List[List[torch.Tensor]]:
    """``images [N, C, H, W]`` -> rows of windows ``[N, C, window, window]``, row by row (the public helper)."""
    _, _, height, width = images.shape
    rows = (height - window) // stride + 1
    cols = (width - window) // stride + 1
    return [[images[:, :, r * stride:r * stride + window, c * stride:c * stride + window] for c in range(cols)]
            for r in range(rows)]


class VisionTransformer(nn.Module):
    """The public ``VisionTransformer``: ``forward(x [N, C, T, T], idx=None) -> [N, n_queries, output_dim]``.

    ``idx`` is one adapter index for the whole batch (or ``None``: base weights only), as in the release."""

    def __init__(self, image_size, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 n_queries: int = 256, output_dim: int = 512, lora_repeat_num: int = 4, window_size: int = 448,
                 num_positions: int = 256, attn_lora_rank: int = 16, mlp_lora_rank: int = 32,
                 lora_dropout: float = 0.05, **kwargs) -> None:
        super().__init__()
        self.image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        self.window_size = window_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(num_positions, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        blocks = MonkeyVisionConfig(tile_size=window_size, image_size=max(self.image_size), patch_size=patch_size,
                                    width=width, layers=layers, heads=heads, mlp_ratio=mlp_ratio,
                                    num_positions=num_positions, n_queries=n_queries, output_dim=output_dim,
                                    resampler_heads=max(1, output_dim // 128), lora_repeat_num=lora_repeat_num,
                                    attn_lora_rank=attn_lora_rank, mlp_lora_rank=mlp_lora_rank,
                                    lora_dropout=lora_dropout)
        self.transformer = MonkeyVisionTransformer(blocks)  # resblocks.{L}.attn.in_proj_lora.{i}, ... (§1)
        self.attn_pool = MonkeyResampler(math.isqrt(n_queries), output_dim, max(1, output_dim // 128),
                                         kv_dim=width, layer_norm_eps=1e-6)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))
        self.image_bank: Dict[str, torch.Tensor] = {}  # test images by path (not a buffer: not in the state dict)
        self.per_image_windows = False

    def forward(self, x: torch.Tensor, idx=None) -> torch.Tensor:
        x = x.to(dtype=self.transformer.get_cast_dtype(), device=self.transformer.get_cast_device())
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid**2, width]
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x, idx=idx)
        x = x.permute(1, 0, 2)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return x @ self.proj

    def encode(self, image_paths: List[str]):
        """``(windows, global_views)`` of the images at ``image_paths`` (looked up in ``image_bank``).

        Default (the public format, all images one size): ``windows[row][col]`` is ``[N, C, T, T]`` and
        ``global_views`` ``[N, C, T, T]`` (bicubic). With ``per_image_windows``: ``windows[k][row][col]`` is
        ``[1, C, T, T]`` for image ``k`` (sizes may differ) and ``global_views`` still ``[N, C, T, T]``."""
        for path in image_paths:
            if path not in self.image_bank and os.path.isfile(path):
                # A saved ``[C, H, W]`` tensor (the public code opens image files; a fine-tuning run of the double,
                # e.g. examples/finetune_monkey.py's test, reads its images from disk the same way).
                self.image_bank[path] = torch.load(path, weights_only=True)
        missing = [p for p in image_paths if p not in self.image_bank]
        if missing:
            raise FileNotFoundError(f"no test image for {missing}")
        images = [self.image_bank[p] for p in image_paths]
        size = (self.window_size, self.window_size)
        if self.per_image_windows:
            windows = [sliding_window(img[None], self.window_size, self.window_size) for img in images]
            global_views = torch.cat([F.interpolate(img[None], size=size, mode="bicubic") for img in images])
            return windows, global_views
        stacked = torch.stack(images, dim=0)
        return sliding_window(stacked, self.window_size, self.window_size), F.interpolate(stacked, size=size,
                                                                                            mode="bicubic")


# ---------------------------------------------------------------------------------------------------------
# Language model (Qwen: RMSNorm, rotary attention with a KV cache, SwiGLU MLP)
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim: int, start: int, length: int, base: float, dtype, device):
    """``(cos, sin)`` ``[1, length, 1, head_dim]`` of positions ``start .. start + length - 1``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    positions = torch.arange(start, start + length, dtype=torch.float64, device=device)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class QWenAttention(nn.Module):
    """``c_attn`` (fused qkv, bias), rotary positions, cache ``(key, value)`` of ``[B, S, heads, hd]``,
    ``c_proj`` (no bias)."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_base = config.rotary_emb_base
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)

    def forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=False, output_attentions=False):
        b, s, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)
        past_length = 0 if layer_past is None else layer_past[0].shape[1]
        cos, sin = rotary_tables(self.head_dim, past_length, s, self.rotary_base, q.dtype, q.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if layer_past is not None:
            k = torch.cat([layer_past[0], k], dim=1)
            v = torch.cat([layer_past[1], v], dim=1)
        present = (k, v) if use_cache else None
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(self.head_dim)  # [B, heads, S, past + S]
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = self.attn_dropout(scores.softmax(dim=-1))
        context = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(b, s, -1)
        return self.c_proj(context), present, (weights if output_attentions else None)


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=False, output_attentions=False):
        attn_out, present, weights = self.attn(self.ln_1(hidden_states), layer_past=layer_past,
                                               attention_mask=attention_mask, use_cache=use_cache,
                                               output_attentions=output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, present, weights


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MonkeyLoraAdapter):
            init.kaiming_uniform_(module.lora_a.weight, a=math.sqrt(5))
            init.zeros_(module.lora_b.weight)
            init.ones_(module.lora_scale)
        elif isinstance(module, MonkeyResampler):
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.embed_dim, module.grid_size))
            init.trunc_normal_(module.query, std=0.02)
        elif isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, VisionTransformer):
            init.normal_(module.positional_embedding, std=module.positional_embedding.shape[1] ** -0.5)
            init.normal_(module.proj, std=module.output_dim ** -0.5)
        elif isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


def _span_positions(input_ids: torch.Tensor, image_start_id: int) -> torch.Tensor:
    """``[n_images, 3]``: (sequence, start position, end position) of every span, as the public code pairs them
    (the k-th start with the k-th end in flattened order)."""
    bos = torch.where(input_ids == image_start_id)
    eos = torch.where(input_ids == image_start_id + 1)
    assert (bos[0] == eos[0]).all()
    return torch.stack((bos[0], bos[1], eos[1]), dim=1)


def _decode_paths(input_ids: torch.Tensor, img_pos: torch.Tensor, image_start_id: int) -> List[str]:
    paths = []
    for i, a, b in img_pos:
        image = input_ids[i][a + 1:b - 1].tolist()
        image = image[:image.index(image_start_id + 2)]
        paths.append(bytes(image).decode("utf-8"))
    return paths


class QWenModel(QWenPreTrainedModel):
    """Qwen-VL's ``QWenModel``: ``wte``, ``drop``, ``h``, ``ln_f``, ``visual``; the image features replace the
    span positions of the hidden states IN PLACE after the embedding dropout."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = self._build_visual(config)
        self.post_init()

    def _build_visual(self, config: QWenConfig) -> nn.Module:
        """The vision tower (a hook of the double: a subclass builds another tower, e.g. TextMonkey's, instead of
        building this one and replacing it afterwards as the public ``TextMonkeyModel`` does)."""
        return VisionTransformer(**config.visual)

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _decoder_mask(self, attention_mask, batch: int, length: int, past_length: int, dtype, device):
        """Additive ``[B, 1, S, past + S]`` mask: causal, plus the padding of a 2D ``attention_mask``."""
        minimum = torch.finfo(dtype).min
        total = past_length + length
        query_pos = torch.arange(past_length, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        mask = torch.zeros(length, total, dtype=dtype, device=device).masked_fill(key_pos > query_pos, minimum)
        mask = mask[None, None].expand(batch, 1, length, total)
        if attention_mask is not None:
            padding = (attention_mask[:, None, None, :].to(device) == 0)
            mask = mask.masked_fill(padding, minimum)
        return mask

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, images=None):
        start_id = self.config.visual["image_start_id"]
        if images is None:
            # As the real code: with input_ids None this is torch.any(False) -> TypeError (no inputs_embeds here).
            if past_key_values is None and torch.any(input_ids == start_id):
                img_pos = _span_positions(input_ids, start_id)
                images = self.visual.encode(_decode_paths(input_ids, img_pos, start_id))
                assert images.shape[0] == len(images)  # Qwen-VL's encode returns features; Monkey's does not
            else:
                images = None
        else:
            img_pos = _span_positions(input_ids, start_id)

        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is not None:
            input_shape = input_ids.size()
            input_ids = input_ids.view(-1, input_shape[-1])
        elif inputs_embeds is not None:
            input_shape = inputs_embeds.size()[:-1]
        else:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        if past_key_values is None:
            past_length = 0
            past_key_values = tuple([None] * len(self.h))
        else:
            past_length = past_key_values[0][0].size(1)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        mask = self._decoder_mask(attention_mask, batch, length, past_length, inputs_embeds.dtype,
                                  inputs_embeds.device)

        hidden_states = self.drop(inputs_embeds)
        if images is not None:
            for k, (i, a, b) in enumerate(img_pos):
                hidden_states[i][a + 1:b] = images[k]  # the public code's in-place write

        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # incompatible with checkpointing, as in the real code
        presents = () if use_cache else None
        all_attentions = () if output_attentions else None
        all_hidden_states = () if output_hidden_states else None
        for block, layer_past in zip(self.h, past_key_values):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if self.gradient_checkpointing and self.training:
                checkpoint = getattr(self, "_gradient_checkpointing_func", None)
                if checkpoint is None:
                    def checkpoint(fn, *args):
                        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

                def run(hidden, block_mask, block=block):
                    return block(hidden, None, block_mask, False, output_attentions)

                outputs = checkpoint(run, hidden_states, mask)
            else:
                outputs = block(hidden_states, layer_past=layer_past, attention_mask=mask, use_cache=use_cache,
                                output_attentions=output_attentions)
            hidden_states = outputs[0]
            if use_cache:
                presents = presents + (outputs[1],)
            if output_attentions:
                all_attentions = all_attentions + (outputs[2],)
        hidden_states = self.ln_f(hidden_states).view(input_shape + (hidden_states.size(-1),))
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=presents,
                                       hidden_states=all_hidden_states, attentions=all_attentions)


class MonkeyModel(QWenModel):
    """Monkey's ``MonkeyModel``: the per-window encoder loop, then ``QWenModel.forward(images=...)``."""

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        start_id = self.config.visual["image_start_id"]
        if past_key_values is None and torch.any(input_ids == start_id):
            img_pos = _span_positions(input_ids, start_id)
            windows, images_448 = self.visual.encode(_decode_paths(input_ids, img_pos, start_id))
            patch_list = []
            lora_idx = 0
            for col in windows:
                for image_patch in col:
                    patch_list.append(self.visual(image_patch, idx=lora_idx))
                    lora_idx += 1
            global_feat = self.visual(images_448)
            local_feat = torch.cat(patch_list, dim=1)
            images = torch.cat([local_feat, global_feat], dim=1)
        else:
            images = None
        return super().forward(input_ids, past_key_values, attention_mask, token_type_ids, position_ids, head_mask,
                               inputs_embeds, encoder_hidden_states, encoder_attention_mask, use_cache,
                               output_attentions, output_hidden_states, return_dict, images)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _base_model_class = QWenModel

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = self._base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # Qwen's tuple cache; the first step runs with past_key_values=None

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, inputs_embeds=None,
                                      next_sequence_length=None, is_first_iteration=None, **kwargs):
        """Qwen's: after the first step only the last token goes in, with the cache as ``past_key_values``."""
        if cache is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "past_key_values": cache, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache")}

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, position_ids=position_ids, head_mask=head_mask,
                                   inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict)
        logits = self.lm_head(outputs[0])
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels.to(logits.device)[..., 1:].contiguous()
            loss = CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        if not return_dict:
            output = (logits,) + tuple(outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def chat(self, input_ids: torch.Tensor, max_new_tokens: int = 8) -> torch.Tensor:
        """Greedy reply to a prompt of token ids (the tokenizer-free core of the release's ``chat``): the
        generated ids after the prompt, ``[B, <= max_new_tokens]``."""
        out = self.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=0)
        return out[:, input_ids.shape[1]:]


class MonkeyLMHeadModel(QWenLMHeadModel):
    """Monkey's ``MonkeyLMHeadModel``: ``transformer`` is a :class:`MonkeyModel`."""

    _base_model_class = MonkeyModel
