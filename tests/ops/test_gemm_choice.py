"""The cuBLAS-based twin of the fused GEMM (``monkey_kernels.ops.multi_lora.cublas_gemm``), the per-shape chooser
between the two (``monkey_kernels.ops.multi_lora.gemm_choice``) and the triton backend's ``fused_gemm`` that runs
the one chosen (the launcher with ``monkey_kernels.ops.multi_lora.triton_impl.cublas_if_chosen`` as its hook).

Both variants are checked against a float64 evaluation of the contract
``OUT = x @ W^T + bias + drop(s[a] * h[:, :rank] @ E[a][:, :rank]^T) + residual`` (per row, base-only rows get no
LoRA term) on the same inputs; outputs start NaN-poisoned (tests/conftest.py), so an unwritten element fails.
On CPU the "cublas" variant runs torch's CPU matmul and the fused one Triton's interpreter.
"""
from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass

import pytest
import torch

from conftest import kernel_device
import monkey_kernels._triton.multi_lora as kernels
from monkey_kernels.ops.multi_lora import gemm_choice, triton_impl
from monkey_kernels.ops.multi_lora.cublas_gemm import fused_lora_gemm_cublas
from monkey_kernels.ops.multi_lora.gemm_choice import GemmChooser, GemmKey
from monkey_kernels.ops.segments import SegmentInfo

DEVICE = kernel_device("triton")
LENGTHS = [7, 0, 12, 5, 9, 3]  # ragged, an empty segment, an adapter used twice, base-only segments
ADAPTER_IDS = [1, 0, -1, 2, 1, -1]
RANKS = [3, 16, 5]  # r_max 16 = R; adapters 0 and 2 use fewer columns
IN_FEATURES, OUT_FEATURES = 20, 24
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@dataclass
class GemmCase:
    dtype: torch.dtype = torch.float32
    base: bool = True
    lora: bool = True
    bias: bool = True
    scale: bool = True
    residual: bool = False
    dropout_p: float = 0.0
    strided: bool = False
    uniform: bool = False  # one adapter per equal-length segment (Monkey's batch layout) instead of ragged


CASES = {
    "fp32_all_terms": GemmCase(residual=True),
    "fp16_all_terms": GemmCase(torch.float16, residual=True),
    "bf16_all_terms": GemmCase(torch.bfloat16, residual=True),
    "fp32_dropout": GemmCase(dropout_p=0.3),
    "bf16_dropout_residual": GemmCase(torch.bfloat16, dropout_p=0.25, residual=True),
    "fp16_dropout_no_scale": GemmCase(torch.float16, dropout_p=0.2, scale=False, bias=False),
    "expand_only": GemmCase(base=False, bias=False, scale=False, dropout_p=0.3),  # dV through the LoRA dropout
    "base_only": GemmCase(lora=False),
    "base_only_residual_bf16": GemmCase(torch.bfloat16, lora=False, residual=True),
    "bias_and_residual_only": GemmCase(base=False, lora=False, residual=True),
    "strided_fp32": GemmCase(strided=True, residual=True),
    "strided_bf16_uniform": GemmCase(torch.bfloat16, strided=True, uniform=True),
}


