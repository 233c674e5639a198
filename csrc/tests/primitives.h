// Test kernels exercising each primitive of csrc/common/ on its own, launched by the binding's
// _test_* functions: on the CPU layer they are checked against the PTX ISA (tests/
// test_cuda_sim_primitives.py); on a GPU the same kernels compare the hardware with the layer.
#pragma once

#include <cstdint>

#include "common/launch.h"

namespace gf::tests {

// in (n) float, out (5, n): shfl_xor(v, 5), shfl_idx(v, 7 * lane + 3), shfl_down(v, 3),
// shfl_up(v, 3), ballot(v > 0) (as a float of the mask's bits). n = threads, a multiple of 32.
void run_shuffles(const float* in, float* out, int n, const DeviceInfo& dev, Stream stream);

// src: 32 rows x 8 b16 values (row-major). One warp stores them to shared memory with a row pitch
// of `pitch` (>= 8, multiple of 8) elements, then ldmatrix variant v (0: x1, 1: x2, 2: x4, 3-5:
// the same .trans) with lane l giving the address of row l. out: 32 lanes x 4 registers.
void run_ldmatrix(const uint16_t* src, uint32_t* out, int variant, int pitch, const DeviceInfo& dev,
              Stream stream);

// One warp: d = mma_m16n8k16(a, b, c) on raw fragments; a (32, 4), b (32, 2) u32, c/d (32, 4) f32.
void run_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, bool bf16,
         const DeviceInfo& dev, Stream stream);

// cp.async of `bytes` (4, 8, 16) per thread with src-size `src_bytes`, in two commit groups
// (threads' first and second halves of `src`), waited for with wait_group 1 then 0.
// src, out: 2 * 32 * bytes bytes. out receives shared memory after the waits.
void run_cp_async(const unsigned char* src, unsigned char* out, int bytes, int src_bytes,
              const DeviceInfo& dev, Stream stream);

// y = exp2_approx(x), n elements.
void run_exp2(const float* x, float* y, int n, const DeviceInfo& dev, Stream stream);

// out[i] = philox_uniform(seeds[i], offsets[i]) (common/random.h: Triton's tl.rand), n elements.
void run_philox(const int64_t* seeds, const int64_t* offsets, float* out, int n, const DeviceInfo& dev,
                Stream stream);

// acc[i % m] += vals[i] with fp32 atomics from `blocks` blocks of 64 threads (n = blocks * 64).
void run_atomics(const float* vals, float* acc, int n, int m, const DeviceInfo& dev, Stream stream);

// out[b] = block_sum of in[b * threads ...] and warp_max of lanes, per block; out (blocks, 2).
void run_reductions(const float* in, float* out, int blocks, int threads, const DeviceInfo& dev,
                Stream stream);

}  // namespace gf::tests
