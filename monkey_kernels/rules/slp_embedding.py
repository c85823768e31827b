"""LayTextLLM-style embedding layers with a Spatial Layout Projector (the ``slp_embedding`` rule): the reference's
table lookup plus in-place box (and image feature) writes become ONE fused, out-of-place assembly pass.

What it recognises (by structure): a module with ``embed_tokens`` (an ``nn.Embedding``), ``projector.proj`` (an
``nn.Linear(4, hidden)`` with ``hidden`` the embedding width: the SLP), an int ``box_token_id`` and an
``image_token_id`` attribute -- e.g. :class:`~monkey_kernels.ops.slp.SLPEmbeddingRef`. Call contract: its
``forward`` takes a prefix of ``forward(input_ids, boxes=None, page_sizes=None, image_features=None,
num_boxes=None, num_image_tokens=None)`` (the reference takes the first four), so every call it accepts means the
same to the fused module; any other forward is left alone and listed as skipped.

What the fused forward does: :class:`~monkey_kernels.modules.FusedSLPEmbedding` over the same (shared)
``embed_tokens`` and ``projector`` modules (state-dict keys unchanged) runs :func:`monkey_kernels.slp_embed`:
each row written once -- a table row for text, ``W c + b`` for the k-th box placeholder, the j-th image feature
row for image placeholders.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..modules import FusedSLPEmbedding
from ..call_contract import class_forward, parameters_prefix_problem
from ..patching import PatchOptions, PatchRule, register_builtin_rule

__all__ = ["SLP_RULE"]

_FORWARD_ORDER = ("input_ids", "boxes", "page_sizes", "image_features", "num_boxes", "num_image_tokens")
_CALL = ("forward(input_ids, boxes=None, page_sizes=None, image_features=None, num_boxes=None, "
         "num_image_tokens=None)")


def _looks_like_slp_embedding(module: nn.Module) -> bool:
    projector = getattr(module, "projector", None)
    proj = getattr(projector, "proj", None)
    embed = getattr(module, "embed_tokens", None)
    return (
        not isinstance(module, FusedSLPEmbedding)
        and isinstance(embed, nn.Embedding)
        and isinstance(proj, nn.Linear) and proj.in_features == 4 and proj.out_features == embed.embedding_dim
        and isinstance(getattr(module, "box_token_id", None), int)
        and hasattr(module, "image_token_id")
    )


def _contract_problem(module: nn.Module) -> Optional[str]:
    forward, problem = class_forward(module)
    if problem is not None:
        return problem
    return parameters_prefix_problem(forward, _FORWARD_ORDER, expected=f"the fused SLP embedding's {_CALL}")


def _to_fused(module: nn.Module, options: PatchOptions) -> nn.Module:
    return FusedSLPEmbedding.from_reference(module, backend=options.backend).train(module.training)


SLP_RULE = register_builtin_rule(PatchRule.by_structure(
    "slp_embedding", _looks_like_slp_embedding, _contract_problem, _to_fused, lambda fused: fused.to_reference(),
    kinds={"slp_embedding": 1},
    description=("an embedding layer with embed_tokens, projector.proj = Linear(4, hidden), box_token_id and "
                 f"image_token_id, whose forward takes a prefix of {_CALL}"),
))
