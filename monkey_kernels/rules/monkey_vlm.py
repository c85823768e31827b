"""The full Monkey VLM (``MonkeyLMHeadModel`` loaded with ``trust_remote_code``): ONE batched encoder pass per
forward and an out-of-place image-feature write (the ``monkey_vlm`` rule).

The public ``MonkeyModel.forward`` (first step only, ``past_key_values is None``) runs the vision encoder once per
window (``self.visual(window, idx=i)``) and once for the global view, then ``QWenModel.forward`` writes the
features into the embeddings IN PLACE (``hidden_states[i][a + 1 : b] = images[k]``). Importing this module
registers a rule (after the block / transformer rules, whose fused encoder it needs) that recognises such a model
BY STRUCTURE, not by class (users hold their own copies of the remote code):

- a module with ``visual``, a Monkey-structured ``VisionTransformer`` (``conv1``, ``positional_embedding``,
  ``ln_pre``, ``transformer.resblocks`` with per-tile adapter lists, fused by the ``monkey_block`` /
  ``monkey_transformer`` rules of :mod:`.monkey_vit`, ``attn_pool``, ``ln_post``, ``proj``, ``encode``);
- ``config.visual`` a mapping holding ``image_start_id``;
- Qwen's ``wte`` / ``drop`` / ``h`` / ``ln_f`` and a ``forward`` taking ``input_ids`` and ``past_key_values``.

Call contract checked (else the model is left alone and listed in ``PatchReport.skipped``): ``visual``'s class
``forward`` is exactly ``forward(x, idx=None)`` and hands ``idx`` on unchanged as ``self.transformer(...,
idx=idx)`` (read from its source: the fused transformer then receives one adapter id per view); the model's
class ``forward`` takes ``input_ids`` and ``past_key_values``.

The rule installs, on that INSTANCE, a forward (:class:`MonkeyVLMForward`, an ``InstanceForward``: it pickles;
``unpatch_model`` restores the previous forward) that, on a first step with image spans:

1. finds and decodes the spans exactly as the original (``<start> path bytes <pad>... <end>``; the k-th start
   pairs with the k-th end of its sequence) and calls the model's own ``visual.encode(paths)``;
2. runs ONE encoder pass, ``visual(views, idx=ids)``, over every window of every image plus every global view:
   views image-major, windows row by row then the global view, adapter id = window index, ``-1`` for the
   global view. The window count of each image comes from the loaded tensors, so a ``lora_repeat_num = 6`` model
   at 1344x896 (2 x 3 windows) works; ``encode`` may also return one nested window list per image (then images
   of one batch may have different window counts);
3. calls the model's original forward with the start markers masked (so its image branch stays off) and two
   hooks for the duration of the call: a pre-hook on ``wte`` gives it the true ids back, and a hook on ``drop``
   returns the dropout output with the span positions replaced OUT OF PLACE (one ``index_copy`` into a new
   tensor: each row written once, no in-place write on a view of a leaf). Everything else is the original's
   own code: attention masks, labels and loss, ``return_dict``, ``use_cache``, gradient checkpointing.

Why hooks rather than ``inputs_embeds``: Qwen-VL's ``QWenModel.forward`` cannot take ``inputs_embeds`` on a
first step (its image check evaluates ``torch.any(input_ids == image_start_id)``, a ``TypeError`` with
``input_ids=None``), and re-implementing its body would fork the user's language-model code. Calls without image
spans, with ``past_key_values`` (generation steps after the first) or without ``input_ids`` go to the original
forward untouched.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..call_contract import class_forward, forward_parameters_problem, only_forwarded_problem
from ..monkey_structure import adapter_count
from ..patching import InstanceForward, PatchRule, register_builtin_rule, rule_of

__all__ = [
    "ImageSpan",
    "MonkeyVLMForward",
    "find_image_spans",
    "gather_views",
    "monkey_vlm_forward",
    "forward_with_image_features",
    "is_monkey_vlm",
    "looks_like_qwen_vl",
    "MONKEY_VLM_RULE",
]

_VISUAL_PARTS = ("conv1", "positional_embedding", "ln_pre", "transformer", "attn_pool", "ln_post", "proj")
_LM_PARTS = ("wte", "drop", "h", "ln_f")


@dataclass(frozen=True)
class ImageSpan:
    """One image of a batch: ``input_ids[sequence, start]`` is the start marker, ``input_ids[sequence, end]`` the
    end marker; the features go to positions ``start + 1 .. end - 1`` (``length`` of them)."""

    sequence: int
    start: int
    end: int
    path: str

    @property
    def length(self) -> int:
        return self.end - self.start - 1


def find_image_spans(input_ids: torch.Tensor, image_start_id: int) -> List[ImageSpan]:
    """The image spans of ``input_ids [B, S]`` in the original's order (sequence by sequence, left to right).

    Span format (the public Monkey / Qwen-VL code): ``image_start_id``, the path's UTF-8 bytes, at least one pad
    ``image_start_id + 2`` before the last position, ``image_start_id + 1``; the path is decoded from the
    positions ``start + 1 .. end - 2`` up to the first pad, exactly as the original.

    Raises:
        ValueError: naming the sequence, for a start marker without an end marker (or the reverse), markers out
            of order, a span without a pad after the path, or path bytes that are not UTF-8.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    end_id, pad_id = image_start_id + 1, image_start_id + 2
    ids = input_ids.detach().cpu()
    spans: List[ImageSpan] = []
    for sequence, row in enumerate(ids.tolist()):
        starts = [p for p, t in enumerate(row) if t == image_start_id]
        ends = [p for p, t in enumerate(row) if t == end_id]
        if len(starts) != len(ends):
            raise ValueError(
                f"input_ids sequence {sequence}: {len(starts)} image start marker(s) (id {image_start_id}, at "
                f"{starts}) but {len(ends)} end marker(s) (id {end_id}, at {ends}); every image must be "
                f"<start> path bytes <pad>... <end>"
            )
        for k, (start, end) in enumerate(zip(starts, ends)):
            following = starts[k + 1] if k + 1 < len(starts) else len(row)
            if not start < end < following:
                raise ValueError(
                    f"input_ids sequence {sequence}: image start marker at {start} and end marker at {end} do not "
                    f"form a span (each end must follow its start and precede the next start)"
                )
            body = row[start + 1:end - 1]
            if pad_id not in body:
                raise ValueError(
                    f"input_ids sequence {sequence}: the image span at positions {start}..{end} has no pad token "
                    f"(id {pad_id}) at positions {start + 1}..{end - 2} to end the path bytes (the original decodes "
                    f"the path up to the first pad before the position ahead of the end marker)"
                )
            path_bytes = body[:body.index(pad_id)]
            try:
                path = bytes(path_bytes).decode("utf-8")
            except ValueError as error:  # a value outside 0..255 or invalid UTF-8
                raise ValueError(f"input_ids sequence {sequence}: the image span at positions {start}..{end} does "
                                 f"not hold a UTF-8 path ({error})") from None
            spans.append(ImageSpan(sequence, start, end, path))
    return spans


