"""The GPU session runner behind ``benchmarks/gpu_session.sh`` (see ``gpu_plan.py`` for the steps and budget).

``python3 benchmarks/gpu_session.py [OUT_DIR] [--budget-s N] [--quick] [--dry-run] [--steps ...]``

- Runs the steps of :mod:`gpu_plan` in order, each under coreutils ``timeout -k`` with the timeout the plan
  gives for the time actually left; a step that fails or times out is recorded and the session goes on.
- Environment of every step: ``PYTHONPATH`` = the repository (no install), ``TRITON_CACHE_DIR`` and
  ``MONKEY_KERNELS_AUTOTUNE_CACHE`` under ``--cache-dir`` (restored from ``OUT_DIR/cache.tar.gz`` when present,
  saved there at the end, so a second run reuses compiled kernels, autotune results and GEMM-path decisions),
  ``MONKEY_KERNELS_NO_JIT=1`` (nothing builds the C++ extension by accident; only ``build_native`` does, with
  ``MAX_JOBS=nproc``).
- Writes at most 4 files to OUT_DIR, each at most 16 MiB: ``session.log`` (every step's output),
  ``results.json`` (the session, every step's status and result in the harness's schema, the GEMM-path
  decisions, the summary), ``summary.md`` (the target table, also printed last) and ``cache.tar.gz``.
- ``--dry-run`` (no GPU): each step runs a stub that writes a sample result marked ``"dry_run": true``; the
  plumbing (budget, timeouts, files, summary) is exercised in seconds. Its numbers are not measurements.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, str(REPO_ROOT))  # monkey_kernels.settings: light, no torch (the dry run stays fast)
import gpu_plan  # noqa: E402
from gpu_plan import KILL_GRACE_S, MAX_FILE_BYTES, MAX_FILES, Step  # noqa: E402

from monkey_kernels import settings  # noqa: E402
CACHE_TARBALL = "cache.tar.gz"
OUTPUT_FILES = ("session.log", "results.json", "summary.md", CACHE_TARBALL)
# Targets (issue 14): (what, goal op, goal value)
TARGETS = {
    "op_fwd": ("<=", 1.08), "op_fwd_bwd": ("<=", 1.15), "op_vs_unfused": (">=", 1.4),
    "encoder_inference": (">=", 2.0), "encoder_train_step": (">=", 1.5), "slp_copy_fraction": (">=", 0.85),
    # issue 22: the fused PLoRA layer within 1.05x of its own work's roofline, and faster than gather/scatter
    "plora_roofline": ("<=", 1.05), "plora_vs_reference": (">=", 1.0),
    # issue 21: one fused block call per layer over every window, never slower than the per-window loop
    "textmonkey_inference": (">=", 1.0), "textmonkey_train_step": (">=", 1.0),
    # issue 20: under the same bf16 autocast over fp32 masters, the patched encoder never slower
    "amp_inference": (">=", 1.0), "amp_train_step": (">=", 1.0),
}


# ---------------------------------------------------------------------------------------------------------
# Step commands
# ---------------------------------------------------------------------------------------------------------
def step_command(step: Step, work: Path, quick: bool, dry_run: bool) -> List[str]:
    """The argv of ``step`` (its result JSON goes to ``work/<step>.json``)."""
    py = sys.executable
    out = str(work / f"{step.name}.json")
    if dry_run:
        return [py, str(Path(__file__).resolve()), "--stub", step.name, out]
    bench = REPO_ROOT / "benchmarks"
    common = ["--no-plot", "--out", out]
    if step.name == "environment":
        return ["bash", "-c", "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; "
                f"{py} -m monkey_kernels info"]
    if step.name == "correctness":
        return [py, "-m", "pytest", "-q", "-rfE", "--maxfail=50", "-p", "no:cacheprovider",
                f"--junitxml={work / 'correctness.xml'}", str(bench / "gpu_correctness.py"),
                str(REPO_ROOT / "tests" / "ops" / "test_cuda_graphs.py")]
    if step.name in ("op_batch1", "op_batch2_8"):
        batches = ["1"] if step.name == "op_batch1" else ["2", "8"]
        return [py, str(bench / "bench_multi_lora.py"), "--gemm", "--batches", *batches, "--rounds", "1",
                "--rep-ms", "50", "--no-progress", *common]
    if step.name == "encoder":
        return [py, str(bench / "bench_monkey_encoder.py"), "--resolutions", "896x896", "--batches",
                *(["1"] if quick else ["1", "4"]), "--cuda-graph", "--backends", "triton", "--rounds", "1",
                "--rep-ms", "100", *common]
    if step.name == "slp":
        return [py, str(bench / "bench_slp.py"), "--backends", "triton", "--rounds", "1", "--rep-ms", "100",
                "--no-progress", *common]
    if step.name == "plora":
        return [py, str(bench / "bench_plora.py"), "--release", "--backends", "triton", "--rounds", "1",
                "--rep-ms", "100", *(["--images", "1"] if quick else []), *common]
    if step.name == "amp":
        return [py, str(bench / "bench_monkey_encoder.py"), "--amp", "bf16", "--layers", "12", "--resolutions",
                "896x896", "--batches", "1", "--backends", "triton", "--rounds", "1", "--rep-ms", "100", *common]
    if step.name == "textmonkey":
        return [py, str(bench / "bench_textmonkey.py"), "--release", "--resolutions", "896x896", "--batches", "1",
                "--adapters", *(["per_window"] if quick else ["per_window", "none"]), "--rounds", "1",
                "--rep-ms", "100", *common]
    if step.name == "build_native":
        return [py, "-c", "from monkey_kernels import _native; s = _native.status(); print('native extension:', s); "
                "raise SystemExit(0 if s in ('prebuilt', 'jit') else 1)"]
    if step.name == "slp_native":
        return [py, str(bench / "bench_slp.py"), "--backends", "triton", "native", "--modes", "fwd", "--rounds", "1",
                "--rep-ms", "100", "--no-progress", *common]
    raise ValueError(f"unknown step {step.name!r}")


def step_env(step: Step, cache_dir: Path, work: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(PYTHONUNBUFFERED="1", MAX_JOBS=str(os.cpu_count() or 1), MPLBACKEND="Agg")
    env.update({settings.TRITON_CACHE_DIR.name: str(cache_dir / "triton"),
                settings.AUTOTUNE_CACHE.name: str(cache_dir / "autotune"), settings.CACHE.name: str(work / "native")})
    if step.name in ("build_native", "slp_native"):
        env.pop(settings.NO_JIT.name, None)
    else:
        env[settings.NO_JIT.name] = "1"
    return env


# ---------------------------------------------------------------------------------------------------------
# Running a step under `timeout`, its output to the console and the (size-capped) log
# ---------------------------------------------------------------------------------------------------------
class Log:
    """The session log: everything goes to stdout; the file stops (with a marker) before ``MAX_FILE_BYTES``."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w", encoding="utf-8", errors="replace")
        self.written = 0
        self.truncated = False

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if self.truncated:
            return
        data = text.encode("utf-8", "replace")
        if self.written + len(data) > MAX_FILE_BYTES - 4096:
            self.handle.write("\n[log truncated at the 16 MiB limit; the console has the rest]\n")
            self.truncated = True
            return
        self.handle.write(text)
        self.handle.flush()
        self.written += len(data)

    def close(self) -> None:
        self.handle.close()


