// Linear cross-entropy, lean schedule (cross_entropy.h): logits = hidden @ weight.T (+ bias) are
// computed tile by tile with mma.sync m16n8k16 (fp32 accumulators) from a cp.async pipeline and
// never leave the chip.
//   forward : grid (row tiles, vocabulary splits). A block walks its split's vocabulary tiles,
//             keeping per row an online max / sum of exponentials / target logit / sum of logits;
//             a small kernel combines the splits into loss and lse.              2 N D V FLOPs
//   backward: grid (row tiles, vocabulary tiles) of one window. A block recomputes its logits
//             tile, forms the gradient tile G (fp32, rounded to T into shared memory for the
//             tensor cores), then for every D chunk adds G @ W[tile] into dhidden and G^T @
//             H[tile] into dweight with fp32 atomics (column sums of G into dbias).  6 N D V FLOPs
// Tile layout (BN = BV = 64, 4 warps): logits phase warp (wm, wn) = (warp / 2, warp % 2) owns
// rows 32 wm.., columns 32 wn..; gradient products give warp w rows (or vocabulary rows) 16 w..
#include <climits>

#include "common/gf.h"
#include "cross_entropy/ce_common.cuh"
#include "cross_entropy/configs.h"
#include "cross_entropy/cross_entropy.h"

