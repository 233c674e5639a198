// Attention backward (FlashAttention-2 on mma.sync; attention.h for the semantics). P is
// recomputed from the saved lse; with s = scale q.k (+ alibi), dS = P (dP - delta):
//   dV = P_drop^T dO,   dK = scale dS^T Q,   dQ = scale dS K,   dP = dropout(dO V^T).
//
// 1. preprocess: delta = rowsum(dO O) - dlse (fp32); zeroes the dQ accumulator when atomics are used.
// 2. dK/dV: one block per (key tile of BN = 16 warps keys, batch * kv head). K and V stay in
//    shared memory; the query tiles that see the keys stream past (Q and dO through a cp.async
//    ring), for every query head of the GQA group in turn, so dK/dV come out summed over the
//    group with plain stores. Warp w owns 16 keys and computes the transposed products
//    S^T = K Q^T and dP^T = V dO^T, so P^T and dS^T are already the A operands of dV and dK.
//    Default: dQ in the same pass, dS^T through shared memory, added with fp32 atomics into an
//    fp32 accumulator (fastest; the order of the additions is not fixed, so dQ's last bits vary).
// 3. deterministic (dq_accum == null): a dQ kernel, one block per (query tile, batch * head),
//    walks the key tiles like the forward and stores dQ once. No atomics anywhere: bit-for-bit
//    reproducible whatever the block order.
#include <climits>

#include "common/gf.h"
#include "attention/attention.h"
#include "attention/attn_common.cuh"
#include "attention/configs.h"

