// The device primitives every kernel source is written against (the only header kernels include
// besides their own). Compiled by nvcc they are the hardware instructions (device.cuh: inline
// PTX); compiled by the host C++ compiler with GPTFAST_SIM defined they run on the CPU execution
// layer (sim_primitives.h over csrc/sim/). Inline asm, __CUDA_ARCH__ and vendor template
// libraries live in this folder only (tests/test_cuda_lint.py enforces it).
//
// What a kernel may use:
//   threadIdx, blockIdx, blockDim, gridDim            as in CUDA
//   gf::lane_id(), gf::warp_id()                        linear thread index % 32, / 32
//   gf::sync_block(), gf::sync_warp()                   __syncthreads, __syncwarp (full warp)
//   gf::shfl_xor/shfl_idx/shfl_down/shfl_up, ballot     full-warp shuffles and votes
//   gf::SmemArena / gf::SmemPtr<T> / gf::smem_cast<U>   dynamic shared memory, carved in order
//   gf::cp_async<4|8|16>, cp_async_commit, cp_async_wait<N>
//   gf::ldmatrix_x1/x2/x4 and _trans                    8x8 b16 matrices from shared memory
//   gf::mma_m16n8k16<half|bf16>                         fp32 accumulate
//   gf::load_global<V>/store_global<V>                  aligned vector accesses
//   gf::atomic_add(float*)                              global fp32 atomic
//   gf::exp2_approx                                     ex2.approx.ftz.f32
//   gf::umulhi                                          mul.hi.u32
//   gf::philox_uniform (random.h)                       Triton's tl.rand stream
//   gf::to_float/from_float/pack2/unpack2               16-bit conversions (types.h)
//   gf::launch(kernel, LaunchConfig, DeviceInfo, args...) (host code)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include "common/launch.h"

#if defined(__CUDACC__)
#define GF_DEVICE __device__ __forceinline__
#define GF_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(GPTFAST_SIM)
#define GF_DEVICE inline
#define GF_HOST_DEVICE inline
#else
#error "csrc/common/gf.h: compile with nvcc, or with -DGPTFAST_SIM for the CPU execution layer"
#endif

#include "common/types.h"

#if defined(__CUDACC__)
#include "common/device.cuh"
#else
#include "common/sim_primitives.h"
#endif

#include "common/helpers.h"
#include "common/random.h"
