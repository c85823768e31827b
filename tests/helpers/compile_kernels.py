"""Compiles every variant of the multi-LoRA and SLP kernels for sm_90 (Hopper) and prints one JSON line each.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives
interpreted functions that cannot be compiled); ``tests/ops/test_compile.py`` does that.

``MONKEY_KERNELS_COMPILE_LEAN=1`` compiles every kernel and flag set in every dtype once, with one config each
(not the sweep over the autotuner's GEMM and SLP configs): the second CI pass on another Triton
(``scripts/test_triton36.sh``) uses it to stay short.
"""
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import monkey_kernels._triton.multi_lora as kernels  # noqa: E402
import monkey_kernels._triton.slp as slp_kernels  # noqa: E402
from monkey_kernels._triton.aot import compile_kernel  # noqa: E402
from monkey_kernels._triton.env import interpreter_active  # noqa: E402

INDEX_POINTERS = {"row_segment_ptr": "int32", "adapter_ids_ptr": "int32", "ranks_ptr": "int32"}
LEAN = os.environ.get("MONKEY_KERNELS_COMPILE_LEAN", "0") not in ("", "0")


def _fitting_config(configs, dtype):
    """The first config the autotuner's own prune keeps for ``dtype``."""
    return kernels._prune_gemm_configs(configs, {"x_ptr": torch.empty(0, dtype=getattr(torch, dtype))})[0]


def variants():
    for dtype in ("float32", "float16", "bfloat16"):
        precision = "ieee" if dtype == "float32" else "tf32"
        shrink_config = kernels._shrink_configs()[0]
        # rank 16 (Monkey), 128, 256 (Partial LoRA: four 64-wide rank chunks)
        for dropout, r_block in ((False, 16), (True, 128), (True, 256)):
            yield (f"shrink {dtype} dropout={dropout} R={r_block}", "_segmented_shrink_kernel",
                   {"x_ptr": dtype, "w_ptr": dtype, "out_ptr": "float32", **INDEX_POINTERS},
                   dict(R_BLOCK=r_block, R_CHUNK=kernels.rank_chunk(r_block, "shrink"), DROPOUT=dropout, PRECISION=precision,
                        UPCAST=False, **shrink_config.kwargs),
                   shrink_config.num_warps, shrink_config.num_stages)
        gemm_pointers = {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "h_ptr": "float32", "e_ptr": dtype,
                         "scale_ptr": dtype, "residual_ptr": dtype, "out_ptr": dtype, **INDEX_POINTERS}
        gemm_config = _fitting_config(kernels._gemm_configs(), dtype)
        flag_sets = {
            "forward": dict(HAS_BASE=True, HAS_BIAS=True, HAS_LORA=True, HAS_SCALE=True, HAS_RESIDUAL=True,
                            LORA_DROPOUT=False, R_BLOCK=32),
            "grad_input_fused": dict(HAS_BASE=True, HAS_BIAS=False, HAS_LORA=True, HAS_SCALE=False,
                                     HAS_RESIDUAL=False, LORA_DROPOUT=True, R_BLOCK=16),
            "expand_only": dict(HAS_BASE=False, HAS_BIAS=False, HAS_LORA=True, HAS_SCALE=False,
                                HAS_RESIDUAL=False, LORA_DROPOUT=True, R_BLOCK=128),
            "base_only": dict(HAS_BASE=True, HAS_BIAS=False, HAS_LORA=False, HAS_SCALE=False,
                              HAS_RESIDUAL=False, LORA_DROPOUT=False, R_BLOCK=16),
            # Partial LoRA's rank 256 (the epilogue loops over four 64-wide rank chunks)
            "forward_rank256": dict(HAS_BASE=True, HAS_BIAS=True, HAS_LORA=True, HAS_SCALE=True, HAS_RESIDUAL=False,
                                    LORA_DROPOUT=False, R_BLOCK=256),
        }
        configs = kernels._gemm_configs() if dtype == "bfloat16" and not LEAN else [gemm_config]
        for flags_name, flags in flag_sets.items():
            for config in (configs if flags_name in ("forward", "forward_rank256") else [gemm_config]):
                yield (f"gemm {flags_name} {dtype} {config.kwargs} w{config.num_warps} s{config.num_stages}",
                       "_fused_lora_gemm_kernel", gemm_pointers,
                       dict(BASE_PRECISION=precision, LORA_PRECISION="ieee" if dtype == "float32" else "tf32",
                            UPCAST=False, R_CHUNK=kernels.rank_chunk(flags["R_BLOCK"], "gemm"), **flags, **config.kwargs),
                       config.num_warps, config.num_stages)
        outer_config = kernels._outer_configs()[0]
        for dropout, r_block in ((False, 32), (True, 32), (True, 256)):
            yield (f"outer {dtype} dropout={dropout} R={r_block}", "_segmented_outer_kernel",
                   {"x_ptr": dtype, "y_ptr": "float32", "scale_ptr": dtype, "out_ptr": dtype,
                    "seg_indptr_ptr": "int32", "adapter_ids_ptr": "int32"},
                   dict(R_BLOCK=r_block, R_CHUNK=kernels.rank_chunk(r_block, "outer"), HAS_SCALE=True, DROPOUT=dropout,
                        PRECISION=precision, **outer_config.kwargs),
                   outer_config.num_warps, outer_config.num_stages)


def slp_variants():
    # (table / output dtype, projection dtype): the projection in a half dtype with the box rows rounded to it is
    # the autocast case (fp32 table, bf16 / fp16 nn.Linear)
    dtypes = [("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"),
              ("float32", "float16")]
    for dtype, proj in dtypes:
        configs = slp_kernels._embed_configs()
        for config in configs[:1] if LEAN or dtype != proj else configs:
            round_box = dtype != proj
            yield (f"slp_embed {dtype}{f' proj={proj} round_box' if round_box else ''} {config.kwargs} "
                   f"w{config.num_warps}", "_slp_embed_kernel",
                   {"out_ptr": dtype, "kind_ptr": "int32", "src_ptr": "int32", "table_ptr": dtype,
                    "boxes_ptr": proj if round_box else "float32", "sizes_ptr": "float32", "w_ptr": proj,
                    "bias_ptr": proj, "feat_ptr": dtype},
                   dict(HAS_SIZES=not round_box, HAS_BIAS=True, HAS_IMAGE=True, ROUND_BOX=round_box,
                        **config.kwargs),
                   config.num_warps, config.num_stages)


def compile_one(variant):
    label, kernel_name, pointers, constexprs, warps, stages = variant
    module = slp_kernels if kernel_name == "_slp_embed_kernel" else kernels
    try:
        report = compile_kernel(getattr(module, kernel_name), pointers, constexprs, num_warps=warps,
                                num_stages=stages)
        return {"label": label, "ok": True, "instruction": report.matrix_instruction,
                "registers": report.registers, "local_bytes": report.local_bytes,
                "shared_bytes": report.shared_bytes}
    except Exception as error:  # reported, and failed, by the test
        return {"label": label, "ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}


if __name__ == "__main__":
    if interpreter_active():
        sys.exit("run without TRITON_INTERPRET")
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for result in pool.map(compile_one, list(variants()) + list(slp_variants())):
            print(json.dumps(result), flush=True)
