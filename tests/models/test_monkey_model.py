"""The reference Monkey vision encoder (``MonkeyVisionModel``) and the image preparation helper: release shapes and
names, the per-tile loop, bad input (named in the error), and a NaN that must stay in its own image."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from monkey_kernels.models import (
    MonkeyVisionConfig,
    MonkeyVisionModel,
    prepare_images,
    release_vision_state_dict,
    tile_grid,
)
from conftest import available_backends, kernel_device
from monkey_kernels import patch_model
from monkey_kernels.models.monkey_vision import get_2d_sincos_pos_embed
from helpers.monkey_models import VisualAttentionBlock, make_model, randomize_, tiny_config, views

BACKENDS = available_backends()


# ---------------------------------------------------------------------------------------------------------
# Configuration and the preparation helper's arithmetic
# ---------------------------------------------------------------------------------------------------------
def test_release_config_shapes():
    cfg = MonkeyVisionConfig()
    assert (cfg.width, cfg.layers, cfg.heads, cfg.width // cfg.heads) == (1664, 48, 16, 104)
    assert cfg.mlp_width == 8192 and cfg.tokens_per_tile == 1024 and cfg.resampler_heads == 32
    assert (cfg.tile_size, cfg.patch_size, cfg.num_positions) == (448, 14, 256)
    assert (cfg.n_queries, cfg.output_dim) == (256, 4096)
    assert (cfg.lora_repeat_num, cfg.attn_lora_rank, cfg.mlp_lora_rank, cfg.lora_dropout) == (4, 16, 32, 0.05)


@pytest.mark.parametrize("width, height, cols, rows, adapters, tokens", [
    (896, 896, 2, 2, 4, 1280),
    (1344, 896, 3, 2, 6, 1792),  # width x height
])
def test_tile_grid_release_sizes(width, height, cols, rows, adapters, tokens):
    grid = tile_grid(width, height, MonkeyVisionConfig())
    assert (grid.n_cols, grid.n_rows, grid.num_adapters, grid.num_image_tokens) == (cols, rows, adapters, tokens)
    assert grid.num_image_tokens == (grid.num_tiles + 1) * 256
    assert grid.resized_size == (cols * 448, rows * 448)


def test_tile_grid_rounding_rule():
    # nearest multiple of the tile, halves up, at least one tile per side
    for pixels in (1, 100, 223, 224, 447, 448, 671, 672, 900, 1000, 1343, 1344, 2000):
        expected = max(1, math.floor(pixels / 448 + 0.5))
        assert tile_grid(pixels, 448).n_cols == expected
        assert tile_grid(448, pixels).n_rows == expected
    assert tile_grid(224, 672).n_cols == 1 and tile_grid(224, 672).n_rows == 2  # 0.5 -> 1, 1.5 -> 2
    assert tile_grid(223, 223).num_tiles == 1  # below half a tile: still one tile
    tiny = tiny_config()
    assert tile_grid(112, 168, tiny).n_cols == 2 and tile_grid(112, 168, tiny).n_rows == 3
    assert tile_grid(112, 112, tiny).num_image_tokens == 5 * tiny.n_queries
    for bad in (0, -448, 448.0, True):
        with pytest.raises(ValueError, match="width"):
            tile_grid(bad, 448)
        with pytest.raises(ValueError, match="height"):
            tile_grid(448, bad)


def test_prepare_images_tiles_row_major_and_global_view():
    cfg = tiny_config()
    images = torch.rand(2, 3, 90, 200)  # resized to 2 rows x 3 cols of 56 px for (168, 112)
    pixel_values, grid = prepare_images(images, (168, 112), cfg, normalize=False)
    assert (grid.n_cols, grid.n_rows) == (3, 2)
    assert pixel_values.shape == (2, 7, 3, 56, 56) and pixel_values.dtype == images.dtype
    resized = F.interpolate(images, size=(112, 168), mode="bicubic", align_corners=False, antialias=True)
    for row in range(2):
        for col in range(3):
            tile = resized[:, :, row * 56:(row + 1) * 56, col * 56:(col + 1) * 56]
            torch.testing.assert_close(pixel_values[:, grid.adapter_index(row, col)], tile)
    global_view = F.interpolate(resized, size=(56, 56), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pixel_values[:, -1], global_view)

    normalized, _ = prepare_images(images, (168, 112), cfg)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(normalized, (pixel_values - mean) / std, rtol=1e-5, atol=1e-5)

    ragged, grid2 = prepare_images([torch.rand(3, 50, 60), torch.rand(3, 120, 70)], None, cfg)
    assert ragged.shape == (2, grid2.num_views, 3, 56, 56) and grid2.num_tiles == 4  # config.image_size 112


def test_prepare_images_rejects_bad_input():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="channels"):
        prepare_images(torch.rand(1, 4, 64, 64), (112, 112), cfg)
    with pytest.raises(ValueError, match="float"):
        prepare_images(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), (112, 112), cfg)
    with pytest.raises(ValueError, match="images must be"):
        prepare_images(torch.rand(64, 64), (112, 112), cfg)
    with pytest.raises(ValueError, match="width"):
        prepare_images(torch.rand(1, 3, 64, 64), (0, 112), cfg)
    with pytest.raises(ValueError, match="resolution"):
        prepare_images(torch.rand(1, 3, 64, 64), 112, cfg)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
RELEASE_KEY_PATTERNS = [
    r"conv1\.weight", r"positional_embedding", r"ln_pre\.(weight|bias)", r"ln_post\.(weight|bias)", r"proj",
    r"attn_pool\.(pos_embed|query|kv_proj\.weight|ln_q\.(weight|bias)|ln_kv\.(weight|bias)"
    r"|attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias))",
    r"transformer\.resblocks\.\d+\.(ln_1|ln_2)\.(weight|bias)",
    r"transformer\.resblocks\.\d+\.attn\.(in_proj|out_proj)\.(weight|bias)",
    r"transformer\.resblocks\.\d+\.attn\.(in_proj_lora|out_proj_lora)\.\d+\.(lora_a\.weight|lora_b\.weight|lora_scale)",
    r"transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)\.(weight|bias)",
    r"transformer\.resblocks\.\d+\.mlp_lora\.\d+\.(lora_a\.weight|lora_b\.weight|lora_scale)",
]


def test_state_dict_names_and_shapes_are_the_release_ones():
    cfg = tiny_config(lora_repeat_num=4)
    model = MonkeyVisionModel(cfg)
    state = model.state_dict()
    for key in state:
        assert any(re.fullmatch(p, key) for p in RELEASE_KEY_PATTERNS), key
    block = "transformer.resblocks.1."
    w, r, rm = cfg.width, cfg.attn_lora_rank, cfg.mlp_lora_rank
    assert state[block + "attn.in_proj.weight"].shape == (3 * w, w)
    assert state[block + "attn.in_proj_lora.3.lora_a.weight"].shape == (r, w)
    assert state[block + "attn.in_proj_lora.3.lora_b.weight"].shape == (3 * w, r)
    assert state[block + "attn.out_proj_lora.0.lora_scale"].shape == (1,)
    assert state[block + "mlp_lora.2.lora_a.weight"].shape == (rm, w)
    assert state[block + "mlp.c_fc.weight"].shape == (cfg.mlp_width, w)
    assert state["positional_embedding"].shape == (cfg.num_positions, w)
    assert state["proj"].shape == (cfg.output_dim, cfg.output_dim)
    assert "transformer.resblocks.2.ln_1.weight" not in state and "attn.in_proj_lora.4" not in " ".join(state)
    # The release's initialisation of the adapters and the frozen sin-cos table.
    assert all((state[k] == 0).all() for k in state if k.endswith("lora_b.weight"))
    assert all((state[k] == 1).all() for k in state if k.endswith("lora_scale"))
    assert not model.attn_pool.pos_embed.requires_grad
    torch.testing.assert_close(state["attn_pool.pos_embed"], get_2d_sincos_pos_embed(cfg.output_dim, 2))
    full = {"transformer.visual." + k: v for k, v in state.items()}
    full["transformer.h.0.attn.c_attn.weight"] = torch.zeros(1)
    assert set(release_vision_state_dict(full)) == set(state)


def test_blocks_match_an_independent_copy_of_the_public_code():
    ours = randomize_(make_model("cpu", width=64, heads=4, mlp_ratio=2, attn_lora_rank=16, mlp_lora_rank=32,
                                 lora_repeat_num=4)).transformer.resblocks[0].eval()
    public = VisualAttentionBlock(64, 4, mlp_ratio=2.0, lora_repeat_num=4).eval()
    public.load_state_dict(ours.state_dict())
    x = torch.randn(16, 3, 64)  # [seq, batch, dim]
    with torch.no_grad():
        for idx in (None, 0, 3):
            torch.testing.assert_close(ours(x, idx=idx), public(x, idx=idx), rtol=1e-5, atol=1e-5)


def test_forward_is_the_per_tile_loop_and_each_tile_uses_its_adapter():
    model = make_model("cpu").eval()
    cfg = model.config
    pixel_values = views(2, 4, cfg, "cpu")
    with torch.no_grad():
        out = model(pixel_values)
        q = cfg.n_queries
        assert out.shape == (2, 5 * q, cfg.output_dim)
        for view in range(5):
            expected = model.encode_views(pixel_values[:, view], idx=view if view < 4 else None)
            torch.testing.assert_close(out[:, view * q:(view + 1) * q], expected)
        # Changing adapter 2 changes the features of tile 2 only.
        for block in model.transformer.resblocks:
            block.mlp_lora[2].lora_b.weight.add_(1.0)
        changed = model(pixel_values)
    differs = [(changed[:, v * q:(v + 1) * q] - out[:, v * q:(v + 1) * q]).abs().max().item() > 1e-4 for v in range(5)]
    assert differs == [False, False, True, False, False]


def test_model_rejects_bad_input():
    model = make_model("cpu")
    cfg = model.config
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 5, 4, cfg.tile_size, cfg.tile_size))
    with pytest.raises(ValueError, match="views must be"):
        model(torch.randn(1, 5, 3, cfg.tile_size + 14, cfg.tile_size))
    with pytest.raises(ValueError, match="lora_repeat_num"):
        model(torch.randn(1, cfg.lora_repeat_num + 2, 3, cfg.tile_size, cfg.tile_size))
    with pytest.raises(ValueError, match="pixel_values must be a 5-D"):
        model(torch.randn(3, cfg.tile_size, cfg.tile_size))
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(tile_size=50)
    with pytest.raises(ValueError, match="square"):
        tiny_config(n_queries=8)


def test_save_and_load_pretrained(tmp_path):
    model = make_model("cpu").eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = MonkeyVisionModel.from_pretrained(tmp_path).eval()
    saved_config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == saved_config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixel_values = views(1, 4, model.config, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values), model(pixel_values))


def test_gradient_checkpointing_of_the_reference():
    model = make_model("cpu").train()  # dropout 0 in the tiny config: runs are deterministic
    plain = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.resblocks)
    pixel_values = views(1, 4, model.config, "cpu")
    for m in (model, plain):
        m(pixel_values).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad and q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------------
# prepare_images / tile_grid / MonkeyVisionModel.forward
# ---------------------------------------------------------------------------------------------------------
IMAGE_ERRORS = {
    "images_none": (dict(images=None), "images must be a"),
    "images_int": (dict(images=3), "images must be a"),
    "images_bool": (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.bool)), r"images\[0\] must be a float"),
    "images_complex": (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.complex64)), r"images\[0\] must be a float"),
    "images_5d": (dict(images=torch.zeros(1, 1, 3, 8, 8)), r"images must be \[B, C, H, W\]"),
    "images_list_with_int": (dict(images=[torch.rand(3, 8, 8), 5]), r"images\[1\] must be a \[C, H, W\]"),
    "images_empty_batch": (dict(images=torch.zeros(0, 3, 8, 8)), "at least one image"),
    "images_zero_width": (dict(images=torch.zeros(1, 3, 8, 0)), r"images\[0\] is empty"),
    "resolution_float": (dict(resolution=(56.0, 56)), "width must be a positive int"),
    "resolution_negative": (dict(resolution=(56, -56)), "height must be a positive int"),
    "resolution_triple": (dict(resolution=(56, 56, 3)), "resolution must be a"),
    "resolution_str": (dict(resolution="56x56"), "resolution must be a"),
    "tile_size_zero": (dict(tile_size=0), "tile_size must be a positive int"),
    "num_channels_zero": (dict(num_channels=0), "num_channels must be a positive int"),
    "num_channels_bool": (dict(num_channels=True), "num_channels must be a positive int"),
    "mean_short": (dict(mean=(0.5,)), "mean and std must have 3 entries"),
    "std_zero": (dict(std=(0.2, 0.0, 0.2)), "std finite and non-zero"),
    "std_nan": (dict(std=(0.2, float("nan"), 0.2)), "std finite and non-zero"),
    "config_wrong_type": (dict(config=object()), "config must be a MonkeyVisionConfig"),
}


@pytest.mark.parametrize("name", list(IMAGE_ERRORS))
def test_prepare_images_bad_arguments(name):
    args = dict(images=torch.rand(1, 3, 8, 8), resolution=(56, 56), tile_size=56) | IMAGE_ERRORS[name][0]
    if "config" in args:
        args.pop("tile_size")
    with pytest.raises(ValueError, match=IMAGE_ERRORS[name][1]):
        prepare_images(args.pop("images"), args.pop("resolution"), **args)


@pytest.mark.parametrize("bad, pattern", [
    (dict(width=True), "width"), (dict(height=None), "height"), (dict(tokens_per_view=0), "tokens_per_view"),
    (dict(tile_size=-14), "tile_size"), (dict(config="release"), "config must be a MonkeyVisionConfig"),
])
def test_tile_grid_bad_arguments(bad, pattern):
    args = dict(width=448, height=448) | bad
    with pytest.raises(ValueError, match=pattern):
        tile_grid(args.pop("width"), args.pop("height"), **args)


def test_prepare_images_nan_stays_in_its_image_and_expanded_input_is_exact():
    images = torch.rand(2, 3, 30, 40)
    images[0, 1, 5, 5] = float("nan")
    out, grid = prepare_images(images, (112, 56), tile_size=56)
    assert out.shape == (2, grid.num_views, 3, 56, 56)
    assert out[0].isnan().any() and not out[1].isnan().any()
    flat = torch.rand(3, 1, 1)
    expanded, _ = prepare_images(flat.expand(3, 30, 40), (112, 56), tile_size=56)
    contiguous, _ = prepare_images(flat.expand(3, 30, 40).contiguous(), (112, 56), tile_size=56)
    assert torch.equal(expanded, contiguous)
    meta_out, _ = prepare_images(torch.rand(1, 3, 30, 40, device="meta"), (112, 56), tile_size=56)
    assert meta_out.device.type == "meta" and meta_out.shape == (1, 3, 3, 56, 56)


@pytest.mark.parametrize("patched", [False, True])
def test_monkey_model_forward_bad_input(patched):
    model = make_model("cpu").eval()
    if patched:
        patch_model(model, backend="torch")
    cfg = model.config
    with pytest.raises(ValueError, match="pixel_values must hold at least one image"):
        model(views(0, 4, cfg, "cpu"))
    with pytest.raises(ValueError, match="pixel_values is on meta"):
        model(views(1, 4, cfg, "cpu").to("meta"))
    with pytest.raises(ValueError, match="pixel_values must hold 2 to"):
        model(views(1, 0, cfg, "cpu"))
    with pytest.raises(ValueError, match="pixel_values must be a 5-D"):
        model(views(1, 4, cfg, "cpu").tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_monkey_model_nan_in_one_image_stays_in_that_image(backend):
    """A NaN pixel in one tile of image 0: after the batched fused pass, exactly the reference's rows are NaN
    (that tile's queries and nothing of image 1)."""
    device = kernel_device(backend)
    model = make_model(device, layers=1).eval()
    pixel_values = views(2, 2, model.config, device)
    pixel_values[0, 1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        expected = model(pixel_values)
        patch_model(model, backend=backend)
        out = model(pixel_values)
    assert not expected[1].isnan().any() and expected[0].isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)
