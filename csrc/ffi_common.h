// Helpers shared by every XLA FFI handler (CPU and CUDA).
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_mxfp4 {

namespace ffi = xla::ffi;

// Product of all dimensions but the last (the "rows" of a [..., K] operand).
inline int64_t LeadingRows(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

inline std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// Handlers re-check what the Python side validated at trace time: a custom
// call can be reached from hand-written HLO too, and a wrong size here would
// be an out-of-bounds access, not an error message.
inline ffi::Error InvalidArgument(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_mxfp4: " + what);
}

}  // namespace jax_mxfp4
