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