def run_step(cmd: Sequence[str], timeout_s: int, env: Dict[str, str], log: Log) -> dict:
    """Runs ``cmd`` under ``timeout -k`` (its own process group; killed by us too, should ``timeout`` be
    missing or the child ignore it); returns ``{rc, seconds, status}`` (status: ok / failed / timeout)."""
    wrapped = (["timeout", "-k", str(KILL_GRACE_S), str(timeout_s)] if shutil.which("timeout") else []) + list(cmd)
    start = time.monotonic()
    proc = subprocess.Popen(wrapped, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s + 2 * KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=KILL_GRACE_S)
    seconds = round(time.monotonic() - start, 1)
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137, -signal.SIGKILL) else "failed"
    return {"rc": rc, "seconds": seconds, "status": status}


# ---------------------------------------------------------------------------------------------------------
# Results: correctness counts, the summary against the targets
# ---------------------------------------------------------------------------------------------------------
def junit_counts(path: Path) -> Optional[dict]:
    """``{tests, failures, errors, skipped, failed: [names]}`` from pytest's JUnit XML, or ``None``."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:300] if problem.get("message") else ""
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    counts["failed"] = failed[:50]
    return counts


def _met(value: Optional[float], target: str) -> Optional[bool]:
    if value is None:
        return None
    op, goal = TARGETS[target]
    return value <= goal if op == "<=" else value >= goal


def summarize(results: Dict[str, Optional[dict]], correctness: Optional[dict]) -> List[dict]:
    """The summary rows ``{target, case, value, goal, met}`` from the steps' results (the harness's schema)."""
    rows: List[dict] = []

    def add(target: Optional[str], case: str, value, goal: Optional[str] = None, met=None, note: str = ""):
        if target in TARGETS:
            op, number = TARGETS[target]
            goal, met = f"{op} {number}", _met(value, target)
        rows.append({"target": target or "info", "case": case, "value": value, "goal": goal or "-", "met": met,
                     "note": note})

    if correctness is not None:
        bad = correctness["failures"] + correctness["errors"]
        add("correctness", f"{correctness['tests']} tests, {correctness['skipped']} skipped",
            bad, "0 failed", bad == 0)
    for step in ("op_batch1", "op_batch2_8"):
        for row in (results.get(step) or {}).get("rows", []):
            case, method, mode, ratio = row["case"], row["method"], row["mode"], row.get("ratio_to_base")
            if method == "fused":
                add(f"op_{mode}", case, ratio)
                if row.get("speedup_vs_unfused") is not None:
                    add("op_vs_unfused", case, row["speedup_vs_unfused"])
            elif method in ("triton_gemm", "fused_r0", "fused_gemm_triton", "fused_gemm_cublas") and mode == "fwd":
                add(None, f"{case} {method} / F.linear", ratio, "<= 1.0 (info)", None if ratio is None else ratio <= 1.0)
    encoder = (results.get("encoder") or {}).get("rows", [])
    reference_peak = {(r["case"], r["mode"]): r.get("peak_memory_bytes") for r in encoder if r["method"] == "reference"}
    for row in encoder:
        if row["method"].startswith("patched") and row.get("speedup") is not None:
            peak, ref = row.get("peak_memory_bytes"), reference_peak.get((row["case"], row["mode"]))
            more_memory = peak is not None and ref is not None and peak > ref
            add(f"encoder_{row['mode']}", f"{row['case']} {row['method']}", row["speedup"],
                note="MORE MEMORY than the reference" if more_memory else "")
            if more_memory:
                rows[-1]["met"] = False
    for row in (results.get("plora") or {}).get("rows", []):
        if row["method"] == "fused":
            add("plora_roofline", f"{row['case']} {row['mode']}", row.get("roofline_ratio"))
            add("plora_vs_reference", f"{row['case']} {row['mode']}", row.get("speedup_vs_reference"))
    for row in (results.get("textmonkey") or {}).get("rows", []):
        if row["method"] == "patched" and row.get("speedup") is not None:
            add(f"textmonkey_{row['mode']}", row["case"], row["speedup"])
    for row in (results.get("amp") or {}).get("rows", []):
        if row["method"] == "patched" and row.get("speedup") is not None:
            add(f"amp_{row['mode']}", f"{row['case']} bf16 autocast", row["speedup"])
    for step in ("slp", "slp_native"):
        for row in (results.get(step) or {}).get("rows", []):
            if row["method"].endswith("_novalidate") and row.get("fraction_of_copy") is not None:
                add("slp_copy_fraction", f"{row['case']} {row['method']}", row["fraction_of_copy"])
    return rows


def summary_markdown(rows: List[dict], steps: List[dict], dry_run: bool) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = []
    if dry_run:
        lines.append("**DRY RUN: stub results, not measurements.**\n")
    lines += ["| step | status | seconds | timeout |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {cell(s.get('seconds'))} | {cell(s.get('timeout_s'))} |" for s in steps]
    lines += ["", "| target | case | value | goal | met | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['case']} | {cell(r['value'])} | {r['goal']} | {cell(r['met'])} | {r['note']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The cache tarball
# ---------------------------------------------------------------------------------------------------------
def restore_cache(tarball: Path, cache_dir: Path) -> str:
    if not tarball.is_file():
        return "no cache to restore"
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = [m for m in archive.getmembers()
                       if (m.isfile() or m.isdir()) and not m.name.startswith(("/", "..")) and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.12 (and the 3.8-3.11 security releases)
                archive.extractall(cache_dir, members=members, filter="data")
            else:
                archive.extractall(cache_dir, members=members)
    except (OSError, tarfile.TarError) as error:
        return f"cache not restored: {error}"
    return f"restored {len(members)} cache entries from {tarball}"


def save_cache(cache_dir: Path, tarball: Path) -> str:
    """``cache_dir`` as a gzip tarball of at most ``MAX_FILE_BYTES``: everything if it fits, else without the
    intermediate IR files, else whole kernel folders (smallest first) up to half the limit uncompressed."""
    if not cache_dir.is_dir():
        return "no cache to save"
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    ir_suffixes = (".ttir", ".ttgir", ".llir", ".ptx", ".source", ".amdgcn")
    lean = [p for p in files if p.suffix not in ir_suffixes]
    folders: Dict[Path, List[Path]] = {}
    for p in lean:
        folders.setdefault(p.parent, []).append(p)
    partial, total = [], 0
    for group in sorted(folders.values(), key=lambda g: sum(p.stat().st_size for p in g)):
        total += sum(p.stat().st_size for p in group)
        if total > MAX_FILE_BYTES // 2:
            break
        partial += group
    for chosen in (files, lean, partial):
        with tarfile.open(tarball, "w:gz") as archive:
            for p in chosen:
                archive.add(p, arcname=str(p.relative_to(cache_dir)))
        if tarball.stat().st_size <= MAX_FILE_BYTES:
            return f"saved {len(chosen)} of {len(files)} cache files to {tarball} ({tarball.stat().st_size} bytes)"
    tarball.unlink()
    return "cache too large to save within 16 MiB"


# ---------------------------------------------------------------------------------------------------------
# The stub of --dry-run
# ---------------------------------------------------------------------------------------------------------
STUB_SLEEP_ENV = settings.GPU_SESSION_STUB_SLEEP.name  # "step=seconds,...": a stub that takes that long


def write_stub(step: str, out: Path) -> None:
    """A sample result in the harness's schema (no torch import: the dry run stays fast); also one file in the
    Triton cache, so the cache round trip is exercised. ``MONKEY_KERNELS_GPU_SESSION_STUB_SLEEP`` makes chosen
    steps slow (for tests of the timeouts)."""
    sleeps = settings.GPU_SESSION_STUB_SLEEP.get()
    if step in sleeps:
        time.sleep(sleeps[step])
    cache = settings.TRITON_CACHE_DIR.get() or out.parent / "triton"
    (cache / "stub").mkdir(parents=True, exist_ok=True)
    (cache / "stub" / f"{step}.json").write_text(json.dumps({"step": step}))
    rows: List[dict] = []
    if step.startswith("op_"):
        for case in ("qkv b1", "out_proj b1", "c_proj b1"):
            rows += [dict(case=case, method="fused", mode="fwd", ms=1.0, ratio_to_base=1.05, peak_memory_bytes=None,
                          speedup_vs_unfused=1.5),
                     dict(case=case, method="fused", mode="fwd_bwd", ms=2.0, ratio_to_base=1.2, peak_memory_bytes=None),
                     dict(case=case, method="triton_gemm", mode="fwd", ms=1.0, ratio_to_base=1.01, peak_memory_bytes=None)]
    elif step == "encoder":
        for mode, speedup in (("inference", 2.5), ("train_step", 1.4)):
            rows += [dict(case="896x896 b1", method="reference", mode=mode, ms=10.0, ratio_to_base=1.0,
                          peak_memory_bytes=100, speedup=1.0),
                     dict(case="896x896 b1", method="patched", mode=mode, ms=10.0 / speedup, ratio_to_base=1 / speedup,
                          peak_memory_bytes=90, speedup=speedup)]
    elif step == "plora":
        for mode in ("fwd", "fwd_bwd"):
            rows.append(dict(case="1 img, 1609 tok", method="fused", mode=mode, ms=1.0, ratio_to_base=1.04,
                             peak_memory_bytes=None, roofline_ratio=1.03, speedup_vs_reference=1.3))
    elif step == "amp":
        for mode, speedup in (("inference", 1.8), ("train_step", 1.3)):
            rows.append(dict(case="896x896 b1", method="patched", mode=mode, ms=10.0 / speedup,
                             ratio_to_base=1 / speedup, peak_memory_bytes=None, speedup=speedup))
    elif step == "textmonkey":
        for mode, speedup in (("inference", 2.0), ("train_step", 1.5)):
            rows.append(dict(case="896x896 per_window b1", method="patched", mode=mode, ms=10.0 / speedup,
                             ratio_to_base=1 / speedup, peak_memory_bytes=None, speedup=speedup))
    elif step.startswith("slp"):
        rows.append(dict(case="monkey", method="fused_novalidate", mode="fwd", ms=1.0, ratio_to_base=1.1,
                         peak_memory_bytes=None, fraction_of_copy=0.9))
    elif step == "correctness":
        out.with_name("correctness.xml").write_text(
            '<testsuites><testsuite name="stub" tests="2" failures="0" errors="0" skipped="1">'
            '<testcase classname="stub" name="ok"/><testcase classname="stub" name="skipped"><skipped/></testcase>'
            '</testsuite></testsuites>')
        return
    elif step in ("environment", "build_native"):
        print(f"dry run: {step}")
        return
    out.write_text(json.dumps({"schema_version": 1, "bench": step, "dry_run": True, "rows": rows}))
    print(f"dry run: wrote a sample result for {step}")


# ---------------------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------------------
def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _slim(result: Optional[dict]) -> Optional[dict]:
    """A step's result without its per-round samples (keeps results.json small)."""
    if result is None:
        return None
    result = dict(result)
    result["rows"] = [{k: v for k, v in row.items() if k != "samples_ms"} for row in result.get("rows", [])]
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--stub"]:
        write_stub(argv[1], Path(argv[2]))
        return 0
    started = time.monotonic()
    args = gpu_plan.parse_args(argv)
    out_dir, cache_dir = Path(args.out_dir), Path(args.cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="monkey_kernels_gpu_session_"))
    log = Log(out_dir / "session.log")
    log.write(f"GPU session: budget {args.budget_s} s{' (--quick)' if args.quick else ''}"
              f"{' DRY RUN' if args.dry_run else ''}; repository {REPO_ROOT}; out {out_dir}; work {work}\n")
    log.write(restore_cache(out_dir / CACHE_TARBALL, cache_dir) + "\n")
    log.write(gpu_plan.format_plan(args.budget_s, args.quick, args.steps) + "\n")

    steps = gpu_plan.steps_for(args.quick, args.steps)
    statuses: List[dict] = []
    succeeded = set()
    for i, step in enumerate(steps):
        remaining = args.budget_s - (time.monotonic() - started)
        timeout = None
        if step.requires is not None and step.requires not in succeeded:
            reason = f"needs {step.requires}"
        else:
            timeout = gpu_plan.step_timeout(step, remaining, steps[i + 1:], args.quick)
            reason = f"{remaining:.0f} s left is too little (min {step.min_s} s plus later steps)"
        if timeout is None:
            statuses.append({"name": step.name, "status": f"skipped: {reason}", "timeout_s": None})
            log.write(f"\n=== {step.name}: skipped ({reason})\n")
            continue
        log.write(f"\n=== {step.name} (timeout {timeout} s, {remaining:.0f} s left): {step.description}\n")
        cmd = step_command(step, work, args.quick, args.dry_run)
        outcome = run_step(cmd, timeout, step_env(step, cache_dir, work), log)
        outcome.update(name=step.name, timeout_s=timeout, started_at_s=round(args.budget_s - remaining, 1),
                       command=" ".join(cmd))
        statuses.append(outcome)
        if outcome["status"] == "ok":
            succeeded.add(step.name)
        log.write(f"=== {step.name}: {outcome['status']} (rc {outcome['rc']}, {outcome['seconds']} s)\n")

    results = {s.name: _slim(_load_json(work / f"{s.name}.json")) for s in steps}
    correctness = junit_counts(work / "correctness.xml")
    summary = summarize(results, correctness)
    gemm_choices = next((r.get("gemm_choices") for name, r in results.items()
                         if name.startswith("op_") and r and r.get("gemm_choices")), None)
    cache_note = save_cache(cache_dir, out_dir / CACHE_TARBALL)
    log.write(cache_note + "\n")
    session = {"budget_s": args.budget_s, "quick": args.quick, "dry_run": args.dry_run,
               "seconds": round(time.monotonic() - started, 1), "steps": statuses, "cache": cache_note}
    payload = {"session": session, "correctness": correctness, "gemm_choices": gemm_choices, "summary": summary,
               "results": results}
    text = json.dumps(payload, indent=1, default=str)
    if len(text.encode()) > MAX_FILE_BYTES:  # never expected; keep the file within the limit regardless
        payload["results"] = {k: None if v is None else {"rows": v.get("rows", [])[:200]} for k, v in results.items()}
        text = json.dumps(payload, indent=1, default=str)[:MAX_FILE_BYTES]
    (out_dir / "results.json").write_text(text)
    markdown = summary_markdown(summary, statuses, args.dry_run)
    (out_dir / "summary.md").write_text(markdown)
    shutil.rmtree(work, ignore_errors=True)
    log.write(f"\n=== summary ({session['seconds']} s of {args.budget_s} s)\n{markdown}")
    log.close()
    written = [p for p in out_dir.iterdir() if p.name in OUTPUT_FILES]
    assert len(written) <= MAX_FILES and all(p.stat().st_size <= MAX_FILE_BYTES for p in written), written
    return 0


if __name__ == "__main__":
    sys.exit(main())
