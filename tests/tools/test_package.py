"""Package-level contracts: a light import, the torch backend without Triton, torch.compile with the default
backend in a fresh process (as users run it), an atomic ``patch_model``, a short path from a patched block
to the kernel, and an install that takes no top-level name but ``monkey_kernels`` (so OpenAI's ``triton_kernels``,
which vLLM and sglang import, lives beside it)."""
from __future__ import annotations

import copy
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from helpers.monkey_models import make_model, views
from monkey_kernels import settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != settings.TRITON_INTERPRET.name}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def test_import_is_light_and_fast():
    result = _run("""
        import sys, time
        import torch
        start = time.perf_counter()
        import monkey_kernels
        elapsed = time.perf_counter() - start
        heavy = [m for m in ("transformers", "peft", "triton", "monkey_kernels._C") if m in sys.modules]
        print(elapsed, heavy)
    """)
    assert result.returncode == 0, result.stderr
    elapsed, heavy = result.stdout.split(" ", 1)
    assert heavy.strip() == "[]", f"import monkey_kernels loaded {heavy.strip()}"
    assert float(elapsed) < 1.0, f"import monkey_kernels took {elapsed} s over import torch"


def test_cli_help_is_fast():
    result = _run("""
        import subprocess, sys, time
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "monkey_kernels", "--help"], capture_output=True, text=True)
        print(time.perf_counter() - start, done.returncode, "bench" in done.stdout and "demo" in done.stdout)
    """)
    elapsed, code, listed = result.stdout.split()
    assert (code, listed) == ("0", "True"), result.stderr
    assert float(elapsed) < 1.5, f"monkey-kernels --help took {elapsed} s"


def test_the_torch_backend_works_without_triton():
    result = _run("""
        import sys
        sys.modules["triton"] = None  # any import of triton now raises ImportError
        import torch
        from monkey_kernels import MultiLoRALinear, slp_embed
        torch.manual_seed(0)
        layer = MultiLoRALinear(8, 6, num_adapters=2, rank=2, backend="torch")
        x = torch.randn(3, 4, 8, requires_grad=True)
        layer(x, [0, -1, 1]).sum().backward()
        ids = torch.tensor([[1, 0, 2, 0]])
        out = slp_embed(ids, torch.randn(5, 6), torch.randn(6, 4), torch.randn(6), torch.rand(1, 2, 4).sort(-1)[0],
                        box_token_id=0, backend="torch")
        print(tuple(out.shape), x.grad.shape, "triton" in sys.modules and sys.modules["triton"] is not None)
    """, MONKEY_KERNELS_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(1,", "4,", "6)", "torch.Size([3,", "4,", "8])", "False"]


@pytest.mark.parametrize("what", ["op", "model"])
def test_compile_fullgraph_with_the_default_backend_in_a_fresh_process(what):
    """The automatic backend choice (native on CPU) loads the extension behind a lock, with importlib: neither
    may reach Dynamo. Run where nothing was imported or chosen before, as a user's first call would."""
    if what == "op":
        body = """
            from monkey_kernels import multi_lora_linear, SegmentInfo
            x, w = torch.randn(2, 4, 8), torch.randn(6, 8)
            a, b, s = torch.randn(2, 2, 8), torch.randn(2, 6, 2), torch.rand(2)
            f = torch.compile(lambda x: multi_lora_linear(x, w, None, a, b, s, [0, 1]), fullgraph=True)
            torch.testing.assert_close(f(x), multi_lora_linear(x, w, None, a, b, s, [0, 1]))
        """
    else:
        body = """
            import sys
            sys.path.insert(0, "tests")
            from helpers.monkey_models import make_model, views
            from monkey_kernels import patch_model
            model = make_model("cpu").eval()
            patch_model(model)
            pixels = views(1, 4, model.config, "cpu")
            with torch.no_grad():
                want = model(pixels)
                got = torch.compile(model, fullgraph=True)(pixels)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        """
    result = _run("import torch\ntorch.manual_seed(0)\n" + textwrap.dedent(body) + "print('ok')\n",
                  MONKEY_KERNELS_BACKEND="")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_patch_model_is_atomic():
    """A rule that fails half-way (adapters of different ranks in one list, in the LAST block) leaves the model
    exactly as it was: same modules, same forward, patchable again once fixed."""
    from monkey_kernels import patch_model
    from monkey_kernels.models import MonkeyLoraAdapter
    from monkey_kernels.patching import is_patched

    model = make_model("cpu").eval()
    last = model.transformer.resblocks[-1]
    good = last.mlp_lora[0]
    last.mlp_lora[0] = MonkeyLoraAdapter(good.lora_a.in_features, good.lora_b.out_features, r=3, dropout=0.0)
    before = {name: type(m) for name, m in model.named_modules()}
    pixels = views(1, 2, model.config, "cpu")
    with torch.no_grad():
        want = model(pixels)
    with pytest.raises(ValueError, match="adapters of one list must share a rank"):
        patch_model(model, backend="torch")
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not is_patched(model) and "forward" not in model.transformer.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), want)
    last.mlp_lora[0] = good
    patch_model(model, backend="torch")
    assert is_patched(model)


def _is_fused_block_forward(frame) -> bool:
    """The ``forward`` of a fused Monkey block (a project module whose class name says Block), wherever the
    model layer keeps it."""
    owner = frame.frame.f_locals.get("self")
    return (frame.function == "forward" and isinstance(owner, torch.nn.Module)
            and "block" in type(owner).__name__.lower())


