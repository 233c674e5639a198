// Cross-entropy over given logits (cross_entropy.h): one block per row, one pass over the row in
// the forward (online log-sum-exp) and one in the backward (read logits, write the gradient,
// possibly in place). Bandwidth-bound: 16-byte loads and stores when the row is aligned.
#include <climits>

#include "common/gf.h"
#include "cross_entropy/ce_common.cuh"
#include "cross_entropy/configs.h"
#include "cross_entropy/cross_entropy.h"

namespace gf::ce {
namespace {

constexpr int kMaxThreads = 512;

// Calls f(col, x) for every column of a row this thread owns: 16-byte vectors strided over the
// block when `vec` (row start 16-byte aligned), then the columns past the last whole vector.
template <class T, class F>
GF_DEVICE void for_each_col(const T* row, int64_t V, bool vec, F&& f) {
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  constexpr int N = kVec<T>;
  int64_t tail = 0;
  if (vec) {
    const int64_t nvec = V / N;
    for (int64_t i = tid; i < nvec; i += nt) {
      float v[N];
      unpack_vec<T>(load_global<uint4>(row + i * N), v);
      for (int k = 0; k < N; ++k) f(i * N + k, v[k]);
    }
    tail = nvec * N;
  }
  for (int64_t j = tail + tid; j < V; j += nt) f(j, to_float<T>(row[j]));
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads) row_fwd_kernel(RowParams p) {
  SmemArena arena = smem_arena();
  SmemPtr<float> red = arena.take<float>(3 * 32);  // per warp: m, s, sum_x
  const int lane = lane_id(), warp = warp_id(), nwarps = int(blockDim.x) / 32;
  const float c = p.softcap;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const int64_t target = p.targets[row];
    if (target == p.ignore_index) {  // the same for the whole block: no barrier is skipped
      if (threadIdx.x == 0) {
        p.loss[row] = 0.0f;
        p.lse[row] = 0.0f;
      }
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + row * p.stride_x;
    RowStats st;
    for_each_col(x, p.V, aligned16(x), [&](int64_t, float v) { st.add(soft(v, c)); });
    st.warp_reduce();
    if (lane == 0) {
      red[warp] = st.m;
      red[32 + warp] = st.s;
      red[64 + warp] = st.sum_x;
    }
    sync_block();
    if (warp == 0) {
      RowStats all;
      if (lane < nwarps) {
        all.m = red[lane];
        all.s = red[32 + lane];
        all.sum_x = red[64 + lane];
      }
      all.warp_reduce();
      if (lane == 0) {
        const float lse = (all.m + log2f(all.s)) * kLn2;
        float loss = NAN;  // target outside [0, V)
        if (target >= 0 && target < p.V) {
          const float xt = soft(to_float<T>(x[target]), c);
          loss = lse - xt;
          if (p.label_smoothing > 0.0f)
            loss = (1.0f - p.label_smoothing) * loss +
                   p.label_smoothing * (lse - all.sum_x / float(p.V));
          loss += p.z_loss * lse * lse;
        }
        p.loss[row] = loss;
        p.lse[row] = lse;
      }
    }
    sync_block();  // `red` is rewritten for the next row
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads) row_bwd_kernel(RowParams p) {
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  constexpr int N = kVec<T>;
  const float c = p.softcap;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const int64_t target = p.targets[row];
    const T* x = static_cast<const T*>(p.logits) + row * p.stride_x;
    T* dx = static_cast<T*>(p.dlogits) + row * p.stride_dx;
    const bool vec = aligned16(x) && aligned16(dx);
    const bool ignored = target == p.ignore_index;
    const bool in_range = target >= 0 && target < p.V;
    const float g = (ignored || !p.grad_rows) ? 0.0f : p.grad_rows[row * p.stride_g];
    const float g_lse = (ignored || !p.grad_lse) ? 0.0f : p.grad_lse[row * p.stride_gl];
    const float lse = ignored ? 0.0f : p.lse[row];
    const float lse2 = lse * kLog2e;
    const float coef = g * (1.0f + 2.0f * p.z_loss * lse) + g_lse;
    const float at_target = g * (1.0f - p.label_smoothing);
    const float uniform = g * p.label_smoothing / float(p.V);
    auto grad = [&](int64_t j, float v) -> float {
      if (ignored) return 0.0f;  // its logits are not even read (see below)
      if (!in_range) return NAN;
      const float t = c > 0.0f ? tanhf(v / c) : 0.0f;
      const float xs = c > 0.0f ? c * t : v;
      float d = exp2_approx(xs * kLog2e - lse2) * coef - uniform;
      if (j == target) d -= at_target;
      return c > 0.0f ? d * (1.0f - t * t) : d;
    };
    int64_t tail = 0;
    if (vec) {
      const int64_t nvec = p.V / N;
      for (int64_t i = tid; i < nvec; i += nt) {
        float v[N];
        if (ignored) {
          for (int k = 0; k < N; ++k) v[k] = 0.0f;
        } else {
          unpack_vec<T>(load_global<uint4>(x + i * N), v);
          for (int k = 0; k < N; ++k) v[k] = grad(i * N + k, v[k]);
        }
        store_global<uint4>(dx + i * N, pack_vec<T>(v));
      }
      tail = nvec * N;
    }
    for (int64_t j = tail + tid; j < p.V; j += nt)
      dx[j] = from_float<T>(ignored ? 0.0f : grad(j, to_float<T>(x[j])));
  }
}

LaunchConfig row_config(const char* name, const RowParams& p, Stream stream) {
  LaunchConfig c;
  c.name = name;
  c.grid = dim3(unsigned(p.n_rows < INT_MAX ? p.n_rows : INT_MAX), 1, 1);
  c.block = dim3(unsigned(row_threads(p.V)), 1, 1);
  c.stream = stream;
  return c;
}

}  // namespace

int row_threads(int64_t V) {
  for (const RowConfig& r : kRowConfigs)
    if (V <= r.max_v) return r.threads;
  return kMaxThreads;
}

void row_forward(DType dtype, const RowParams& p, const DeviceInfo& dev, Stream stream) {
  if (p.n_rows == 0) return;
  LaunchConfig c = row_config("ce_row_fwd", p, stream);
  c.smem = 3 * 32 * sizeof(float);
  switch (dtype) {
    case DType::kF32: launch(row_fwd_kernel<float>, c, dev, p); break;
    case DType::kF16: launch(row_fwd_kernel<half>, c, dev, p); break;
    case DType::kBF16: launch(row_fwd_kernel<bf16>, c, dev, p); break;
  }
}

void row_backward(DType dtype, const RowParams& p, const DeviceInfo& dev, Stream stream) {
  if (p.n_rows == 0) return;
  const LaunchConfig c = row_config("ce_row_bwd", p, stream);
  switch (dtype) {
    case DType::kF32: launch(row_bwd_kernel<float>, c, dev, p); break;
    case DType::kF16: launch(row_bwd_kernel<half>, c, dev, p); break;
    case DType::kBF16: launch(row_bwd_kernel<bf16>, c, dev, p); break;
  }
}

}  // namespace gf::ce
