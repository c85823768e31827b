"""MonkeyImageProcessor / MonkeyProcessor: grids against independent re-implementations of each peer's rule,
pixels against per-image float64 (and PIL) references, save/load and Auto classes, token counts against the
features a tiny MonkeyVisionModel produces, placeholder prefill against the fused embedding assembly."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel, prepare_images
from monkey_kernels.processing import MonkeyImageProcessor, MonkeyProcessor
from monkey_kernels.processing.image_processing_monkey import _resize_pil_like

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------------
# Independent references of the peers' rules (written from their descriptions, loop by loop)
# ---------------------------------------------------------------------------------------------------------
def ref_monkey_grid(width, height, tile):
    """Nearest multiple of the tile per side, halves up, at least one: integer arithmetic only."""
    return max(1, (2 * width + tile) // (2 * tile)), max(1, (2 * height + tile) // (2 * tile))


def ref_internvl_grid(width, height, min_num, max_num, image_size):
    """InternVL's dynamic_preprocess grid choice, transcribed loop by loop. Returns ``(grid, tie_replaced)``."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area, replaced = float("inf"), (1, 1), width * height, False
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio, replaced = ratio, True
    return best_ratio, replaced


def ref_budget(width, height, max_pixels, min_pixels):
    """LLaMA-Factory's _preprocess_image size rule."""
    if max_pixels is not None and width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if min_pixels is not None and width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    return width, height


def sweep_sizes():
    """Small sizes (every exact tie of small ratios), extreme aspect ratios, tiny and huge."""
    sizes = [(w, h) for w in range(1, 41, 3) for h in range(1, 41, 2)]
    sizes += [(10000, 30), (30, 10000), (1, 1), (20000, 20000), (1, 20000), (20000, 1), (1544, 896), (1344, 896),
              (896, 896), (448, 448), (1250, 1000), (125, 100), (1000, 1250), (4480, 448), (449, 448), (671, 448),
              (672, 448), (673, 448), (224, 224), (223, 223), (3000, 2000), (500, 1000)]
    return sizes