def test_a_patched_block_reaches_the_kernel_in_at_most_six_project_frames(monkeypatch):
    from monkey_kernels import patch_model
    from monkey_kernels.ops.multi_lora.torch_impl import TorchMultiLoRA

    depths = []
    original = TorchMultiLoRA.fused_gemm

    def spy(*args, **kwargs):
        frames = [f for f in inspect.stack()[1:] if f.filename.startswith(os.path.join(ROOT, "monkey_kernels"))]
        block = next(i for i, f in enumerate(frames) if _is_fused_block_forward(f))
        depths.append(block + 2)  # the frames from the block's forward down to here, plus the launcher itself
        return original(*args, **kwargs)

    monkeypatch.setattr(TorchMultiLoRA, "fused_gemm", staticmethod(spy))
    model = make_model("cpu").eval()
    patch_model(copy.deepcopy(model), backend="torch")
    fused = copy.deepcopy(model)
    patch_model(fused, backend="torch")
    with torch.no_grad():
        fused(views(1, 2, model.config, "cpu"))
    assert depths and max(depths) <= 6, depths


def test_a_patched_block_reaches_the_triton_launch_in_at_most_six_project_frames(monkeypatch):
    """The same on the Triton backend (the interpreter), counted down to the frame that launches the kernel
    (``kernel[grid](...)``), launcher frames in ``triton_kernels/`` included."""
    pytest.importorskip("triton")
    monkeypatch.setenv(settings.TRITON_INTERPRET.name, "1")
    import monkey_kernels._triton.multi_lora as kernels
    from monkey_kernels import patch_model

    project = (os.path.join(ROOT, "monkey_kernels"), os.path.join(ROOT, "triton_kernels"))
    depths = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            frames = [f for f in inspect.stack()[1:] if f.filename.startswith(project)]
            block = next(i for i, f in enumerate(frames) if _is_fused_block_forward(f))
            depths.append(block + 1)  # the launching frame down to the block's forward, both included
            return self.kernel[grid]

    monkeypatch.setattr(kernels, "_fused_lora_gemm_kernel", Spy(kernels._fused_lora_gemm_kernel))
    model = make_model("cpu").eval()
    patch_model(model, backend="triton")
    with torch.no_grad():
        model(views(1, 2, model.config, "cpu"))
    assert depths and max(depths) <= 6, depths


@pytest.mark.parametrize("first", ["theirs", "ours"])
def test_a_foreign_triton_kernels_package_and_ours_import_side_by_side(tmp_path, first):
    """An OpenAI-style ``triton_kernels`` (with ``matmul_ogs``) on the path, in a process started outside the
    repository (whose ``triton_kernels/`` folder is not a package on the path): ``triton_kernels`` is theirs, and
    our kernels (``monkey_kernels._triton``) import and run an op under the interpreter, in either import order."""
    fake = tmp_path / "site" / "triton_kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("ORIGIN = 'openai'\n")
    (fake / "matmul_ogs.py").write_text("def matmul_ogs(*args):\n    return 'matmul_ogs'\n")
    code = f"""
        import sys
        import torch

        def theirs():
            from triton_kernels.matmul_ogs import matmul_ogs
            import triton_kernels
            assert triton_kernels.ORIGIN == "openai" and matmul_ogs() == "matmul_ogs", triton_kernels.__file__

        def ours():
            import monkey_kernels._triton.multi_lora as kernels
            from monkey_kernels import SegmentInfo, multi_lora_linear, multi_lora_linear_ref
            torch.manual_seed(0)
            x, w = torch.randn(2, 8, 16), torch.randn(12, 16)
            a, b, s = torch.randn(2, 4, 16), torch.randn(2, 12, 4), torch.rand(2)
            y = multi_lora_linear(x, w, None, a, b, s, [1, -1], backend="triton")
            ref = multi_lora_linear_ref(*(t.double() for t in (x, w)), None, *(t.double() for t in (a, b, s)),
                                        SegmentInfo.from_batch([1, -1], 8))
            assert kernels.__name__ == "monkey_kernels._triton.multi_lora"
            return float((y.double() - ref).abs().max())

        order = [theirs, ours] if "{first}" == "theirs" else [ours, theirs]
        error = [f() for f in order][order.index(ours)]
        print(sys.modules["triton_kernels"].__file__, error)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(tmp_path / "site"), settings.TRITON_INTERPRET.name: "1",
                settings.BACKEND.name: ""})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    origin, error = result.stdout.split()
    assert origin == str(fake / "__init__.py")
    assert float(error) < 1e-4


def test_the_wheel_holds_no_top_level_package_but_monkey_kernels(tmp_path):
    """The built wheel (extension build skipped: ``MONKEY_KERNELS_NO_BUILD=1``) has only ``monkey_kernels/`` and its
    dist-info: the ``triton_kernels/`` folder installs as ``monkey_kernels._triton``. Built from a copy of the
    checkout, so the build leaves nothing behind in it."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "__pycache__", "results", ".pytest_cache", ".hypothesis"))
    env = dict(os.environ, **{settings.NO_BUILD.name: "1"})
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path / "wheel"), "."], cwd=source, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    import monkey_kernels

    assert {name.split("/")[0] for name in names} == {"monkey_kernels",
                                                      f"monkey_kernels-{monkey_kernels.__version__}.dist-info"}
    for module in ("monkey_kernels/_triton/multi_lora.py", "monkey_kernels/_triton/slp.py",
                   "monkey_kernels/settings.py", "monkey_kernels/ops/registry.py",
                   "monkey_kernels/ops/multi_lora/cublas_gemm.py", "monkey_kernels/ops/multi_lora/gemm_choice.py"):
        assert module in names, module
