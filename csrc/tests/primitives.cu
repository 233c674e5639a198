// Test kernels for the primitives (see primitives.h).
#include "common/gf.h"
#include "tests/primitives.h"

namespace gf::tests {
namespace {

__global__ void shuffles_kernel(const float* in, float* out, int n) {
  const int t = int(threadIdx.x);
  const float v = in[t];
  const int lane = lane_id();
  out[0 * n + t] = shfl_xor(v, 5);
  out[1 * n + t] = shfl_idx(v, 7 * lane + 3);
  out[2 * n + t] = shfl_down(v, 3);
  out[3 * n + t] = shfl_up(v, 3);
  out[4 * n + t] = float(ballot(v > 0.0f));
}

__global__ void ldmatrix_kernel(const uint16_t* src, uint32_t* out, int variant, int pitch) {
  SmemArena arena = smem_arena();
  SmemPtr<uint16_t> tile = arena.take<uint16_t>(size_t(32) * pitch);
  const int lane = lane_id();
  for (int c = 0; c < 8; ++c) tile[lane * pitch + c] = src[lane * 8 + c];
  sync_warp();
  SmemPtr<uint16_t> row = tile + lane * pitch;
  uint32_t r[4] = {0, 0, 0, 0};
  switch (variant) {
    case 0: { uint32_t x[1]; ldmatrix_x1(x, row); r[0] = x[0]; break; }
    case 1: { uint32_t x[2]; ldmatrix_x2(x, row); r[0] = x[0]; r[1] = x[1]; break; }
    case 2: { ldmatrix_x4(r, row); break; }
    case 3: { uint32_t x[1]; ldmatrix_x1_trans(x, row); r[0] = x[0]; break; }
    case 4: { uint32_t x[2]; ldmatrix_x2_trans(x, row); r[0] = x[0]; r[1] = x[1]; break; }
    default: { ldmatrix_x4_trans(r, row); break; }
  }
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

template <class T>
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const int lane = lane_id();
  uint32_t fa[4], fb[2];
  float fc[4], fd[4];
  for (int i = 0; i < 4; ++i) fa[i] = a[lane * 4 + i];
  for (int i = 0; i < 2; ++i) fb[i] = b[lane * 2 + i];
  for (int i = 0; i < 4; ++i) fc[i] = c[lane * 4 + i];
  mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = fd[i];
}

// One thread's copy of `bytes` (a run-time value: kernels are templated on the dtype only).
template <int Bytes>
GF_DEVICE void copy_async(SmemPtr<unsigned char> dst, const unsigned char* src, int src_bytes) {
  cp_async<Bytes>(dst, src, src_bytes);
}

GF_DEVICE void copy_async(int bytes, SmemPtr<unsigned char> dst, const unsigned char* src, int src_bytes) {
  if (bytes == 4) copy_async<4>(dst, src, src_bytes);
  if (bytes == 8) copy_async<8>(dst, src, src_bytes);
  if (bytes == 16) copy_async<16>(dst, src, src_bytes);
}

__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out, int bytes, int src_bytes) {
  SmemArena arena = smem_arena();
  SmemPtr<unsigned char> buf = arena.take<unsigned char>(size_t(2) * 32 * bytes);
  const int t = int(threadIdx.x);
  copy_async(bytes, buf + t * bytes, src + t * bytes, src_bytes);
  cp_async_commit();
  copy_async(bytes, buf + (32 + t) * bytes, src + (32 + t) * bytes, src_bytes);
  cp_async_commit();
  cp_async_wait<1>();  // the first group is complete, the second may not be
  sync_warp();
  for (int i = 0; i < bytes; ++i) out[t * bytes + i] = buf[t * bytes + i];
  cp_async_wait<0>();
  sync_warp();
  for (int i = 0; i < bytes; ++i) out[(32 + t) * bytes + i] = buf[(32 + t) * bytes + i];
}

__global__ void exp2_kernel(const float* x, float* y, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) y[i] = exp2_approx(x[i]);
}

__global__ void philox_kernel(const int64_t* seeds, const int64_t* offsets, float* out, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = philox_uniform(uint64_t(seeds[i]), uint64_t(offsets[i]));
}

__global__ void atomics_kernel(const float* vals, float* acc, int n, int m) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) atomic_add(acc + i % m, vals[i]);
}

__global__ void reductions_kernel(const float* in, float* out) {
  SmemArena arena = smem_arena();
  SmemPtr<float> scratch = arena.take<float>(32);
  const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  const float total = block_sum(v, scratch);
  const float wmax = warp_max(v);
  if (threadIdx.x == 0) {
    out[blockIdx.x * 2 + 0] = total;
    out[blockIdx.x * 2 + 1] = wmax;
  }
}

LaunchConfig cfg(const char* name, unsigned blocks, unsigned threads, size_t smem, Stream s) {
  LaunchConfig c;
  c.name = name;
  c.grid = dim3(blocks, 1, 1);
  c.block = dim3(threads, 1, 1);
  c.smem = smem;
  c.stream = s;
  return c;
}

}  // namespace

void run_shuffles(const float* in, float* out, int n, const DeviceInfo& dev, Stream s) {
  launch(shuffles_kernel, cfg("test_shuffles", 1, unsigned(n), 0, s), dev, in, out, n);
}

void run_ldmatrix(const uint16_t* src, uint32_t* out, int variant, int pitch, const DeviceInfo& dev,
              Stream s) {
  launch(ldmatrix_kernel, cfg("test_ldmatrix", 1, 32, size_t(32) * pitch * 2, s), dev, src, out,
         variant, pitch);
}

void run_mma(const uint32_t* a, const uint32_t* b, const float* c, float* d, bool bf16_inputs,
         const DeviceInfo& dev, Stream s) {
  if (bf16_inputs)
    launch(mma_kernel<bf16>, cfg("test_mma_bf16", 1, 32, 0, s), dev, a, b, c, d);
  else
    launch(mma_kernel<half>, cfg("test_mma_f16", 1, 32, 0, s), dev, a, b, c, d);
}

void run_cp_async(const unsigned char* src, unsigned char* out, int bytes, int src_bytes,
                  const DeviceInfo& dev, Stream s) {
  launch(cp_async_kernel, cfg("test_cp_async", 1, 32, size_t(2) * 32 * bytes, s), dev, src, out,
         bytes, src_bytes);
}

void run_exp2(const float* x, float* y, int n, const DeviceInfo& dev, Stream s) {
  launch(exp2_kernel, cfg("test_exp2", unsigned((n + 127) / 128), 128, 0, s), dev, x, y, n);
}

void run_philox(const int64_t* seeds, const int64_t* offsets, float* out, int n,
                const DeviceInfo& dev, Stream s) {
  launch(philox_kernel, cfg("test_philox", unsigned((n + 127) / 128), 128, 0, s), dev, seeds,
         offsets, out, n);
}

void run_atomics(const float* vals, float* acc, int n, int m, const DeviceInfo& dev, Stream s) {
  launch(atomics_kernel, cfg("test_atomics", unsigned((n + 63) / 64), 64, 0, s), dev, vals, acc,
         n, m);
}

void run_reductions(const float* in, float* out, int blocks, int threads, const DeviceInfo& dev,
                Stream s) {
  launch(reductions_kernel, cfg("test_reductions", unsigned(blocks), unsigned(threads), 128, s),
         dev, in, out);
}

}  // namespace gf::tests