def make_case(case: GemmCase):
    """Inputs of one call; H, E hold NaN past each adapter's rank and H on base-only rows (never to be read)."""
    dtype, device = case.dtype, DEVICE
    if case.uniform:
        segments = SegmentInfo.from_batch([0, 1, 2, -1], 6, device=device)
    else:
        indptr = [0] + list(itertools.accumulate(LENGTHS))
        segments = SegmentInfo.from_indptr(indptr, ADAPTER_IDS, device=device)
    M, K, N, A, R = segments.num_rows, IN_FEATURES, OUT_FEATURES, len(RANKS), max(RANKS)
    r_block = kernels.rank_block(R)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x = rand(M, K) if case.base else None
    weight = rand(N, K, scale=K**-0.5) if case.base else None
    h = torch.randn(M, r_block, dtype=torch.float64).to(device=device, dtype=torch.float32)
    expand = rand(A, N, R, scale=R**-0.5)
    row_adapter = segments.row_adapter.cpu()
    for adapter, rank in enumerate(RANKS):
        expand[adapter, :, rank:] = float("nan")
        h[(row_adapter == adapter).to(device), rank:] = float("nan")
    h[(row_adapter < 0).to(device)] = float("nan")
    if case.strided:
        x = x.t().contiguous().t() if x is not None else None  # column-major [M, K]
        weight = weight.t().contiguous().t() if weight is not None else None
        expand = expand.transpose(1, 2).contiguous().transpose(1, 2)
    tensors = {
        "x": x,
        "weight": weight,
        "bias": rand(N) if case.bias else None,
        "h": h if case.lora else None,
        "expand": expand if case.lora else None,
        "scale": (torch.rand(A, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype) if case.scale else None,
        "residual": rand(M, N) if case.residual else None,
    }
    if case.strided and case.residual:
        tensors["residual"] = tensors["residual"].t().contiguous().t()
    return tensors, segments


def reference(tensors: dict, segments: SegmentInfo, case: GemmCase, seed: int) -> torch.Tensor:
    """The contract in float64 on the CPU, one row at a time of each adapter (the per-segment loop)."""
    t = {n: None if v is None else v.detach().cpu().double() for n, v in tensors.items()}
    M, N = segments.num_rows, OUT_FEATURES
    out = t["x"] @ t["weight"].t() if t["x"] is not None else torch.zeros(M, N, dtype=torch.float64)
    if t["bias"] is not None:
        out = out + t["bias"]
    if t["h"] is not None:
        lora = torch.zeros(M, N, dtype=torch.float64)
        row_adapter = segments.row_adapter.cpu()
        for adapter, rank in enumerate(RANKS):
            rows = row_adapter == adapter
            term = t["h"][rows, :rank] @ t["expand"][adapter, :, :rank].t()
            lora[rows] = term * (t["scale"][adapter] if t["scale"] is not None else 1.0)
        if case.dropout_p > 0:
            keep = kernels.dropout_keep_mask(seed, M, N, case.dropout_p, DEVICE).cpu()
            lora = torch.where(keep, lora / (1 - case.dropout_p), 0.0)
        out = out + lora
    if t["residual"] is not None:
        out = out + t["residual"]
    return out


def run_variant(variant, tensors: dict, segments: SegmentInfo, case: GemmCase, seed: int) -> torch.Tensor:
    ranks = torch.tensor(RANKS, dtype=torch.int32, device=DEVICE)
    return variant(
        tensors["x"], tensors["weight"], tensors["bias"], tensors["h"], tensors["expand"], tensors["scale"],
        tensors["residual"], segments, ranks, out_features=OUT_FEATURES, out_dtype=case.dtype,
        dropout_p=case.dropout_p, seed=seed,
    )


def error_bound(case: GemmCase, expected: torch.Tensor) -> float:
    # Up to three roundings to the output dtype (each <= eps/2 of the largest magnitude: bias + residual, the
    # base GEMM, the LoRA add), plus the fp32 accumulation over K.
    largest = float(expected.abs().max())
    return 3 * EPS[case.dtype] * largest + 64 * 2.0**-23 * largest + 1e-6


@pytest.mark.parametrize("case_name", list(CASES))
def test_cublas_variant_matches_fp64_and_the_fused_kernel(case_name):
    case = CASES[case_name]
    seed = 4321 + len(case_name)
    tensors, segments = make_case(case)
    expected = reference(tensors, segments, case, seed)
    bound = error_bound(case, expected)
    for name, variant in (("cublas", fused_lora_gemm_cublas), ("triton", kernels.fused_lora_gemm)):
        out = run_variant(variant, tensors, segments, case, seed)
        assert out.shape == (segments.num_rows, OUT_FEATURES) and out.dtype == case.dtype, name
        assert torch.isfinite(out).all(), f"{name}: unwritten (NaN-poisoned) or junk-polluted entries"
        error = float((out.cpu().double() - expected).abs().max())
        assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def test_cublas_variant_empty_output():
    segments = SegmentInfo.from_indptr([0], [], device=DEVICE)
    ranks = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    x, weight = torch.randn(0, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    out = fused_lora_gemm_cublas(x, weight, None, None, None, None, None, segments, ranks,
                                 out_features=3, out_dtype=torch.float32)
    assert out.shape == (0, 3)


@pytest.fixture
def spied_variants(monkeypatch):
    """Replaces both variants (the cuBLAS function, the Triton kernel's launch) by recorders of which one
    the triton backend's ``fused_gemm`` dispatched to."""
    calls = []

    def cublas(*args, **kwargs):
        calls.append("cublas")
        return torch.zeros(args[7].num_rows, kwargs["out_features"], dtype=kwargs["out_dtype"])

    class TritonLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append("triton")

    monkeypatch.setattr(kernels, "_fused_lora_gemm_kernel", TritonLaunch())
    monkeypatch.setattr(triton_impl, "fused_lora_gemm_cublas", cublas)
    return calls


def _dispatch_once():
    segments = SegmentInfo.from_indptr([0, 4], [0], device=DEVICE)
    triton_impl.TritonMultiLoRA.fused_gemm(
        torch.randn(4, 6, device=DEVICE), torch.randn(5, 6, device=DEVICE), None, None, None, None, None, segments,
        torch.tensor([2], dtype=torch.int32, device=DEVICE), out_features=5, out_dtype=torch.float32)


@pytest.mark.parametrize("mode", ["triton", "cublas", " CUBLAS "])
def test_env_forces_the_path(monkeypatch, spied_variants, mode):
    monkeypatch.setenv(gemm_choice.ENV_GEMM, mode)
    _dispatch_once()
    assert spied_variants == [mode.strip().lower()]


def test_fused_gemm_rejects_an_unknown_path():
    segments = SegmentInfo.from_indptr([0, 4], [0], device=DEVICE)
    with pytest.raises(ValueError, match="path must be None, 'triton' or 'cublas'"):
        triton_impl.cublas_if_chosen(torch.randn(4, 6, device=DEVICE), torch.randn(5, 6, device=DEVICE), None, None,
                                     None, None, None, segments, torch.tensor([2], dtype=torch.int32, device=DEVICE),
                                     out_features=5, out_dtype=torch.float32, path="cutlass")


@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_fused_gemm_runs_a_forced_path(spied_variants, path):
    segments = SegmentInfo.from_indptr([0, 4], [0], device=DEVICE)
    kernels.fused_lora_gemm(torch.randn(4, 6, device=DEVICE), torch.randn(5, 6, device=DEVICE), None, None, None,
                            None, None, segments, torch.tensor([2], dtype=torch.int32, device=DEVICE),
                            out_features=5, out_dtype=torch.float32,
                            alternative=functools.partial(triton_impl.cublas_if_chosen, path=path))
    assert spied_variants == [path]


def test_env_rejects_an_unknown_path(monkeypatch):
    monkeypatch.setenv(gemm_choice.ENV_GEMM, "cutlass")
    with pytest.raises(ValueError, match=gemm_choice.ENV_GEMM):
        gemm_choice.gemm_mode()


def _refusing_timer(candidates):
    raise AssertionError("timed off CUDA")


def test_auto_off_cuda_is_the_fused_kernel_without_timing(monkeypatch, spied_variants, tmp_path):
    monkeypatch.delenv(gemm_choice.ENV_GEMM, raising=False)
    chooser = GemmChooser(tmp_path / "choices.json", timer=_refusing_timer)
    path = gemm_choice.choose_gemm_path(torch.device("cpu"), torch.float32, 64, 32, 16, 16, True, chooser=chooser,
                                        candidates=lambda: pytest.fail("candidates built off CUDA"))
    assert path == "triton" and chooser.timings_run == 0 and chooser.decisions() == {}
    assert not (tmp_path / "choices.json").exists()
    before = gemm_choice.gemm_choices()
    _dispatch_once()
    assert spied_variants == ["triton"] and gemm_choice.gemm_choices() == before


def test_auto_on_cuda_times_once_per_key_and_reuses_the_decision(monkeypatch, tmp_path):
    """The CUDA branch with the device queries faked: first sight of a key times, the next call does not."""
    monkeypatch.delenv(gemm_choice.ENV_GEMM, raising=False)
    monkeypatch.setattr(gemm_choice, "_device_name", lambda device: "Fake H200")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []

    def timer(candidates):
        timed.append(sorted(candidates))
        return {"triton": 3.0, "cublas": 1.5}

    chooser = GemmChooser(tmp_path / "choices.json", timer=timer)
    runs = lambda: {"triton": lambda: None, "cublas": lambda: None}  # noqa: E731
    for m in (1000, 1024, 600):  # 1000 and 1024 share the bucket 1024; 600 is bucket 1024 too
        assert gemm_choice.choose_gemm_path(torch.device("cuda"), torch.bfloat16, m, 4096, 1024, 16, True,
                                            candidates=runs, chooser=chooser) == "cublas"
    assert timed == [["cublas", "triton"]]
    key = GemmKey.of("Fake H200", torch.bfloat16, 1024, 4096, 1024, 16, True)
    assert chooser.decisions()[key.text()] == {"choice": "cublas", "triton_ms": 3.0, "cublas_ms": 1.5,
                                               "source": "measured"}
    # while a CUDA graph is captured nothing is timed: a known key keeps its choice, an unknown one is triton
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gemm_choice.choose_gemm_path(torch.device("cuda"), torch.bfloat16, 1024, 4096, 1024, 16, True,
                                        candidates=runs, chooser=chooser) == "cublas"
    assert gemm_choice.choose_gemm_path(torch.device("cuda"), torch.bfloat16, 8, 4096, 1024, 16, True,
                                        candidates=runs, chooser=chooser) == "triton"
    assert len(timed) == 1


def test_cache_file_round_trip(tmp_path):
    path = tmp_path / "nested" / "choices.json"
    writer = GemmChooser(path, timer=lambda candidates: {"triton": 2.0, "cublas": 1.0})
    slow_cublas = GemmChooser(path, timer=lambda candidates: {"triton": 1.0, "cublas": 2.0})
    first = GemmKey.of("Fake GPU", torch.bfloat16, 300, 1024, 4096, 16, True)
    second = GemmKey.of("Fake GPU", torch.float16, 300, 1024, 4096, 0, False)
    runs = lambda: {"triton": lambda: None, "cublas": lambda: None}  # noqa: E731
    assert writer.choose(first, runs) == "cublas"
    assert slow_cublas.choose(second, runs) == "triton"  # a second writer merges into the same file
    on_disk = json.loads(path.read_text())
    assert on_disk[first.text()]["choice"] == "cublas" and on_disk[second.text()]["choice"] == "triton"
    assert "triton" in first.text() and "torch" in first.text() and "M512" in first.text()

    reader = GemmChooser(path, timer=_refusing_timer)  # a new process: reads, never times
    assert reader.choose(first, runs) == "cublas" and reader.choose(second, runs) == "triton"
    assert reader.timings_run == 0
    decisions = reader.decisions()
    assert decisions[first.text()] == {"choice": "cublas", "triton_ms": 2.0, "cublas_ms": 1.0, "source": "file"}


def test_unreadable_cache_file_is_ignored(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("{not json")
    chooser = GemmChooser(path, timer=lambda candidates: {"triton": 1.0, "cublas": 2.0})
    key = GemmKey.of("Fake GPU", torch.float32, 64, 64, 64, 16, True)
    assert chooser.lookup(key) is None
    assert chooser.choose(key, lambda: {}) == "triton"
    assert json.loads(path.read_text())[key.text()]["choice"] == "triton"  # rewritten whole


def test_cache_path_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(gemm_choice.ENV_CACHE, str(tmp_path))
    assert gemm_choice.cache_path() == tmp_path / gemm_choice.CACHE_FILE_NAME
    monkeypatch.setenv(gemm_choice.ENV_CACHE, str(tmp_path / "mine.json"))
    assert gemm_choice.cache_path() == tmp_path / "mine.json"
    monkeypatch.delenv(gemm_choice.ENV_CACHE)
    assert gemm_choice.cache_path().parts[-3:] == (".cache", "monkey_kernels", gemm_choice.CACHE_FILE_NAME)


def test_record_needs_both_timings(tmp_path):
    chooser = GemmChooser(tmp_path / "choices.json")
    with pytest.raises(ValueError, match="timings_ms"):
        chooser.record(GemmKey.of("Fake GPU", torch.float32, 1, 1, 1, 16, True), {"triton": 1.0})
    with pytest.raises(ValueError, match="m must be positive"):
        GemmKey.of("Fake GPU", torch.float32, 0, 1, 1, 16, True)
