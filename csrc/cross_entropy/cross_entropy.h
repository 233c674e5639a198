// Cross-entropy kernels: launch parameters and launchers (no torch, no CUDA keywords; the binding
// fills these from tensors). Semantics: those of gptfast/ops/reference.py and the docstring of
// kernels/cross_entropy.py (per row, x = logits in fp32):
//     softcap c:      x <- c * tanh(x / c)                          (before anything else)
//     lse           = log sum_j exp(x_j)
//     loss_row      = (1 - eps) (lse - x_y) + eps (lse - mean_j x_j) + z lse^2
//     dloss/dx      = p (g (1 + 2 z lse) + g_lse) - g (1 - eps) onehot_y - g eps / V
//                     (times 1 - tanh^2 when softcapped)
//     target == ignore_index: loss 0, lse 0, gradient 0 (the row's logits are never read)
//     target outside [0, V): loss NaN, gradient row NaN (no out-of-bounds read, no host sync)
#pragma once

#include <cstdint>

#include "common/launch.h"

namespace gf::ce {

// Cross-entropy over given logits: one block per row, one pass over the row.
struct RowParams {
  const void* logits = nullptr;   // (n_rows, V), element stride 1, row stride stride_x
  void* dlogits = nullptr;        // backward output (n_rows, V); may be `logits` (in place)
  const int64_t* targets = nullptr;
  float* loss = nullptr;          // forward output (n_rows,)
  float* lse = nullptr;           // forward output, backward input (n_rows,)
  const float* grad_rows = nullptr;  // backward: d/d loss_row, stride stride_g (0: broadcast); null: 0
  const float* grad_lse = nullptr;   // backward: d/d lse, stride stride_gl; null: 0
  int64_t n_rows = 0, V = 0, stride_x = 0, stride_dx = 0, stride_g = 0, stride_gl = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f, z_loss = 0.0f;
  float softcap = 0.0f;           // <= 0: no softcap
};

void row_forward(DType dtype, const RowParams& p, const DeviceInfo& dev, Stream stream);
void row_backward(DType dtype, const RowParams& p, const DeviceInfo& dev, Stream stream);

// Threads per row block for a vocabulary of V (configs.h).
int row_threads(int64_t V);

}  // namespace gf::ce

namespace gf::ce {

// Linear cross-entropy, lean schedule, on mma.sync tiles (linear_cross_entropy.cu): the logits
// hidden @ weight.T (+ bias) exist only tile by tile on chip. fp16/bf16 (mma.sync has no fp32
// form), fp32 accumulation. Rows are visited in `order` (non-ignored rows first, n_valid of them,
// counted on the device): tiles past n_valid do nothing, without a host sync.
struct LinearParams {
  const void* hidden = nullptr;   // (N, D), element stride 1, row stride stride_h
  const void* weight = nullptr;   // (V, D), element stride 1, row stride stride_w
  const void* bias = nullptr;     // (V,) or null
  const int64_t* targets = nullptr;
  const int64_t* order = nullptr; // (N,) row ids, non-ignored first
  const int32_t* n_valid = nullptr;  // (1,) on the device
  int64_t N = 0, V = 0, D = 0, stride_h = 0, stride_w = 0;
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f, z_loss = 0.0f, softcap = 0.0f;
  // forward: per (split, row) partial statistics, combined into loss and lse
  float* partials = nullptr;      // (4, splits, N): max (base 2), sum 2^(y - max), x_target, sum x
  int splits = 1;
  int64_t tiles_per_split = 1;
  float* loss = nullptr;          // (N,)
  float* lse = nullptr;           // (N,) forward output; backward input
  // backward: fp32 accumulators of one window of rows (slots) and one of vocabulary rows
  const float* grad_rows = nullptr;  // stride stride_g (0: broadcast); null: 0
  const float* grad_lse = nullptr;   // stride stride_gl; null: 0
  int64_t stride_g = 0, stride_gl = 0;
  int64_t slot0 = 0, slots = 0;   // row window: order[slot0, slot0 + slots)
  int64_t v0 = 0, vcount = 0;     // vocabulary window: rows [v0, v0 + vcount) of weight
  float* dh = nullptr;            // (slots, D) fp32, zeroed: accumulates d hidden; null: skip
  float* dw = nullptr;            // (vcount, D) fp32, zeroed: accumulates d weight; null: skip
  float* db = nullptr;            // (vcount,) fp32, zeroed: d bias; null: skip
};

// Vocabulary splits for the forward (fills splits / tiles_per_split): enough row tiles x splits to
// give every SM two blocks.
void linear_plan_forward(LinearParams& p, const DeviceInfo& dev);
void linear_forward(DType dtype, const LinearParams& p, const DeviceInfo& dev, Stream stream);
void linear_backward(DType dtype, const LinearParams& p, const DeviceInfo& dev, Stream stream);
// Shared memory of the two kernels (bytes), for the resource table.
size_t linear_forward_smem();
size_t linear_backward_smem();

}  // namespace gf::ce