namespace gf::ce {
namespace {

constexpr int BN = kLinearTile.block_n;
constexpr int BV = kLinearTile.block_v;
constexpr int BK = kLinearTile.block_k;
constexpr int STAGES = kLinearTile.stages;
constexpr int THREADS = 32 * kLinearTile.warps;
constexpr int LDS = BK + 8;   // row pitch of the operand tiles (80 B: ldmatrix rows in distinct banks)
constexpr int LDG = BV + 8;   // row pitch of the gradient tile (144 B)
static_assert(BN == 64 && BV == 64 && kLinearTile.warps == 4, "the warp layout below assumes 64 x 64, 4 warps");
static_assert(BK % 16 == 0 && THREADS == 2 * BN, "each thread loads 2 rows x 16 bytes per stage");
static_assert(STAGES >= 2, "cp.async pipeline depth");

// Shared memory, carved in this order by the kernels and summed the same way by the launchers.
constexpr size_t operand_bytes() { return size_t(STAGES) * (BN + BV) * LDS * 2; }
constexpr size_t fwd_smem() { return smem_align_up(operand_bytes(), 16) + size_t(2) * BN * 4 * sizeof(float); }
constexpr size_t bwd_smem() { return smem_align_up(operand_bytes(), 16) + size_t(BN) * LDG * 2; }

// The pipeline's stages: hidden rows (BN x LDS) and weight rows (BV x LDS) per stage, addressed
// arithmetically (an array of stage pointers indexed at run time would live in local memory).
template <class T>
struct Operands {
  SmemPtr<T> a, b;
  GF_DEVICE SmemPtr<T> a_stage(int64_t kb) const { return a + int(kb % STAGES) * (BN * LDS); }
  GF_DEVICE SmemPtr<T> b_stage(int64_t kb) const { return b + int(kb % STAGES) * (BV * LDS); }
};

template <class T>
GF_DEVICE Operands<T> take_operands(SmemArena& arena) {
  Operands<T> o;
  o.a = arena.take<T>(size_t(STAGES) * BN * LDS);
  o.b = arena.take<T>(size_t(STAGES) * BV * LDS);
  return o;
}

GF_DEVICE bool rows_vectorizable(const void* base, int64_t stride, int64_t elt) {
  return (reinterpret_cast<uintptr_t>(base) & 15) == 0 && (stride * elt) % 16 == 0;
}

// Stages columns [d0, d0 + BK) of 64 matrix rows into `dst` (row r at dst + r * LDS). This thread
// moves 16 bytes of rows tid / 4 and tid / 4 + 32 (ids[0], ids[1]; -1: a zero row); columns past
// D are zeros. Aligned rows go through cp.async (src-size zero-fills the tail), others through
// plain loads and stores.
template <class T>
GF_DEVICE void load_rows(SmemPtr<T> dst, const T* base, int64_t stride, int64_t D,
                         const int64_t (&ids)[2], int64_t d0, bool vec) {
  const int chunk = int(threadIdx.x) % 4;
  const int64_t d = d0 + chunk * 8;
  #pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = int(threadIdx.x) / 4 + 32 * i;
    SmemPtr<T> s = dst + r * LDS + chunk * 8;
    const int64_t n = (ids[i] < 0 || d >= D) ? 0 : (D - d < 8 ? D - d : 8);
    if (vec) {
      cp_async<16>(s, n > 0 ? base + ids[i] * stride + d : base, int(n * int64_t(sizeof(T))));
    } else {
      #pragma unroll
      for (int e = 0; e < 8; ++e) s[e] = e < n ? base[ids[i] * stride + d + e] : from_float<T>(0.0f);
    }
  }
}

// Issues stage `kb` of a D sweep: hidden rows into o.a[kb % STAGES], weight rows into o.b[..].
template <class T>
GF_DEVICE void load_stage(const Operands<T>& o, int64_t kb, const T* H, int64_t sh,
                          const int64_t (&hid)[2], bool vec_h, const T* W, int64_t sw,
                          const int64_t (&wid)[2], bool vec_w, int64_t D) {
  load_rows(o.a_stage(kb), H, sh, D, hid, kb * BK, vec_h);
  load_rows(o.b_stage(kb), W, sw, D, wid, kb * BK, vec_w);
}

// acc = H[rows] @ W[vocab rows]^T over all of D for this warp's 32 x 32 part of the tile.
// Leaves every stage buffer free (trailing wait and barrier).
template <class T>
GF_DEVICE void logits_tile(float (&acc)[2][4][4], const Operands<T>& o, const T* H, int64_t sh,
                           const int64_t (&hid)[2], bool vec_h, const T* W, int64_t sw,
                           const int64_t (&wid)[2], bool vec_w, int64_t D) {
  const int lane = lane_id(), wm = warp_id() / 2, wn = warp_id() % 2;
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;
  const int64_t nk = (D + BK - 1) / BK;
  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(o, s, H, sh, hid, vec_h, W, sw, wid, vec_w, D);
    cp_async_commit();
  }
  for (int64_t kb = 0; kb < nk; ++kb) {
    cp_async_wait<STAGES - 2>();  // stage kb has landed (for this thread) ...
    sync_block();                 // ... for every thread; stage kb - 1 is free again
    if (kb + STAGES - 1 < nk) load_stage(o, kb + STAGES - 1, H, sh, hid, vec_h, W, sw, wid, vec_w, D);
    cp_async_commit();
    const SmemPtr<T> a = o.a_stage(kb), b = o.b_stage(kb);
    #pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t af[2][4], bf[4][2];
      #pragma unroll
      for (int mi = 0; mi < 2; ++mi)  // A 16 x 16: lanes 0-15 rows at col 0, 16-31 at col 8
        ldmatrix_x4(af[mi], a + (wm * 32 + mi * 16 + lane % 16) * LDS + kk * 16 + (lane / 16) * 8);
      #pragma unroll
      for (int nj = 0; nj < 2; ++nj) {  // B 16 x 16 (two n8 tiles), W rows are B's columns
        uint32_t r[4];
        ldmatrix_x4(r, b + (wn * 32 + nj * 16 + lane % 8 + (lane / 16) * 8) * LDS + kk * 16 +
                           ((lane / 8) % 2) * 8);
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
      #pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        #pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
  }
  cp_async_wait<0>();
  sync_block();
}

// Row (within the tile) and column of element i of accumulator [mi][ni] of this thread
// (PTX ISA 9.7.14.5.8, C fragment: row groupID (+8 for c2, c3), col 2 threadID_in_group + (i & 1)).
GF_DEVICE int acc_row(int mi, int i) { return (warp_id() / 2) * 32 + mi * 16 + (lane_id() >> 2) + (i >= 2 ? 8 : 0); }
GF_DEVICE int acc_col(int ni, int i) { return (warp_id() % 2) * 32 + ni * 8 + 2 * (lane_id() & 3) + (i & 1); }

// Slot -> row id for the loaders: -1 past the end (zero row).
GF_DEVICE int64_t slot_row(const LinearParams& p, int64_t slot, int64_t slot_end) {
  return slot < slot_end ? p.order[slot] : -1;
}

template <class T>
__global__ void __launch_bounds__(THREADS) linear_fwd_kernel(LinearParams p) {
  const int64_t n_valid = *p.n_valid;
  const int64_t tile0 = int64_t(blockIdx.x) * BN;
  if (tile0 >= n_valid) return;  // ignored rows only: nothing to compute (uniform per block)
  SmemArena arena = smem_arena();
  const Operands<T> o = take_operands<T>(arena);
  SmemPtr<float> red = arena.take<float>(size_t(2) * BN * 4);
  const int tid = int(threadIdx.x), lane = lane_id(), wn = warp_id() % 2;
  const T* H = static_cast<const T*>(p.hidden);
  const T* W = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const bool vec_h = rows_vectorizable(H, p.stride_h, sizeof(T));
  const bool vec_w = rows_vectorizable(W, p.stride_w, sizeof(T));
  const int64_t hid[2] = {slot_row(p, tile0 + tid / 4, n_valid), slot_row(p, tile0 + tid / 4 + 32, n_valid)};

  // This thread's 4 accumulator rows: [mi * 2 + (i >= 2)].
  int64_t target[4];
  #pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t slot = tile0 + acc_row(r / 2, (r % 2) * 2);
    target[r] = slot < n_valid ? p.targets[p.order[slot]] : -1;
  }
  RowStats st[4];
  float xt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t vtiles = (p.V + BV - 1) / BV;
  const int64_t vt0 = int64_t(blockIdx.y) * p.tiles_per_split;
  const int64_t vt1 = vt0 + p.tiles_per_split < vtiles ? vt0 + p.tiles_per_split : vtiles;
  for (int64_t vt = vt0; vt < vt1; ++vt) {
    const int64_t v = vt * BV + tid / 4;
    const int64_t wid[2] = {v < p.V ? v : -1, v + 32 < p.V ? v + 32 : -1};
    float acc[2][4][4];
    logits_tile(acc, o, H, p.stride_h, hid, vec_h, W, p.stride_w, wid, vec_w, p.D);
    #pragma unroll
    for (int mi = 0; mi < 2; ++mi)
      #pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t col = vt * BV + acc_col(ni, i);
          if (col >= p.V) continue;
          float x = acc[mi][ni][i];
          if (bias) x += to_float<T>(bias[col]);
          x = soft(x, p.softcap);
          const int r = mi * 2 + (i >= 2 ? 1 : 0);
          st[r].add(x);
          if (col == target[r]) xt[r] += x;
        }
  }
  // The 4 lanes of a quad hold the same rows: merge them, then the two column halves (wn).
  #pragma unroll
  for (int r = 0; r < 4; ++r) {
    #pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = shfl_xor(st[r].m, off), s2 = shfl_xor(st[r].s, off);
      const float x2 = shfl_xor(st[r].sum_x, off), t2 = shfl_xor(xt[r], off);
      st[r].merge(m2, s2, x2);
      xt[r] += t2;
    }
    if ((lane & 3) == 0) {
      SmemPtr<float> slot = red + (wn * BN + acc_row(r / 2, (r % 2) * 2)) * 4;
      slot[0] = st[r].m;
      slot[1] = st[r].s;
      slot[2] = st[r].sum_x;
      slot[3] = xt[r];
    }
  }
  sync_block();
  if (tid < BN && tile0 + tid < n_valid) {
    const int64_t row = p.order[tile0 + tid];
    RowStats all;
    all.m = red[tid * 4 + 0];
    all.s = red[tid * 4 + 1];
    all.sum_x = red[tid * 4 + 2];
    const float xt_all = float(red[tid * 4 + 3]) + float(red[(BN + tid) * 4 + 3]);
    all.merge(red[(BN + tid) * 4 + 0], red[(BN + tid) * 4 + 1], red[(BN + tid) * 4 + 2]);
    const int64_t at = int64_t(blockIdx.y) * p.N + row, plane = int64_t(p.splits) * p.N;
    p.partials[0 * plane + at] = all.m;
    p.partials[1 * plane + at] = all.s;
    p.partials[2 * plane + at] = xt_all;
    p.partials[3 * plane + at] = all.sum_x;
  }
}