namespace gf::attn {
namespace {

// ---- 1. preprocess ---------------------------------------------------------------------------

template <int D>
struct PreShape {
  // A row's 16-byte chunks go to TPR threads of one warp (the largest power of two <= 16 that
  // divides them: 8 at d = 64, 4 at d = 96, 16 at d = 128), CPT chunks each.
  static constexpr int CHUNKS = D / 8;
  static constexpr int TPR = CHUNKS % 16 == 0 ? 16 : CHUNKS % 8 == 0 ? 8 : CHUNKS % 4 == 0 ? 4
                             : CHUNKS % 2 == 0 ? 2 : 1;
  static constexpr int THREADS = kPreprocessThreads, CPT = CHUNKS / TPR, RPB = THREADS / TPR;
  static_assert(32 % TPR == 0 && CPT * TPR == CHUNKS, "a row's threads share a warp");
};

template <class T, int D>
__global__ void __launch_bounds__(kPreprocessThreads) attn_bwd_preprocess_kernel(Params p) {
  using S = PreShape<D>;
  const int n_rt = (p.Sq + S::RPB - 1) / S::RPB;
  const TileHead th = tile_and_head(n_rt, false);
  const int b = int(th.bh / p.Hq), h = int(th.bh % p.Hq);
  const int tid = int(threadIdx.x), chunk = tid % S::TPR;
  const int64_t row = int64_t(th.tile) * S::RPB + tid / S::TPR;
  const bool in = row < p.Sq;
  float sum = 0.0f;
  if (in) {
    const T* o = static_cast<const T*>(p.out) + b * p.so.b + h * p.so.h + row * p.so.row + chunk * 8;
    const T* d = static_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h + row * p.sdo.row + chunk * 8;
    #pragma unroll
    for (int c = 0; c < S::CPT; ++c) {
      #pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float<T>(o[c * S::TPR * 8 + e]) * to_float<T>(d[c * S::TPR * 8 + e]);
    }
  }
  #pragma unroll
  for (int m = 1; m < S::TPR; m <<= 1) sum += shfl_xor(sum, m);
  if (!in) return;
  const int64_t at = th.bh * p.Sq + row;
  if (chunk == 0) p.delta[at] = sum - (p.dlse ? p.dlse[at] : 0.0f);
  if (p.dq_accum) {
    float* acc = p.dq_accum + at * D + chunk * 8;
    #pragma unroll
    for (int c = 0; c < S::CPT; ++c) {
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[c * S::TPR * 8 + e] = 0.0f;
    }
  }
}

// ---- 2. dK / dV (and atomic dQ) ----------------------------------------------------------------

template <int D>
struct KvShape {
  static constexpr BwdKvTile t = Config<D>::bwd_kv;
  static constexpr int WARPS = t.warps, BN = 16 * WARPS, BM = t.block_m, STAGES = t.stages;
  static constexpr int THREADS = 32 * WARPS, LD = D + 8, LDS = BM + 8;
  // The atomic dQ product (BM x D) split over the warps: MQ strips of 16 queries, each shared by
  // WARPS / MQ warps that take DQN n8 column tiles apiece.
  static constexpr int MQ = BM / 16, DQN = D / 8 / (WARPS / MQ);
  static_assert(BM % 16 == 0 && STAGES >= 2, "tile shape");
  static_assert(WARPS % MQ == 0 && DQN % 2 == 0 && DQN * 8 * (WARPS / MQ) == D, "dQ warp split");
  // K, V (BN rows), STAGES x Q, STAGES x dO (BM rows), dS^T (BN x BM, pitch LDS)
  static constexpr size_t smem() {
    return (size_t(2 * BN + 2 * STAGES * BM) * LD + size_t(BN) * LDS) * 2;
  }
};

template <class T, int D>
__global__ void __launch_bounds__(KvShape<D>::THREADS) attn_bwd_kv_kernel(Params p) {
  using S = KvShape<D>;
  constexpr int BN = S::BN, BM = S::BM, LD = S::LD, LDS = S::LDS, STAGES = S::STAGES;
  constexpr int THREADS = S::THREADS, MT = BM / 8, DT = D / 8;
  const int n_kt = (p.Sk + BN - 1) / BN;
  const TileHead th = tile_and_head(n_kt, false);  // low key tiles see the most queries: first
  const int b = int(th.bh / p.Hkv), hk = int(th.bh % p.Hkv), group = p.Hq / p.Hkv;
  const int n0 = th.tile * BN;
  const T* K = static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h;
  const T* V = static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h;
  const int lane = lane_id(), warp = warp_id(), g = lane >> 2, t4 = lane & 3;
  const int64_t kv_row0 = (int64_t(b) * p.Hkv + hk) * p.Sk;  // dK / dV rows (contiguous)

  const TileRange r = query_tiles(n0, BN, BM, p);
  const int nt = r.hi - r.lo, n_steps = group * nt;
  float dk[DT][4], dv[DT][4];
  #pragma unroll
  for (int nd = 0; nd < DT; ++nd)
    #pragma unroll
    for (int i = 0; i < 4; ++i) dk[nd][i] = dv[nd][i] = 0.0f;

  if (n_steps > 0) {
    SmemArena arena = smem_arena();
    const auto sK = arena.take<T>(size_t(BN) * LD);
    const auto sV = arena.take<T>(size_t(BN) * LD);
    const auto sQ = arena.take<T>(size_t(STAGES) * BM * LD);
    const auto sdO = arena.take<T>(size_t(STAGES) * BM * LD);
    const auto sdS = arena.take<T>(size_t(BN) * LDS);
    const auto sdS32 = smem_cast<uint32_t>(sdS);

    // Step i: query head hk * group + i / nt, query tile r.lo + i % nt.
    auto head_of = [&](int step) { return hk * group + step / nt; };
    auto load_q = [&](int step, int stage) {
      const int h = head_of(step), m0 = (r.lo + step % nt) * BM;
      const T* Q = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
      const T* dO = static_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h;
      load_tile<T, D, BM, THREADS>(sQ + stage * (BM * LD), Q, p.sq.row, m0, p.Sq, rows_aligned16(Q, p.sq.row));
      load_tile<T, D, BM, THREADS>(sdO + stage * (BM * LD), dO, p.sdo.row, m0, p.Sq,
                                   rows_aligned16(dO, p.sdo.row));
    };
    load_tile<T, D, BN, THREADS>(sK, K, p.sk.row, n0, p.Sk, rows_aligned16(K, p.sk.row));
    load_tile<T, D, BN, THREADS>(sV, V, p.sv.row, n0, p.Sk, rows_aligned16(V, p.sv.row));
    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_steps) load_q(s, s);
      cp_async_commit();
    }

    const float scale2 = p.scale * kLog2e;
    const bool dropout = p.dropout_p > 0.0f;
    const uint64_t seed = dropout ? uint64_t(*p.seed) : 0;
    const float drop_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    // This lane's two keys (C rows g and g + 8 of the warp's strip) and whether they are real.
    int key[2];
    bool real[2];
    #pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      key[hh] = n0 + warp * 16 + g + 8 * hh;
      real[hh] = key_real(p, b, key[hh]);
    }

