"""Images of different grids in ONE fused encoder pass (``MonkeyVisionModel.forward_views``), against the per-image
reference loop: outputs, gradients, and the training semantics of adapters no view of the batch uses."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from conftest import available_backends, kernel_device
from monkey_kernels import patch_model, unpatch_model
from helpers.monkey_models import make_model

BACKENDS = available_backends()
# Positions and queries match the 4x4 patches of a 56 px view: the release interpolates both tables in float32
# otherwise, which would put a float32 step into the float64 comparison of their gradients.
NO_INTERPOLATION = dict(num_positions=16, n_queries=16)

# (views of each image: its tile adapter ids then -1 for the global view) for grids 2x2, 3x2, 1x1 (no global
# view: a single tile is the whole image), 2x1, and a thumbnail-first layout: every image has its own count.
MIXED = [[0, 1, 2, 3, -1], [0, 1, 2, 3, 4, 5, -1], [0], [0, 1, -1], [-1, 0, 1, 2]]


def _packed(groups, cfg, device, dtype):
    ids = [a for group in groups for a in group]
    pixels = torch.randn(len(ids), 3, cfg.tile_size, cfg.tile_size, device=device, dtype=dtype)
    return pixels, ids, [len(g) for g in groups]


def _grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-4}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_grids_in_one_pass_match_the_per_image_loop(backend):
    device = kernel_device(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    groups = MIXED[:3] if backend == "triton" else MIXED  # the interpreter is slow: three grids suffice there
    reference = make_model(device, dtype, **NO_INTERPOLATION).eval()
    fused = copy.deepcopy(reference)
    patch_model(fused, backend=backend)
    pixels, ids, counts = _packed(groups, reference.config, device, dtype)
    weights = [torch.randn(c * reference.config.n_queries, reference.config.output_dim, device=device, dtype=dtype)
               for c in counts]

    passes = []
    handle = fused.transformer.resblocks[0].register_forward_hook(lambda *args: passes.append(1))
    outs_ref = reference.forward_views(pixels, ids, counts)
    outs = fused.forward_views(pixels, ids, counts)
    handle.remove()

    assert len(passes) == 1, "the fused model must run ONE encoder pass for the whole mixed batch"
    assert [tuple(o.shape) for o in outs] == [tuple(o.shape) for o in outs_ref]
    tol = _tolerance(dtype)
    for got, want in zip(outs, outs_ref):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    sum((o * w).sum() for o, w in zip(outs_ref, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    want_grads, got_grads = _grads(reference), _grads(fused)
    for name, want in want_grads.items():
        got = got_grads[name]
        assert (got is None) == (want is None), f"{name}: a gradient in only one of the two models"
        if want is not None:
            torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol * 10, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_adapters_no_view_uses_keep_no_gradient_and_do_not_move(backend):
    """One SGD step with weight decay on a batch of 1x1 grids: the reference loop leaves every unused adapter's
    ``.grad`` None, so decay and momentum must not move it in the patched model either."""
    device = kernel_device(backend)
    reference = make_model(device, torch.float64, **NO_INTERPOLATION).eval()
    fused = copy.deepcopy(reference)
    patch_model(fused, backend=backend)
    pixels, ids, counts = _packed([[0], [0], [-1, 1]], reference.config, device, torch.float64)
    for model in (reference, fused):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                    weight_decay=0.1)
        sum(o.square().sum() for o in model.forward_views(pixels, ids, counts)).backward()
        optimizer.step()
    unused = [n for n, p in fused.named_parameters() if p.requires_grad and p.grad is None]
    assert unused and all(re.search(r"_lora\.[2-5]\.", n) for n in unused), unused
    after = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p, after[name], atol=1e-12, rtol=1e-12, msg=f"{name} after one SGD step")


def test_an_image_needing_more_adapters_than_the_model_has_is_named():
    model = make_model("cpu", lora_repeat_num=4)
    pixels, ids, counts = _packed([[0, 1, 2, 3, -1], [0, 1, 2, 3, 4, 5, -1]], model.config, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"image 1 needs 6 tile adapters but the model has 4"):
        model.forward_views(pixels, ids, counts)
    fused = copy.deepcopy(model)
    patch_model(fused, backend="torch")
    with pytest.raises(ValueError, match=r"image 1 needs 6 tile adapters but the model has 4"):
        fused.forward_views(pixels, ids, counts)
    pixels, ids, counts = _packed([[0, 1, -1], [0]], model.config, "cpu", torch.float32)
    with pytest.raises(ValueError, match="views_per_image"):
        fused.forward_views(pixels, ids, [2, 1])
    with pytest.raises(ValueError, match="adapter_ids must give one id per view"):
        fused.forward_views(pixels[:-1], ids, counts)
    with pytest.raises(ValueError, match="adapter_ids of image 1 must be >= -1"):
        fused.forward_views(pixels, ids[:-1] + [-2], counts)
    unpatch_model(fused)
    assert "forward_views" not in fused.__dict__


def test_benchmark_of_a_mixed_batch_runs_and_checks_outputs(tmp_path):
    """The benchmark script (one harness, one schema) on a tiny batch: every patched model was checked against
    the per-image loop before it was timed."""
    import importlib
    import sys as _sys

    root = str(Path(__file__).resolve().parents[2])
    if root not in _sys.path:
        _sys.path.insert(0, root)
    bench = importlib.import_module("benchmarks.bench_mixed_resolution")
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--device", "cpu", "--batches", "2", "--rounds", "1", "--backends", "torch",
                             "--no-plot", "--out", str(tmp_path / "mixed.json")])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "mixed.json").exists() and result["bench"] == "mixed_resolution"
    assert {(r["method"], r["mode"]) for r in result["rows"]} == {
        (m, mode) for m in ("reference", "patched") for mode in ("inference", "train_step")}
    assert max(result["rel_errors"].values()) < 1e-5
    assert bench.views_of(5) == ([0, 1, 2, 3, -1, 0, 1, 2, 3, 4, 5, -1, 0, *range(12), -1, 0, 1, -1],
                                 [5, 7, 1, 13, 3])
