# SM100 (Blackwell) sources, include()d by the top-level CMakeLists.txt after
# CUDAToolkit is found (the CUDA language need not be enabled for the layout
# target).
#
# Uses:    XLA_FFI_INCLUDE_DIR, CUTLASS_INCLUDE_DIR, JAX_MXFP4_CSRC_DIR
# Defines:
#   mxfp4_sm100_layout   OBJECT, host C++ compiler: CutlassScaleFactorOffsets /
#                        CutlassScaleFactorBytes (scale_layout_cutlass.h). No nvcc
#                        and no GPU needed, only the CUTLASS and CUDA toolkit headers.
#   mxfp4_sm100          OBJECT, CUDA for sm_100a: the W4A4 GEMM handler and its
#                        host queries (w4a4_gemm.h). Only when the CUDA compiler
#                        can target sm_100a (nvcc >= 12.8). Link CUDA::cudart(_static).
#   JAX_MXFP4_WITH_SM100_LAYOUT, JAX_MXFP4_WITH_SM100: 1 when the target exists,
#                        else 0 (compile definitions for module.cc).
# Compile time of mxfp4_sm100 on a 2-core machine: 1 min 50 s to 2 min 50 s wall, 5.4 GB peak RSS.

set(JAX_MXFP4_SM100_DIR "${CMAKE_CURRENT_LIST_DIR}")
set(JAX_MXFP4_WITH_SM100_LAYOUT 0)
set(JAX_MXFP4_WITH_SM100 0)

if(NOT CUTLASS_INCLUDE_DIR OR NOT EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/cutlass.h")
  message(STATUS "jax_mxfp4: CUTLASS_INCLUDE_DIR not set; skipping the SM100 sources")
  return()
endif()
if(NOT CUDAToolkit_FOUND)
  find_package(CUDAToolkit QUIET)
endif()
if(NOT CUDAToolkit_FOUND)
  message(STATUS "jax_mxfp4: no CUDA toolkit headers; skipping the SM100 sources")
  return()
endif()

# --- Host-only scale-layout proof ----------------------------------------------
# CUTLASS's host headers include vector_types.h and CCCL's cuda/std; nvcc adds
# CCCL to its include path by itself, a host compiler does not (CUDA 13 keeps
# it under include/cccl, CUDA 12 directly under include).
find_path(JAX_MXFP4_CCCL_INCLUDE_DIR cuda/std/utility
          HINTS ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES cccl NO_DEFAULT_PATH)
if(JAX_MXFP4_CCCL_INCLUDE_DIR)
  add_library(mxfp4_sm100_layout OBJECT "${JAX_MXFP4_SM100_DIR}/scale_layout_cutlass.cc")
  target_include_directories(mxfp4_sm100_layout PRIVATE "${JAX_MXFP4_CSRC_DIR}")
  target_include_directories(mxfp4_sm100_layout SYSTEM PRIVATE
                             "${CUTLASS_INCLUDE_DIR}" "${JAX_MXFP4_CCCL_INCLUDE_DIR}" ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(mxfp4_sm100_layout PRIVATE $<$<CXX_COMPILER_ID:GNU,Clang>:-O2 -Wall -Wextra>)
  set(JAX_MXFP4_WITH_SM100_LAYOUT 1)
else()
  message(STATUS "jax_mxfp4: CCCL headers (cuda/std/utility) not found; skipping mxfp4_sm100_layout")
endif()

# --- W4A4 GEMM for sm_100a -------------------------------------------------------
get_property(_jax_mxfp4_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
if("CUDA" IN_LIST _jax_mxfp4_languages AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
   AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
  add_library(mxfp4_sm100 OBJECT "${JAX_MXFP4_SM100_DIR}/w4a4_gemm.cu")
  # sm_100a only: tcgen05 block-scaled MMA is an arch-specific ("a") feature,
  # and the 'a' cubin loads on compute capability 10.0 alone (the handler
  # reports any other device as unsupported).
  set_target_properties(mxfp4_sm100 PROPERTIES CUDA_ARCHITECTURES "100a-real")
  target_include_directories(mxfp4_sm100 PRIVATE "${JAX_MXFP4_CSRC_DIR}")
  target_include_directories(mxfp4_sm100 SYSTEM PRIVATE "${CUTLASS_INCLUDE_DIR}" "${XLA_FFI_INCLUDE_DIR}")
  # The flags CUTLASS's own CMake gives its SM100 examples that matter here.
  target_compile_definitions(mxfp4_sm100 PRIVATE CUTLASS_ENABLE_TENSOR_CORE_MMA=1)
  target_compile_options(mxfp4_sm100 PRIVATE
                         $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr -lineinfo -Xcompiler=-fno-strict-aliasing>)
  set(JAX_MXFP4_WITH_SM100 1)
else()
  message(STATUS "jax_mxfp4: CUDA is not enabled or cannot target sm_100a (needs nvcc >= 12.8); "
                 "skipping the SM100 W4A4 GEMM")
endif()