    for (int step = 0; step < n_steps; ++step) {
      cp_async_wait<STAGES - 2>();
      sync_block();  // Q/dO of this step landed; the previous step's buffers and dS^T are free
      if (step + STAGES - 1 < n_steps) load_q(step + STAGES - 1, (step + STAGES - 1) % STAGES);
      cp_async_commit();
      const int h = head_of(step), qt = r.lo + step % nt, m0 = qt * BM;
      const int64_t bh = int64_t(b) * p.Hq + h;
      const bool masked = qt < r.full_lo || qt >= r.full_hi;
      const float slope2 = p.slopes ? p.slopes[h] * kLog2e : 0.0f;
      const auto sQt = sQ + (step % STAGES) * (BM * LD);
      const auto sdOt = sdO + (step % STAGES) * (BM * LD);

      // S^T = K Q^T, dP^T = V dO^T: rows = this warp's keys, columns = the tile's queries
      float st[MT][4], dpt[MT][4];
      #pragma unroll
      for (int ni = 0; ni < MT; ++ni)
        #pragma unroll
        for (int i = 0; i < 4; ++i) st[ni][i] = dpt[ni][i] = 0.0f;
      #pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4], va[4];
        ldm_a<LD>(ka, sK, warp * 16, kk * 16);
        ldm_a<LD>(va, sV, warp * 16, kk * 16);
        #pragma unroll
        for (int nj = 0; nj < BM / 16; ++nj) {
          uint32_t b0[2], b1[2];
          ldm_b<LD>(b0, b1, sQt, nj * 16, kk * 16);
          mma<T>(st[2 * nj], ka, b0);
          mma<T>(st[2 * nj + 1], ka, b1);
          ldm_b<LD>(b0, b1, sdOt, nj * 16, kk * 16);
          mma<T>(dpt[2 * nj], va, b0);
          mma<T>(dpt[2 * nj + 1], va, b1);
        }
      }