__global__ void __launch_bounds__(128) linear_combine_kernel(LinearParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= p.N) return;
  const int64_t target = p.targets[row];
  if (target == p.ignore_index) {  // never computed: its partials were not written
    p.loss[row] = 0.0f;
    p.lse[row] = 0.0f;
    return;
  }
  const int64_t plane = int64_t(p.splits) * p.N;
  RowStats all;
  float xt = 0.0f;
  for (int sp = 0; sp < p.splits; ++sp) {
    const int64_t at = int64_t(sp) * p.N + row;
    all.merge(p.partials[at], p.partials[plane + at], p.partials[3 * plane + at]);
    xt += p.partials[2 * plane + at];
  }
  const float lse = (all.m + log2f(all.s)) * kLn2;
  float loss = NAN;  // target outside [0, V)
  if (target >= 0 && target < p.V) {
    loss = lse - xt;
    if (p.label_smoothing > 0.0f)
      loss = (1.0f - p.label_smoothing) * loss + p.label_smoothing * (lse - all.sum_x / float(p.V));
    loss += p.z_loss * lse * lse;
  }
  p.loss[row] = loss;
  p.lse[row] = lse;
}

template <class T>
__global__ void __launch_bounds__(THREADS) linear_bwd_kernel(LinearParams p) {
  const int64_t n_valid = *p.n_valid;
  const int64_t tile0 = p.slot0 + int64_t(blockIdx.x) * BN;
  if (tile0 >= n_valid) return;  // uniform per block
  const int64_t slot_end = p.slot0 + p.slots < n_valid ? p.slot0 + p.slots : n_valid;
  const int64_t v_tile0 = p.v0 + int64_t(blockIdx.y) * BV;
  const int64_t v_end = p.v0 + p.vcount < p.V ? p.v0 + p.vcount : p.V;
  SmemArena arena = smem_arena();
  const Operands<T> o = take_operands<T>(arena);
  SmemPtr<T> gt = arena.take<T>(size_t(BN) * LDG);  // gradient tile G, BN x BV (row pitch LDG)
  const int tid = int(threadIdx.x), lane = lane_id(), warp = warp_id();
  const int g = lane >> 2, q = lane & 3;
  const T* H = static_cast<const T*>(p.hidden);
  const T* W = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const bool vec_h = rows_vectorizable(H, p.stride_h, sizeof(T));
  const bool vec_w = rows_vectorizable(W, p.stride_w, sizeof(T));
  const int64_t hid[2] = {slot_row(p, tile0 + tid / 4, slot_end), slot_row(p, tile0 + tid / 4 + 32, slot_end)};
  const int64_t v = v_tile0 + tid / 4;
  const int64_t wid[2] = {v < v_end ? v : -1, v + 32 < v_end ? v + 32 : -1};

  // Per accumulator row [mi * 2 + (i >= 2)]: dloss/dx = p coef - uniform - at_target [col == y].
  bool live[4], in_range[4];
  int64_t target[4];
  float lse2[4], coef[4], at_target[4], uniform[4];
  #pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t slot = tile0 + acc_row(r / 2, (r % 2) * 2);
    live[r] = slot < slot_end;
    const int64_t row = live[r] ? p.order[slot] : 0;
    target[r] = live[r] ? p.targets[row] : -1;
    in_range[r] = target[r] >= 0 && target[r] < p.V;
    const float lse = live[r] ? p.lse[row] : 0.0f;
    const float gr = live[r] && p.grad_rows ? p.grad_rows[row * p.stride_g] : 0.0f;
    const float gl = live[r] && p.grad_lse ? p.grad_lse[row * p.stride_gl] : 0.0f;
    lse2[r] = lse * kLog2e;
    coef[r] = gr * (1.0f + 2.0f * p.z_loss * lse) + gl;
    at_target[r] = gr * (1.0f - p.label_smoothing);
    uniform[r] = gr * p.label_smoothing / float(p.V);
  }

  float acc[2][4][4];
  logits_tile(acc, o, H, p.stride_h, hid, vec_h, W, p.stride_w, wid, vec_w, p.D);

  // G into shared memory (two adjacent columns per 32-bit store); column sums for dbias.
  float colsum[4][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}, {0.0f, 0.0f}, {0.0f, 0.0f}};
  SmemPtr<uint32_t> gt32 = smem_cast<uint32_t>(gt);
  const float c = p.softcap;
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mi * 2 + h;
        float d[2];
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 2 * h + e;
          const int64_t col = v_tile0 + acc_col(ni, i);
          d[e] = 0.0f;
          if (!live[r] || col >= v_end) continue;
          float x = acc[mi][ni][i];
          if (bias) x += to_float<T>(bias[col]);
          const float t = c > 0.0f ? tanhf(x / c) : 0.0f;
          const float xs = c > 0.0f ? c * t : x;
          float dx = exp2_approx(xs * kLog2e - lse2[r]) * coef[r] - uniform[r];
          if (col == target[r]) dx -= at_target[r];
          if (c > 0.0f) dx *= 1.0f - t * t;
          d[e] = in_range[r] ? dx : NAN;
          colsum[ni][e] += d[e];
        }
        gt32[(acc_row(mi, 2 * h) * LDG + acc_col(ni, 0)) / 2] = pack2<T>(d[0], d[1]);
      }
  if (p.db) {  // the same for every thread
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        float s = colsum[ni][e];
        #pragma unroll
        for (int off = 4; off < 32; off <<= 1) s += shfl_xor(s, off);  // over groupID
        const int64_t col = v_tile0 + acc_col(ni, e);
        if (g == 0 && col < v_end) atomic_add(p.db + (col - p.v0), s);
      }
  }
  sync_block();  // G is complete

  // For every D chunk: dH[rows, chunk] += G @ W[tile, chunk]; dW[tile, chunk] += G^T @ H[rows, chunk].
  const bool do_h = p.dh != nullptr, do_w = p.dw != nullptr;
  const int64_t nk = (p.D + BK - 1) / BK;
  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load_stage(o, s, H, p.stride_h, hid, vec_h, W, p.stride_w, wid, vec_w, p.D);
    cp_async_commit();
  }
  for (int64_t kb = 0; kb < nk; ++kb) {
    cp_async_wait<STAGES - 2>();
    sync_block();
    if (kb + STAGES - 1 < nk)
      load_stage(o, kb + STAGES - 1, H, p.stride_h, hid, vec_h, W, p.stride_w, wid, vec_w, p.D);
    cp_async_commit();
    const SmemPtr<T> a = o.a_stage(kb), b = o.b_stage(kb);
    if (do_h) {  // warp: rows 16 warp.., all BK columns of the chunk; K = BV
      float ah[4][4] = {};
      #pragma unroll
      for (int kk = 0; kk < BV / 16; ++kk) {
        uint32_t af[4], bf[4][2];
        ldmatrix_x4(af, gt + (warp * 16 + lane % 16) * LDG + kk * 16 + (lane / 16) * 8);
        #pragma unroll
        for (int nj = 0; nj < BK / 16; ++nj) {  // W chunk is [k = vocab][n = d]: transposed load
          uint32_t r4[4];
          ldmatrix_x4_trans(r4, b + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + nj * 16 + (lane / 16) * 8);
          bf[2 * nj][0] = r4[0];
          bf[2 * nj][1] = r4[1];
          bf[2 * nj + 1][0] = r4[2];
          bf[2 * nj + 1][1] = r4[3];
        }
        #pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(ah[ni], af, bf[ni], ah[ni]);
      }
      #pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t slot = tile0 + warp * 16 + g + (i >= 2 ? 8 : 0);
          const int64_t d = kb * BK + ni * 8 + 2 * q + (i & 1);
          if (slot < slot_end && d < p.D) atomic_add(p.dh + (slot - p.slot0) * p.D + d, ah[ni][i]);
        }
    }
    if (do_w) {  // warp: vocabulary rows 16 warp.., all BK columns; K = BN; A = G^T
      float aw[4][4] = {};
      #pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t af[4], bf[4][2];
        const int j = lane / 8;  // matrix j: k rows (j / 2) * 8.., m columns (j % 2) * 8..
        ldmatrix_x4_trans(af, gt + (kk * 16 + (j / 2) * 8 + lane % 8) * LDG + warp * 16 + (j % 2) * 8);
        #pragma unroll
        for (int nj = 0; nj < BK / 16; ++nj) {  // H chunk is [k = row][n = d]: transposed load
          uint32_t r4[4];
          ldmatrix_x4_trans(r4, a + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LDS + nj * 16 + (lane / 16) * 8);
          bf[2 * nj][0] = r4[0];
          bf[2 * nj][1] = r4[1];
          bf[2 * nj + 1][0] = r4[2];
          bf[2 * nj + 1][1] = r4[3];
        }
        #pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(aw[ni], af, bf[ni], aw[ni]);
      }
      #pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t vv = v_tile0 + warp * 16 + g + (i >= 2 ? 8 : 0);
          const int64_t d = kb * BK + ni * 8 + 2 * q + (i & 1);
          if (vv < v_end && d < p.D) atomic_add(p.dw + (vv - p.v0) * p.D + d, aw[ni][i]);
        }
    }
  }
  cp_async_wait<0>();
}

