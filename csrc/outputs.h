// Allocation of the outputs the native ops must overwrite entirely.
//
// With poisoning on (MONKEY_KERNELS_POISON, or monkey_kernels.ops.alloc.set_poison: the same switch as the
// Triton launchers', passed in by monkey_kernels/_native.py, see settings.h), fresh float outputs start as NaN
// instead of uninitialised memory: the test suite turns it on, so an element an op forgets to write shows up as
// NaN instead of a plausible leftover value.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "settings.h"

namespace monkey_kernels {

inline bool poison_outputs() { return settings().poison.load(std::memory_order_relaxed); }

inline at::Tensor fresh_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs() && at::isFloatingType(options.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

}  // namespace monkey_kernels