      // P^T (recomputed from lse), dropout, dS^T = P^T (dP^T - delta)
      uint32_t keep[2] = {0xffffffffu, 0xffffffffu};  // per key row: bit 2 ni + e, query column
      if (dropout)
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          keep[hh] = keep_bits<MT>([&](int ni, int e) {
            return dropout_keep(seed, bh, m0 + ni * 8 + 2 * t4 + e, key[hh], p);
          });
      #pragma unroll
      for (int ni = 0; ni < MT; ++ni)
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int qi = m0 + ni * 8 + 2 * t4 + e;
          const bool q_in = qi < p.Sq;
          const float lse = q_in ? p.lse[bh * p.Sq + qi] : 0.0f;
          // A row that saw no key has lse = -inf: +inf makes its p exactly 0.
          const float lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
          const float delta = q_in ? p.delta[bh * p.Sq + qi] : 0.0f;
          #pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = 2 * hh + e;
            float x = st[ni][i] * scale2;
            if (p.slopes) x -= slope2 * alibi_dist(qi, key[hh], p);
            // Invisible entries may overflow (their score never entered lse): select, never
            // multiply by a 0/1 mask (inf * 0 = NaN).
            const bool vis = real[hh] && (!masked || (q_in && visible(qi, key[hh], p)));
            const float pt = vis ? exp2_approx(x - lse2) : 0.0f;
            const bool kept = (keep[hh] >> (2 * ni + e)) & 1u;
            const float pd = kept ? pt * drop_scale : 0.0f;
            const float dp = kept ? dpt[ni][i] * drop_scale : 0.0f;
            st[ni][i] = pd;
            dpt[ni][i] = pt * (dp - delta);
          }
        }

      // dV += P_drop^T dO, dK += dS^T Q (dO and Q as [k = query][n = d]: transposed loads)
      #pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        uint32_t pa[4], sa[4];
        c_to_a<T>(pa, st[2 * kk], st[2 * kk + 1]);
        c_to_a<T>(sa, dpt[2 * kk], dpt[2 * kk + 1]);
        #pragma unroll
        for (int nj = 0; nj < D / 16; ++nj) {
          uint32_t b0[2], b1[2];
          ldm_b_trans<LD>(b0, b1, sdOt, kk * 16, nj * 16);
          mma<T>(dv[2 * nj], pa, b0);
          mma<T>(dv[2 * nj + 1], pa, b1);
          ldm_b_trans<LD>(b0, b1, sQt, kk * 16, nj * 16);
          mma<T>(dk[2 * nj], sa, b0);
          mma<T>(dk[2 * nj + 1], sa, b1);
        }
      }

      if (p.dq_accum) {  // dQ (BM x D) += scale dS K with fp32 atomics
        #pragma unroll
        for (int ni = 0; ni < MT; ++ni)
          #pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            sdS32[((warp * 16 + g + 8 * hh) * LDS + ni * 8 + 2 * t4) / 2] =
                pack2<T>(dpt[ni][2 * hh], dpt[ni][2 * hh + 1]);
        sync_block();
        const int mq = warp % S::MQ, c0 = (warp / S::MQ) * S::DQN * 8;
        float dq[S::DQN][4];
        #pragma unroll
        for (int nd = 0; nd < S::DQN; ++nd)
          #pragma unroll
          for (int i = 0; i < 4; ++i) dq[nd][i] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          ldm_a_trans<LDS>(a, sdS, kk * 16, mq * 16);  // dS = (dS^T)^T: [k = key][m = query]
          #pragma unroll
          for (int nj = 0; nj < S::DQN / 2; ++nj) {
            uint32_t b0[2], b1[2];
            ldm_b_trans<LD>(b0, b1, sK, kk * 16, c0 + nj * 16);
            mma<T>(dq[2 * nj], a, b0);
            mma<T>(dq[2 * nj + 1], a, b1);
          }
        }
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int qi = m0 + mq * 16 + g + 8 * hh;
          if (qi >= p.Sq) continue;
          float* acc = p.dq_accum + (bh * p.Sq + qi) * D + c0 + 2 * t4;
          #pragma unroll
          for (int nd = 0; nd < S::DQN; ++nd) {
            atomic_add(acc + nd * 8, dq[nd][2 * hh] * p.scale);
            atomic_add(acc + nd * 8 + 1, dq[nd][2 * hh + 1] * p.scale);
          }
        }
      }
    }
    cp_async_wait<0>();
  }

  // dK = scale sum dS^T Q, dV: rows past Sk are not stored (a key tile no query sees: zeros)
  T* dK = static_cast<T*>(p.dk);
  T* dV = static_cast<T*>(p.dv);
  #pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = n0 + warp * 16 + g + 8 * hh;
    if (j >= p.Sk) continue;
    const int64_t at = (kv_row0 + j) * D + 2 * t4;
    #pragma unroll
    for (int nd = 0; nd < DT; ++nd) {
      store_global<uint32_t>(dK + at + nd * 8, pack2<T>(dk[nd][2 * hh] * p.scale, dk[nd][2 * hh + 1] * p.scale));
      store_global<uint32_t>(dV + at + nd * 8, pack2<T>(dv[nd][2 * hh], dv[nd][2 * hh + 1]));
    }
  }
}

// ---- 3. deterministic dQ -----------------------------------------------------------------------

template <int D>
struct QShape {
  static constexpr BwdQTile t = Config<D>::bwd_q;
  static constexpr int WARPS = t.warps, BM = 16 * WARPS, BN = t.block_n, STAGES = t.stages;
  static constexpr int THREADS = 32 * WARPS, LD = D + 8;
  static_assert(BN % 16 == 0 && STAGES >= 2, "tile shape");
  // Q, dO (BM rows), STAGES x K, STAGES x V (BN rows)
  static constexpr size_t smem() { return size_t(2 * BM + 2 * STAGES * BN) * LD * 2; }
};

