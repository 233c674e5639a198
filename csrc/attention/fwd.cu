// Attention forward (FlashAttention-2 on mma.sync, attention.h for the semantics) and the dropout
// keep-mask kernel.
//
// One block per (query tile of BM rows, batch * head), the tile index fastest on grid axis x
// (causal: heaviest tiles first). The Q tile is staged in shared memory once; K and V tiles of BN
// keys stream through a STAGES-deep cp.async ring. Warp w owns MT strips of 16 query rows and keeps
// their output accumulators (fp32), running max m and running sum l in registers:
//   S = Q K^T                       mma, Q and K fragments by ldmatrix
//   x = S scale log2(e) [- alibi]   base-2 scores; masked entries -inf (only on edge tiles)
//   m' = max(m, rowmax x); p = 2^(x - m'); l = l 2^(m - m') + rowsum p; O = O 2^(m - m')
//   O += dropout(p) V               p stays in registers as the A operand (rounded to T)
//   out = O / l, lse = (m + log2 l) ln 2   (l = 0: a row that saw no key: out 0, lse -inf)
// Key tiles outside the causal / window band are never loaded; fully visible tiles skip the mask.
#include <climits>

#include "common/gf.h"
#include "attention/attention.h"
#include "attention/attn_common.cuh"
#include "attention/configs.h"

namespace gf::attn {
namespace {

template <int D>
struct FwdShape {
  static constexpr FwdTile t = Config<D>::fwd;
  static constexpr int WARPS = t.warps, MT = t.m_tiles, BM = 16 * WARPS * MT, BN = t.block_n;
  static constexpr int STAGES = t.stages, THREADS = 32 * WARPS, LD = D + 8;
  static_assert(D % 16 == 0 && BN % 16 == 0 && STAGES >= 2, "tile shape");
  // Q (BM rows), then STAGES x K (BN rows), then STAGES x V; every carving 16-byte aligned.
  static constexpr size_t smem() { return size_t(BM + 2 * STAGES * BN) * LD * 2; }
};

template <class T, int D>
__global__ void __launch_bounds__(FwdShape<D>::THREADS) attn_fwd_kernel(Params p) {
  using S = FwdShape<D>;
  constexpr int BM = S::BM, BN = S::BN, MT = S::MT, LD = S::LD, STAGES = S::STAGES;
  constexpr int THREADS = S::THREADS, NT = BN / 8, DT = D / 8;
  const int n_qt = (p.Sq + BM - 1) / BM;
  const TileHead th = tile_and_head(n_qt, p.causal);
  const int b = int(th.bh / p.Hq), h = int(th.bh % p.Hq), hk = h / (p.Hq / p.Hkv);
  const int m0 = th.tile * BM;
  const T* Q = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
  const T* K = static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h;
  const T* V = static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h;
  const bool vq = rows_aligned16(Q, p.sq.row);
  const bool vk = rows_aligned16(K, p.sk.row);
  const bool vv = rows_aligned16(V, p.sv.row);

  SmemArena arena = smem_arena();
  const auto sQ = arena.take<T>(size_t(BM) * LD);
  const auto sK = arena.take<T>(size_t(STAGES) * BN * LD);
  const auto sV = arena.take<T>(size_t(STAGES) * BN * LD);

  const TileRange r = key_tiles(m0, BM, BN, p);
  auto load_kv = [&](int kt, int stage) {
    load_tile<T, D, BN, THREADS>(sK + stage * (BN * LD), K, p.sk.row, kt * BN, p.Sk, vk);
    load_tile<T, D, BN, THREADS>(sV + stage * (BN * LD), V, p.sv.row, kt * BN, p.Sk, vv);
  };
  if (r.lo < r.hi) load_tile<T, D, BM, THREADS>(sQ, Q, p.sq.row, m0, p.Sq, vq);
  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (r.lo + s < r.hi) load_kv(r.lo + s, s);
    cp_async_commit();
  }

  const int lane = lane_id(), warp = warp_id(), g = lane >> 2, t4 = lane & 3;
  const int row_w = warp * 16 * MT;  // this warp's first row in the tile
  const float scale2 = p.scale * kLog2e;
  const float slope2 = p.slopes ? p.slopes[h] * kLog2e : 0.0f;
  const bool dropout = p.dropout_p > 0.0f;
  const uint64_t seed = dropout ? uint64_t(*p.seed) : 0;
  const float drop_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;

