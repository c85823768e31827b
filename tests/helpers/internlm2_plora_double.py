"""A structural test double of InternLM-XComposer's language model: InternLM2 with Partial LoRA (``PLoRA``) on its
five linears, written from the facts of ``shared/docs/reference-models.md`` §7 and the PLoRA research notes (the
public code cannot ship; nothing here is copied from it).

What it keeps from the public code, because the ``plora_linear`` / ``plora_peft_linear`` rules depend on it:

- ``PLoRA``: an ``nn.Linear`` subclass with ``Plora_A`` (``in -> r``, no bias), ``Plora_B`` (``r -> out``, no
  bias), ``lora_scaling = lora_alpha / lora_r`` (a float), ``lora_dropout`` (``nn.Dropout(p)``, or a plain
  identity function when ``p == 0``), the unused ``lora_r`` / ``lora_alpha`` / ``lora_len``, and a
  ``reset_parameters`` that only acts on a ``lora_A`` the class never has (so the module itself initialises
  nothing: the base weight stays ``torch.empty`` until the model's ``_init_weights`` or a checkpoint fills it).
  Both public forward forms, chosen by ``config.plora_form``:

  * ``"ixc2"`` (IXC2-VL / 4KHD, :class:`PLoRAIXC2`): ``res = linear(x)``; with a mask holding an image token,
    ``res[im_mask] += B(A(dropout(x[im_mask]))) * scaling``; without one, the FIRST TOKEN OF EVERY ROW gets
    ``+ 0 * B(A(dropout(x[:, :1])))``; ``im_mask=None`` is a plain linear.
  * ``"ixc2d5"`` (IXC-2.5 / 2.5-OL, :class:`PLoRA`): ``x`` must be 3-D; ``im_mask.view(-1)`` runs first (so
    ``im_mask=None`` raises ``AttributeError``), ``x`` is flattened to ``[B*N, C]``, the same masked add, and the
    all-text branch touches only flattened row 0; the result is reshaped to ``[B, N, out]``.

  The "any image token?" test (``torch.sum(im_mask) > 0``) covers the whole batch (a host sync).
- InternLM2 with the released structure at tiny sizes: ``model.tok_embeddings``, ``model.layers[i]`` with
  ``attention.wqkv`` / ``attention.wo`` (GQA, ``wqkv``'s output channels INTERLEAVED per KV head: for each KV head
  ``G = heads / kv_heads`` query heads, then its key, then its value, each ``head_dim`` wide), ``feed_forward.w1``,
  ``w3``, ``w2`` (SiLU gate), ``attention_norm`` / ``ffn_norm`` (RMSNorm in fp32, cast back, then times the
  weight), ``model.norm``; ``output`` (plain linear head) in :class:`InternLM2ForCausalLM`, logits cast to fp32.
  Rotary embedding on the full head dim, half-split ``rotate_half``, cos/sin cast to the activation dtype,
  gathered by ``position_ids``. Eager attention, softmax in fp32, additive causal + padding mask of
  ``finfo.min``.
- ``im_mask`` travels as the public code passes it: a KEYWORD of the model (``model(inputs_embeds=...,
  im_mask=...)``, read with ``kwargs.get``), the 7th argument of a decoder layer, a keyword to the attention
  (``im_mask=``) and POSITIONAL to the MLP and to every linear (``self.wqkv(h, im_mask)``). A call with
  ``input_ids`` (no ``inputs_embeds``) REPLACES the mask with an all-False one, as InternLM2Model does.
- Gradient checkpointing as the public code: in training with ``model.gradient_checkpointing`` set, each layer
  runs under REENTRANT ``torch.utils.checkpoint.checkpoint(custom_forward, hidden, attention_mask,
  position_ids, None)``, ``im_mask`` captured by the closure (not a checkpoint input); reentrant means the layer
  input must require grad (``enable_input_require_grads()`` in the fine-tuning script).

What differs (test conveniences, none on the path the rules replace): no KV cache (``use_cache`` is ignored), no
flash attention or dynamic NTK rope scaling, no vision tower (tests pass ``inputs_embeds`` and ``im_mask``);
``config.wqkv_lora_r`` / ``wqkv_lora_alpha`` model 4KHD's rank-8, scale-2 ``wqkv``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from helpers.accuracy import rel_err

__all__ = ["InternLM2Config", "PLoRA", "PLoRAIXC2", "InternLM2Model", "InternLM2ForCausalLM", "tiny_config",
           "PLORA_TARGETS", "plora_layers", "image_mask", "build", "run", "assert_same_results", "MASKS", "B", "N",
           "HIDDEN"]

#: PEFT target modules of InternLM-XComposer's fine-tuning recipe (finetune.py's LoraArguments)
PLORA_TARGETS = ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


class PLoRA(nn.Linear):
    """The IXC-2.5 form (flattens ``x`` to ``[B*N, C]``; ``im_mask`` must not be ``None``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05, lora_len: int = 0,
                 **kwargs) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_len = lora_len  # stored, never used
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else (lambda x: x)
        self.lora_scaling = self.lora_alpha / self.lora_r
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False, device=device, dtype=dtype)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The public override looks for `lora_A`, which this class never has: it initialises nothing (and, called
        # from nn.Linear.__init__, leaves the base weight uninitialised).
        if hasattr(self, "lora_A"):
            raise AssertionError("unreachable: PLoRA has no lora_A")

    def forward(self, x, im_mask=None):
        batch, seq, width = x.shape
        im_mask = im_mask.view(-1)
        x = x.reshape(-1, width)
        res = super().forward(x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                res[im_mask] += self.Plora_B(self.Plora_A(self.lora_dropout(x[im_mask]))) * self.lora_scaling
            else:
                res[:1] += self.Plora_B(self.Plora_A(self.lora_dropout(x[:1]))) * 0
        return res.reshape(batch, seq, -1)


class PLoRAIXC2(PLoRA):
    """The IXC2-VL / 4KHD form (no flattening; ``im_mask=None`` is a plain linear)."""

    def forward(self, x, im_mask=None):
        res = nn.Linear.forward(self, x)
        if im_mask is not None:
            if torch.sum(im_mask) > 0:
                res[im_mask] += self.Plora_B(self.Plora_A(self.lora_dropout(x[im_mask]))) * self.lora_scaling
            else:
                res[:, :1] += self.Plora_B(self.Plora_A(self.lora_dropout(x[:, :1]))) * 0
        return res


_FORMS = {"ixc2": PLoRAIXC2, "ixc2d5": PLoRA}


class InternLM2Config(PreTrainedConfig):
    """InternLM2's config at what the double needs, plus the PLoRA settings of a variant: ``plora_form``
    (``"ixc2"`` or ``"ixc2d5"``), ``plora_r`` / ``plora_alpha`` (all five linears), ``wqkv_lora_r`` /
    ``wqkv_lora_alpha`` (4KHD: 8 / 16 in the release), ``plora_dropout`` (0.05 in every release)."""

    model_type = "internlm2_plora_double"

    def __init__(self, vocab_size: int = 128, hidden_size: int = 64, intermediate_size: int = 128,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                 hidden_act: str = "silu", max_position_embeddings: int = 512, initializer_range: float = 0.02,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 1e6, bias: bool = False, pad_token_id: int = 2,
                 plora_form: str = "ixc2d5", plora_r: int = 16, plora_alpha: int = 16,
                 wqkv_lora_r: Optional[int] = None, wqkv_lora_alpha: Optional[int] = None,
                 plora_dropout: float = 0.05, attn_implementation: str = "eager", **kwargs) -> None:
        if plora_form not in _FORMS:
            raise ValueError(f"plora_form must be one of {sorted(_FORMS)}, got {plora_form!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.bias = bias
        self.plora_form = plora_form
        self.plora_r = plora_r
        self.plora_alpha = plora_alpha
        self.wqkv_lora_r = wqkv_lora_r if wqkv_lora_r is not None else plora_r
        self.wqkv_lora_alpha = wqkv_lora_alpha if wqkv_lora_alpha is not None else plora_alpha
        self.plora_dropout = plora_dropout
        self.attn_implementation = attn_implementation
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def tiny_config(**overrides) -> InternLM2Config:
    """hidden 64, 4 heads over 2 KV heads (G = 2, head_dim 16: ``wqkv`` 64 -> 128), FFN 128, 2 layers."""
    return InternLM2Config(**overrides)


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)  # cast back first, then the weight (an fp32 weight promotes)


class InternLM2RotaryEmbedding(nn.Module):
    """cos / sin ``[max_positions, head_dim]`` in fp32, gathered by ``position_ids`` and cast to ``x``'s dtype."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(max_position_embeddings, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, seq_len: int):
        if seq_len > self.cos_cached.shape[0]:
            raise ValueError(f"sequence of {seq_len} positions, the double caches {self.cos_cached.shape[0]}")
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q, k, cos, sin, position_ids):
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)  # [B, 1, N, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _plora(config: InternLM2Config, fan_in: int, fan_out: int, rank: int, alpha: int) -> PLoRA:
    return _FORMS[config.plora_form](fan_in, fan_out, bias=config.bias, lora_r=rank, lora_alpha=alpha,
                                     lora_dropout=config.plora_dropout, lora_len=1225)


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        r, alpha = config.plora_r, config.plora_alpha
        self.w1 = _plora(config, config.hidden_size, config.intermediate_size, r, alpha)
        self.w3 = _plora(config, config.hidden_size, config.intermediate_size, r, alpha)
        self.w2 = _plora(config, config.intermediate_size, config.hidden_size, r, alpha)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        qkv = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.wqkv = _plora(config, self.hidden_size, qkv, config.wqkv_lora_r, config.wqkv_lora_alpha)
        self.wo = _plora(config, self.num_heads * self.head_dim, self.hidden_size, config.plora_r, config.plora_alpha)
        self.rotary_emb = InternLM2RotaryEmbedding(self.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, im_mask=None, **kwargs):
        batch, q_len, _ = hidden_states.shape
        groups, d = self.num_key_value_groups, self.head_dim
        qkv = self.wqkv(hidden_states, im_mask)
        # interleaved per KV head: [q_0 .. q_{G-1}, k, v] for each of the kv heads
        qkv = qkv.view(batch, q_len, self.num_key_value_heads, groups + 2, d)
        query = qkv[..., :groups, :].reshape(batch, q_len, self.num_heads, d).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        cos, sin = self.rotary_emb(value, seq_len=q_len)
        query, key = _apply_rotary(query, key, cos, sin, position_ids)
        # repeat_kv: KV head h serves query heads h*G .. h*G + G - 1
        key = key[:, :, None].expand(batch, self.num_key_value_heads, groups, q_len, d).reshape(
            batch, self.num_heads, q_len, d)
        value = value[:, :, None].expand(batch, self.num_key_value_heads, groups, q_len, d).reshape(
            batch, self.num_heads, q_len, d)
        weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(d)
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value).transpose(1, 2).reshape(batch, q_len, self.hidden_size)
        out = self.wo(out, im_mask)
        return out, (weights if output_attentions else None), None


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, im_mask=None, **kwargs):
        residual = hidden_states
        hidden_states, weights, _ = self.attention(
            hidden_states=self.attention_norm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_value=past_key_value, output_attentions=output_attentions,
            use_cache=use_cache, im_mask=im_mask)
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states), im_mask)
        return (hidden_states, weights) if output_attentions else (hidden_states,)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    config: InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):  # PLoRA, Plora_A and Plora_B included: Plora_B is NOT zero
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, InternLM2RMSNorm):
            init.ones_(module.weight)


def _causal_mask(attention_mask, batch: int, seq: int, dtype, device):
    """Additive ``[B, 1, N, N]``: ``finfo.min`` above the diagonal and on padded keys (``attention_mask`` 0)."""
    low = torch.finfo(dtype).min
    causal = torch.full((seq, seq), low, dtype=dtype, device=device).triu(1)
    mask = causal[None, None].expand(batch, 1, seq, seq)
    if attention_mask is not None:
        padded = (attention_mask[:, None, None, :] == 0).expand(batch, 1, seq, seq)
        mask = mask.masked_fill(padded, low)
    return mask


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        im_mask = kwargs.get("im_mask", None)
        output_attentions = bool(output_attentions)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
            im_mask = torch.zeros(inputs_embeds.shape[:2]).to(inputs_embeds.device).bool()  # as the public code
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq, dtype=torch.long, device=inputs_embeds.device).unsqueeze(0)
        mask = _causal_mask(attention_mask, batch, seq, inputs_embeds.dtype, inputs_embeds.device)
        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if self.gradient_checkpointing and self.training:
                def custom_forward(*inputs, layer=layer):
                    return layer(*inputs, output_attentions, None, im_mask)  # im_mask by closure

                # the public code passes no use_reentrant: torch's default, the reentrant implementation
                outputs = torch.utils.checkpoint.checkpoint(custom_forward, hidden_states, mask, position_ids, None,
                                                            use_reentrant=True)
            else:
                outputs = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                output_attentions=output_attentions, use_cache=False, im_mask=im_mask)
            hidden_states = outputs[0]
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """``model`` + ``output`` (the LM head, a plain linear); ``forward(input_ids | inputs_embeds, attention_mask,
    labels, im_mask=...)``; logits in fp32, shifted cross-entropy loss."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, im_mask=kwargs.get("im_mask"))
        logits = self.output(outputs.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def plora_layers(model: nn.Module):
    """``{name: module}`` of every PLoRA in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PLoRA)}


def image_mask(spans_per_row, seq_len: int, device=None) -> torch.Tensor:
    """bool ``[B, seq_len]`` with ``True`` on ``[start, end)`` for every ``(start, end)`` of each row's spans
    (an end past ``seq_len`` is cut there, like a sample truncated to ``max_length``)."""
    mask = torch.zeros(len(spans_per_row), seq_len, dtype=torch.bool, device=device)
    for row, spans in enumerate(spans_per_row):
        for start, end in spans:
            mask[row, start:min(end, seq_len)] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# Test utilities shared by tests/models/test_plora*.py
# ---------------------------------------------------------------------------------------------------------
B, N, HIDDEN = 3, 12, 32


def build(form: str = "ixc2d5", dtype=torch.float64, dropout: float = 0.0, layers: int = 1, bias: bool = False,
          **overrides) -> InternLM2ForCausalLM:
    """A tiny InternLM2 with PLoRA everywhere; 4KHD-like ``wqkv`` (rank 2, alpha 4: scale 2), the rest rank 8,
    alpha 8; every weight N(0, 0.02) but ``Plora_B`` drawn larger, so the image rows differ clearly."""
    config = tiny_config(plora_form=form, hidden_size=HIDDEN, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, plora_r=8, plora_alpha=8, wqkv_lora_r=2,
                         wqkv_lora_alpha=4, plora_dropout=dropout, bias=bias, **overrides)
    model = InternLM2ForCausalLM(config)
    with torch.no_grad():
        for layer in plora_layers(model).values():
            layer.Plora_B.weight.normal_(0, 0.2)
            if layer.bias is not None:
                layer.bias.normal_(0, 0.1)
    return model.to(dtype)


MASKS = {
    # several spans in row 0, a span at the start of row 1, row 2 all text; the last tokens are text (padding)
    "mixed": [[(1, 4), (6, 9)], [(0, 5)], []],
    "all_text": [[], [], []],
    "all_image": [[(0, N)], [(0, N)], [(0, N)]],
    "cut_at_end": [[(8, 40)], [(2, 3), (5, 7), (11, 30)], [(0, 1)]],
}


def run(model: nn.Module, x: torch.Tensor, mask, grad_weights: torch.Tensor, **kwargs):
    """``(logits, d inputs_embeds, {name: grad})`` of ``sum(logits * grad_weights)``."""
    model.zero_grad(set_to_none=True)
    embeds = x.detach().clone().requires_grad_()
    logits = model(inputs_embeds=embeds, im_mask=mask, **kwargs).logits
    (logits * grad_weights).sum().backward()
    return logits.detach(), embeds.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_same_results(got, want, rel: float) -> None:
    assert rel_err(got[0], want[0]) <= rel, ("logits", rel_err(got[0], want[0]))
    assert rel_err(got[1], want[1]) <= rel, ("inputs_embeds grad", rel_err(got[1], want[1]))
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        assert (got[2][name] is None) == (grad is None), name
        if grad is not None and grad.abs().max() > 0:
            assert rel_err(got[2][name], grad) <= rel, (name, rel_err(got[2][name], grad))
        elif grad is not None:
            assert torch.equal(got[2][name].double().cpu(), grad.double().cpu()), name