def _as_views(tensor, what: str) -> torch.Tensor:
    """A ``[C, T, T]`` or ``[n, C, T, T]`` view tensor as ``[n, C, T, T]``."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (3, 4):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"visual.encode returned {what} of shape {shape}; expected [C, T, T] or [n, C, T, T]")
    return tensor.unsqueeze(0) if tensor.dim() == 3 else tensor


def gather_views(encoded, num_images: int) -> Tuple[torch.Tensor, List[int]]:
    """All views of ``visual.encode``'s output in the one-pass order, and the window count of each image.

    ``encoded = (windows, global_views)`` in either format:

    - the public one (all images one size): ``windows[row][col]`` is ``[N, C, T, T]`` (image ``k`` is row ``k``
      of each), ``global_views`` ``[N, C, T, T]``;
    - one nested list per image: ``windows[k][row][col]`` is ``[C, T, T]`` or ``[1, C, T, T]``; ``global_views``
      ``[N, C, T, T]`` or a list of ``N`` views.

    Returns ``views [sum_k (W_k + 1), C, T, T]`` (image-major: image ``k``'s windows row by row, then its global
    view) and ``[W_0, W_1, ...]``.
    """
    if not isinstance(encoded, (tuple, list)) or len(encoded) != 2:
        raise ValueError(f"visual.encode(paths) must return (windows, global_views) like the public Monkey code, "
                         f"got {type(encoded).__name__}")
    windows, global_views = encoded
    if not isinstance(windows, (list, tuple)) or len(windows) == 0:
        raise ValueError(f"visual.encode returned windows of type {type(windows).__name__}; expected a non-empty "
                         f"nested list (rows of windows)")
    if isinstance(global_views, torch.Tensor):
        global_list = list(_as_views(global_views, "global views").unbind(0))
    else:
        global_list = [_as_views(g, "a global view")[0] for g in global_views]
    if len(global_list) != num_images:
        raise ValueError(f"visual.encode returned {len(global_list)} global views for {num_images} image spans")
    first_row = windows[0]
    per_image = isinstance(first_row, (list, tuple)) and len(first_row) > 0 and isinstance(first_row[0],
                                                                                          (list, tuple))
    per_image_windows: List[List[torch.Tensor]] = []
    if per_image:
        if len(windows) != num_images:
            raise ValueError(f"visual.encode returned window lists for {len(windows)} images for {num_images} "
                             f"image spans")
        for k, rows in enumerate(windows):
            views = [_as_views(w, f"a window of image {k}") for row in rows for w in row]
            if any(v.shape[0] != 1 for v in views):
                raise ValueError(f"visual.encode: per-image windows of image {k} must each hold one view")
            per_image_windows.append([v[0] for v in views])
    else:
        flat = [_as_views(w, "a window") for row in windows for w in row]
        for w in flat:
            if w.shape[0] != num_images:
                raise ValueError(f"visual.encode returned windows of {w.shape[0]} images for {num_images} image "
                                 f"spans")
        per_image_windows = [[w[k] for w in flat] for k in range(num_images)]
    reference = global_list[0]
    parts: List[torch.Tensor] = []
    for k in range(num_images):
        parts.extend(per_image_windows[k])
        parts.append(global_list[k])
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"visual.encode returned views of different shapes {sorted(shapes)}; every window and "
                         f"global view must be [C, T, T] of one size")
    views = torch.stack([p.to(dtype=reference.dtype, device=reference.device) for p in parts])
    return views, [len(w) for w in per_image_windows]


def _adapter_count(visual: nn.Module) -> int:
    """Adapters every per-tile LoRA list of every block holds (``lora_repeat_num``)."""
    return min(adapter_count(block) for block in visual.transformer.resblocks)


def _check_spans(spans: Sequence[ImageSpan], windows: Sequence[int], adapters: int,
                 queries: Optional[int]) -> None:
    for span, count in zip(spans, windows):
        where = f"input_ids sequence {span.sequence}: the image {span.path!r} at positions {span.start}..{span.end}"
        if count < 1:
            raise ValueError(f"{where} was loaded with no window; visual.encode must return at least one")
        if count > adapters:
            raise ValueError(f"{where} has {count} windows but the model has only {adapters} per-tile adapters "
                             f"(lora_repeat_num); one adapter per window is needed")
        if queries is not None and span.length != (count + 1) * queries:
            raise ValueError(
                f"{where} holds {span.length} positions between its markers; (windows + 1) x queries = "
                f"({count} + 1) x {queries} = {(count + 1) * queries} are needed for {count} windows"
            )


def _original_forward(module: nn.Module) -> Callable:
    installed = module.__dict__.get("forward")
    if isinstance(installed, MonkeyVLMForward) and installed.previous is not None:
        return installed.previous
    return type(module).forward.__get__(module, type(module))


@contextmanager
def _features_in_embeddings(module: nn.Module, input_ids: torch.Tensor, rows: torch.Tensor,
                            features: torch.Tensor):
    """While active, ``module.wte`` embeds ``input_ids`` whatever ids it is given (the caller masks the start
    markers), and ``module.drop`` returns its output with rows ``rows`` (of the flattened ``[B * S, H]``)
    replaced by ``features`` out of place. Yields the fire counts ``{"wte": n, "drop": n}``."""
    fired = {"wte": 0, "drop": 0}

    def true_ids(_module, args, kwargs):
        fired["wte"] += 1
        if fired["wte"] > 1:  # not the batch's lookup (the count check after the call reports it)
            return None
        given = args[0] if args else kwargs.get("input")
        if not isinstance(given, torch.Tensor) or given.numel() != input_ids.numel():
            raise RuntimeError(f"{type(module).__name__}: transformer.wte was called with {type(given).__name__} "
                               f"{tuple(getattr(given, 'shape', ()))}, not the batch's ids {tuple(input_ids.shape)}")
        true = input_ids.reshape(given.shape).to(given.device)
        if args:
            return (true,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "input": true}

    def place_features(_module, _args, output):
        fired["drop"] += 1
        if fired["drop"] > 1:
            return output
        batch, seq = input_ids.shape
        if not isinstance(output, torch.Tensor) or output.shape[:2] != (batch, seq):
            raise RuntimeError(f"{type(module).__name__}: transformer.drop returned "
                               f"{tuple(getattr(output, 'shape', ()))}, expected [{batch}, {seq}, hidden] embeddings")
        flat = output.reshape(batch * seq, output.shape[-1])
        source = features.to(dtype=flat.dtype, device=flat.device)
        # Out of place: a new tensor, each image row written once (no write into a view of the embeddings).
        return flat.index_copy(0, rows.to(flat.device), source).view_as(output)

    handles = [module.wte.register_forward_pre_hook(true_ids, prepend=True, with_kwargs=True),
               module.drop.register_forward_hook(place_features)]
    try:
        yield fired
    finally:
        for handle in handles:
            handle.remove()


def forward_with_image_features(module: nn.Module, image_features: Callable[[nn.Module, List[ImageSpan]],
                                                                            torch.Tensor], args, kwargs):
    """A Qwen-VL-style model's forward with the image features placed OUT OF PLACE (see the module docstring):
    the shared body of the Monkey and TextMonkey VLM rules, which differ only in ``image_features``.

    ``module``'s original forward (its class's, or a previous instance forward) runs with ``args`` / ``kwargs``;
    on a first step with image spans, ``image_features(module, spans)`` returns the features of every span in
    order, ``[sum of the span lengths, hidden]`` (image-major, each span's ``length`` rows), and they replace the
    span positions of the embedding-dropout output (the start markers are masked from the original forward, so
    its own image branch stays off). Calls without image spans, with ``past_key_values`` or ``images``, or
    without ``input_ids`` go to the original forward untouched."""
    original = _original_forward(module)
    try:
        # The class forward's signature: a previous instance forward (a wrapper) is called the same way.
        bound = inspect.signature(type(module).forward.__get__(module, type(module))).bind(*args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # let the original report its own argument error
    input_ids = bound.arguments.get("input_ids")
    image_start_id = int(module.config.visual["image_start_id"])
    if (bound.arguments.get("past_key_values") is not None or bound.arguments.get("images") is not None
            or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or not bool((input_ids == image_start_id).any())):
        return original(*args, **kwargs)

    spans = find_image_spans(input_ids, image_start_id)
    features = image_features(module, spans)
    if features.dim() != 2 or features.shape[0] != sum(span.length for span in spans):
        raise RuntimeError(f"{type(module).__name__}: image features of shape {tuple(features.shape)} for spans "
                           f"of {sum(span.length for span in spans)} positions")
    seq = input_ids.shape[1]
    rows = torch.cat([torch.arange(span.start + 1, span.end) + span.sequence * seq for span in spans])

    bound.arguments["input_ids"] = input_ids.masked_fill(input_ids == image_start_id, image_start_id + 2)
    with _features_in_embeddings(module, input_ids, rows, features) as fired:
        output = original(*bound.args, **bound.kwargs)
    if fired["wte"] != 1 or fired["drop"] != 1:
        raise RuntimeError(
            f"{type(module).__name__}: the language model's forward called transformer.wte {fired['wte']} and "
            f"transformer.drop {fired['drop']} times; the rule needs Qwen's order (wte once, then drop once) to "
            f"place the image features. Unpatch the model (monkey_kernels.unpatch_model) to run its own forward."
        )
    return output


def _monkey_features(module: nn.Module, spans: List[ImageSpan]) -> torch.Tensor:
    """Monkey's image features: ``encode`` loads the windows and global views, ONE encoder pass runs them all."""
    visual = module.visual
    views, windows = gather_views(visual.encode([span.path for span in spans]), len(spans))
    queries = getattr(visual.attn_pool, "num_queries", None)
    _check_spans(spans, windows, _adapter_count(visual), queries)
    adapter_ids = [i for count in windows for i in list(range(count)) + [-1]]
    device = visual.conv1.weight.device
    features = visual(views, idx=torch.tensor(adapter_ids, dtype=torch.int64, device=device))  # the ONE pass
    if features.dim() != 3 or features.shape[0] != len(adapter_ids):
        raise RuntimeError(f"monkey_vlm: visual returned {tuple(features.shape)} for {len(adapter_ids)} views")
    if queries is None:
        _check_spans(spans, windows, len(adapter_ids), features.shape[1])
    return features.reshape(-1, features.shape[-1])  # image-major = the spans' row-major order


def monkey_vlm_forward(module: nn.Module, *args, **kwargs):
    """Patched ``MonkeyModel.forward`` (same signature as the instance's original, see the module docstring)."""
    return forward_with_image_features(module, _monkey_features, args, kwargs)


class MonkeyVLMForward(InstanceForward):
    """The forward the rule installs: :func:`monkey_vlm_forward` on ``module``; ``previous`` is an instance-level
    forward that was there before (e.g. an accelerate hook), restored by ``unpatch_model``."""

    def __init__(self, module: nn.Module, previous: Optional[Callable] = None) -> None:
        super().__init__(monkey_vlm_forward, module)
        self.previous = previous


# ---------------------------------------------------------------------------------------------------------
# Recognition by structure
# ---------------------------------------------------------------------------------------------------------
def _image_start_id(module: nn.Module) -> Optional[int]:
    visual_config = getattr(getattr(module, "config", None), "visual", None)
    if not isinstance(visual_config, Mapping):
        return None
    value = visual_config.get("image_start_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def looks_like_qwen_vl(module: nn.Module) -> bool:
    """A Qwen-VL-style model with a vision tower (``visual`` with ``encode``, ``config.visual['image_start_id']``,
    ``wte`` / ``drop`` / ``h`` / ``ln_f``): what the Monkey and TextMonkey VLM rules report on when they cannot
    patch it."""
    visual = getattr(module, "visual", None)
    return (isinstance(visual, nn.Module) and callable(getattr(visual, "encode", None))
            and _image_start_id(module) is not None
            and all(isinstance(getattr(module, name, None), nn.Module) for name in _LM_PARTS)
            and isinstance(module.h, nn.ModuleList))


def _has_param(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _unpatchable_reason(module: nn.Module) -> Optional[str]:
    """Why a Qwen-VL-style model cannot take the rule (``None``: it can)."""
    visual = module.visual
    missing = [name for name in _VISUAL_PARTS if not hasattr(visual, name)]
    if missing:
        return f"visual lacks {missing} (not a Monkey VisionTransformer)"
    blocks = getattr(visual.transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return "visual.transformer has no resblocks"
    if rule_of(visual.transformer) != "monkey_transformer" or not all(rule_of(b) == "monkey_block" for b in blocks):
        return ("visual.transformer was not patched by the monkey_transformer / monkey_block rules (see their "
                "entries): no batched encoder pass to run")
    visual_forward, problem = class_forward(visual)
    if problem is not None:
        return f"visual: {problem}"
    problem = (forward_parameters_problem(visual_forward, keywords=("idx",), first="x",
                                          expected="Monkey's VisionTransformer.forward(x, idx=None)")
               or only_forwarded_problem(visual_forward, "idx", "transformer"))
    if problem is not None:
        return f"visual: {problem}"
    original = type(module).forward
    if not (_has_param(original, "input_ids") and _has_param(original, "past_key_values")):
        return "forward takes no input_ids / past_key_values"
    forward = module.__dict__.get("forward")
    if forward is not None and not callable(forward):
        return "its instance forward is not callable"
    return None


def is_monkey_vlm(module: nn.Module) -> bool:
    """Whether ``module`` is a Monkey VLM (``MonkeyModel``-like) the ``monkey_vlm`` rule patches, judged by
    structure, with its vision blocks already fused."""
    return (not isinstance(module.__dict__.get("forward"), MonkeyVLMForward) and looks_like_qwen_vl(module)
            and _unpatchable_reason(module) is None)


def _skip_reason(module: nn.Module) -> Optional[str]:
    if isinstance(module.__dict__.get("forward"), MonkeyVLMForward) or not looks_like_qwen_vl(module):
        return None
    return _unpatchable_reason(module)


def _to_fused(module: nn.Module, options) -> nn.Module:
    module.forward = MonkeyVLMForward(module, previous=module.__dict__.get("forward"))
    return module


def restore_vlm_forward(module: nn.Module) -> nn.Module:
    """Removes the installed :class:`MonkeyVLMForward` (or a subclass's) from ``module`` and puts back the
    instance-level forward that was there before it, if any (e.g. an accelerate hook)."""
    installed = module.__dict__.pop("forward", None)
    if isinstance(installed, MonkeyVLMForward) and installed.previous is not None:
        module.forward = installed.previous
    return module


MONKEY_VLM_RULE = register_builtin_rule(PatchRule(
    "monkey_vlm", is_monkey_vlm, _to_fused, restore_vlm_forward,
    kinds={"vlm_one_encoder_pass": 1, "vlm_out_of_place_features": 1}, skip_reason=_skip_reason,
    after=("monkey_block",),
    description=("a Qwen-VL-style model (wte, drop, h, ln_f, config.visual['image_start_id']) whose visual is a "
                 "Monkey VisionTransformer with forward(x, idx=None) and a transformer the rules above patch"),
))
