"""The ``monkey-kernels`` command line: ``info``, ``demo`` and ``bench``.

- ``monkey-kernels info``: versions, CUDA, the Triton interpreter, the backend picked for CPU and CUDA
  tensors, whether Triton's bundled ``ptxas`` (used by the sm_90 compile check) is present, and the effective
  value of every environment variable of :mod:`monkey_kernels.settings`.
- ``monkey-kernels demo``: a Monkey-style encoder, reference vs ``patch_model``-ed, on a synthetic image:
  output and gradient differences, then forward and forward+backward timed interleaved in rounds by the
  benchmark harness (``monkey_kernels.benchmarking``: the speed-up is the median of per-round ratios), peak memory
  on GPU, printed as a table.
- ``monkey-kernels bench``: the benchmark scripts of ``benchmarks/`` (a source checkout): each prints its
  table and writes ``<bench>_<device>_<date>.json`` (the harness's schema) and, when matplotlib is
  installed, the matching ``.png``.

Exit codes: 0 on success, 2 on bad arguments (argparse), 1 on a failure (with a one-line message on stderr).
Heavy imports (torch models, benchmarks, matplotlib) happen inside the subcommands, and nothing queries the
GPU at import time, so ``--help`` and ``info`` stay fast.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from monkey_kernels import settings
from monkey_kernels.ops.registry import BACKENDS  # the light home of monkey_kernels.ops.backends.BACKENDS

__all__ = ["main", "run", "CLIError", "build_parser", "cmd_info", "cmd_demo", "cmd_bench", "SMALL_DEMO_CONFIG", "BENCHMARKS"]


class CLIError(Exception):
    """A failure reported to the user as one line on stderr and exit code 1 (no traceback)."""


# The small CPU config of ``demo``: a few seconds on two CPU cores, same structure as the release.
SMALL_DEMO_CONFIG = dict(tile_size=112, image_size=224, patch_size=14, width=128, layers=4, heads=4, mlp_ratio=4,
                         num_positions=16, n_queries=16, output_dim=64, resampler_heads=4,
                         attn_lora_rank=16, mlp_lora_rank=32)

# Benchmark name -> (module in the ``benchmarks`` package, options that make it short for ``--quick``).
# Options the user passes after ``bench`` are appended after these, so theirs win (argparse keeps the last).
BENCHMARKS: Dict[str, tuple] = {
    # the op on Monkey's layers (CUDA) or square layers (CPU): every backend, the loop, PEFT, F.linear
    "multi_lora": ("bench_multi_lora", ["--quick", "--no-progress"]),
    "slp": ("bench_slp", ["--quick", "--no-progress"]),
    "monkey_encoder": ("bench_monkey_encoder", ["--quick"]),
    "peft": ("bench_peft", ["--quick"]),
    "monkey_vlm": ("bench_monkey_vlm", ["--quick"]),
    "processor": ("bench_processor", ["--quick"]),
    "mixed_resolution": ("bench_mixed_resolution", ["--quick"]),
    # InternLM-XComposer's Partial LoRA: one decoder layer's five linears, gather/scatter reference vs fused
    "plora": ("bench_plora", ["--quick"]),
    # TextMonkey's encoder: the per-layer window loop vs one fused block call per layer
    "textmonkey": ("bench_textmonkey", ["--quick"]),
}

_DTYPES = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------
def _version(module_name: str) -> str:
    """``module.__version__``, or why it is unavailable (import errors are reported, not raised)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is information for the user here
        return f"not available ({type(exc).__name__}: {exc})"
    return str(getattr(module, "__version__", "unknown version"))


def _backend_for(device_type: str) -> str:
    """What ``resolve_backend(None, device)`` picks, or its error (e.g. a bad MONKEY_KERNELS_BACKEND)."""
    import torch

    from monkey_kernels import resolve_backend

    try:
        return resolve_backend(None, torch.device(device_type))
    except ValueError as exc:
        return f"error: {exc}"