# ---------------------------------------------------------------------------------------------------------
# Grids from sizes
# ---------------------------------------------------------------------------------------------------------
def test_release_example_1544x896():
    proc = MonkeyImageProcessor(tiling="monkey", resolution=(1544, 896))
    image = torch.randint(0, 256, (3, 896, 1544), dtype=torch.uint8)
    out = proc(image, return_tensors="pt")
    assert out["grids"].tolist() == [[3, 2]]
    assert out["adapter_ids"].tolist() == [0, 1, 2, 3, 4, 5, -1]
    assert out["num_image_tokens"].tolist() == [1792]
    assert out["views_per_image"].tolist() == [7]
    assert tuple(out["pixel_values"].shape) == (7, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    assert proc.get_number_of_image_tokens(896, 896, resolution=(896, 896)) == 1280


@pytest.mark.parametrize("tile", [448, 14])
def test_monkey_grids_match_reference(tile):
    proc = MonkeyImageProcessor(tile_size=tile, resolution=None)
    sizes = sweep_sizes()
    for (w, h), lay in zip(sizes, proc.layouts(sizes)):
        cols, rows = ref_monkey_grid(w, h, tile)
        assert lay.grid == (cols, rows), (w, h)
        assert lay.adapter_ids == tuple(range(cols * rows)) + (-1,)
        assert lay.num_image_tokens == (cols * rows + 1) * 256
        assert lay.resized_size == (cols * tile, rows * tile)
    # A fixed resolution: the grid ignores the image size.
    fixed = MonkeyImageProcessor(tile_size=tile, resolution=(3 * tile + 1, tile // 2))
    assert {lay.grid for lay in fixed.layouts(sizes)} == {ref_monkey_grid(3 * tile + 1, tile // 2, tile)}


@pytest.mark.parametrize("tile,min_num,max_num,thumb", [(448, 1, 12, True), (8, 1, 6, True), (8, 2, 2, False),
                                                         (8, 3, 9, True), (448, 1, 1, True), (5, 4, 30, False)])
def test_dynamic_grids_match_internvl(tile, min_num, max_num, thumb):
    proc = MonkeyImageProcessor(tiling="dynamic", tile_size=tile, min_tiles=min_num, max_tiles=max_num,
                                use_thumbnail=thumb)
    sizes = sweep_sizes()
    ties = 0
    for (w, h), lay in zip(sizes, proc.layouts(sizes)):
        (cols, rows), replaced = ref_internvl_grid(w, h, min_num, max_num, tile)
        ties += replaced
        assert lay.grid == (cols, rows), (w, h)
        has_thumb = thumb and cols * rows != 1
        assert lay.num_views == cols * rows + has_thumb
        assert lay.adapter_ids == tuple(range(cols * rows)) + ((-1,) if has_thumb else ())
        assert lay.num_image_tokens == lay.num_views * 256
    if max_num > 1 and min_num < max_num:
        assert ties > 0, "the sweep must exercise InternVL's tie rule"


def test_dynamic_exact_ties():
    # 1250x1000: aspect 1.25 is exactly between (1, 1) and (3, 2)-ratio 1.5; the area allows the 6-tile grid.
    proc = MonkeyImageProcessor(tiling="dynamic", max_tiles=6)
    assert proc.layout(1250, 1000).grid == (3, 2) == ref_internvl_grid(1250, 1000, 1, 6, 448)[0]
    # The same ratio with too few pixels keeps the first (smaller) grid.
    assert proc.layout(125, 100).grid == (1, 1) == ref_internvl_grid(125, 100, 1, 6, 448)[0]


@pytest.mark.parametrize("max_pixels,min_pixels", [(768 * 768, 32 * 32), (448 * 448, None), (None, 1000 * 1000),
                                                   (500_000, 250_000)])
def test_pixel_budget_matches_llamafactory(max_pixels, min_pixels):
    proc = MonkeyImageProcessor(tiling="dynamic", image_max_pixels=max_pixels, image_min_pixels=min_pixels)
    sizes = [s for s in sweep_sizes() if s not in ((1, 20000), (20000, 1))]
    sizes += [(1999, 1001), (7, 3), (4000, 3000), (768, 768), (769, 768)]
    for (w, h), lay in zip(sizes, proc.layouts(sizes)):
        bw, bh = ref_budget(w, h, max_pixels, min_pixels)
        assert (lay.budget_width, lay.budget_height) == (bw, bh), (w, h)
        assert lay.grid == ref_internvl_grid(bw, bh, 1, 12, 448)[0], (w, h)
    monkey = MonkeyImageProcessor(resolution=None, image_max_pixels=max_pixels, image_min_pixels=min_pixels)
    for (w, h), lay in zip(sizes, monkey.layouts(sizes)):
        assert lay.grid == ref_monkey_grid(*ref_budget(w, h, max_pixels, min_pixels), 448)


# ---------------------------------------------------------------------------------------------------------
# Pixels against per-image references
# ---------------------------------------------------------------------------------------------------------
def ref_normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    return (x - torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)) / torch.tensor(std, dtype=x.dtype).view(3, 1, 1)


def ref_resize64(x, height, width):
    """float64 PIL-style bicubic of one [3, h, w] image."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bicubic", antialias=True)[0]


def ref_crop(x, cols, rows, tile):
    return [x[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]


def ref_views_float(image, proc_kwargs, tile):
    """Per-image float64 reference: budget resize, grid resize, crop row by row, global view / thumbnail."""
    x = image.double()
    h, w = x.shape[1:]
    bw, bh = ref_budget(w, h, proc_kwargs.get("image_max_pixels"), proc_kwargs.get("image_min_pixels"))
    x = ref_resize64(x, bh, bw)
    if proc_kwargs.get("tiling", "monkey") == "monkey":
        res = proc_kwargs.get("resolution", (896, 896)) or (bw, bh)
        cols, rows = ref_monkey_grid(res[0], res[1], tile)
        big = ref_normalize(ref_resize64(x, rows * tile, cols * tile))
        glob = big if big.shape[-2:] == (tile, tile) else F.interpolate(big[None], size=(tile, tile), mode="bicubic")[0]
        return ref_crop(big, cols, rows, tile) + [glob]
    (cols, rows), _ = ref_internvl_grid(bw, bh, proc_kwargs.get("min_tiles", 1), proc_kwargs.get("max_tiles", 12), tile)
    views = ref_crop(ref_normalize(ref_resize64(x, rows * tile, cols * tile)), cols, rows, tile)
    if proc_kwargs.get("use_thumbnail", True) and cols * rows > 1:
        views.append(ref_normalize(ref_resize64(x, tile, tile)))
    return views


@pytest.mark.parametrize("proc_kwargs", [
    dict(tiling="monkey", resolution=(40, 24)),
    dict(tiling="monkey", resolution=None),
    dict(tiling="monkey", resolution=(16, 16)),
    dict(tiling="dynamic", max_tiles=6),
    dict(tiling="dynamic", max_tiles=4, use_thumbnail=False, image_max_pixels=700, image_min_pixels=300),
    dict(tiling="monkey", resolution=None, image_max_pixels=900),
])
def test_pixels_match_per_image_reference_float(proc_kwargs):
    tile = 16
    proc = MonkeyImageProcessor(tile_size=tile, **proc_kwargs)
    # Mixed sizes, two of them equal (batched together), one already at a grid size.
    sizes = [(37, 23), (37, 23), (16, 48), (64, 32), (9, 50), (70, 41)]
    images = [torch.rand(3, h, w) for (w, h) in sizes]
    out = proc(images, return_tensors="pt")
    expected = [v for image in images for v in ref_views_float(image, proc_kwargs, tile)]
    assert out["pixel_values"].shape[0] == len(expected) == int(out["views_per_image"].sum())
    torch.testing.assert_close(out["pixel_values"].double(), torch.stack(expected), atol=2e-5, rtol=1e-5)


def test_float_monkey_equals_prepare_images():
    tile = 14
    proc = MonkeyImageProcessor(tile_size=tile, resolution=(42, 28))
    images = [torch.rand(3, 30, 50), torch.rand(3, 61, 17)]
    out = proc(images, return_tensors="pt")
    for i, image in enumerate(images):
        reference, grid = prepare_images(image, resolution=(42, 28), tile_size=tile)
        assert (grid.n_cols, grid.n_rows) == tuple(out["grids"][i].tolist())
        views = out["pixel_values"][i * 7:(i + 1) * 7]
        torch.testing.assert_close(views, reference[0], atol=1e-6, rtol=1e-6)


def smooth_uint8(h, w):
    """A natural-ish image: low-resolution noise, upsampled (PIL and torch agree to a grey level on it)."""
    low = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), dtype=torch.float64)
    return (F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] * 255).round().to(torch.uint8)


def test_uint8_pixels_match_pil():
    Image = pytest.importorskip("PIL.Image")
    tile = 16
    for proc_kwargs in (dict(tiling="monkey", resolution=(48, 32)),
                        dict(tiling="dynamic", max_tiles=6, image_max_pixels=1500)):
        proc = MonkeyImageProcessor(tile_size=tile, **proc_kwargs)
        images = [smooth_uint8(45, 70), smooth_uint8(90, 31)]
        pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        out_tensor = proc(images, return_tensors="pt")["pixel_values"]
        out_pil = proc(pils, return_tensors="pt")["pixel_values"]
        out_numpy = proc([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(out_tensor, out_pil, atol=0, rtol=0)
        torch.testing.assert_close(out_tensor, out_numpy, atol=0, rtol=0)
        expected = []
        for pil in pils:
            bw, bh = ref_budget(pil.width, pil.height, proc_kwargs.get("image_max_pixels"), None)
            if (bw, bh) != pil.size:
                pil = pil.resize((bw, bh), Image.BICUBIC)  # LLaMA-Factory's resize

            def to_tensor(p):
                return torch.from_numpy(np.array(p)).permute(2, 0, 1).double() / 255

            if proc_kwargs["tiling"] == "monkey":
                cols, rows = ref_monkey_grid(48, 32, tile)
                big = ref_normalize(to_tensor(pil.resize((cols * tile, rows * tile), Image.BICUBIC)))
                expected += ref_crop(big, cols, rows, tile)
                expected.append(F.interpolate(big[None], size=(tile, tile), mode="bicubic")[0])
            else:
                (cols, rows), _ = ref_internvl_grid(bw, bh, 1, 6, tile)
                big = pil.resize((cols * tile, rows * tile), Image.BICUBIC)
                expected += [ref_normalize(to_tensor(big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))))
                             for r in range(rows) for c in range(cols)]
                expected.append(ref_normalize(to_tensor(pil.resize((tile, tile), Image.BICUBIC))))
        expected = torch.stack(expected)
        # PIL to a grey level per resize (two chained resizes with the budget: up to ~2), most pixels exact.
        level = 1.0 / 255 / min(CLIP_STD)
        diff = (out_tensor.double() - expected).abs()
        assert diff.max() <= 3 * level, float(diff.max() / level)
        assert diff.mean() <= 0.15 * level  # most pixels equal, a few one level off


def test_input_kinds_agree():
    Image = pytest.importorskip("PIL.Image")
    proc = MonkeyImageProcessor(tile_size=8, tiling="dynamic", max_tiles=4)
    gray = torch.randint(0, 256, (13, 29), dtype=torch.uint8)
    rgb = gray[None].expand(3, -1, -1).contiguous()
    from_pil = proc(Image.fromarray(gray.numpy(), mode="L"), return_tensors="pt")["pixel_values"]  # convert("RGB")
    torch.testing.assert_close(from_pil, proc(rgb, return_tensors="pt")["pixel_values"], atol=0, rtol=0)
    image = torch.rand(3, 13, 29)
    from_numpy_chw = proc(image.numpy(), return_tensors="pt")["pixel_values"]
    from_batch = proc(image[None].expand(2, -1, -1, -1), return_tensors="pt")
    torch.testing.assert_close(from_numpy_chw, proc(image, return_tensors="pt")["pixel_values"], atol=0, rtol=0)
    assert from_batch["views_per_image"].tolist() == [from_numpy_chw.shape[0]] * 2
    hwc = proc(image.permute(1, 2, 0).numpy(), input_data_format="channels_last", return_tensors="pt")
    torch.testing.assert_close(hwc["pixel_values"], from_numpy_chw, atol=0, rtol=0)


def test_uint8_fallback_resize_matches_native():
    x = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    for size in ((64, 96), (20, 30), (37, 20), (80, 53)):
        native = _resize_pil_like(x, *size, native_uint8=True)
        fallback = _resize_pil_like(x, *size, native_uint8=False)
        assert native.dtype == fallback.dtype == torch.uint8
        diff = (native.int() - fallback.int()).abs()
        # A one-level difference after the first pass can grow past 1 through bicubic's negative lobes.
        assert diff.max() <= 2 and diff.float().mean() < 0.05


def test_huge_and_tiny_images_by_size():
    proc = MonkeyImageProcessor(tiling="dynamic", image_max_pixels=768 * 768, image_min_pixels=32 * 32)
    huge, tiny = proc.layouts([(20000, 20000), (1, 1)])
    # int() truncation, exactly as LLaMA-Factory: sqrt(768**2 / 20000**2) * 20000 = 767.99... -> 767.
    assert (huge.budget_width, huge.budget_height) == ref_budget(20000, 20000, 768 * 768, 32 * 32) == (767, 767)
    assert huge.grid == ref_internvl_grid(767, 767, 1, 12, 448)[0] == (2, 2) and huge.num_views == 5
    assert (tiny.budget_width, tiny.budget_height) == ref_budget(1, 1, 768 * 768, 32 * 32) == (32, 32)
    # A real 1x1 image is processed (upscaled to the tile).
    out = MonkeyImageProcessor(tile_size=8, resolution=None)(torch.rand(3, 1, 1), return_tensors="pt")
    assert out["grids"].tolist() == [[1, 1]] and out["pixel_values"].shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# Save / load, Auto classes
# ---------------------------------------------------------------------------------------------------------
def test_save_load_and_auto_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    proc = MonkeyImageProcessor(tiling="dynamic", tile_size=16, min_tiles=2, max_tiles=5, use_thumbnail=False,
                                image_max_pixels=5000, image_min_pixels=300, resolution=None,
                                image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4), tokens_per_view=4)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    for loaded in (MonkeyImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is MonkeyImageProcessor
        assert loaded.to_dict() == proc.to_dict()
        images = [torch.rand(3, 30, 70), torch.randint(0, 256, (3, 50, 20), dtype=torch.uint8)]
        a, b = proc(images, return_tensors="pt"), loaded(images, return_tensors="pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    overridden = AutoImageProcessor.from_pretrained(tmp_path, max_tiles=3)
    assert overridden.max_tiles == 3 and overridden.resolution is None


def test_per_call_overrides_and_numpy_output():
    proc = MonkeyImageProcessor(tile_size=8)
    image = torch.rand(3, 20, 30)
    out = proc(image, tiling="dynamic", max_tiles=2, use_thumbnail=False, return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["grids"].tolist() == [[2, 1]]
    assert proc.tiling == "monkey"  # the override was for that call only
    # do_normalize=False: the same views in [0, 1] (uint8 and float inputs mixed in one batch).
    images = [torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8), torch.rand(3, 11, 13)]
    normalized = proc(images, return_tensors="pt")["pixel_values"].double()
    raw = proc(images, do_normalize=False, return_tensors="pt")["pixel_values"].double()
    assert raw.min() >= -0.5 and raw.max() <= 1.5  # bicubic may overshoot a little on the float image
    torch.testing.assert_close(ref_normalize(raw), normalized, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Token counts against the features of a tiny MonkeyVisionModel
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Run a tiny model on one thread: its ops are microseconds, and thread hand-offs on a loaded 2-core
    machine cost 100x that. Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vision_model():
    config = MonkeyVisionConfig(tile_size=28, image_size=56, patch_size=14, width=16, layers=1, heads=2,
                                mlp_ratio=2.0, num_positions=4, n_queries=4, output_dim=16, lora_repeat_num=6,
                                lora_dropout=0.0)
    return MonkeyVisionModel(config).eval()


def encode_per_view(model, pixel_values, adapter_ids):
    """The release's loop: one pass per view with its adapter (``None`` for -1)."""
    return torch.cat([model.encode_views(pixel_values[v:v + 1], idx=None if a < 0 else a)[0]
                      for v, a in enumerate(adapter_ids.tolist())])


@pytest.mark.parametrize("proc_kwargs", [dict(resolution=(84, 56)), dict(resolution=None),
                                         dict(tiling="dynamic", max_tiles=6, use_thumbnail=False),
                                         dict(tiling="dynamic", max_tiles=6)])
def test_num_image_tokens_match_model_features(proc_kwargs, one_thread):
    model = tiny_vision_model()
    proc = MonkeyImageProcessor.from_vision_config(model.config, **proc_kwargs)
    images = [torch.rand(3, 56, 84), torch.rand(3, 30, 30), torch.rand(3, 60, 28)]
    out = proc(images, return_tensors="pt")
    start = 0
    with torch.no_grad():
        for i, views in enumerate(out["views_per_image"].tolist()):
            pv, ids = out["pixel_values"][start:start + views], out["adapter_ids"][start:start + views]
            feats = encode_per_view(model, pv, ids)
            assert feats.shape[0] == int(out["num_image_tokens"][i])
            if proc_kwargs.get("tiling", "monkey") == "monkey":  # the model's own forward: tiles then global
                torch.testing.assert_close(model(pv[None])[0], feats)
            start += views


# ---------------------------------------------------------------------------------------------------------
# MonkeyProcessor: placeholder prefill
# ---------------------------------------------------------------------------------------------------------
WORDS = ["hello", "world", "a", "photo", "of", "describe", "and", "then"]


def local_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}  # byte ids 0..255, as Qwen's references are written
    for token in ["[PAD]", "[UNK]", "<s>", "</s>", "<img>", "</img>", "<imgpad>", "<image>"] + WORDS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>")
    fast.add_tokens(["<image>", "<img>", "</img>", "<imgpad>"], special_tokens=True)
    return fast


def reference_expand(text, tokenizer, counts, fmt, refs=None):
    """Independent expansion: split the text at the placeholder, tokenize the pieces, splice spans."""
    pieces = text.split("<image>")
    ids = [tokenizer.bos_token_id]
    mask = [False]
    for k, piece in enumerate(pieces):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece.strip() else []
        mask += [False] * (len(ids) - len(mask))
        if k < len(counts):
            n = counts[k]
            if fmt == "generic":
                ids += [tokenizer.convert_tokens_to_ids("<image>")] * n
                mask += [True] * n
            else:
                start = tokenizer.convert_tokens_to_ids("<img>")
                ref = list((refs[k] if refs else "").encode())
                ids += [start] + ref + [start + 2] * (n - len(ref)) + [start + 1]
                mask += [False] + [True] * n + [False]
    return ids, mask


@pytest.mark.parametrize("fmt", ["generic", "monkey"])
def test_prefill_matches_features_and_slp_embed(fmt, one_thread):
    from monkey_kernels import slp_embed

    model = tiny_vision_model()
    tokenizer = local_tokenizer()
    image_proc = MonkeyImageProcessor.from_vision_config(model.config, resolution=None)
    proc = MonkeyProcessor(image_proc, tokenizer, span_format=fmt)
    texts = ["describe <image> and <image> then", "hello <image> world", "a photo"]
    images = [[torch.rand(3, 56, 84), torch.rand(3, 28, 28)], [torch.rand(3, 60, 30)], []]
    refs = ["a.png", "é.j", "d/c.png"] if fmt == "monkey" else None  # spans of 28, 8 and 12 positions
    batch = proc(images=images, text=texts, image_refs=refs, return_tensors="pt")

    per_image = batch["num_image_tokens"].tolist()
    assert batch["images_per_sequence"].tolist() == [2, 1, 0]
    assert batch["image_tokens_per_sequence"].tolist() == [per_image[0] + per_image[1], per_image[2], 0]
    assert batch["image_token_mask"].sum(1).tolist() == batch["image_tokens_per_sequence"].tolist()
    flat_refs = refs or [None] * 3
    starts = [0, 2, 3, 3]
    for b, text in enumerate(texts):
        counts = per_image[starts[b]:starts[b + 1]]
        ids, mask = reference_expand(text, tokenizer, counts, fmt, flat_refs[starts[b]:starts[b + 1]] if refs else None)
        n = len(ids)
        assert batch["input_ids"][b, :n].tolist() == ids
        assert batch["image_token_mask"][b, :n].tolist() == mask
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()

    # Features in view order -> slp_embed writes row j of a sequence at its j-th masked position.
    with torch.no_grad():
        feats = encode_per_view(model, batch["pixel_values"], batch["adapter_ids"])
        assert feats.shape[0] == sum(per_image)
        packed, counts = proc.pack_image_features(feats, batch)
        assert counts.tolist() == batch["image_tokens_per_sequence"].tolist()
        ids = proc.placeholder_input_ids(batch)
        table = torch.randn(len(tokenizer), model.config.output_dim)
        proj_w, proj_b = torch.randn(model.config.output_dim, 4), torch.randn(model.config.output_dim)
        embeds = slp_embed(ids, table, proj_w, proj_b, box_token_id=tokenizer.unk_token_id, image_features=packed,
                           image_token_id=proc.image_token_id, num_image_tokens=counts,
                           image_span_unit=model.config.n_queries, backend="torch")
    # The release's write, out of place: text rows from the table, every span position from the features.
    expected = table[batch["input_ids"]]
    offset = 0
    for b in range(len(texts)):
        positions = batch["image_token_mask"][b].nonzero().flatten()
        expected[b, positions] = feats[offset:offset + len(positions)]
        offset += len(positions)
    torch.testing.assert_close(embeds, expected)


def test_processor_save_load_and_auto_processor(tmp_path):
    from transformers import AutoProcessor

    proc = MonkeyProcessor(MonkeyImageProcessor(tile_size=8, resolution=None, tokens_per_view=4), local_tokenizer(),
                           span_format="monkey")
    proc.save_pretrained(tmp_path)
    texts, images = ["hello <image> world"], [torch.rand(3, 20, 9)]
    expected = proc(images=images, text=texts, image_refs=["x.png"])
    for loaded in (MonkeyProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is MonkeyProcessor and type(loaded.image_processor) is MonkeyImageProcessor
        assert loaded.span_format == "monkey" and loaded.image_start_id == proc.image_start_id
        assert loaded.image_processor.to_dict() == proc.image_processor.to_dict()
        got = loaded(images=images, text=texts, image_refs=["x.png"])
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_processor_left_padding_and_flat_images():
    tokenizer = local_tokenizer()
    tokenizer.padding_side = "left"
    proc = MonkeyProcessor(MonkeyImageProcessor(tile_size=8, resolution=(16, 8), tokens_per_view=4), tokenizer)
    batch = proc(images=[torch.rand(3, 9, 9), torch.rand(3, 9, 9)], text=["<image> <image> hello", "world"])
    assert batch["image_tokens_per_sequence"].tolist() == [24, 0]
    # Sequence 0 is <s>, 2 x 12 image positions, "hello"; sequence 1 (<s> world) is padded on the left.
    assert batch["attention_mask"][1].tolist() == [0] * 24 + [1, 1]
    assert batch["input_ids"][1].tolist() == [tokenizer.pad_token_id] * 24 + tokenizer("world")["input_ids"]
    assert batch["image_token_mask"][0].tolist() == [False] + [True] * 24 + [False]


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(tiling="anyres"), "tiling"),
    (dict(tile_size=0), "tile_size"),
    (dict(tile_size=-448), "tile_size"),
    (dict(resolution=(0, 896)), "resolution width"),
    (dict(resolution=(896, -1)), "resolution height"),
    (dict(resolution=(896,)), "resolution"),
    (dict(min_tiles=0), "min_tiles"),
    (dict(min_tiles=5, max_tiles=4), "min_tiles=5"),
    (dict(image_max_pixels=448 * 448 - 1), "image_max_pixels"),
    (dict(image_min_pixels=0), "image_min_pixels"),
    (dict(image_max_pixels=300_000, image_min_pixels=400_000), "image_min_pixels"),
    (dict(image_std=(1.0, 0.0, 1.0)), "image_std"),
    (dict(image_mean=(0.5, 0.5)), "image_mean"),
    (dict(use_thumbnail="yes"), "use_thumbnail"),
    (dict(tokens_per_view=0), "tokens_per_view"),
    (dict(bogus_option=1), "bogus_option"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        MonkeyImageProcessor(**options)
    with pytest.raises(ValueError, match=match):  # the same check per call
        MonkeyImageProcessor()(torch.rand(3, 8, 8), **options)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(3, 0, 10), r"images\[1\] is empty"),
    (torch.rand(1, 10, 10), r"images\[1\] must be RGB"),
    (torch.rand(4, 10, 10), r"images\[1\] must be RGB"),
    (torch.rand(10, 10), r"images\[1\] must be an RGB image"),
    (torch.rand(3, 10, 10) * 255, r"images\[1\] is float with values"),
    (torch.full((3, 4, 4), float("nan")), r"images\[1\] has non-finite"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), r"images\[1\] must be uint8 or float"),
    (np.zeros((5, 5, 4), dtype=np.uint8), r"images\[1\] must be RGB"),
    ("not an image", r"images\[1\] must be a torch.Tensor"),
])
def test_bad_images_name_the_image(bad, match):
    proc = MonkeyImageProcessor(tile_size=8)
    with pytest.raises(ValueError, match=match):
        proc([torch.rand(3, 8, 8), bad])


