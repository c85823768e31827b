// Run-time settings of the native ops. The C++ reads no environment variable: monkey_kernels/_native.py reads
// them (monkey_kernels/settings.py) and passes them through configure() (csrc/module.cpp) when the extension
// loads and, when they changed, before every op call. Atomics: ops running on other threads read them while a
// new value is set.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <string>

namespace monkey_kernels {

// The native ops' base GEMM (MONKEY_KERNELS_CPU_GEMM): measured per shape, BLAS, or the register-tiled kernel.
enum class CpuGemmMode : int { kAuto = 0, kBlas = 1, kTiled = 2 };

struct Settings {
  std::atomic<bool> poison{false};  // fresh float outputs start as NaN (MONKEY_KERNELS_POISON)
  std::atomic<int> cpu_gemm{static_cast<int>(CpuGemmMode::kAuto)};
  std::atomic<int> lowrank_isa_cap{2};  // 2: AVX-512, 1: AVX2, 0: portable (MONKEY_KERNELS_LOWRANK_ISA)
};

// One instance for the whole library (an inline function's static is shared by every translation unit).
inline Settings& settings() {
  static Settings instance;
  return instance;
}

inline CpuGemmMode cpu_gemm_mode() {
  return static_cast<CpuGemmMode>(settings().cpu_gemm.load(std::memory_order_relaxed));
}

// Sets every setting at once; the values were checked in Python, checked again here against a direct caller.
inline void configure(bool poison, const std::string& cpu_gemm, const std::string& lowrank_isa) {
  int mode = -1;
  if (cpu_gemm == "auto") mode = static_cast<int>(CpuGemmMode::kAuto);
  if (cpu_gemm == "blas") mode = static_cast<int>(CpuGemmMode::kBlas);
  if (cpu_gemm == "tiled") mode = static_cast<int>(CpuGemmMode::kTiled);
  TORCH_CHECK(mode >= 0, "cpu_gemm must be auto, blas or tiled, got '", cpu_gemm, "'");
  int cap = -1;
  if (lowrank_isa == "avx512") cap = 2;
  if (lowrank_isa == "avx2") cap = 1;
  if (lowrank_isa == "portable") cap = 0;
  TORCH_CHECK(cap >= 0, "lowrank_isa must be avx512, avx2 or portable, got '", lowrank_isa, "'");
  settings().poison.store(poison);
  settings().cpu_gemm.store(mode);
  settings().lowrank_isa_cap.store(cap);
}

}  // namespace monkey_kernels