void check_grid(const char* name, int64_t x, int64_t y) {
  if (x > INT_MAX || y > 65535)
    throw std::invalid_argument(std::string(name) + ": the problem needs a grid of (" +
                                std::to_string(x) + ", " + std::to_string(y) +
                                ") blocks, beyond CUDA's limits (2^31 - 1, 65535)");
}

}  // namespace

size_t linear_forward_smem() { return fwd_smem(); }
size_t linear_backward_smem() { return bwd_smem(); }

void linear_plan_forward(LinearParams& p, const DeviceInfo& dev) {
  const int64_t row_tiles = (p.N + BN - 1) / BN;
  const int64_t vtiles = (p.V + BV - 1) / BV;
  int64_t want = (2 * int64_t(dev.num_sms) + row_tiles - 1) / (row_tiles > 0 ? row_tiles : 1);
  want = want < 1 ? 1 : (want > vtiles ? vtiles : want);
  p.tiles_per_split = (vtiles + want - 1) / want;
  p.splits = int((vtiles + p.tiles_per_split - 1) / p.tiles_per_split);  // every split >= 1 tile
}

void linear_forward(DType dtype, const LinearParams& p, const DeviceInfo& dev, Stream stream) {
  if (p.N == 0) return;
  LaunchConfig c;
  c.name = "lce_fwd";
  c.grid = dim3(unsigned((p.N + BN - 1) / BN), unsigned(p.splits), 1);
  check_grid(c.name, (p.N + BN - 1) / BN, p.splits);
  c.block = dim3(THREADS, 1, 1);
  c.smem = fwd_smem();
  c.stream = stream;
  if (dtype == DType::kF16) launch(linear_fwd_kernel<half>, c, dev, p);
  else if (dtype == DType::kBF16) launch(linear_fwd_kernel<bf16>, c, dev, p);
  else throw std::invalid_argument("lce_fwd: fp16 or bf16 only (mma.sync has no fp32 form)");
  LaunchConfig k;
  k.name = "lce_combine";
  k.grid = dim3(unsigned((p.N + 127) / 128), 1, 1);
  k.block = dim3(128, 1, 1);
  k.stream = stream;
  launch(linear_combine_kernel, k, dev, p);
}

void linear_backward(DType dtype, const LinearParams& p, const DeviceInfo& dev, Stream stream) {
  if (p.slots == 0 || p.vcount == 0) return;
  LaunchConfig c;
  c.name = "lce_bwd";
  const int64_t gx = (p.slots + BN - 1) / BN, gy = (p.vcount + BV - 1) / BV;
  check_grid(c.name, gx, gy);
  c.grid = dim3(unsigned(gx), unsigned(gy), 1);
  c.block = dim3(THREADS, 1, 1);
  c.smem = bwd_smem();
  c.stream = stream;
  if (dtype == DType::kF16) launch(linear_bwd_kernel<half>, c, dev, p);
  else if (dtype == DType::kBF16) launch(linear_bwd_kernel<bf16>, c, dev, p);
  else throw std::invalid_argument("lce_bwd: fp16 or bf16 only (mma.sync has no fp32 form)");
}

}  // namespace gf::ce