template <class T, int D>
__global__ void __launch_bounds__(QShape<D>::THREADS) attn_bwd_q_kernel(Params p) {
  using S = QShape<D>;
  constexpr int BM = S::BM, BN = S::BN, LD = S::LD, STAGES = S::STAGES, THREADS = S::THREADS;
  constexpr int NT = BN / 8, DT = D / 8;
  const int n_qt = (p.Sq + BM - 1) / BM;
  const TileHead th = tile_and_head(n_qt, p.causal);
  const int b = int(th.bh / p.Hq), h = int(th.bh % p.Hq), hk = h / (p.Hq / p.Hkv);
  const int m0 = th.tile * BM;
  const T* Q = static_cast<const T*>(p.q) + b * p.sq.b + h * p.sq.h;
  const T* dO = static_cast<const T*>(p.dout) + b * p.sdo.b + h * p.sdo.h;
  const T* K = static_cast<const T*>(p.k) + b * p.sk.b + hk * p.sk.h;
  const T* V = static_cast<const T*>(p.v) + b * p.sv.b + hk * p.sv.h;
  const bool vk = rows_aligned16(K, p.sk.row), vv = rows_aligned16(V, p.sv.row);
  const int lane = lane_id(), warp = warp_id(), g = lane >> 2, t4 = lane & 3;

  SmemArena arena = smem_arena();
  const auto sQ = arena.take<T>(size_t(BM) * LD);
  const auto sdO = arena.take<T>(size_t(BM) * LD);
  const auto sK = arena.take<T>(size_t(STAGES) * BN * LD);
  const auto sV = arena.take<T>(size_t(STAGES) * BN * LD);

  const TileRange r = key_tiles(m0, BM, BN, p);
  auto load_kv = [&](int kt, int stage) {
    load_tile<T, D, BN, THREADS>(sK + stage * (BN * LD), K, p.sk.row, kt * BN, p.Sk, vk);
    load_tile<T, D, BN, THREADS>(sV + stage * (BN * LD), V, p.sv.row, kt * BN, p.Sk, vv);
  };
  if (r.lo < r.hi) {
    load_tile<T, D, BM, THREADS>(sQ, Q, p.sq.row, m0, p.Sq, rows_aligned16(Q, p.sq.row));
    load_tile<T, D, BM, THREADS>(sdO, dO, p.sdo.row, m0, p.Sq, rows_aligned16(dO, p.sdo.row));
  }
  #pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (r.lo + s < r.hi) load_kv(r.lo + s, s);
    cp_async_commit();
  }

  const float scale2 = p.scale * kLog2e;
  const float slope2 = p.slopes ? p.slopes[h] * kLog2e : 0.0f;
  const bool dropout = p.dropout_p > 0.0f;
  const uint64_t seed = dropout ? uint64_t(*p.seed) : 0;
  const float drop_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  int row[2];
  float lse2[2], delta[2];
  #pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    row[hh] = m0 + warp * 16 + g + 8 * hh;
    const bool in = row[hh] < p.Sq;
    const float lse = in ? p.lse[th.bh * p.Sq + row[hh]] : -INFINITY;
    lse2[hh] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // a dead row: p = 0
    delta[hh] = in ? p.delta[th.bh * p.Sq + row[hh]] : 0.0f;
  }
  float dq[DT][4];
  #pragma unroll
  for (int nd = 0; nd < DT; ++nd)
    #pragma unroll
    for (int i = 0; i < 4; ++i) dq[nd][i] = 0.0f;

  for (int kt = r.lo; kt < r.hi; ++kt) {
    const int it = kt - r.lo;
    cp_async_wait<STAGES - 2>();
    sync_block();
    if (kt + STAGES - 1 < r.hi) load_kv(kt + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    const auto sKt = sK + (it % STAGES) * (BN * LD);
    const auto sVt = sV + (it % STAGES) * (BN * LD);

    // S = Q K^T, dP = dO V^T
    float s[NT][4], dp[NT][4];
    #pragma unroll
    for (int ni = 0; ni < NT; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) s[ni][i] = dp[ni][i] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], da[4];
      ldm_a<LD>(qa, sQ, warp * 16, kk * 16);
      ldm_a<LD>(da, sdO, warp * 16, kk * 16);
      #pragma unroll
      for (int nj = 0; nj < BN / 16; ++nj) {
        uint32_t b0[2], b1[2];
        ldm_b<LD>(b0, b1, sKt, nj * 16, kk * 16);
        mma<T>(s[2 * nj], qa, b0);
        mma<T>(s[2 * nj + 1], qa, b1);
        ldm_b<LD>(b0, b1, sVt, nj * 16, kk * 16);
        mma<T>(dp[2 * nj], da, b0);
        mma<T>(dp[2 * nj + 1], da, b1);
      }
    }

    // dS = P (dP - delta)
    const int n0 = kt * BN;
    const bool masked = kt < r.full_lo || kt >= r.full_hi;
    uint32_t keep[2] = {0xffffffffu, 0xffffffffu};
    if (dropout)
      #pragma unroll
      for (int hh = 0; hh < 2; ++hh)
        keep[hh] = keep_bits<NT>([&](int ni, int e) {
          return dropout_keep(seed, th.bh, row[hh], n0 + ni * 8 + 2 * t4 + e, p);
        });
    #pragma unroll
    for (int ni = 0; ni < NT; ++ni)
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n0 + ni * 8 + 2 * t4 + e;
        const bool real = key_real(p, b, col);
        #pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = 2 * hh + e;
          float x = s[ni][i] * scale2;
          if (p.slopes) x -= slope2 * alibi_dist(row[hh], col, p);
          const bool vis = real && (!masked || (row[hh] < p.Sq && visible(row[hh], col, p)));
          const float pv = vis ? exp2_approx(x - lse2[hh]) : 0.0f;
          const float d = (keep[hh] >> (2 * ni + e)) & 1u ? dp[ni][i] * drop_scale : 0.0f;
          s[ni][i] = pv * (d - delta[hh]);
        }
      }

    // dQ += dS K (K as [k = key][n = d]: transposed loads)
    #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      c_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
      #pragma unroll
      for (int nj = 0; nj < D / 16; ++nj) {
        uint32_t b0[2], b1[2];
        ldm_b_trans<LD>(b0, b1, sKt, kk * 16, nj * 16);
        mma<T>(dq[2 * nj], a, b0);
        mma<T>(dq[2 * nj + 1], a, b1);
      }
    }
  }
  cp_async_wait<0>();

  T* dQ = static_cast<T*>(p.dq);
  #pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    if (row[hh] >= p.Sq) continue;
    const int64_t at = (th.bh * p.Sq + row[hh]) * D + 2 * t4;
    #pragma unroll
    for (int nd = 0; nd < DT; ++nd)
      store_global<uint32_t>(dQ + at + nd * 8, pack2<T>(dq[nd][2 * hh] * p.scale, dq[nd][2 * hh + 1] * p.scale));
  }
}

