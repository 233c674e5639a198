// Attention kernels: launch parameters and launchers (no torch, no CUDA keywords; the binding
// fills these from tensors). Semantics: those of gptfast.attention's docstring, the Triton
// kernels (kernels/attention.py) and gptfast/ops/reference.py:
//   q (B, Hq, Sq, d), k/v (B, Hkv, Sk, d), Hkv divides Hq: query head h reads kv head h / group;
//   offset = Sk - Sq (bottom-right alignment); query i sees key j iff
//     causal:  j <= i + offset;   window W (causal only):  j > i + offset - W;
//     key_padding_mask[b, j] != 0;
//   s_ij = scale q_i.k_j - slope_h |i + offset - j| (ALiBi); p = softmax over the visible keys;
//   dropout: element (b, h, i, j) kept iff tl.rand(seed, ((b Hq + h) Sq + i) Sk + j) >= p_drop
//     (common/random.h: the Triton kernels' stream), kept ones scaled by 1 / (1 - p_drop);
//   out = p V, lse = log sum_j exp(s_ij) of the undropped scores (-inf, with out = 0 and zero
//   gradients, for a row that sees no key).
// Backward (FlashAttention-2): delta_i = rowsum(dO_i O_i) - dlse_i, then per key tile dK, dV
// (summed over the query heads of each GQA group inside one block: no atomics), and dQ either
// accumulated with fp32 atomics in the same pass, or (deterministic) by a second kernel per query
// tile with plain stores.
//
// Only the last dimension of q, k, v, dout is contiguous: every other stride is a parameter, and
// every address is computed in 64 bits. Outputs are contiguous.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/launch.h"

namespace gf::attn {

// (batch, head, row) strides of a (B, H, S, d) tensor whose last dimension is contiguous.
struct Strides {
  int64_t b = 0, h = 0, row = 0;
};

struct Params {
  // ---- forward inputs (backward too)
  const void* q = nullptr;        // (B, Hq, Sq, d)
  const void* k = nullptr;        // (B, Hkv, Sk, d)
  const void* v = nullptr;        // (B, Hkv, Sk, d)
  Strides sq, sk, sv;
  int B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, head_dim = 0;
  float scale = 1.0f;             // softmax scale (multiplies q.k)
  bool causal = false;
  int window = 0;                 // 0: none; else W >= 1 (causal only)
  const float* slopes = nullptr;  // (Hq,) fp32 or null: ALiBi
  const uint8_t* kpm = nullptr;   // key_padding_mask (B, Sk) bool bytes, strides kpm_b, kpm_n; or null
  int64_t kpm_b = 0, kpm_n = 0;
  const int64_t* seed = nullptr;  // (1,) on the device; read inside the kernels (no host sync)
  float dropout_p = 0.0f;         // 0: no dropout
  // ---- forward outputs (backward inputs)
  void* out = nullptr;            // (B, Hq, Sq, d), strides so
  Strides so;
  float* lse = nullptr;           // (B, Hq, Sq) contiguous fp32
  // ---- backward
  const void* dout = nullptr;     // (B, Hq, Sq, d), strides sdo
  Strides sdo;
  const float* dlse = nullptr;    // (B, Hq, Sq) contiguous fp32, or null
  float* delta = nullptr;         // (B, Hq, Sq) contiguous fp32 scratch: rowsum(dO O) - dlse
  void* dq = nullptr;             // (B, Hq, Sq, d) contiguous (deterministic: written by the dQ kernel)
  void* dk = nullptr;             // (B, Hkv, Sk, d) contiguous
  void* dv = nullptr;             // (B, Hkv, Sk, d) contiguous
  float* dq_accum = nullptr;      // (B, Hq, Sq, d) contiguous fp32, or null: deterministic backward
};

// Head dims with kernels (configs.h), and whether `d` is one of them.
bool supported_head_dim(int d);
const int* head_dims(int* count);

// out, lse.
void forward(DType dtype, const Params& p, const DeviceInfo& dev, Stream stream);
// dq, dk, dv (p.delta scratch; p.dq_accum fp32 scratch when not deterministic, zeroed by the
// preprocess kernel; the caller converts it to dq).
void backward(DType dtype, const Params& p, const DeviceInfo& dev, Stream stream);
// The keep mask (B, Hq, Sq, Sk) as bytes (1 = kept): what the kernels draw for this seed.
void dropout_mask(const Params& p, uint8_t* mask, const DeviceInfo& dev, Stream stream);

// For the resource table: threads per block and dynamic shared memory of each kernel at head dim d.
struct LaunchShape {
  int threads = 0;
  size_t smem = 0;
};
LaunchShape forward_shape(int d);          // attn_fwd_kernel
LaunchShape dropout_mask_shape();          // dropout_mask_kernel
LaunchShape bwd_preprocess_shape(int d);   // attn_bwd_preprocess_kernel
LaunchShape bwd_kv_shape(int d);           // attn_bwd_kv_kernel
LaunchShape bwd_q_shape(int d);            // attn_bwd_q_kernel

}  // namespace gf::attn
