"""The plan of a GPU session (``benchmarks/gpu_session.sh``): its arguments, steps and time budget.

Pure Python (no torch import), so it is fast and unit-tested on CPU (``tests/tools/test_gpu_session.py``).

Budget rule, applied before each step with the time actually left (``remaining_s``):

- ``usable = remaining_s - FINISH_RESERVE_S - KILL_GRACE_S`` (the summary and the cache tarball always get
  their time, and a step killed by ``timeout`` gets ``KILL_GRACE_S`` to die);
- the step's timeout is ``min(want_s, usable - reserve)``, ``reserve`` being what the later required steps
  keep (each its ``min_s``, or, when this step is optional, its full ``want_s``; plus ``KILL_GRACE_S`` each):
  optional steps get only what the required ones will not use;
- if that is below the step's ``min_s``: an optional step is skipped; a required step takes
  ``min(want_s, usable)`` (earlier steps have priority: correctness before timings), and is skipped only if even
  that is below its ``min_s``.

So every timeout is at most the usable time left, and the timeouts of a run (plus the grace of each and the
reserve) never sum above the budget.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

DEFAULT_BUDGET_S = 480
QUICK_BUDGET_S = 270
FINISH_RESERVE_S = 15  # summary, results.json, cache tarball
KILL_GRACE_S = 5  # ``timeout -k``: SIGKILL this long after SIGTERM
MAX_FILES = 8  # what the device tool brings back from OUT_DIR
MAX_FILE_BYTES = 16 * 2**20
DEFAULT_OUT_DIR = "gpu_session_out"
DEFAULT_CACHE_DIR = "/tmp/monkey_kernels_gpu_cache"  # absolute and fixed: Triton's cache records absolute paths


@dataclass(frozen=True)
class Step:
    """One step: ``min_s`` (not worth starting with less), ``want_s`` (its timeout when time is plenty; in
    ``--quick``: ``quick_want_s``), ``in_quick`` (part of ``--quick``), ``optional`` (skipped rather than
    squeezing later steps)."""

    name: str
    min_s: int
    want_s: int
    quick_want_s: int
    in_quick: bool
    optional: bool
    description: str
    requires: Optional[str] = None  # a step that must have succeeded first (else this one is skipped)

    def want(self, quick: bool) -> int:
        return self.quick_want_s if quick else self.want_s


STEPS: Tuple[Step, ...] = (
    Step("environment", 3, 10, 10, True, False, "nvidia-smi, versions (no native build)"),
    Step("correctness", 60, 160, 95, True, False,
         "compiled kernels at Monkey sizes vs float64, plain and under fp16/bf16 autocast over fp32 masters "
         "(benchmarks/gpu_correctness.py) + tests/ops/test_cuda_graphs.py"),
    Step("op_batch1", 30, 75, 35, True, False,
         "multi-LoRA op at Monkey shapes, batch 1: fused vs F.linear, unfused, loop, PEFT; Triton GEMM (rank 0) "
         "vs cuBLAS; both GEMM paths"),
    Step("op_batch2_8", 30, 90, 60, False, True, "the same at batch 2 and 8"),
    Step("encoder", 40, 110, 45, True, False,
         "Monkey encoder, release config, bf16, 896x896, batch 1 and 4 (--quick: 1), CUDA graphs"),
    Step("slp", 15, 35, 15, True, False, "SLP embedding assembly vs copy bandwidth"),
    Step("plora", 30, 60, 35, True, False,
         "InternLM-XComposer PLoRA: one decoder layer's five linears at the released shapes (r=256, bf16), "
         "1/2/4 images of 1225 tokens (--quick: 1), gather/scatter reference vs fused, roofline ratio"),
    Step("amp", 45, 90, 60, False, True,
         "AMP train step: Monkey encoder at the release's width, 12 of its 48 layers, fp32 weights under bf16 "
         "autocast (the Trainer's bf16=True), 896x896 batch 1: reference vs patched under the same autocast"),
    Step("textmonkey", 60, 150, 90, False, True,
         "TextMonkey encoder, release shapes (48 layers, width 1664, bf16), 896x896, per-window adapters, batch 1 "
         "(full run: also no adapters): reference per-window loop vs one fused block call per layer"),
    Step("build_native", 90, 150, 150, False, True, "CUDA build of the native extension (MAX_JOBS=nproc)"),
    Step("slp_native", 15, 30, 30, False, True, "SLP with the native CUDA kernel", requires="build_native"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def steps_for(quick: bool, only: Optional[Sequence[str]] = None) -> List[Step]:
    """The steps of a run, in order: those of ``--quick`` (or all), restricted to ``only`` when given."""
    if only is not None:
        unknown = [name for name in only if name not in STEP_NAMES]
        if unknown:
            raise ValueError(f"steps must be among {STEP_NAMES}, got {unknown}")
    chosen = [s for s in STEPS if (s.in_quick or not quick) and (only is None or s.name in only)]
    names = {s.name for s in chosen}
    return [s for s in chosen if s.requires is None or s.requires in names]


def step_timeout(step: Step, remaining_s: float, later: Sequence[Step], quick: bool) -> Optional[int]:
    """The timeout (whole seconds) of ``step`` with ``remaining_s`` left and ``later`` steps still to come, or
    ``None`` to skip it (see the module docstring)."""
    usable = remaining_s - FINISH_RESERVE_S - KILL_GRACE_S
    reserve = sum((s.want(quick) if step.optional else s.min_s) + KILL_GRACE_S for s in later if not s.optional)
    timeout = min(step.want(quick), usable - reserve)
    if timeout < step.min_s:
        if step.optional:
            return None
        timeout = min(step.want(quick), usable)
        if timeout < step.min_s:
            return None
    return int(timeout)


def plan(budget_s: float, quick: bool, only: Optional[Sequence[str]] = None,
         skipped: Sequence[str] = ()) -> List[Tuple[Step, Optional[int]]]:
    """The whole run's ``[(step, timeout or None)]`` assuming every step runs to its timeout (the worst case;
    a real run re-plans before each step with the time actually left). ``skipped``: steps to leave out."""
    steps = [s for s in steps_for(quick, only) if s.name not in skipped]
    remaining = float(budget_s)
    result: List[Tuple[Step, Optional[int]]] = []
    ran = set()
    for i, step in enumerate(steps):
        timeout = None
        if step.requires is None or step.requires in ran:
            timeout = step_timeout(step, remaining, steps[i + 1:], quick)
        result.append((step, timeout))
        if timeout is not None:
            ran.add(step.name)
            remaining -= timeout + KILL_GRACE_S
    return result


def _positive_budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value < FINISH_RESERVE_S + KILL_GRACE_S + 1:
        raise argparse.ArgumentTypeError(
            f"a budget below {FINISH_RESERVE_S + KILL_GRACE_S + 1} s leaves no time for any step, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_session.sh",
        description="One GPU session within a time budget: correctness, then op / encoder / SLP timings.")
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_OUT_DIR,
                        help=f"where the (at most {MAX_FILES}) result files go (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--budget-s", type=_positive_budget, default=None,
                        help=f"wall-clock budget in seconds (default {DEFAULT_BUDGET_S}; --quick: {QUICK_BUDGET_S})")
    parser.add_argument("--quick", action="store_true", help="correctness and batch-1 timings only")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: every step runs a stub that writes a sample result (tests the plumbing)")
    parser.add_argument("--steps", nargs="+", choices=STEP_NAMES, default=None, help="run only these steps")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="Triton / autotune cache (restored from and saved to OUT_DIR/cache.tar.gz)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The session's arguments; ``budget_s`` filled in from ``--quick`` when not given."""
    args = build_parser().parse_args(argv)
    if args.budget_s is None:
        args.budget_s = QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S
    return args


def format_plan(budget_s: float, quick: bool, only: Optional[Sequence[str]] = None) -> str:
    lines = [f"plan for a {budget_s:.0f} s budget{' (--quick)' if quick else ''} (worst case: every step to its timeout):"]
    for step, timeout in plan(budget_s, quick, only):
        lines.append(f"  {step.name:<13} {'skip' if timeout is None else f'<= {timeout} s':>9}  {step.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    parsed = parse_args()
    print(format_plan(parsed.budget_s, parsed.quick, parsed.steps))
