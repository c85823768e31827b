"""The fused SLP ``inputs_embeds`` assembly (LayTextLLM's Spatial Layout Projector, one box -> one token).

``slp_embed`` builds ``inputs_embeds [B, S, H]`` out of place, each row written once:

- text token ``t`` with id ``v``: ``table[v]``;
- the ``k``-th box placeholder of sequence ``b``: ``W c + b_slp`` with ``c = boxes[b, k] / (w, h, w, h)``
  (``page_sizes[b] = (w, h)``; ``page_sizes=None`` means the boxes are already normalized);
- the ``j``-th image placeholder of sequence ``b``: ``image_features[b, j]``;
- padding id ``-1`` (what the public LayTextLLM collate function pads ``input_ids`` with): a **zero row**,
  with no gradient to anything.

Per-token kind and source index come from cumsums over the placeholder masks (:func:`.checks.build_token_index`):
no host synchronisation. The value checks read one small summary back to the host; ``validate=False`` skips
them for CUDA-graph capture (then surplus placeholders and out-of-range ids give zero rows, never
out-of-bounds reads).

- :mod:`.api`: :func:`slp_embed`; :mod:`.checks`: its one checker; :mod:`.op`: the custom op pair with fakes,
  autograd (the backward's math) and the eager twin; :mod:`.torch_impl`, :mod:`.native_impl`,
  :mod:`.triton_impl`: the backends (kernel in ``triton_kernels/slp.py``); :mod:`.reference`: the reference
  modules (:class:`SpatialLayoutProjector`, :class:`SLPEmbeddingRef`, :func:`assemble_inputs_embeds_ref`).
"""
from .api import slp_embed
from .checks import TokenIndex, build_token_index
from .op import slp_embed_bwd, slp_embed_fwd
from .reference import PAD_TOKEN_ID, SLPEmbeddingRef, SpatialLayoutProjector, assemble_inputs_embeds_ref

__all__ = ["slp_embed", "slp_embed_fwd", "slp_embed_bwd", "build_token_index", "TokenIndex", "PAD_TOKEN_ID",
           "SLPEmbeddingRef", "SpatialLayoutProjector", "assemble_inputs_embeds_ref"]
