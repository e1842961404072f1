# Marlin W4A16 MXFP4 GEMM (SM80 / SM90): include()d by the top-level
# CMakeLists.txt when CUDA is enabled.
#
# Inputs (set by the includer):
#   XLA_FFI_INCLUDE_DIR   from `python -c "import jax; print(jax.ffi.include_dir())"`
#   JAX_MXFP4_CSRC_DIR    the repository's csrc/ directory
# Provides:
#   mxfp4_marlin          OBJECT library: the GEMM kernels (marlin_kernel.cuh; the
#                         warp-specialized wgmma one, marlin_kernel_ws.cuh; their
#                         shared wgmma step, marlin_wgmma.cuh) and
#                         its launch (marlin_gemm.cu; with marlin_split_reduce.cuh:
#                         the split-K reduction pass and the cluster sum),
#                         its planner and GPU-free host API (marlin_plan.cc),
#                         the dense dequantization of prepared weights for the
#                         large-M path (marlin_dequantize.cu) and the XLA FFI
#                         handler symbols MarlinMxfp4GemmFfi, MarlinDequantizeFfi
#                         (marlin_ffi.cc). Add its objects to the nanobind
#                         module ($<TARGET_OBJECTS:mxfp4_marlin>)
#                         (the module links the CUDA runtime, statically).
#   (marlin_cpu.cc, the CPU handlers of the same custom calls, is not here: the
#   top-level CMakeLists.txt compiles it into the module with or without CUDA.)
#   mxfp4_marlin_selftest (EXCLUDE_FROM_ALL) the standalone GPU self-test;
#                         build with `cmake --build <dir> --target mxfp4_marlin_selftest`.
#
# Architectures: real SASS for sm_80 (A100) and sm_90a (H100). "90a" is the
# arch-specific Hopper target (CMake >= 3.24 understands the suffix); the
# kernel uses no sm_90a-only instruction, but compiling for 90a keeps one
# cubin per arch the project ships. No PTX is embedded (JIT for other GPUs
# would run an untuned kernel; they get the XLA path instead).

if(NOT DEFINED JAX_MXFP4_CSRC_DIR)
  message(FATAL_ERROR "csrc/marlin/sources.cmake: set JAX_MXFP4_CSRC_DIR before include()")
endif()
if(NOT DEFINED XLA_FFI_INCLUDE_DIR)
  message(FATAL_ERROR "csrc/marlin/sources.cmake: set XLA_FFI_INCLUDE_DIR before include()")
endif()
find_package(CUDAToolkit REQUIRED)

set(_marlin_dir "${JAX_MXFP4_CSRC_DIR}/marlin")
set(_marlin_archs "80-real;90a-real")

add_library(mxfp4_marlin OBJECT
  "${_marlin_dir}/marlin_gemm.cu"
  "${_marlin_dir}/marlin_plan.cc"
  "${_marlin_dir}/marlin_dequantize.cu"
  "${_marlin_dir}/marlin_ffi.cc")
set_target_properties(mxfp4_marlin PROPERTIES
  CUDA_ARCHITECTURES "${_marlin_archs}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CXX_STANDARD 17
  CXX_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON)
target_include_directories(mxfp4_marlin PUBLIC "${JAX_MXFP4_CSRC_DIR}")
target_include_directories(mxfp4_marlin SYSTEM PRIVATE "${XLA_FFI_INCLUDE_DIR}" ${CUDAToolkit_INCLUDE_DIRS})
# -Xptxas -warn-spills: a local-memory spill in the kernel is a performance bug.
target_compile_options(mxfp4_marlin PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo -Xptxas=-warn-spills,-warn-lmem-usage>)

add_executable(mxfp4_marlin_selftest EXCLUDE_FROM_ALL
  "${_marlin_dir}/marlin_selftest.cu"
  "${_marlin_dir}/marlin_gemm.cu"
  "${_marlin_dir}/marlin_plan.cc")
set_target_properties(mxfp4_marlin_selftest PROPERTIES
  CUDA_ARCHITECTURES "${_marlin_archs}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON)
target_include_directories(mxfp4_marlin_selftest PRIVATE "${JAX_MXFP4_CSRC_DIR}")
target_link_libraries(mxfp4_marlin_selftest PRIVATE CUDA::cudart)

unset(_marlin_dir)
unset(_marlin_archs)
