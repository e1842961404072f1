// Operand checks shared by the CUDA (marlin_ffi.cc) and CPU (marlin_cpu.cc)
// handlers of the Marlin custom calls.
#pragma once

#include <cstdint>
#include <string>

#include "../ffi_common.h"
#include "marlin_layout.h"

namespace jax_mxfp4 {
namespace marlin {

// tiles / scales must have the prepared shapes of an [n, k] weight (marlin_layout.h).
inline ffi::Error CheckPreparedShapes(const std::string& op, const ffi::Buffer<ffi::U8>& tiles,
                                      const ffi::Buffer<ffi::U8>& scales, int64_t n, int64_t k) {
  const PreparedShape ps = GetPreparedShape(n, k);
  const auto t_dims = tiles.dimensions();
  if (t_dims.size() != 2 || t_dims[0] != ps.tiles_rows || t_dims[1] != ps.tiles_cols)
    return InvalidArgument(op + ": tiles has shape " + ShapeString(t_dims) + ", expected [" +
                           std::to_string(ps.tiles_rows) + ", " + std::to_string(ps.tiles_cols) + "]");
  const auto s_dims = scales.dimensions();
  if (s_dims.size() != 2 || s_dims[0] != ps.scales_rows || s_dims[1] != ps.scales_cols)
    return InvalidArgument(op + ": scales has shape " + ShapeString(s_dims) + ", expected [" +
                           std::to_string(ps.scales_rows) + ", " + std::to_string(ps.scales_cols) + "]");
  return ffi::Error::Success();
}

}  // namespace marlin
}  // namespace jax_mxfp4
