// Allocation of the outputs the native ops must overwrite entirely.
//
// With MONKEY_KERNELS_POISON set (and not "0"), fresh float outputs start as NaN instead of uninitialised
// memory, as triton_kernels.alloc does for the Triton launchers: the test suite turns it on, so an element an
// op forgets to write shows up as NaN instead of a plausible leftover value. Read on every call (one getenv),
// so toggling the variable at run time takes effect.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace monkey_kernels {

inline bool poison_outputs() {
  const char* value = std::getenv("MONKEY_KERNELS_POISON");
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

inline at::Tensor fresh_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs() && at::isFloatingType(options.dtype().toScalarType()))
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(sizes, options);
}

}  // namespace monkey_kernels