def _ptxas_path() -> Optional[str]:
    """Triton's bundled ``ptxas`` path, or ``None`` when Triton is not importable."""
    try:
        import triton
    except Exception:  # noqa: BLE001
        return None
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _native_facts() -> Dict[str, str]:
    """The extension's status and, when it loads, its low-rank ISA and base-GEMM choice (or the settings' error)."""
    from monkey_kernels import _native

    facts = {"native extension": _native.status()}
    if not _native.available():
        return facts
    try:
        module = _native.extension()  # the current settings passed to it
    except ValueError as error:  # a bad MONKEY_KERNELS_CPU_GEMM / MONKEY_KERNELS_LOWRANK_ISA value
        facts["native low-rank GEMMs"] = facts["native base GEMM"] = f"error: {error}"
        return facts
    mode = settings.CPU_GEMM.get()
    facts["native low-rank GEMMs"] = (f"{module.lowrank_isa()} (csrc/lowrank_gemm.h; "
                                      f"{settings.LOWRANK_ISA.name} caps it)")
    sample = "tiled kernel" if module.tiled_base_gemm(256, 256, False) else "BLAS"
    facts["native base GEMM"] = (f"{mode}: a 256x256 fp32 layer runs on {sample} "
                                 f"(measured once per shape; {settings.CPU_GEMM.name}=auto|blas|tiled)")
    return facts


