// Device helpers shared by the attention kernels (fwd.cu, bwd.cu): tile loads into shared
// memory, mma fragment loads and conversions, the key/query tile ranges a tile must visit, the
// visibility rule and the dropout draw. Included by kernel sources only (after common/gf.h).
//
// Fragment conventions (PTX ISA 9.7.14.5.8, mma.m16n8k16 .row.col; g = lane / 4, t = lane % 4):
//   A 16 x 16: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, ...), a[2] = (row g, cols 2t+8,
//              2t+9), a[3] = (row g+8, cols 2t+8, 2t+9), two 16-bit values per register;
//   B 16 x 8:  b[0] = (rows 2t, 2t+1, col g), b[1] = (rows 2t+8, 2t+9, col g);
//   C 16 x 8:  c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1).
// Shared-memory tiles are row-major with a pitch of LD = d + 8 (or block + 8) elements.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention.h"
#include "attention/configs.h"

namespace gf::attn {

// ---- global -> shared tiles ----------------------------------------------------------------

// Whether every row of a (batch, head) slice starting at `base` with row stride `stride` (in
// elements of 2 bytes) starts on a 16-byte boundary: then rows move with 16-byte cp.async.
GF_DEVICE bool rows_aligned16(const void* base, int64_t stride) {
  return (reinterpret_cast<uintptr_t>(base) & 15) == 0 && (stride * 2) % 16 == 0;
}

// Stages rows [row0, row0 + ROWS) x [0, D) of a slice (row r at base + r * stride) into `dst`
// (pitch D + 8); rows at or past n_rows become zeros. Aligned rows: 16-byte cp.async (src-size 0
// zero-fills), to be completed by the caller's commit / wait; otherwise plain loads and stores.
template <class T, int D, int ROWS, int THREADS, class P>
GF_DEVICE void load_tile(P dst, const T* base, int64_t stride, int row0, int n_rows, bool vec) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int LD = D + 8;
  for (int c = int(threadIdx.x); c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t row = int64_t(row0) + r;
    const bool in = row < n_rows;
    P s = dst + (r * LD + col);
    if (vec) {
      cp_async<16>(s, in ? base + row * stride + col : base, in ? 16 : 0);
    } else {
      #pragma unroll
      for (int e = 0; e < 8; ++e) s[e] = in ? base[row * stride + col + e] : from_float<T>(0.0f);
    }
  }
}

// ---- mma fragments from shared memory (ldmatrix) -----------------------------------------------

// A 16 x 16 at (row0, k0) of a row-major [m][k] tile: lane l addresses row l % 16, column
// k0 + 8 (l / 16) (matrices: rows 0-7 / 8-15 x columns 0-7 / 8-15 -> a[0..3]).
template <int LD, class P>
GF_DEVICE void ldm_a(uint32_t (&a)[4], P tile, int row0, int k0) {
  const int lane = lane_id();
  ldmatrix_x4(a, tile + ((row0 + lane % 16) * LD + k0 + (lane / 16) * 8));
}

// A 16 x 16 (m0.., k0..) of a tile stored transposed, [k][m]: .trans; lane l addresses k row
// k0 + 8 (l / 16) + l % 8 at column m0 + 8 ((l / 8) % 2).
template <int LD, class P>
GF_DEVICE void ldm_a_trans(uint32_t (&a)[4], P tile, int k0, int m0) {
  const int lane = lane_id(), j = lane / 8;
  ldmatrix_x4_trans(a, tile + ((k0 + (j / 2) * 8 + lane % 8) * LD + m0 + (j % 2) * 8));
}

