r"""``MonkeyProcessor``: image placeholders in the text expanded to each image's exact token count.

A transformers ``ProcessorMixin`` holding a :class:`MonkeyImageProcessor` and any HF tokenizer. The text marks
each image with ``image_token`` (default ``"<image>"``, a single token of the tokenizer: add it with
``tokenizer.add_tokens(["<image>"], special_tokens=True)``); the ``k``-th placeholder of the batch (text order)
is the ``k``-th image, or ``images`` is a list per text. After tokenizing, each placeholder becomes a span of
``n = num_image_tokens[i]`` positions (``(tiles + 1) * 256`` with a global view; with ``tiling="textmonkey"``
``r + 256``, 768 for the release):

- ``span_format="generic"``: ``[image_token_id] * n``;
- ``span_format="monkey"`` (the Qwen-VL / Monkey span, reference §4): ``image_start_id``, the image reference's
  UTF-8 bytes as ids equal to the byte values (Qwen's tokenizer encodes them so; the model decodes them with
  ``bytes(ids)``), pad ids ``image_start_id + 2`` up to ``n`` positions, then ``image_start_id + 1``. The ``n``
  positions BETWEEN the markers, reference bytes included, are what the model overwrites with the features
  (``hidden_states[a + 1 : b] = images[idx]``); the markers stay text tokens. A reference of ``n`` bytes or more
  is an error (the release needs one pad to find the reference's end).

Outputs (a ``BatchFeature``): ``input_ids`` / ``attention_mask`` ``[B, S]`` (padded with the tokenizer's pad id,
on its ``padding_side``), ``image_token_mask`` ``[B, S]`` (True exactly where feature rows go), everything the
image processor returns (``pixel_values``, ``adapter_ids``, ``grids``, ``views_per_image``, ``num_image_tokens``
per image), ``images_per_sequence`` ``[B]`` and ``image_tokens_per_sequence`` ``[B]``.

With :func:`monkey_kernels.slp_embed`: ``placeholder_input_ids(batch)`` turns every masked position into
``processor.image_token_id`` (the pad id in the Monkey format, so reference bytes are overwritten as in the
release), and ``pack_image_features(features, batch)`` gives ``image_features [B, n_max, D]`` and the per-sequence
counts; then ``slp_embed(ids, table, W, b, image_features=..., image_token_id=processor.image_token_id,
num_image_tokens=counts, image_span_unit=tokens_per_view)`` writes row ``j`` of sequence ``b``'s features at its
``j``-th masked position: image by image in text order, each image's views tiles-then-global.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_monkey import MonkeyImageProcessor

__all__ = ["MonkeyProcessor", "SPAN_FORMATS"]

SPAN_FORMATS = ("generic", "monkey")
# Tokenizer arguments that would cut or re-pad the spans after expansion: refused rather than silently wrong.
_REFUSED_TEXT_KWARGS = ("truncation", "max_length", "padding_side", "pad_to_multiple_of", "return_overflowing_tokens")


class MonkeyProcessor(ProcessorMixin):
    r"""Image processor + tokenizer with exact image-placeholder prefill (see the module docstring).

    Args:
        image_processor: a :class:`MonkeyImageProcessor`.
        tokenizer: any HF tokenizer (``PreTrainedTokenizerBase``) in which ``image_token`` is one token.
        chat_template: optional, as every ``ProcessorMixin``.
        image_token: the text placeholder of an image (``"<image>"``).
        span_format: ``"generic"`` or ``"monkey"``.
        image_start_id: the Monkey span's start id (``config.visual['image_start_id']``; its end is ``+ 1`` and
            its pad ``+ 2``). ``None`` with ``span_format="monkey"``: the id of the tokenizer's ``"<img>"``
            token, which must be followed by ``"</img>"`` and ``"<imgpad>"`` (Qwen-VL's layout).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = "<image>",
                 span_format: str = "generic", image_start_id: Optional[int] = None, **kwargs) -> None:
        if not isinstance(image_processor, MonkeyImageProcessor):
            raise ValueError(f"image_processor must be a MonkeyImageProcessor, got {type(image_processor).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer must be a transformers tokenizer, got None")
        if span_format not in SPAN_FORMATS:
            raise ValueError(f"span_format must be one of {SPAN_FORMATS}, got {span_format!r}")
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"image_token must be a non-empty string, got {image_token!r}")
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token = image_token
        self.span_format = span_format
        self.placeholder_id = self._single_token_id(image_token, "image_token")
        if span_format == "monkey":
            if image_start_id is None:
                image_start_id = self._single_token_id("<img>", "image_start_id (from the '<img>' token)")
                for offset, name in ((1, "</img>"), (2, "<imgpad>")):
                    if self.tokenizer.convert_tokens_to_ids(name) != image_start_id + offset:
                        raise ValueError(
                            f"image_start_id: the tokenizer's '<img>' is id {image_start_id} but {name!r} is not "
                            f"id {image_start_id + offset}; pass image_start_id explicitly"
                        )
            if isinstance(image_start_id, bool) or not isinstance(image_start_id, int) or image_start_id < 0:
                raise ValueError(f"image_start_id must be a non-negative int, got {image_start_id!r}")
            if image_start_id + 2 >= len(self.tokenizer):
                raise ValueError(
                    f"image_start_id={image_start_id}: its pad id {image_start_id + 2} is outside the tokenizer's "
                    f"{len(self.tokenizer)} ids"
                )
        self.image_start_id = image_start_id

    def _single_token_id(self, token: str, what: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"{what}: {token!r} is not a token of the tokenizer; add it with "
                f"tokenizer.add_tokens([{token!r}], special_tokens=True)"
            )
        return token_id

    # -- ids ------------------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        """The id the fused embedding assembly treats as an image placeholder (``slp_embed(image_token_id=)``):
        ``image_token``'s id (generic) or the pad id ``image_start_id + 2`` (monkey)."""
        return self.placeholder_id if self.span_format == "generic" else self.image_start_id + 2

    @property
    def model_input_names(self) -> List[str]:
        return ["input_ids", "attention_mask", "image_token_mask"] + list(self.image_processor.model_input_names)

    def _span(self, num_tokens: int, ref: Optional[Union[str, bytes]], image_index: int):
        """``(ids, mask)`` of one image's span."""
        if self.span_format == "generic":
            if ref:
                raise ValueError(f"image_refs[{image_index}]: references are only written in span_format='monkey'")
            return [self.placeholder_id] * num_tokens, [True] * num_tokens
        ref_bytes = b"" if ref is None else (ref.encode("utf-8") if isinstance(ref, str) else bytes(ref))
        if len(ref_bytes) >= num_tokens:
            raise ValueError(
                f"image_refs[{image_index}] is {len(ref_bytes)} bytes, too long for its span of {num_tokens} "
                "positions (at least one pad must follow it)"
            )
        inner = list(ref_bytes) + [self.image_start_id + 2] * (num_tokens - len(ref_bytes))
        ids = [self.image_start_id] + inner + [self.image_start_id + 1]
        return ids, [False] + [True] * num_tokens + [False]

    # -- call -----------------------------------------------------------------------------------------------
    def __call__(self, images=None, text: Union[str, Sequence[str], None] = None, *, image_refs=None,
                 return_tensors: Optional[str] = "pt", padding: bool = True, add_special_tokens: bool = True,
                 **kwargs) -> BatchFeature:
        """Tokenize ``text``, process ``images`` and expand each placeholder (see the module docstring).

        Args:
            images: a flat list (the ``k``-th placeholder of the batch is image ``k``) or one list per text; any
                input of :class:`MonkeyImageProcessor`.
            text: a string or a list of strings.
            image_refs: ``span_format="monkey"``: one reference (path, URL; str or bytes) per image, written
                inside its span, or ``None`` (all pads).
            return_tensors: ``"pt"`` (tensors) or ``None`` (lists for the text fields).
            padding: pad to the longest sequence (with the tokenizer's pad id; attention mask 0 there).
            add_special_tokens: handed to the tokenizer.
            kwargs: :class:`MonkeyImageProcessor` options for this call (``tiling``, ``max_tiles``, ...), and
                other tokenizer arguments.
        Raises:
            ValueError: naming the text or image: placeholder count != image count, a refused tokenizer
                argument, a placeholder the tokenizer split, a too long reference, unequal lengths without
                padding.
        """
        image_options = {k: kwargs.pop(k) for k in list(kwargs) if k in MonkeyImageProcessor._OPTION_DEFAULTS
                         or k == "input_data_format"}
        for name in _REFUSED_TEXT_KWARGS:
            if name in kwargs:
                raise ValueError(f"{name} is not supported: it would cut or re-pad the image spans after expansion")
        if return_tensors not in (None, "pt", "torch"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if text is None:
            if images is None:
                raise ValueError("give images, text or both")
            return self.image_processor(images, return_tensors="pt", **image_options)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")

        placeholder_counts, per_text, flat_images = self._images_per_text(texts, images)
        if image_refs is not None:
            image_refs = list(image_refs)
            if len(image_refs) != len(flat_images):
                raise ValueError(f"image_refs must hold one reference per image ({len(flat_images)}), "
                                 f"got {len(image_refs)}")
        image_data: Dict[str, Any] = {}
        tokens_per_image: List[int] = []
        if flat_images:
            image_data = dict(self.image_processor(flat_images, return_tensors="pt", **image_options))
            tokens_per_image = image_data["num_image_tokens"].tolist()

        encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=False, **kwargs)["input_ids"]
        all_ids, all_masks = self._expand_placeholders(encoded, placeholder_counts, tokens_per_image, image_refs)
        attention = self._pad(all_ids, all_masks, padding, return_tensors)
        starts = [0]
        for count in per_text:
            starts.append(starts[-1] + count)
        tokens_per_sequence = [sum(tokens_per_image[starts[b]:starts[b + 1]]) for b in range(len(texts))]
        data: Dict[str, Any] = {"input_ids": all_ids, "attention_mask": attention, "image_token_mask": all_masks,
                                "images_per_sequence": per_text, "image_tokens_per_sequence": tokens_per_sequence}
        if return_tensors is not None:
            for key, dtype in (("input_ids", torch.int64), ("attention_mask", torch.int64),
                               ("image_token_mask", torch.bool), ("images_per_sequence", torch.int64),
                               ("image_tokens_per_sequence", torch.int64)):
                data[key] = torch.tensor(data[key], dtype=dtype)
        data.update(image_data)
        return BatchFeature(data=data)

    def _images_per_text(self, texts: List[str], images):
        """``(placeholders per text, images per text, the images flat in placeholder order)``: ``images`` is one
        list per text, or a flat list consumed in placeholder order; the counts must agree."""
        placeholder_counts = [t.count(self.image_token) for t in texts]
        nested = (images is not None and isinstance(images, (list, tuple)) and len(images) == len(texts)
                  and all(isinstance(item, (list, tuple)) for item in images))
        if nested:
            per_text = [len(item) for item in images]
            flat_images = [image for item in images for image in item]
        else:
            flat_images = [] if images is None else MonkeyImageProcessor._flatten(images)
            if len(flat_images) != sum(placeholder_counts):
                raise ValueError(
                    f"text holds {sum(placeholder_counts)} image placeholders ({self.image_token!r}; per text "
                    f"{placeholder_counts}) but {len(flat_images)} images were given"
                )
            per_text = placeholder_counts
        for t, (have, want) in enumerate(zip(placeholder_counts, per_text)):
            if have != want:
                raise ValueError(f"text[{t}] holds {have} image placeholders ({self.image_token!r}) but "
                                 f"{want} images were given for it")
        return placeholder_counts, per_text, flat_images

    def _expand_placeholders(self, encoded: List[List[int]], placeholder_counts: List[int],
                             tokens_per_image: List[int], image_refs) -> Tuple[List[List[int]], List[List[bool]]]:
        """``(ids, image_token_mask)`` per text: each placeholder token replaced by its image's span."""
        all_ids: List[List[int]] = []
        all_masks: List[List[bool]] = []
        image_index = 0
        for t, ids in enumerate(encoded):
            positions = [p for p, token in enumerate(ids) if token == self.placeholder_id]
            if len(positions) != placeholder_counts[t]:
                raise ValueError(
                    f"text[{t}]: {placeholder_counts[t]} occurrences of {self.image_token!r} became "
                    f"{len(positions)} placeholder tokens; make it a special token of the tokenizer"
                )
            out_ids: List[int] = []
            out_mask: List[bool] = []
            previous = 0
            for p in positions:
                out_ids += ids[previous:p]
                out_mask += [False] * (p - previous)
                ref = image_refs[image_index] if image_refs is not None else None
                span_ids, span_mask = self._span(tokens_per_image[image_index], ref, image_index)
                out_ids += span_ids
                out_mask += span_mask
                previous = p + 1
                image_index += 1
            out_ids += ids[previous:]
            out_mask += [False] * (len(ids) - previous)
            all_ids.append(out_ids)
            all_masks.append(out_mask)
        return all_ids, all_masks

    def _pad(self, all_ids: List[List[int]], all_masks: List[List[bool]], padding: bool,
             return_tensors: Optional[str]) -> List[List[int]]:
        """Pads ``all_ids`` / ``all_masks`` in place to the longest (``padding``, on the tokenizer's side);
        returns the attention masks."""
        lengths = [len(ids) for ids in all_ids]
        longest = max(lengths)
        attention = [[1] * n for n in lengths]
        if padding and any(n != longest for n in lengths):
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError("padding: the tokenizer has no pad_token; set one or pass padding=False")
            left = getattr(self.tokenizer, "padding_side", "right") == "left"
            for b, n in enumerate(lengths):
                fill = longest - n
                if left:
                    all_ids[b] = [pad_id] * fill + all_ids[b]
                    all_masks[b] = [False] * fill + all_masks[b]
                    attention[b] = [0] * fill + attention[b]
                else:
                    all_ids[b] = all_ids[b] + [pad_id] * fill
                    all_masks[b] = all_masks[b] + [False] * fill
                    attention[b] = attention[b] + [0] * fill
        elif return_tensors is not None and any(n != longest for n in lengths):
            raise ValueError(f"padding=False with return_tensors={return_tensors!r} needs equal lengths, got {lengths}")
        return attention

    # -- the fused embedding assembly -------------------------------------------------------------------
    def placeholder_input_ids(self, batch) -> torch.Tensor:
        """``input_ids`` with every feature position (``image_token_mask``) set to :attr:`image_token_id`:
        the ids ``slp_embed`` consumes (equal to ``input_ids`` in the generic format and without references)."""
        input_ids, mask = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["image_token_mask"])
        return torch.where(mask, torch.full_like(input_ids, self.image_token_id), input_ids)

    @staticmethod
    def pack_image_features(image_features, batch):
        """Per-sequence feature rows for ``slp_embed``.

        Args:
            image_features: the encoder's output for ``batch["pixel_values"]`` in view order: ``[total_views, Q,
                D]``, ``[total_image_tokens, D]``, or a list of one ``[num_image_tokens[i], D]`` per image.
            batch: this processor's output (``num_image_tokens``, ``images_per_sequence``).
        Returns:
            ``(features [B, n_max, D], counts [B])``: sequence ``b``'s images' rows in text order, zero-padded.
        Raises:
            ValueError: when the rows do not add up to the batch's ``num_image_tokens``.
        """
        per_image = torch.as_tensor(batch["num_image_tokens"]).tolist()
        per_sequence = torch.as_tensor(batch["images_per_sequence"]).tolist()
        if isinstance(image_features, (list, tuple)):
            if len(image_features) != len(per_image) or any(
                    f.dim() != 2 or f.shape[0] != n for f, n in zip(image_features, per_image)):
                raise ValueError(f"image_features: expected one [n_i, D] tensor per image with n_i = {per_image}, "
                                 f"got {[tuple(f.shape) for f in image_features]}")
            flat = torch.cat(list(image_features), dim=0)
        elif isinstance(image_features, torch.Tensor) and image_features.dim() in (2, 3):
            flat = image_features.reshape(-1, image_features.shape[-1])
        else:
            raise ValueError("image_features must be [total_views, Q, D], [total_tokens, D] or a list per image, "
                             f"got {getattr(image_features, 'shape', type(image_features))}")
        if flat.shape[0] != sum(per_image):
            raise ValueError(f"image_features holds {flat.shape[0]} rows but the images need {sum(per_image)} "
                             f"(num_image_tokens {per_image})")
        counts, start_image, start_row = [], 0, 0
        pieces = []
        for n_images in per_sequence:
            rows = sum(per_image[start_image:start_image + n_images])
            pieces.append(flat[start_row:start_row + rows])
            counts.append(rows)
            start_image += n_images
            start_row += rows
        n_max = max(1, max(counts))
        out = flat.new_zeros(len(per_sequence), n_max, flat.shape[-1])
        for b, piece in enumerate(pieces):
            out[b, : piece.shape[0]] = piece
        return out, torch.tensor(counts, dtype=torch.int64, device=flat.device)
