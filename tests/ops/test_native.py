"""The native C++ extension: build and loader, backend dispatch and its log line, the ops under
``torch.compile``, determinism and argument checks. (Accuracy of the native backend against float64 runs in
the shared matrices of test_multi_lora.py, test_segments_fuzz.py and test_modules.py.)

Without the extension these tests FAIL (CI builds it); ``MONKEY_KERNELS_ALLOW_NO_NATIVE=1`` skips them.
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import require_native
from monkey_kernels import SegmentInfo, _native, multi_lora_linear, multi_lora_linear_ref, settings
from monkey_kernels.ops import alloc, backends
from monkey_kernels.ops.backends import resolve_backend
from monkey_kernels.ops.multi_lora.native_impl import NativeMultiLoRA, native_keep_mask
from monkey_kernels.ops.multi_lora.torch_impl import TorchMultiLoRA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def need_native():
    require_native()


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)


LOWRANK_ISAS = ("avx512", "avx2", "portable")


@pytest.fixture(params=LOWRANK_ISAS)
def lowrank_isa(request, monkeypatch):
    """Runs a test on each vector path of the fp32 low-rank GEMMs (csrc/lowrank_gemm.h) this CPU has; a path the
    CPU cannot run is skipped, with the path it would have fallen back to named."""
    monkeypatch.setenv(settings.LOWRANK_ISA.name, request.param)
    running = _native.extension().lowrank_isa()
    if running != request.param:
        pytest.skip(f"this CPU has no {request.param} (the low-rank GEMMs run {running})")
    return request.param


@pytest.fixture(params=["blas", "tiled"])
def cpu_gemm(request, monkeypatch):
    """Runs a test with the base GEMM by BLAS and by the register-tiled kernel (``MONKEY_KERNELS_CPU_GEMM``)."""
    monkeypatch.setenv(settings.CPU_GEMM.name, request.param)
    return request.param


def _problem(num_rows_per_segment=(7, 0, 40, 13), ids=(1, -1, 0, 1), k=24, n=20, num_adapters=3, r_max=5,
             dtype=torch.float32, ranks=None):
    indptr = [0]
    for length in num_rows_per_segment:
        indptr.append(indptr[-1] + length)
    segments = SegmentInfo.from_indptr(indptr, list(ids))
    m = segments.num_rows
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    t = {
        "x": torch.randn(m, k, generator=g, dtype=dtype),
        "weight": torch.randn(n, k, generator=g, dtype=dtype),
        "bias": torch.randn(n, generator=g, dtype=dtype),
        "lora_a": torch.randn(num_adapters, r_max, k, generator=g, dtype=dtype),
        "lora_b": torch.randn(num_adapters, n, r_max, generator=g, dtype=dtype),
        "scale": torch.rand(num_adapters, generator=g, dtype=dtype) + 0.5,
        "residual": torch.randn(m, n, generator=g, dtype=dtype),
        "dy": torch.randn(m, n, generator=g, dtype=dtype),
        "ranks": torch.tensor(ranks or [r_max, 2, 1][:num_adapters], dtype=torch.int32),
    }
    return t, segments


def test_extension_module_reports_its_build(monkeypatch):
    module = _native.load()
    assert _native.status() in ("prebuilt", "jit")
    assert module.built_with_openmp(), "at::parallel_for would run single-threaded"
    assert module.built_with_cuda() in (True, False)
    assert module.num_threads() == torch.get_num_threads()
    assert _native.extension().poison_outputs(), "conftest poisons every test's outputs, the native ops' too"
    # One switch for the Triton launchers and the C++ ops: alloc's override, else the environment variable, both
    # passed to the extension before its next call (the C++ reads no environment).
    alloc.set_poison(False)  # the conftest fixture restores its override after the test
    assert not _native.extension().poison_outputs()
    alloc.set_poison(None)
    monkeypatch.setenv(settings.POISON.name, "1")
    assert _native.extension().poison_outputs()
    monkeypatch.setenv(settings.POISON.name, "0")
    assert not _native.extension().poison_outputs()
    for op in ("multi_lora_shrink", "multi_lora_fused_gemm", "multi_lora_outer"):
        assert hasattr(_native.ops(), op)


def test_import_does_not_load_or_build_the_extension_and_disabling_it_logs_at_info():
    code = (
        "import logging, sys, torch, monkey_kernels\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from monkey_kernels import _native, resolve_backend\n"
        "def loaded():\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    return ('monkey_kernels._C' in sys.modules or 'monkey_kernels/_C.' in maps or 'monkey_kernels_C' in maps)\n"
        "print('IMPORT', _native._status is None, loaded())\n"
        "print('CHOICE', resolve_backend(None, torch.device('cpu')), loaded())\n"
    )
    proc = _run_python(code, TRITON_INTERPRET="0", MONKEY_KERNELS_NO_NATIVE="1", MONKEY_KERNELS_BACKEND="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORT True False" in proc.stdout and "CHOICE torch False" in proc.stdout, proc.stdout
    assert "INFO monkey-kernels: CPU tensors use the pure-PyTorch backend (native extension unavailable: " \
           "disabled: MONKEY_KERNELS_NO_NATIVE=1)" in proc.stderr


def test_failed_build_falls_back_to_torch_and_logs_the_reason_once(tmp_path):
    """A real failure: the prebuilt module is hidden and the JIT build runs with a compiler that fails."""
    code = (
        "import logging, sys, torch\n"
        "sys.modules['monkey_kernels._C'] = None  # import of the prebuilt module now raises ImportError\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "from monkey_kernels import resolve_backend, _native\n"
        "cpu = torch.device('cpu')\n"
        "print('CHOICE', resolve_backend(None, cpu), resolve_backend(None, cpu))\n"
        "try:\n"
        "    resolve_backend('native', cpu)\n"
        "except ValueError as error:\n"
        "    print('EXPLICIT', error)\n"
    )
    proc = _run_python(code, TRITON_INTERPRET="0", CXX="/bin/false", MONKEY_KERNELS_CACHE=str(tmp_path),
                       MONKEY_KERNELS_BACKEND="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CHOICE torch torch" in proc.stdout
    assert "EXPLICIT backend='native' is unavailable: unavailable: no prebuilt extension" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "tensors use" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("WARNING monkey_kernels monkey-kernels: CPU tensors use the pure-PyTorch backend")
    assert "native extension unavailable" in lines[0] and "JIT build failed" in lines[0]


def test_auto_picks_native_for_cpu_and_logs_one_line(monkeypatch, caplog):
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "0")
    monkeypatch.delenv(settings.BACKEND.name, raising=False)
    monkeypatch.setattr(backends, "_logged_device_types", set())
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="monkey_kernels"):
        assert resolve_backend(None, cpu) == "native"
        assert resolve_backend("auto", cpu) == "native"
    records = [r for r in caplog.records if "tensors use" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith("monkey-kernels: CPU tensors use the native C++ backend (")
    # Under the interpreter auto keeps picking triton (the test suite relies on it); native stays explicit.
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "1")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("native", cpu) == "native"
    with pytest.raises(ValueError, match="native.*cpu"):
        resolve_backend("native", torch.device("meta"))


def test_monkeypatched_failed_load_falls_back_in_process(monkeypatch, caplog):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_status", "unavailable: simulated compiler failure")
    monkeypatch.setattr(backends, "_logged_device_types", set())
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "0")
    monkeypatch.delenv(settings.BACKEND.name, raising=False)
    with caplog.at_level(logging.INFO, logger="monkey_kernels"):
        assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "simulated compiler failure" in caplog.records[0].getMessage()
    with pytest.raises(ValueError, match="simulated compiler failure"):
        resolve_backend("native", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="simulated compiler failure"):
        _native.ops()


def _drop(x, keep, p):
    return torch.where(keep, x / (1.0 - p), 0.0) if p else x


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", ["r5", "r20"])
def test_primitives_match_the_torch_backend(dropout_p, shape, lowrank_isa, cpu_gemm):
    """Each primitive equals the torch backend's on the native backend's own mask (applied here by hand: the
    native masks are a hash in C++, the torch backend's come from torch.rand, so the two streams differ), on
    every vector path of the low-rank GEMMs: ranks below, at and above one 16-column tile (r20: 20, 16, 3),
    odd widths (K = 29, N = 37) and segments of 7, 40 and 13 rows (tails of every tile height)."""
    if shape == "r5":
        t, segments = _problem()
        r_block = 16
    else:
        t, segments = _problem(k=29, n=37, r_max=20, ranks=[20, 16, 3])
        r_block = 32
    m, k = t["x"].shape

    def close(actual, expected):  # two fp32 results of sums in different orders: eps-sized error of the terms
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    keep = {seed: native_keep_mask(seed, m, k, dropout_p, "cpu") for seed in (3, 5, 9)}
    args = (t["lora_a"], segments, t["ranks"])
    h = NativeMultiLoRA.shrink(t["x"], *args, r_block, dropout_p=dropout_p, seed=5)
    close(h, TorchMultiLoRA.shrink(_drop(t["x"], keep[5], dropout_p), *args, r_block))
    assert h.dtype == torch.float32 and h.shape == (segments.num_rows, r_block)
    kwargs = dict(out_features=k, out_dtype=torch.float32)
    base = (t["dy"], t["weight"].t(), None)
    lora = (h, t["lora_a"].transpose(1, 2), t["scale"], None, segments, t["ranks"])
    expected = (TorchMultiLoRA.fused_gemm(*base, None, None, None, None, segments, t["ranks"], **kwargs)
                + _drop(TorchMultiLoRA.fused_gemm(None, None, None, *lora, **kwargs), keep[9], dropout_p))
    close(NativeMultiLoRA.fused_gemm(*base, *lora, **kwargs, dropout_p=dropout_p, seed=9), expected)
    r_max = t["lora_a"].shape[1]
    out_native = torch.full((3, k, r_max), float("nan")).transpose(1, 2).contiguous().transpose(1, 2)
    out_torch = torch.empty_like(out_native)
    NativeMultiLoRA.outer(t["x"], h, segments, out_native, scale=t["scale"], dropout_p=dropout_p, seed=3)
    TorchMultiLoRA.outer(_drop(t["x"], keep[3], dropout_p), h, segments, out_torch, scale=t["scale"])
    close(out_native, out_torch)


def test_native_mask_is_the_one_the_ops_apply_at_any_column_offset():
    """The outer product cuts columns into blocks of 128 and rows into segments: its dropped input must be the
    mask of the whole [M, K] (global row and column indices), also for a bf16 input and a strided one."""
    t, segments = _problem(num_rows_per_segment=(70, 0, 9, 61), k=300, n=7)
    p = 0.4
    for x in (t["x"], t["x"].to(torch.bfloat16), t["x"].t().contiguous().t()):
        m, k = x.shape
        keep = native_keep_mask(17, m, k, p, "cpu")
        y = torch.randn(m, 4, generator=torch.Generator().manual_seed(1))
        out = torch.empty(3, k, 4)
        NativeMultiLoRA.outer(x, y, segments, out, dropout_p=p, seed=17)
        dropped = torch.where(keep, (x.float() / (1 - p)).to(x.dtype).float(), 0.0)
        expected = torch.empty_like(out)
        TorchMultiLoRA.outer(dropped, y, segments, expected)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_op_in_float64_and_bfloat16_with_residual(dtype):
    t, segments = _problem(dtype=dtype)
    out = multi_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                            ranks=t["ranks"], residual=t["residual"], backend="native")
    expected = multi_lora_linear_ref(*(t[n].double() for n in ("x", "weight", "bias", "lora_a", "lora_b", "scale")),
                                     segments, ranks=t["ranks"].tolist(), residual=t["residual"].double())
    assert out.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance


def test_outer_is_bitwise_deterministic_across_runs_and_thread_counts():
    t, segments = _problem(num_rows_per_segment=(300, 0, 517, 9, 260), ids=(1, -1, 0, 1, 2), k=300, n=20)
    h = NativeMultiLoRA.shrink(t["x"], t["lora_a"], segments, t["ranks"], 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, threads, 1):
            torch.set_num_threads(count)
            out = torch.empty(3, 300, 5)
            results.append(NativeMultiLoRA.outer(t["x"], h, segments, out, scale=t["scale"]).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert results[0][2].abs().sum() > 0  # adapter 2 owns rows: a real sum, not zeros


def test_base_gemm_choice_is_measured_once_per_shape_and_can_be_pinned(monkeypatch):
    """``auto`` measures BLAS against the tiled kernel once per (K, N, dtype) and keeps the answer; shapes the tiled
    kernel would need cache blocking for stay on BLAS; ``blas`` / ``tiled`` pin it; anything else is refused."""
    name = settings.CPU_GEMM.name
    monkeypatch.delenv(name, raising=False)
    first = _native.extension().tiled_base_gemm(96, 80, False)
    assert all(_native.extension().tiled_base_gemm(96, 80, False) == first for _ in range(3))
    assert _native.extension().tiled_base_gemm(1024, 64, False) is False  # K past the tiled kernel's depth limit
    monkeypatch.setenv(name, "blas")
    assert _native.extension().tiled_base_gemm(96, 80, False) is False
    monkeypatch.setenv(name, "tiled")
    assert _native.extension().tiled_base_gemm(4096, 4096, True) is True
    monkeypatch.setenv(name, "cublas")
    with pytest.raises(ValueError, match="MONKEY_KERNELS_CPU_GEMM must be auto, blas or tiled, got 'cublas'"):
        _native.extension().tiled_base_gemm(96, 80, False)
    with pytest.raises(RuntimeError, match="cpu_gemm must be auto, blas or tiled"):  # the C++ checks a direct call
        _native.load().configure(True, "cublas", "avx512")
    t, segments = _problem()
    with pytest.raises(ValueError, match="MONKEY_KERNELS_CPU_GEMM"):
        multi_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                          ranks=t["ranks"], backend="native")


def test_merged_pass_is_bitwise_deterministic_across_thread_counts(lowrank_isa):
    """The merged GEMM's shrink and outer product split rows / columns over the threads: each element is one sum
    in one order, so both are bitwise equal for every thread count (the GEMM output itself is BLAS's, which
    may pick another kernel for another thread count)."""
    t, segments = _problem(num_rows_per_segment=(300, 0, 517, 9, 260), ids=(1, -1, 0, 1, 2), k=300, n=20,
                           r_max=20, ranks=[20, 16, 3])
    h = torch.randn(segments.num_rows, 32, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1, 2):
            torch.set_num_threads(count)
            results.append(_native.ops().multi_lora_merged_gemm(
                t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], None, segments.seg_indptr,
                segments.adapter_ids, t["ranks"], torch.float32, 32, h))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert [torch.equal(a, b) for a, b in zip(results[0][1:], other[1:])] == [True, True]
    assert all(r.abs().sum() > 0 for r in results[0])


def test_native_ops_under_torch_compile_fullgraph():
    t, segments = _problem()
    ops = _native.ops()

    def step(x, lora_a, lora_b, weight, bias, scale, ranks, indptr, ids):
        h = ops.multi_lora_shrink(x, lora_a, indptr, ids, ranks, 16, 4, 0.25)
        y = ops.multi_lora_fused_gemm(x, weight, bias, h, lora_b, scale, None, indptr, ids, ranks, x.shape[0],
                                      weight.shape[0], torch.float32, 5, 0.25)
        grad_b = ops.multi_lora_outer(y, h, indptr, ids, scale, 6, 0.25, lora_b.shape[0], lora_b.shape[2],
                                      torch.float32)
        keep = ops.multi_lora_keep_mask(7, x.shape[0], 3, 0.5)
        return torch.relu(y) * 2.0, grad_b, keep

    args = (t["x"], t["lora_a"], t["lora_b"], t["weight"], t["bias"], t["scale"], t["ranks"], segments.seg_indptr,
            segments.adapter_ids)
    eager = step(*args)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_module_with_native_backend_under_torch_compile_fullgraph():
    from monkey_kernels import MultiLoRALinear

    layer = MultiLoRALinear(16, 12, 3, [4, 2, 3], backend="native")
    with torch.no_grad():
        layer.lora_b.normal_()
    segments = SegmentInfo.from_batch([2, -1, 0], 5)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda inp: layer(inp, segments), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x, segments))
    out.square().sum().backward()
    assert x.grad is not None and layer.lora_a.grad is not None and layer.lora_a.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t, s: _native.ops().multi_lora_shrink(t["x"], t["lora_a"][:, :, :3], s.seg_indptr, s.adapter_ids,
                                                      t["ranks"], 16, 0, 0.0), "weight must be"),
        (lambda t, s: _native.ops().multi_lora_shrink(t["x"], t["lora_a"], s.seg_indptr, s.adapter_ids,
                                                      torch.tensor([9, 1, 1], dtype=torch.int32), 16, 0, 0.0),
         "ranks\\[0\\] = 9"),
        (lambda t, s: _native.ops().multi_lora_shrink(t["x"], t["lora_a"], s.seg_indptr, s.adapter_ids, t["ranks"],
                                                      16, 0, 1.0), "dropout_p must be in \\[0, 1\\)"),
        (lambda t, s: _native.ops().multi_lora_keep_mask(0, -1, 3, 0.5), "rows and cols must be >= 0"),
        (lambda t, s: _native.ops().multi_lora_shrink(t["x"], t["lora_a"], s.seg_indptr,
                                                      torch.tensor([1, 5, 0, 1], dtype=torch.int32), t["ranks"], 16,
                                                      0, 0.0), "adapter_ids\\[1\\] = 5"),
        (lambda t, s: _native.ops().multi_lora_fused_gemm(t["x"], t["weight"][:, :3], None, None, None, None, None,
                                                          s.seg_indptr, s.adapter_ids, t["ranks"], t["x"].shape[0],
                                                          20, torch.float32, 0, 0.0), "weight must be"),
        (lambda t, s: _native.ops().multi_lora_outer(t["x"], t["x"][:3], s.seg_indptr, s.adapter_ids, None, 0,
                                                     0.0, 3, 5, torch.float32), "y must be"),
    ],
)
def test_ops_check_their_arguments(call, message):
    t, segments = _problem()
    with pytest.raises(RuntimeError, match=message):
        call(t, segments)


def _per_adapter_rows(segments, ranks, rows_fn, r_block, dtype):
    """``[M, r_block]``: row i of segment g (adapter a) = ``rows_fn(a, slice of g)[:, :ranks[a]]``, 0 elsewhere."""
    out = torch.zeros(segments.num_rows, r_block, dtype=dtype)
    indptr = segments.seg_indptr.tolist()
    for g, a in enumerate(segments.adapter_ids.tolist()):
        if a >= 0 and ranks[a] > 0 and indptr[g + 1] > indptr[g]:
            rows = slice(indptr[g], indptr[g + 1])
            out[rows, :ranks[a]] = rows_fn(a, rows)[:, :ranks[a]]
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["float64", "float32", "bfloat16", "float16"])
def test_merged_gemm_matches_float64_with_merged_and_unmerged_adapters(dtype, lowrank_isa, cpu_gemm):
    """``multi_lora_merged_gemm``: adapter 0 (60 rows) and 1 (45 rows) are worth merging at K=24, N=20
    (rows (N + K) >= N K), adapter 2 (4 rows) is not; the forward and the input-gradient form both match the
    float64 loop, and adapter 0's merged weight leaves the base-only rows untouched. The passes that ride along
    match too: the shrink (forward H = X A^T, backward G = dY B) and the outer product dB = s sum dY^T H, exactly
    0 past each rank, on base-only rows and for adapter 3, which owns no rows."""
    t, segments = _problem(num_rows_per_segment=(60, 7, 45, 4, 0), ids=(0, -1, 1, 2, 1), dtype=dtype,
                           num_adapters=4, ranks=[5, 2, 3, 4])
    ranks = torch.tensor([5, 2, 3, 4], dtype=torch.int32)
    r_block = 8
    ops = _native.ops()
    out, h, no_outer = ops.multi_lora_merged_gemm(
        t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], t["residual"], segments.seg_indptr,
        segments.adapter_ids, ranks, dtype, r_block)
    d = {n: t[n].double() for n in ("x", "weight", "bias", "lora_a", "lora_b", "scale", "residual", "dy")}
    expected = multi_lora_linear_ref(d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["scale"], segments,
                                     ranks=ranks.tolist(), residual=d["residual"])
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6}.get(dtype, 1e-2)

    def close(actual, reference):
        return ((actual.double() - reference).norm() / reference.norm()).item() < tolerance

    assert out.dtype == dtype and no_outer.shape[0] == 0
    assert close(out, expected)
    base_rows = slice(60, 67)
    base_expected = (d["x"] @ d["weight"].t() + d["bias"] + d["residual"])[base_rows]
    # element-wise: an entry near 0 still carries the rounding of its O(max) terms
    torch.testing.assert_close(out[base_rows].double(), base_expected, rtol=tolerance,
                               atol=tolerance * base_expected.abs().max().item())
    h_expected = _per_adapter_rows(segments, ranks.tolist(), lambda a, rows: d["x"][rows] @ d["lora_a"][a].t(),
                                   r_block, torch.float64)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and h.shape == (60 + 7 + 45 + 4, 8)
    assert close(h, h_expected) and torch.equal(h == 0, h_expected == 0)
    # dX = dY (W + s B A): the forward's op with W^T, B^T, A^T as strided views; G = dY B and dB from H with it
    grad, g, grad_b = ops.multi_lora_merged_gemm(
        t["dy"], t["weight"].t(), None, t["lora_b"].transpose(1, 2), t["lora_a"].transpose(1, 2), t["scale"], None,
        segments.seg_indptr, segments.adapter_ids, ranks, dtype, r_block, h)
    x = d["x"].clone().requires_grad_(True)
    lora_b = d["lora_b"].clone().requires_grad_(True)
    multi_lora_linear_ref(x, d["weight"], None, d["lora_a"], lora_b, d["scale"], segments,
                          ranks=ranks.tolist()).backward(d["dy"])
    assert close(grad, x.grad)
    g_expected = _per_adapter_rows(segments, ranks.tolist(), lambda a, rows: d["dy"][rows] @ d["lora_b"][a],
                                   r_block, torch.float64)
    assert close(g, g_expected) and torch.equal(g == 0, g_expected == 0)
    assert grad_b.dtype == dtype and grad_b.shape == t["lora_b"].shape
    assert close(grad_b, lora_b.grad)
    live = torch.arange(5)[None, :] < torch.tensor([5, 2, 3, 0])[:, None]  # adapter 3: rank 4, no rows
    assert torch.equal(grad_b != 0, live[:, None, :].expand_as(grad_b))


def test_op_uses_merged_weights_only_where_they_apply(monkeypatch):
    """Long segments without dropout and with V = U go through merged_linear (forward and dX); dropout, a separate
    LoRA input or short segments keep the shrink + fused GEMM path. Both give the float64 result."""
    calls = []
    original = NativeMultiLoRA.merged_linear
    monkeypatch.setattr(NativeMultiLoRA, "merged_linear",
                        staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k)))
    t, segments = _problem(num_rows_per_segment=(60, 7, 45, 20), ids=(0, -1, 1, 2), dtype=torch.float64)
    x = t["x"].clone().requires_grad_(True)
    out = multi_lora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                            ranks=t["ranks"], backend="native")
    out.backward(t["dy"])
    assert len(calls) == 2, "forward and input gradient should both use the merged weights"
    x_ref = t["x"].clone().requires_grad_(True)
    ref = multi_lora_linear_ref(x_ref, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments,
                                ranks=t["ranks"].tolist())
    ref.backward(t["dy"])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    calls.clear()
    multi_lora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments, ranks=t["ranks"],
                      dropout_p=0.1, seed=3, backend="native").sum().backward()
    multi_lora_linear(x, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], segments, ranks=t["ranks"],
                      lora_input=x * 2, backend="native").sum().backward()
    short, short_segments = _problem(dtype=torch.float64)  # 60 rows in 4 segments: 15 rows on average
    multi_lora_linear(short["x"], short["weight"], short["bias"], short["lora_a"], short["lora_b"], short["scale"],
                      short_segments, ranks=short["ranks"], backend="native")
    assert calls == []


def test_inference_skips_h_and_training_keeps_it():
    """H feeds dB and dscale only: without grad (or with B and scale frozen) the forward returns an empty H."""
    from monkey_kernels import multi_lora_linear_fwd

    t, segments = _problem(num_rows_per_segment=(60, 7, 45, 4), ids=(0, -1, 1, 2))
    args = lambda need_h: (t["x"], None, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scale"], None,
                           t["ranks"], segments.seg_indptr, segments.adapter_ids, segments.row_segment,
                           segments.row_adapter, -1, 16, 0.0, torch.tensor(0), "native", need_h)
    y_full, h_full = multi_lora_linear_fwd(*args(True))
    y_lean, h_lean = multi_lora_linear_fwd(*args(False))
    assert h_full.shape == (segments.num_rows, 16) and h_lean.shape == (segments.num_rows, 0)
    torch.testing.assert_close(y_full, y_lean, rtol=0, atol=0)
    torch.library.opcheck(multi_lora_linear_fwd, args(False))
    lora_b = t["lora_b"].clone().requires_grad_(True)
    out = multi_lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], lora_b, t["scale"], segments,
                            ranks=t["ranks"], backend="native")
    out.backward(t["dy"])
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_malloc_tuning_is_opt_in_and_lets_freed_activations_be_reused():
    """A batched pass frees and reallocates MB-sized activations every layer: with the raised thresholds
    (``MONKEY_KERNELS_MALLOC_TUNING=1``, applied when the extension loads) they come back from the heap instead
    of fresh mmaps, so the steps fault (almost) no new pages; by default (untuned) glibc maps and unmaps them
    (tens of thousands of faults over the same steps). A process that set glibc's own variables is left alone."""
    code = """
import resource, torch
from monkey_kernels import _native
assert _native.load() is not None
tuned = _native.allocator_tuned()
def step(i):
    kept = [torch.ones((1 << 18) + (i % 5) * (1 << 16)) for _ in range(4)]   # 1-2 MiB activations
    return sum(t.sum() for t in kept)
for i in range(5):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    step(i)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    opt_in = {settings.MALLOC_TUNING.name: "1"}
    tuned, faults = _run_python(code, **opt_in).stdout.split()
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        assert tuned == "False"
        return
    untuned, untuned_faults = _run_python(code, **{settings.MALLOC_TUNING.name: ""}).stdout.split()
    assert (tuned, untuned) == ("True", "False")
    assert int(faults) * 10 < int(untuned_faults), (faults, untuned_faults)
    assert _run_python(code, MALLOC_TRIM_THRESHOLD_=str(1 << 30), **opt_in).stdout.split()[0] == "False"


def test_partial_lora_layout_keeps_the_shrink_and_fused_gemm_path(monkeypatch):
    """One adapter's runs among base-only runs (InternLM-XComposer's PLoRA) take the shrink + fused GEMM path even
    with long segments; several adapters (Monkey's tiles, with or without a base-only global view) and one adapter
    over every row keep the merged weights. Both paths give the float64 result."""
    from monkey_kernels import SegmentInfo

    plora = SegmentInfo.from_indptr([0, 40, 120, 160, 240, 300], [-1, 0, -1, 0, -1])
    monkey = SegmentInfo.from_indptr([0, 64, 128, 192, 256, 320], [0, 1, 2, 3, -1])
    single = SegmentInfo.from_indptr([0, 200], [0])
    static = SegmentInfo.from_row_mask(torch.tensor([False] * 40 + [True] * 80 + [False] * 40), trim=False)
    assert NativeMultiLoRA.one_adapter_among_base_rows(plora)
    assert NativeMultiLoRA.one_adapter_among_base_rows(static)  # the empty tail (adapter -1, no rows) ignored
    assert not NativeMultiLoRA.merge_worthwhile(plora)
    assert NativeMultiLoRA.merge_worthwhile(monkey) and NativeMultiLoRA.merge_worthwhile(single)
    assert NativeMultiLoRA.merge_worthwhile(SegmentInfo.from_indptr([0, 100, 200], [0, 1]))
    assert not NativeMultiLoRA.one_adapter_among_base_rows(SegmentInfo.from_indptr([0, 100, 200], [-1, -1]))
    calls = []
    original = NativeMultiLoRA.merged_linear
    monkeypatch.setattr(NativeMultiLoRA, "merged_linear",
                        staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k)))
    for segments, merged in ((plora, False), (monkey, True)):
        calls.clear()
        adapters = int(segments.adapter_ids.max()) + 1
        x = torch.randn(segments.num_rows, 12, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(10, 12, dtype=torch.float64)
        lora_a = torch.randn(adapters, 3, 12, dtype=torch.float64)
        lora_b = torch.randn(adapters, 10, 3, dtype=torch.float64)
        scale = torch.rand(adapters, dtype=torch.float64) + 0.5
        out = multi_lora_linear(x, weight, None, lora_a, lora_b, scale, segments, backend="native")
        grad = torch.autograd.grad(out, x, torch.ones_like(out))[0]
        assert bool(calls) == merged
        x_ref = x.detach().clone().requires_grad_(True)
        ref = multi_lora_linear_ref(x_ref, weight, None, lora_a, lora_b, scale, segments)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, torch.autograd.grad(ref, x_ref, torch.ones_like(ref))[0], rtol=1e-12,
                                   atol=1e-12)
