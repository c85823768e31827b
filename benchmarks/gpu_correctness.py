"""Compiled-kernel correctness at Monkey's real sizes, against float64 (GPU only; every test skips without CUDA).

Step (1) of ``benchmarks/gpu_session.sh``; run alone with ``python -m pytest -q benchmarks/gpu_correctness.py``.

The multi-LoRA op (``multi_lora_linear``, the default backend on CUDA: triton) at the encoder's layers, width
1664, 1024 tokens per view, one image of 4 tiles + the global view (5120 rows):

- ``in_proj`` 1664 -> 4992 r16, ``out_proj`` 1664 -> 1664 r16, ``mlp c_proj`` 8192 -> 1664 with a separate LoRA
  input of width 1664 (``mlp_lora``, r32) and a residual;
- ragged segments (lengths that are not multiples of any block, an empty one, the base-only id ``-1``, an
  adapter used twice), forward + backward, bf16 / fp16 / fp32; LoRA dropout with the op's own mask.

The SLP embedding assembly (``slp_embed``) at LayTextLLM / Monkey sizes, forward + backward, the same dtypes.

Mixed precision (what the HF ``Trainer``'s ``bf16=True`` / ``fp16=True`` runs): fp32 master tensors under
``torch.autocast("cuda", fp16 / bf16)``, the op at the three layers above and a patched Monkey encoder at the
release's width (1664, 2 of its 48 layers, 4 tiles + the global view, per-tile LoRA) against the unpatched
encoder under the same autocast: output dtype the reference's, output and gradients (input, every trainable
Parameter, ``lora_scale`` kept fp32) within the unpatched model's own error against float64.

Judged as the unit tests judge (``tests/helpers/accuracy.py``): the op's error against float64 may be at most
``tolerance_factor`` times the error of the same computation by plain PyTorch in the op's dtype, plus a floor.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers.accuracy import (assert_grads_within_reference_error, assert_within_pytorch_error,  # noqa: E402
                              assert_within_reference_error, error_floor)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
WIDTH, TOKENS = 1664, 1024
# (name, K, N, rank, separate LoRA input width, residual)
LAYERS = {
    "in_proj": (WIDTH, 3 * WIDTH, 16, None, False),
    "out_proj": (WIDTH, WIDTH, 16, None, False),
    "mlp_c_proj": (8192, WIDTH, 32, WIDTH, True),
}
# 5 * 1024 rows as Monkey lays them out, made ragged: segment lengths (sum 5120) and adapter ids.
RAGGED_LENGTHS = [1024, 517, 0, 1531, 1024, 1000, 24]
RAGGED_IDS = [0, 1, 2, 3, -1, 1, 0]
NUM_ADAPTERS = 4


def _id(value) -> str:
    return str(value).replace("torch.", "")


def _problem(layer: str, dtype: torch.dtype, device: torch.device, divisor: int = 1):
    from monkey_kernels import SegmentInfo  # noqa: PLC0415

    K, N, r, k_lora, has_residual = (v // divisor if isinstance(v, int) and i in (0, 1, 3) else v
                                     for i, v in enumerate(LAYERS[layer]))
    lengths = [n // divisor for n in RAGGED_LENGTHS]
    M = sum(lengths)
    kl = k_lora or K

    def randn(*shape, std=1.0, grad=False):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype).requires_grad_(grad)

    tensors = dict(
        input=randn(M, K, grad=True),
        weight=randn(N, K, std=K ** -0.5),
        bias=randn(N, std=0.1),
        lora_a=randn(NUM_ADAPTERS, r, kl, std=kl ** -0.5, grad=True),
        lora_b=randn(NUM_ADAPTERS, N, r, std=r ** -0.5, grad=True),
        scale=(torch.rand(NUM_ADAPTERS, device=device) + 0.5).requires_grad_(True),
        lora_input=randn(M, kl, grad=True) if k_lora else None,
        residual=randn(M, N) if has_residual else None,
    )
    indptr = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    segments = SegmentInfo.from_indptr(indptr, torch.tensor(RAGGED_IDS, dtype=torch.int32, device=device))
    return tensors, segments


def _grads(out, leaves: dict, grad_out) -> dict:
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    return dict(zip(names, torch.autograd.grad(out, [leaves[n] for n in names], grad_out)))


def _reference(tensors: dict, segments, dtype, keep=None, dropout_p=0.0):
    from monkey_kernels import multi_lora_linear_ref  # noqa: PLC0415

    leaves = {n: None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for n, t in tensors.items()}
    out = multi_lora_linear_ref(leaves["input"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                                leaves["scale"], segments, lora_input=leaves["lora_input"],
                                residual=leaves["residual"], keep_mask=keep, dropout_p=dropout_p)
    return out, leaves


def check_multi_lora(layer: str, dtype: torch.dtype, dropout_p: float = 0.0, device: str = "cuda",
                     backend: str = "triton", divisor: int = 1) -> None:
    """One layer of ``LAYERS`` (widths and segment lengths divided by ``divisor``): output and every gradient of
    ``multi_lora_linear(backend=backend)`` against float64 (see the module docstring)."""
    from monkey_kernels import dropout_keep_mask, multi_lora_linear  # noqa: PLC0415

    device = torch.device(device)
    tensors, segments = _problem(layer, dtype, device, divisor)
    seed = 1234
    out = multi_lora_linear(tensors["input"], tensors["weight"], tensors["bias"], tensors["lora_a"],
                            tensors["lora_b"], tensors["scale"], segments, lora_input=tensors["lora_input"],
                            residual=tensors["residual"], dropout_p=dropout_p, seed=seed if dropout_p else None,
                            backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    grad_out = torch.randn(out.shape, device=device).to(dtype)
    grads = _grads(out, tensors, grad_out)
    keep = None
    if dropout_p:
        width = (tensors["lora_input"] if tensors["lora_input"] is not None else tensors["input"]).shape[-1]
        keep = dropout_keep_mask(seed, segments.num_rows, width, dropout_p, device, backend=backend)
    ref64, leaves64 = _reference(tensors, segments, torch.float64, keep, dropout_p)
    grads64 = _grads(ref64, leaves64, grad_out.double())
    plain, leaves_plain = _reference(tensors, segments, dtype, keep, dropout_p)
    grads_plain = _grads(plain, leaves_plain, grad_out)
    assert_within_pytorch_error(backend, dtype, out, plain, ref64, grads, grads_plain, grads64)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_multi_lora_matches_fp64_at_monkey_sizes(layer, dtype):
    check_multi_lora(layer, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
@pytest.mark.parametrize("layer", ["in_proj", "mlp_c_proj"])
def test_multi_lora_dropout_matches_fp64_with_the_ops_mask(layer, dtype):
    check_multi_lora(layer, dtype, dropout_p=0.05)


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_both_gemm_paths_match_fp64(gemm, monkeypatch):
    """``MONKEY_KERNELS_GEMM`` forces each path of the fused GEMM (when this version has the choice)."""
    gemm_choice = pytest.importorskip("monkey_kernels.ops.multi_lora.gemm_choice",
                                      reason="no per-shape GEMM choice in this version")
    monkeypatch.setenv(gemm_choice.ENV_GEMM, gemm)
    check_multi_lora("out_proj", torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision: fp32 masters under torch.autocast
# ---------------------------------------------------------------------------------------------------------
AMP_DTYPES = [torch.float16, torch.bfloat16]


def check_multi_lora_autocast(layer: str, amp: torch.dtype, device: str = "cuda", backend: str = "triton",
                              divisor: int = 1) -> None:
    """One layer of ``LAYERS`` with fp32 tensors under ``torch.autocast(device, amp)``: the op's output (dtype
    ``amp`` as ``F.linear``'s; fp32 with the fp32 residual, as the reference's sum) and gradients (fp32, as the masters') against float64, judged against the
    reference ``multi_lora_linear_ref`` under the same autocast."""
    from monkey_kernels import multi_lora_linear, multi_lora_linear_ref  # noqa: PLC0415

    device = torch.device(device)
    tensors, segments = _problem(layer, torch.float32, device, divisor)
    with torch.autocast(device.type, dtype=amp):
        out = multi_lora_linear(tensors["input"], tensors["weight"], tensors["bias"], tensors["lora_a"],
                                tensors["lora_b"], tensors["scale"], segments, lora_input=tensors["lora_input"],
                                residual=tensors["residual"], backend=backend)
    assert torch.isfinite(out).all()
    grad_out = torch.randn(out.shape, device=device).to(out.dtype)
    grads = _grads(out, tensors, grad_out)
    assert all(g.dtype == torch.float32 for g in grads.values()), {n: g.dtype for n, g in grads.items()}
    ref64, leaves64 = _reference(tensors, segments, torch.float64)
    grads64 = _grads(ref64, leaves64, grad_out.double())
    leaves = {n: None if t is None else t.detach().requires_grad_(t.requires_grad) for n, t in tensors.items()}
    with torch.autocast(device.type, dtype=amp):
        plain = multi_lora_linear_ref(leaves["input"], leaves["weight"], leaves["bias"], leaves["lora_a"],
                                      leaves["lora_b"], leaves["scale"], segments, lora_input=leaves["lora_input"],
                                      residual=leaves["residual"])
    assert plain.dtype == out.dtype, (plain.dtype, out.dtype)
    grads_plain = _grads(plain, leaves, grad_out)
    assert_within_pytorch_error(backend, amp, out, plain, ref64, grads, grads_plain, grads64)


def _release_width_encoder(device: torch.device, divisor: int):
    """A Monkey encoder with 2 layers, 4 per-tile adapters (random non-zero LoRA) and the release's trainable set,
    fp32: the release's shapes (width 1664, 448 px tiles of 1024 tokens) when ``divisor`` is 1, else a small
    config of width ``1664 // divisor`` (the CPU check of this harness)."""
    from monkey_kernels.models import MonkeyVisionConfig, MonkeyVisionModel  # noqa: PLC0415

    if divisor == 1:
        config = MonkeyVisionConfig(layers=2, lora_repeat_num=4, lora_dropout=0.0)
    else:
        config = MonkeyVisionConfig(width=1664 // divisor, heads=4, layers=2, tile_size=112, image_size=224,
                                    patch_size=14, num_positions=16, n_queries=16, output_dim=128,
                                    resampler_heads=4, lora_repeat_num=4, lora_dropout=0.0)
    model = MonkeyVisionModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name and p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    for name, p in model.named_parameters():
        p.requires_grad_("lora" in name or name.startswith("attn_pool"))
    return model.to(device), config


def check_encoder_autocast(amp: torch.dtype, device: str = "cuda", backend: str = "triton", divisor: int = 1) -> None:
    """A patched Monkey encoder (``_release_width_encoder``) under ``torch.autocast(device, amp)`` against the
    unpatched one under the same autocast, both against the float64 unpatched encoder: output (dtype the
    reference's), the gradient of the pixels and of every trainable Parameter (fp32)."""
    import copy  # noqa: PLC0415

    from monkey_kernels import patch_model  # noqa: PLC0415

    device = torch.device(device)
    reference, config = _release_width_encoder(device, divisor)
    patched = copy.deepcopy(reference)
    patch_model(patched, backend=backend)
    ref64 = copy.deepcopy(reference).double()
    pixels = torch.randn(1, 5, config.num_channels, config.tile_size, config.tile_size, device=device)

    def run(model, dtype, amp_dtype):
        x = pixels.to(dtype).requires_grad_(True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        return out, x

    out, x = run(patched, torch.float32, amp)
    plain, x_plain = run(reference, torch.float32, amp)
    out64, x64 = run(ref64, torch.float64, None)
    assert out.dtype == plain.dtype, (out.dtype, plain.dtype)
    grad_out = torch.randn(out.shape, device=device).to(out.dtype)

    def grads(model, output, inputs, g):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        values = torch.autograd.grad(output, [inputs] + [params[n] for n in names], g, allow_unused=True)
        return {n: v for n, v in zip(["pixels"] + names, values) if v is not None}

    g, g_plain, g64 = (grads(patched, out, x, grad_out), grads(reference, plain, x_plain, grad_out),
                       grads(ref64, out64, x64, grad_out.double()))
    assert set(g) == set(g_plain) == set(g64), (set(g) ^ set(g_plain), set(g_plain) ^ set(g64))
    assert all(v.dtype == torch.float32 for v in g.values())
    # A whole model: rounding errors compound over the layers in an order of their own, so each result is held to
    # 3x the unpatched model's own error (the op-level checks above: 2x), plus the dtype's floor.
    assert_within_reference_error("output", out, plain, out64, factor=3.0, floor=error_floor(amp))
    assert_grads_within_reference_error(g, g_plain, g64, factor=3.0, floor=error_floor(amp))


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=_id)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_multi_lora_under_autocast_matches_fp64_at_monkey_sizes(layer, amp):
    check_multi_lora_autocast(layer, amp)


@pytest.mark.parametrize("amp", AMP_DTYPES, ids=_id)
def test_patched_encoder_under_autocast_at_release_width(amp):
    check_encoder_autocast(amp)


# ---------------------------------------------------------------------------------------------------------
# SLP
# ---------------------------------------------------------------------------------------------------------
SLP_CASES = {  # batch, seq, hidden, vocab, boxes per sequence, image tokens per sequence
    "laytextllm": (2, 4096, 4096, 32000, 512, 0),
    "monkey": (2, 2048, 4096, 151936, 64, 1280),
}


def _slp_reference_module():
    try:
        from monkey_kernels.ops.slp import reference  # noqa: PLC0415
    except ImportError:  # the layout before the ops/ folders
        from monkey_kernels.models import slp as reference  # noqa: PLC0415
    return reference


def check_slp(case: str, dtype: torch.dtype, device: str = "cuda", backend: str = "triton", divisor: int = 1) -> None:
    """``slp_embed(backend=backend)`` forward and gradients (table, projection, image features) against float64;
    sequence, hidden size, vocabulary, boxes and image tokens divided by ``divisor``."""
    from monkey_kernels import slp_embed  # noqa: PLC0415

    reference = _slp_reference_module()
    device = torch.device(device)
    B, S, H, V, n_boxes, n_image = (v if i == 0 else v // divisor for i, v in enumerate(SLP_CASES[case]))
    start = 16 // divisor
    image_id = V - 1 if n_image else None
    ids = torch.randint(1, V - 1, (B, S), device=device)
    if n_image:
        ids[:, start:start + n_image] = image_id
    free = torch.arange(start + n_image, S, device=device)
    for b in range(B):
        ids[b, free[torch.randperm(free.numel(), device=device)[:n_boxes]]] = 0
    page = (torch.rand(B, 2, device=device) * 1500 + 500).round()
    corner = torch.rand(B, n_boxes, 2, device=device)
    boxes = torch.cat([corner, corner + torch.rand_like(corner) * (1 - corner)], -1) * page.repeat(1, 2)[:, None]
    boxes, page = boxes.round().to(dtype), page.to(dtype)
    leaves = dict(table=torch.randn(V, H, device=device), weight=torch.randn(H, 4, device=device) * 0.5,
                  bias=torch.randn(H, device=device) * 0.1,
                  features=torch.randn(B, n_image, H, device=device) if n_image else None)
    leaves = {n: None if t is None else t.to(dtype).requires_grad_(True) for n, t in leaves.items()}

    out = slp_embed(ids, leaves["table"], leaves["weight"], leaves["bias"], boxes, box_token_id=0, page_sizes=page,
                    image_features=leaves["features"], image_token_id=image_id, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    grad_out = torch.randn(out.shape, device=device).to(dtype)
    grads = _grads(out, leaves, grad_out)

    def run_reference(ref_dtype):
        embedding = torch.nn.Embedding(V, H, device=device, dtype=ref_dtype)
        embedding.weight = torch.nn.Parameter(leaves["table"].detach().to(ref_dtype))
        projector = reference.SpatialLayoutProjector(H, device=device, dtype=ref_dtype)
        projector.proj.weight = torch.nn.Parameter(leaves["weight"].detach().to(ref_dtype))
        projector.proj.bias = torch.nn.Parameter(leaves["bias"].detach().to(ref_dtype))
        features = None if leaves["features"] is None else leaves["features"].detach().to(ref_dtype).requires_grad_(True)
        result = reference.SLPEmbeddingRef(embedding, projector, 0, image_id)(
            ids, boxes.to(ref_dtype), page.to(ref_dtype), features)
        return result, dict(table=embedding.weight, weight=projector.proj.weight, bias=projector.proj.bias,
                            features=features)

    ref64, leaves64 = run_reference(torch.float64)
    plain, leaves_plain = run_reference(dtype)
    grads64 = _grads(ref64, leaves64, grad_out.double())
    grads_plain = _grads(plain, leaves_plain, grad_out)
    assert_within_pytorch_error(backend, dtype, out, plain, ref64, grads, grads_plain, grads64)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", list(SLP_CASES))
def test_slp_matches_fp64_at_real_sizes(case, dtype):
    check_slp(case, dtype)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