// ---- launchers -----------------------------------------------------------------------------------

LaunchConfig config(const char* name, int64_t blocks, int threads, size_t smem, Stream stream) {
  LaunchConfig c;
  c.name = name;
  check_grid_x(name, blocks);
  c.grid = dim3(unsigned(blocks), 1, 1);
  c.block = dim3(unsigned(threads), 1, 1);
  c.smem = smem;
  c.smem_opt_in = smem > kDefaultSmemPerBlock;
  c.stream = stream;
  return c;
}

template <class T, int D>
void launch_bwd(const Params& p, const DeviceInfo& dev, Stream stream) {
  const int64_t bhq = int64_t(p.B) * p.Hq, bhk = int64_t(p.B) * p.Hkv;
  using Pre = PreShape<D>;
  launch(attn_bwd_preprocess_kernel<T, D>,
         config("attn_bwd_preprocess", (p.Sq + Pre::RPB - 1) / Pre::RPB * bhq, Pre::THREADS, 0, stream),
         dev, p);
  using Kv = KvShape<D>;
  launch(attn_bwd_kv_kernel<T, D>,
         config("attn_bwd_kv", (p.Sk + Kv::BN - 1) / Kv::BN * bhk, Kv::THREADS, Kv::smem(), stream),
         dev, p);
  if (p.dq_accum == nullptr) {
    using Q = QShape<D>;
    launch(attn_bwd_q_kernel<T, D>,
           config("attn_bwd_q", (p.Sq + Q::BM - 1) / Q::BM * bhq, Q::THREADS, Q::smem(), stream),
           dev, p);
  }
}

}  // namespace

void backward(DType dtype, const Params& p, const DeviceInfo& dev, Stream stream) {
  if (int64_t(p.B) * p.Hq * p.Sq == 0 || p.Sk == 0) return;
  dispatch(dtype, p.head_dim, "attn_bwd", [&](auto t, auto d) {
    launch_bwd<typename decltype(t)::type, decltype(d)::value>(p, dev, stream);
  });
}

LaunchShape bwd_preprocess_shape(int d) {
  LaunchShape out;
  dispatch(DType::kF16, d, "attn_bwd", [&](auto, auto dd) { out = LaunchShape{PreShape<decltype(dd)::value>::THREADS, 0}; });
  return out;
}
LaunchShape bwd_kv_shape(int d) {
  LaunchShape out;
  dispatch(DType::kF16, d, "attn_bwd", [&](auto, auto dd) {
    using S = KvShape<decltype(dd)::value>;
    out = LaunchShape{S::THREADS, S::smem()};
  });
  return out;
}
LaunchShape bwd_q_shape(int d) {
  LaunchShape out;
  dispatch(DType::kF16, d, "attn_bwd", [&](auto, auto dd) {
    using S = QShape<decltype(dd)::value>;
    out = LaunchShape{S::THREADS, S::smem()};
  });
  return out;
}

}  // namespace gf::attn