  float o[MT][DT][4];
  float m_i[MT][2], l_i[MT][2];
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    #pragma unroll
    for (int nd = 0; nd < DT; ++nd)
      #pragma unroll
      for (int i = 0; i < 4; ++i) o[mt][nd][i] = 0.0f;
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      m_i[mt][hh] = -INFINITY;
      l_i[mt][hh] = 0.0f;
    }
  }

  for (int kt = r.lo; kt < r.hi; ++kt) {
    const int it = kt - r.lo;
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies) ...
    sync_block();                 // ... and everyone's; the buffer of tile kt - 1 is free again
    if (kt + STAGES - 1 < r.hi) load_kv(kt + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    const auto sKt = sK + (it % STAGES) * (BN * LD);
    const auto sVt = sV + (it % STAGES) * (BN * LD);

    // S = Q K^T for this warp's rows
    float s[MT][NT][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      #pragma unroll
      for (int ni = 0; ni < NT; ++ni)
        #pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][ni][i] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MT][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldm_a<LD>(qa[mt], sQ, row_w + mt * 16, kk * 16);
      #pragma unroll
      for (int nj = 0; nj < BN / 16; ++nj) {
        uint32_t b0[2], b1[2];
        ldm_b<LD>(b0, b1, sKt, nj * 16, kk * 16);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(s[mt][2 * nj], qa[mt], b0);
          mma<T>(s[mt][2 * nj + 1], qa[mt], b1);
        }
      }
    }

    // base-2 scores, masks, online softmax
    const int n0 = kt * BN;
    const bool masked = kt < r.full_lo || kt >= r.full_hi;
    bool real[NT][2];
    #pragma unroll
    for (int ni = 0; ni < NT; ++ni)
      #pragma unroll
      for (int e = 0; e < 2; ++e) real[ni][e] = key_real(p, b, n0 + ni * 8 + 2 * t4 + e);
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      #pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + row_w + mt * 16 + g + 8 * hh;
        float mx = -INFINITY;
        #pragma unroll
        for (int ni = 0; ni < NT; ++ni)
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + ni * 8 + 2 * t4 + e;
            float x = s[mt][ni][2 * hh + e] * scale2;
            if (p.slopes) x -= slope2 * alibi_dist(row, col, p);
            if (!real[ni][e] || (masked && !visible(row, col, p))) x = -INFINITY;
            s[mt][ni][2 * hh + e] = x;
            mx = fmaxf(mx, x);
          }
        mx = quad_max(mx);
        const float m_new = fmaxf(m_i[mt][hh], mx);
        // A row with no visible key yet keeps m = -inf: subtract 0 instead (no -inf - -inf).
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2_approx(m_i[mt][hh] - m_safe);
        const uint32_t keep = dropout ? keep_bits<NT>([&](int ni, int e) {
          return dropout_keep(seed, th.bh, row, n0 + ni * 8 + 2 * t4 + e, p);
        }) : 0xffffffffu;
        float sum = 0.0f;
        #pragma unroll
        for (int ni = 0; ni < NT; ++ni)
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = exp2_approx(s[mt][ni][2 * hh + e] - m_safe);
            sum += pv;  // the normalizer uses the undropped p
            s[mt][ni][2 * hh + e] = (keep >> (2 * ni + e)) & 1u ? pv * drop_scale : 0.0f;
          }
        l_i[mt][hh] = l_i[mt][hh] * alpha + sum;  // this lane's columns; quad-summed at the end
        m_i[mt][hh] = m_new;
        #pragma unroll
        for (int nd = 0; nd < DT; ++nd) {
          o[mt][nd][2 * hh] *= alpha;
          o[mt][nd][2 * hh + 1] *= alpha;
        }
      }
    }

    // O += P V
    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) c_to_a<T>(pa[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
      #pragma unroll
      for (int nj = 0; nj < D / 16; ++nj) {
        uint32_t b0[2], b1[2];
        ldm_b_trans<LD>(b0, b1, sVt, kk * 16, nj * 16);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma<T>(o[mt][2 * nj], pa[mt], b0);
          mma<T>(o[mt][2 * nj + 1], pa[mt], b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  // out = O / l, lse; rows past Sq are not stored
  T* out = static_cast<T*>(p.out) + b * p.so.b + h * p.so.h;
  #pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float l = quad_sum(l_i[mt][hh]);
      const int row = m0 + row_w + mt * 16 + g + 8 * hh;
      if (row >= p.Sq) continue;
      const bool dead = l == 0.0f;  // the max term alone contributes 1 to a live row
      const float inv = dead ? 0.0f : 1.0f / l;
      T* orow = out + int64_t(row) * p.so.row;
      #pragma unroll
      for (int nd = 0; nd < DT; ++nd)
        store_global<uint32_t>(orow + nd * 8 + 2 * t4,
                               pack2<T>(o[mt][nd][2 * hh] * inv, o[mt][nd][2 * hh + 1] * inv));
      if (t4 == 0)
        p.lse[th.bh * p.Sq + row] = dead ? -INFINITY : (m_i[mt][hh] + log2f(l)) * kLn2;
    }
}

constexpr int kMaskThreads = 256;

// keep[e] for every element e = ((b Hq + h) Sq + i) Sk + j of (B, Hq, Sq, Sk): the counter is e.
__global__ void __launch_bounds__(kMaskThreads) dropout_mask_kernel(Params p, uint8_t* mask, int64_t total) {
  const int64_t e = int64_t(blockIdx.x) * kMaskThreads + threadIdx.x;
  if (e >= total) return;
  mask[e] = philox_uniform(uint64_t(*p.seed), uint64_t(e)) >= p.dropout_p ? 1 : 0;
}

template <class T, int D>
void launch_fwd(const Params& p, const DeviceInfo& dev, Stream stream) {
  using S = FwdShape<D>;
  LaunchConfig c;
  c.name = "attn_fwd";
  const int64_t blocks = int64_t((p.Sq + S::BM - 1) / S::BM) * p.B * p.Hq;
  check_grid_x(c.name, blocks);
  c.grid = dim3(unsigned(blocks), 1, 1);
  c.block = dim3(S::THREADS, 1, 1);
  c.smem = S::smem();
  c.smem_opt_in = c.smem > kDefaultSmemPerBlock;
  c.stream = stream;
  launch(attn_fwd_kernel<T, D>, c, dev, p);
}

template <int... Ds>
const int* head_dim_list(int* count, std::integer_sequence<int, Ds...>) {
  static const int list[] = {Ds...};
  *count = int(sizeof...(Ds));
  return list;
}

}  // namespace

bool supported_head_dim(int d) {
  int n = 0;
  const int* list = head_dims(&n);
  for (int i = 0; i < n; ++i)
    if (list[i] == d) return true;
  return false;
}

const int* head_dims(int* count) { return head_dim_list(count, HeadDims{}); }

void forward(DType dtype, const Params& p, const DeviceInfo& dev, Stream stream) {
  if (int64_t(p.B) * p.Hq * p.Sq == 0) return;
  dispatch(dtype, p.head_dim, "attn_fwd", [&](auto t, auto d) {
    launch_fwd<typename decltype(t)::type, decltype(d)::value>(p, dev, stream);
  });
}

void dropout_mask(const Params& p, uint8_t* mask, const DeviceInfo& dev, Stream stream) {
  const int64_t total = int64_t(p.B) * p.Hq * p.Sq * p.Sk;
  if (total == 0) return;
  LaunchConfig c;
  c.name = "attn_dropout_mask";
  const int64_t blocks = (total + kMaskThreads - 1) / kMaskThreads;
  check_grid_x(c.name, blocks);
  c.grid = dim3(unsigned(blocks), 1, 1);
  c.block = dim3(kMaskThreads, 1, 1);
  c.stream = stream;
  launch(dropout_mask_kernel, c, dev, p, mask, total);
}

LaunchShape forward_shape(int d) {
  LaunchShape out;
  dispatch(DType::kF16, d, "attn_fwd", [&](auto, auto dd) {
    using S = FwdShape<decltype(dd)::value>;
    out = LaunchShape{S::THREADS, S::smem()};
  });
  return out;
}

LaunchShape dropout_mask_shape() { return LaunchShape{kMaskThreads, 0}; }

}  // namespace gf::attn
