// The Python module of the extension (monkey_kernels._C, or monkey_kernels_C when JIT-built). The ops
// themselves are registered with the dispatcher by the other sources (TORCH_LIBRARY_FRAGMENT of the
// namespace monkey_kernels_native) when this library is loaded; this file makes the .so importable, reports
// how it was built, and takes the run-time settings from monkey_kernels/_native.py (configure: the C++
// reads no environment variable).
#include <ATen/Parallel.h>
// pybind11 alone (not torch/extension.h): nothing here needs the torch C++ API, and the build is faster.
#include <pybind11/pybind11.h>

#include <string>

#include "lowrank_gemm.h"
#include "outputs.h"
#include "settings.h"

namespace monkey_kernels_native {
bool tiled_base_gemm_choice(int64_t K, int64_t N, bool float64);  // multi_lora_cpu.cpp
}

namespace {

bool built_with_cuda() {
#ifdef MONKEY_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "monkey-kernels native ops (registered as torch.ops.monkey_kernels_native.*)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA sources were compiled in (-DMONKEY_WITH_CUDA)");
  m.def("built_with_openmp", &built_with_openmp,
        "True when compiled with OpenMP, i.e. at::parallel_for in the native ops runs on several threads");
  m.def("num_threads", []() { return at::get_num_threads(); }, "ATen's intra-op thread count (at::get_num_threads)");
  m.def("configure", &monkey_kernels::configure, pybind11::arg("poison"), pybind11::arg("cpu_gemm"),
        pybind11::arg("lowrank_isa"),
        "Sets the run-time settings (csrc/settings.h): NaN poisoning of fresh outputs, the base GEMM mode "
        "(auto, blas, tiled) and the low-rank GEMMs' ISA cap (avx512, avx2, portable). Called by "
        "monkey_kernels/_native.py from monkey_kernels.settings");
  m.def("poison_outputs", &monkey_kernels::poison_outputs,
        "True while poisoning is on: the ops' fresh outputs start as NaN (csrc/outputs.h)");
  m.def("tiled_base_gemm", &monkey_kernels_native::tiled_base_gemm_choice, pybind11::arg("K"), pybind11::arg("N"),
        pybind11::arg("float64"),
        "Whether the native ops' base GEMM X W^T (K inputs, N outputs) runs the register-tiled kernel instead of "
        "BLAS: measured once per shape and dtype, or pinned (configure's cpu_gemm, from MONKEY_KERNELS_CPU_GEMM)");
  m.def("lowrank_isa", &monkey_kernels::lowrank_isa,
        "The vector ISA of the fp32 low-rank GEMMs now: avx512, avx2 or portable (csrc/lowrank_gemm.h; "
        "configure's lowrank_isa, from MONKEY_KERNELS_LOWRANK_ISA, caps it)");
}