// B fragments of two adjacent n8 tiles (n0.., n0 + 8..) x k16 (k0..) of a tile stored [n][k]
// (the operand's columns are the tile's rows: K for Q K^T): lane l addresses n row
// n0 + 8 (l / 16) + l % 8 at column k0 + 8 ((l / 8) % 2).
template <int LD, class P>
GF_DEVICE void ldm_b(uint32_t (&b0)[2], uint32_t (&b1)[2], P tile, int n0, int k0) {
  const int lane = lane_id();
  uint32_t r[4];
  ldmatrix_x4(r, tile + ((n0 + lane % 8 + (lane / 16) * 8) * LD + k0 + ((lane / 8) % 2) * 8));
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// The same for a tile stored [k][n] (V for P V): .trans; lane l addresses k row
// k0 + 8 ((l / 8) % 2) + l % 8 at column n0 + 8 (l / 16).
template <int LD, class P>
GF_DEVICE void ldm_b_trans(uint32_t (&b0)[2], uint32_t (&b1)[2], P tile, int k0, int n0) {
  const int lane = lane_id();
  uint32_t r[4];
  ldmatrix_x4_trans(r, tile + ((k0 + lane % 8 + ((lane / 8) % 2) * 8) * LD + n0 + (lane / 16) * 8));
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// Two C tiles of adjacent n8 columns (c0: k 0-7, c1: k 8-15 of the next product), rounded to T,
// as the A fragment of that product (FlashAttention-2's register reuse of P): the C and A layouts
// put the same (row, column) pairs in the same lanes.
template <class T>
GF_DEVICE void c_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

template <class T>
GF_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16<T>(d, a, b, d);
}

// ---- which tiles a tile must visit ---------------------------------------------------------------

// Tiles [lo, hi) must be visited; those in [full_lo, full_hi) need no masking (every row of the
// owned tile sees every column of the visited tile, all inside the sequences). Everything is
// clamped at 0 before dividing. Mirrors kernels/attention.py (_key_tiles_of_query_tile and the
// dK/dV kernel's query range).
struct TileRange {
  int lo = 0, full_lo = 0, full_hi = 0, hi = 0;
};

GF_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
GF_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
GF_DEVICE int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key tiles (of bn keys) of the query tile [m0, m0 + bm).
GF_DEVICE TileRange key_tiles(int m0, int bm, int bn, const Params& p) {
  const int64_t offset = int64_t(p.Sk) - p.Sq;
  int64_t hi = p.Sk, full_end = p.Sk;
  if (p.causal) {
    hi = min64(p.Sk, max64(m0 + bm + offset, 0));           // the last row's last key + 1
    full_end = min64(p.Sk, max64(m0 + offset + 1, 0));      // the first row's last key + 1
  }
  TileRange r;
  r.hi = int(cdiv64(hi, bn));
  if (p.window > 0) {
    const int64_t lo = max64(m0 + offset - p.window + 1, 0);            // the first row's first key
    r.lo = int(min64(lo / bn, r.hi));
    const int64_t first_full = max64(m0 + bm + offset - p.window, 0);   // the last row's
    r.full_lo = int(min64(max64(cdiv64(first_full, bn), r.lo), r.hi));
  }
  r.full_hi = int(min64(max64(full_end / bn, r.full_lo), r.hi));
  return r;
}

// Query tiles (of bm queries) that see any key of the key tile [n0, n0 + bn).
GF_DEVICE TileRange query_tiles(int n0, int bn, int bm, const Params& p) {
  const int64_t offset = int64_t(p.Sk) - p.Sq;
  int64_t q_lo = 0, q_hi = p.Sq, first_full = 0, full_end = p.Sq;
  if (p.causal) {
    q_lo = min64(max64(n0 - offset, 0), p.Sq);              // the first query that sees key n0
    first_full = max64(n0 + bn - 1 - offset, 0);            // the first that sees the tile's last
  }
  if (p.window > 0) {
    q_hi = min64(p.Sq, max64(n0 + bn - 1 - offset + p.window, 0));
    full_end = min64(p.Sq, max64(n0 - offset + p.window, 0));
  }
  TileRange r;
  r.hi = int(cdiv64(q_hi, bm));
  r.lo = int(min64(q_lo / bm, r.hi));
  r.full_lo = int(min64(max64(cdiv64(first_full, bm), r.lo), r.hi));
  r.full_hi = int(min64(max64(full_end / bm, r.full_lo), r.hi));
  if (int64_t(n0) + bn > p.Sk) r.full_hi = r.full_lo;      // a key tile crossing Sk: mask all
  return r;
}

// Positions are 32-bit: the binding bounds Sq and Sk by 2^29 and the window by Sq + Sk + 1, so
// i + Sk - Sq - W cannot overflow.

// Query i sees key j (without the padding mask), i < Sq.
GF_DEVICE bool visible(int i, int j, const Params& p) {
  const int diag = i + (p.Sk - p.Sq);
  return j < p.Sk && (!p.causal || j <= diag) && (p.window == 0 || j > diag - p.window);
}

// The key padding mask of key j of batch row b (true: a real key); keys past Sk are not.
GF_DEVICE bool key_real(const Params& p, int b, int j) {
  if (j >= p.Sk) return false;
  return p.kpm == nullptr || p.kpm[b * p.kpm_b + int64_t(j) * p.kpm_n] != 0;
}

// ALiBi distance |i + Sk - Sq - j| as a float.
GF_DEVICE float alibi_dist(int i, int j, const Params& p) {
  const int d = i + (p.Sk - p.Sq) - j;
  return float(d < 0 ? -d : d);
}

// Whether dropout keeps element (bh = b Hq + h, i, j): tl.rand(seed, ((bh Sq + i) Sk + j)) >= p,
// the Triton kernels' draw (64-bit counter).
GF_DEVICE bool dropout_keep(uint64_t seed, int64_t bh, int i, int j, const Params& p) {
  const int64_t counter = (bh * p.Sq + i) * p.Sk + j;
  return philox_uniform(seed, uint64_t(counter)) >= p.dropout_p;
}

// Dropout decisions for the 2 N columns a lane holds in a row of C tiles: bit 2 ni + e is
// keep(column 8 ni + 2 t + e of the tile), asked of `keep(ni, e)`. Drawn in a rolled loop (one
// Philox per element, 10 rounds each), so the unrolled softmax code around it holds one word of
// bits instead of every draw's state (which would spill).
template <int N, class F>
GF_DEVICE uint32_t keep_bits(F&& keep) {
  static_assert(2 * N <= 32, "one bit per column in a 32-bit word");
  uint32_t bits = 0;
  #pragma unroll 1
  for (int c = 0; c < 2 * N; ++c) bits |= uint32_t(keep(c >> 1, c & 1)) << c;
  return bits;
}

// (tile, batch * head) of this block in a grid of n_tiles * heads blocks on axis 0, the tile
// index fastest (blocks sharing a head's K/V run together); `reverse`: heaviest tiles first.
struct TileHead {
  int tile;
  int64_t bh;
};
GF_DEVICE TileHead tile_and_head(int n_tiles, bool reverse) {
  const int64_t pid = blockIdx.x;
  TileHead th;
  th.tile = int(pid % n_tiles);
  th.bh = pid / n_tiles;
  if (reverse) th.tile = n_tiles - 1 - th.tile;
  return th;
}

// ---- host: the instantiation for a run-time dtype and head dim ------------------------------------

template <class T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}, std::integral_constant<int, D>{}) for the kernels' element type and head
// dim; throws std::invalid_argument naming `what` for any other.
template <class F, int... Ds>
void dispatch_impl(DType dtype, int d, const char* what, F&& f, std::integer_sequence<int, Ds...>) {
  auto with_type = [&](auto tag) {
    const bool found = ((d == Ds ? (f(tag, std::integral_constant<int, Ds>{}), true) : false) || ...);
    if (!found)
      throw std::invalid_argument(std::string(what) + ": no kernel for head dim " + std::to_string(d));
  };
  if (dtype == DType::kF16) with_type(TypeTag<half>{});
  else if (dtype == DType::kBF16) with_type(TypeTag<bf16>{});
  else throw std::invalid_argument(std::string(what) + ": fp16 or bf16 only (mma.sync has no fp32 form)");
}

template <class F>
void dispatch(DType dtype, int d, const char* what, F&& f) {
  dispatch_impl(dtype, d, what, std::forward<F>(f), HeadDims{});
}

inline void check_grid_x(const char* name, int64_t blocks) {
  if (blocks > 0x7fffffffLL)
    throw std::invalid_argument(std::string(name) + ": the problem needs " + std::to_string(blocks) +
                                " blocks, beyond CUDA's grid limit of 2^31 - 1 on axis x");
}

}  // namespace gf::attn