def _print_table(rows: Dict[str, object]) -> None:
    width = max(len(key) for key in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def cmd_info(args: argparse.Namespace) -> dict:
    """Prints (and returns) the environment facts that decide which backend runs, then the effective settings
    (``info["settings"]``: variable -> ``"value (source)"``)."""
    import torch

    info: Dict[str, object] = {
        "monkey_kernels": _version("monkey_kernels"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
    }
    # Queried here, at call time, never at import: CUDA initialisation is slow and may fail.
    cuda = torch.cuda.is_available()
    if cuda:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        info["cuda"] = f"available: {torch.cuda.get_device_name(index)} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    else:
        reason = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        info["cuda"] = f"not available ({reason})"
    try:
        interpret = settings.TRITON_INTERPRET.get()
    except ValueError as error:
        interpret = f"error: {error}"
    info[settings.TRITON_INTERPRET.name] = (
        "set: Triton kernels run on CPU through the interpreter (slow)" if interpret is True
        else "not set" if interpret is False else interpret)
    info.update(_native_facts())
    info["backend for CPU tensors"] = _backend_for("cpu")
    info["backend for CUDA tensors"] = _backend_for("cuda") + ("" if cuda else " (no CUDA device here)")
    ptxas = _ptxas_path()
    if ptxas is None:
        info["bundled ptxas"] = "n/a (Triton not importable)"
    elif os.path.isfile(ptxas):
        info["bundled ptxas"] = f"present: {ptxas}"
    else:
        info["bundled ptxas"] = f"missing: {ptxas} (the sm_90 compile check is skipped)"
    _print_table(info)
    info["settings"] = {name: f"{value} ({source})" for name, (value, source) in settings.effective().items()}
    print("\nenvironment variables (monkey_kernels.settings; the README's table says what each does):")
    _print_table(info["settings"])
    return info


# ---------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------
def _parse_resolution(text: str) -> tuple:
    """``"WxH"`` -> ``(W, H)`` positive ints (an ``argparse`` type: raises ``ArgumentTypeError``)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (e.g. 896x896), got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return width, height


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def synthetic_images(batch: int, width: int, height: int, seed: int = 0):
    """``[batch, 3, height, width]`` float images in ``[0, 1]``: colour gradients, a disc, a box and stripes,
    shifted per image so every tile (and every image) sees different content."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    images = []
    for _ in range(batch):
        cx, cy, r, bx, by = torch.rand(5, generator=generator).tolist()
        red = xs.clone()
        green = ys.clone()
        blue = 0.5 + 0.5 * torch.sin(2 * torch.pi * (6 * xs + 3 * ys))  # diagonal stripes: high frequencies
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 < (0.1 + 0.2 * r) ** 2
        red[disc] = 1.0 - red[disc]
        box = (xs > bx * 0.7) & (xs < bx * 0.7 + 0.25) & (ys > by * 0.7) & (ys < by * 0.7 + 0.2)
        green[box] = 0.1
        blue[box] = 0.9
        images.append(torch.stack([red, green, blue]).clamp(0.0, 1.0))
    return torch.stack(images)


def _max_diffs(actual, expected) -> tuple:
    """(max |actual - expected|, that / max |expected|), in fp32."""
    diff = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    return diff, diff / max(scale, 1e-30)


@dataclass
class _DemoPlan:
    """What ``demo`` runs: where, in which dtype, on which backend, at which size."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    dtype_name: str
    config_name: str
    backend: str
    config: Any  # MonkeyVisionConfig
    width: int
    height: int
    grid: Any  # the tile grid of (width, height)


def _plan_demo(args: argparse.Namespace) -> _DemoPlan:
    """The device, dtype, backend and model config from the arguments (``CLIError`` for an impossible one)."""
    import torch

    from monkey_kernels import resolve_backend
    from monkey_kernels.models import MonkeyVisionConfig, tile_grid

    device_text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_text)
    except RuntimeError as exc:
        raise CLIError(f"--device {device_text!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available here (try --device cpu)")
    on_cuda = device.type == "cuda"
    config_name = args.config or ("release" if on_cuda else "small")
    dtype_name = args.dtype or ("bf16" if on_cuda else "fp32")
    try:
        backend = resolve_backend(args.backend, device)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    # lora_dropout 0 so the reference and the fused model draw no (different) dropout masks in train mode.
    base_kwargs = dict(SMALL_DEMO_CONFIG) if config_name == "small" else {}
    base_kwargs["lora_dropout"] = 0.0
    probe = MonkeyVisionConfig(**base_kwargs)
    width, height = args.resolution if args.resolution is not None else (probe.image_size, probe.image_size)
    grid = tile_grid(width, height, probe)
    # One adapter per tile: the release has 4 (2x2); wider grids need more adapters, as in the 1344x896 recipe.
    config = MonkeyVisionConfig(**base_kwargs, lora_repeat_num=max(probe.lora_repeat_num, grid.num_tiles))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    return _DemoPlan(device, dtype, dtype_name, config_name, backend, config, width, height, grid)


def _demo_models(plan: _DemoPlan, seed: int):
    """``(reference, patched, report)``: a random encoder with non-zero LoRA ``B`` and the release recipe's
    trainable parameters (LoRA + resampler), in train mode, and its patched deep copy."""
    import torch

    from monkey_kernels import patch_model
    from monkey_kernels.models import MonkeyVisionModel

    torch.manual_seed(seed)
    reference = MonkeyVisionModel(plan.config)
    with torch.no_grad():  # zero-initialised lora_b would make the LoRA path a no-op: give it weights
        for name, param in reference.named_parameters():
            if "lora_b" in name:
                param.normal_(0.0, 0.02)
    for name, param in reference.named_parameters():
        param.requires_grad_("lora" in name or name.startswith("attn_pool"))
    reference = reference.to(device=plan.device, dtype=plan.dtype).train()
    patched = copy.deepcopy(reference)
    report = patch_model(patched, backend=plan.backend)
    patched.train()
    return reference, patched, report


def _gradient_differences(reference, patched) -> tuple:
    """``(max abs diff, max rel diff, worst parameter, trainable count)`` over the trainable parameters' gradients
    (``CLIError`` when a parameter or a gradient exists in one model only)."""
    fused_params = dict(patched.named_parameters())
    grad_abs, grad_rel, worst = 0.0, 0.0, None
    trainable = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    for name, param in trainable:
        other = fused_params.get(name)
        if other is None:
            raise CLIError(f"patched model has no parameter {name!r} to compare gradients with")
        if param.grad is None and other.grad is None:
            continue  # e.g. adapters of tiles this grid does not have
        if param.grad is None or other.grad is None:
            raise CLIError(f"gradient of {name!r} exists in only one of the two models")
        diff, rel = _max_diffs(other.grad, param.grad)
        grad_abs = max(grad_abs, diff)
        if rel >= grad_rel:
            grad_rel, worst = rel, name
    return grad_abs, grad_rel, worst, len(trainable)


def _time_demo(plan: _DemoPlan, models: dict, pixel_values, forward_backward, args) -> tuple:
    """``(rows, speedup)``: forward and forward+backward of each model timed interleaved in rounds by the harness
    (the speed-up is reference / patched, the median of per-round ratios), peak memory on GPU."""
    import torch

    from monkey_kernels import benchmarking as harness  # noqa: PLC0415

    def inference(model):
        def call():
            with torch.no_grad():
                model(pixel_values)
        return call

    rows: List[dict] = []
    for mode, make in (("fwd", inference), ("fwd_bwd", lambda model: lambda: forward_backward(model))):
        calls = {name: make(model) for name, model in models.items()}
        timings = harness.time_methods(calls, plan.device, base="reference", rounds=args.repeats, warmup=args.warmup)
        peaks = {name: harness.peak_memory_bytes(call, plan.device) for name, call in calls.items()}
        label = f"{plan.width}x{plan.height} b{args.batch}"
        for row in harness.timing_rows(label, mode, timings, peaks, backend=None):
            row["backend"] = plan.backend if row["method"] == "patched" else None
            row["speedup"] = round(1.0 / row["ratio_to_base"], 3) if row["ratio_to_base"] else None
            rows.append(row)
    print(harness.markdown_table(rows, ["case", "method", "mode", "ms", "speedup", "peak_memory_bytes", "backend"]))
    return rows, {r["mode"]: r["speedup"] for r in rows if r["method"] == "patched"}


def cmd_demo(args: argparse.Namespace) -> dict:
    """Reference vs patched Monkey encoder on a synthetic image; prints and returns the comparison."""
    import torch

    from monkey_kernels.models import prepare_images

    plan = _plan_demo(args)
    config, grid = plan.config, plan.grid
    print(f"demo: {plan.config_name} config (width {config.width}, {config.layers} layers, tile {config.tile_size} "
          f"px), {plan.dtype_name} on {plan.device}, backend={plan.backend}; resolution {plan.width}x{plan.height} "
          f"-> {grid.n_cols}x{grid.n_rows} tiles + global view, batch {args.batch}")
    reference, patched, report = _demo_models(plan, args.seed)
    print(f"patched: {report}")

    images = synthetic_images(args.batch, plan.width, plan.height, seed=args.seed)
    pixel_values, _ = prepare_images(images, (plan.width, plan.height), config=config)
    pixel_values = pixel_values.to(device=plan.device, dtype=plan.dtype)
    out_grad = torch.randn(args.batch, grid.num_views * config.n_queries, config.output_dim,
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(plan.device, plan.dtype)

    def forward_backward(model):
        model.zero_grad(set_to_none=True)
        out = model(pixel_values)
        out.backward(out_grad)
        return out

    ref_out = forward_backward(reference)
    out_abs, out_rel = _max_diffs(forward_backward(patched), ref_out)
    grad_abs, grad_rel, worst, trainable = _gradient_differences(reference, patched)
    print(f"output    max abs diff {out_abs:.3e}   max rel diff {out_rel:.3e}")
    print(f"gradients max abs diff {grad_abs:.3e}   max rel diff {grad_rel:.3e}   "
          f"({trainable} trainable tensors; worst: {worst})")

    rows, speedup = _time_demo(plan, {"reference": reference, "patched": patched}, pixel_values, forward_backward,
                               args)
    print(f"speed-up (reference / patched, median of {args.repeats} interleaved rounds): forward "
          f"{speedup['fwd']:.2f}x, forward+backward {speedup['fwd_bwd']:.2f}x"
          f"{'' if plan.device.type == 'cuda' else ' (CPU timings say nothing about GPU performance)'}")
    return {
        "config": plan.config_name, "device": str(plan.device), "dtype": plan.dtype_name, "backend": plan.backend,
        "grid": [grid.n_cols, grid.n_rows], "batch": args.batch,
        "output_max_abs_diff": out_abs, "output_max_rel_diff": out_rel,
        "grad_max_abs_diff": grad_abs, "grad_max_rel_diff": grad_rel, "worst_grad": worst,
        "rows": rows, "speedup_forward": speedup["fwd"], "speedup_fwdbwd": speedup["fwd_bwd"],
    }


# ---------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------
def _import_benchmark(module_name: str):
    """``benchmarks.<module_name>``; from the repository root beside this package when not importable."""
    try:
        return importlib.import_module(f"benchmarks.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", f"benchmarks.{module_name}"):
            raise  # a dependency of the benchmark is missing: say that, not "no checkout"
    # An installed package has no benchmarks/: they live in the source checkout, one level above the package.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / f"{module_name}.py").is_file():
        raise CLIError(f"bench needs the benchmark scripts of a source checkout (benchmarks/{module_name}.py "
                       f"not found under {root}); run from the repository root")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"benchmarks.{module_name}")


def cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> dict:
    """Runs the selected benchmarks (each prints its table and writes its JSON under ``--out-dir`` with the
    harness's file names, and its PNG beside it unless ``--no-plots``)."""
    import torch
    from tqdm import tqdm

    which = list(dict.fromkeys(args.which or BENCHMARKS))
    if extra and len(which) > 1:
        # The scripts' options differ (e.g. --cases choices), so pass-through options only make sense for one.
        raise CLIError(f"options {' '.join(extra)} are passed to the benchmark script: select one with --which")
    from monkey_kernels import benchmarking as harness  # noqa: PLC0415
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the scripts' default device
    outputs: Dict[str, dict] = {}
    written: List[Path] = []
    plots: List[Path] = []
    with tqdm(total=len(which), desc="benchmarks", unit="bench", disable=args.no_progress) as progress:
        for name in which:
            module_name, quick_argv = BENCHMARKS[name]
            progress.set_postfix_str(name)
            module = _import_benchmark(module_name)
            json_path = harness.result_path(name, device, results_dir=out_dir)
            argv = ((list(quick_argv) if args.quick else []) + ["--out", str(json_path)]
                    + (["--no-plot"] if args.no_plots else []) + list(extra))
            try:
                result = module.main(argv)
            except SystemExit as exc:  # the script's argparse rejected an option: a bad argument, exit 2
                if exc.code not in (0, None) and not isinstance(exc.code, str):
                    raise SystemExit(2) from None
                if isinstance(exc.code, str):  # a script's own refusal, e.g. an unavailable backend
                    raise CLIError(f"{name}: {exc.code}") from None
                raise
            if not isinstance(result, dict) or "rows" not in result or not json_path.is_file():
                raise CLIError(f"{name}: the benchmark returned no result in the harness's schema")
            outputs[name] = result
            written.append(json_path)
            png = harness.plot_path(json_path)
            if not args.no_plots and png.is_file():
                plots.append(png)
            progress.update(1)
    for path in written + plots:
        print(f"wrote {path}")
    return {"results": outputs, "json": [str(p) for p in written], "plots": [str(p) for p in plots]}


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``monkey-kernels`` argument parser (subcommands ``info``, ``demo``, ``bench``)."""
    parser = argparse.ArgumentParser(prog="monkey-kernels",
                                     description="Fused Triton kernels for Monkey-style multi-LoRA encoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,demo,bench}")
    sub.add_parser("info", help="versions, CUDA, and which backend runs where")

    demo = sub.add_parser("demo", help="reference vs patched Monkey encoder: differences and speed-up")
    demo.add_argument("--config", choices=["small", "release"], default=None,
                      help="model size (default: release on CUDA, small on CPU)")
    demo.add_argument("--resolution", type=_parse_resolution, default=None, metavar="WxH",
                      help="requested resolution in the config's pixels (default: config.image_size square, "
                           "a 2x2 tile grid: 896x896 for release, 224x224 for small)")
    demo.add_argument("--batch", type=_positive_int, default=1)
    demo.add_argument("--backend", choices=("auto",) + BACKENDS, default=None,
                      help="fused backend (default: resolve_backend's choice for the device)")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    demo.add_argument("--dtype", choices=_DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    demo.add_argument("--repeats", type=_positive_int, default=5, help="timed calls per measurement (median)")
    demo.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    demo.add_argument("--seed", type=int, default=0)

    bench = sub.add_parser("bench", help="run the benchmark suite: tables, JSON results and plots",
                           description="Unrecognised options are passed to the selected benchmark script "
                                       "(with a single --which), e.g. --batches 1 --cases out_proj.")
    bench.add_argument("--which", nargs="+", choices=list(BENCHMARKS), default=None,
                       help="benchmarks to run (default: all)")
    bench.add_argument("--out-dir", default=str(Path("benchmarks") / "results"),
                       help="where the JSON results and PNG plots go (default: benchmarks/results)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    bench.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv`` and runs the subcommand; returns its result dict (for scripts and tests).

    Raises ``SystemExit(2)`` on bad arguments and :class:`CLIError` (or the underlying exception) on failure.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo" and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.command == "info":
        return cmd_info(args)
    if args.command == "demo":
        return cmd_demo(args)
    return cmd_bench(args, extra)


def _show_traceback() -> bool:
    """``MONKEY_KERNELS_TRACEBACK``; a bad value is reported on stderr and counts as off."""
    try:
        return settings.TRACEBACK.get()
    except ValueError as error:
        print(f"monkey-kernels: {error}", file=sys.stderr)
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``monkey-kernels`` entry point: 0 on success, 1 on failure (one line on stderr), and argparse's
    ``SystemExit(2)`` on bad arguments. Returns an int because ``console_scripts`` calls ``sys.exit(main())``."""
    command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
    try:
        run(argv)
    except CLIError as exc:
        print(f"monkey-kernels {command}: error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError, ImportError, OSError) as exc:
        # Expected failure modes (a missing optional dependency, CUDA out of memory, a bad shape) get one
        # clear line; MONKEY_KERNELS_TRACEBACK=1 shows where they came from.
        if _show_traceback():
            raise
        print(f"monkey-kernels {command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