def test_bad_batches_and_budget_truncation():
    proc = MonkeyImageProcessor(tile_size=8)
    with pytest.raises(ValueError, match="at least one image"):
        proc([])
    with pytest.raises(ValueError, match="return_tensors"):
        proc(torch.rand(3, 8, 8), return_tensors="jax")
    squeeze = MonkeyImageProcessor(tile_size=8, image_max_pixels=100)
    with pytest.raises(ValueError, match=r"images\[2\]: image_max_pixels=100"):
        squeeze.layouts([(10, 10), (20, 5), (100000, 2)])
    with pytest.raises(ValueError, match=r"images\[0\]: width"):
        proc.layout(0, 10)
    with pytest.raises(ValueError, match=r"images\[3\]: height"):
        proc.layout(10, -2, image_index=3)


def test_processor_bad_inputs():
    tokenizer = local_tokenizer()
    image_proc = MonkeyImageProcessor(tile_size=8, resolution=(8, 8), tokens_per_view=4)
    proc = MonkeyProcessor(image_proc, tokenizer, span_format="monkey")
    image = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="2 image placeholders"):
        proc(images=[image], text=["<image> <image>"])
    with pytest.raises(ValueError, match=r"text\[1\] holds 0 image placeholders"):
        proc(images=[[image], [image]], text=["<image>", "hello"])
    with pytest.raises(ValueError, match=r"image_refs\[0\] is 8 bytes"):
        proc(images=[image], text=["<image>"], image_refs=["12345678"])  # span of 8: no room for a pad
    with pytest.raises(ValueError, match="image_refs must hold one reference per image"):
        proc(images=[image], text=["<image>"], image_refs=["a", "b"])
    with pytest.raises(ValueError, match="truncation"):
        proc(images=[image], text=["<image>"], truncation=True)
    with pytest.raises(ValueError, match="span_format"):
        MonkeyProcessor(image_proc, tokenizer, span_format="llava")
    with pytest.raises(ValueError, match="image_token"):
        MonkeyProcessor(image_proc, tokenizer, image_token="<missing>")
    with pytest.raises(ValueError, match="image_processor must be a MonkeyImageProcessor"):
        MonkeyProcessor(None, tokenizer)
    with pytest.raises(ValueError, match="image_start_id"):
        MonkeyProcessor(image_proc, tokenizer, span_format="monkey", image_start_id=len(tokenizer) - 2)
    with pytest.raises(ValueError, match=r"image_refs\[0\]: references"):
        MonkeyProcessor(image_proc, tokenizer)(images=[image], text=["<image>"], image_refs=["a"])
