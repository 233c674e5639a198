"""FlashAttention-2 style attention in Triton, shaped for Hopper: forward, a one-launch
backward, and the dropout keep-mask.

Only kernels and thin launchers live here (no autograd: `gptfast.ops` owns that).

Layout and masks
----------------
q is (B, Hq, Sq, d); k, v are (B, Hkv, Sk, d) with Hq % Hkv == 0 (query head h reads kv head
h // (Hq // Hkv)); d is any multiple of 8 up to 256 (padded inside the tiles to the next power
of two, >= 16). Only the last dim must be contiguous: every other stride is passed to the
kernels, so q/k/v may be transposed slices of one fused QKV buffer. Masks are aligned
bottom-right, offset = Sk - Sq (the last query sees the last key, what a KV cache needs):

    softcap c:         x_ij = c * tanh(scale * q_i.k_j / c)    (else x_ij = scale * q_i.k_j)
    alibi:             score_ij = x_ij - slope_h * |i + offset - j|
    causal:            key j visible to query i  iff  j <= i + offset
    window W (causal):                          and  j >  i + offset - W
    key_padding_mask:                           and  key_padding_mask[b, j]

A row that sees no key has lse = -inf, an output of exactly 0 and zero gradients.

Forward (one program per (BLOCK_M query tile, batch*head))
----------------------------------------------------------
The query tile stays resident while K/V tiles stream past it. Online softmax in fp32: running
max m, running sum l, accumulator acc, rescaled by exp2(m_old - m_new) whenever the max grows.
Scores are in base-2 units (log2(e) folded into the scale, alibi slope and softcap) so the
exponentials are exp2. Without softcap or ALiBi the row max is taken on the raw products
q.k and the scale is folded into the exponent: p = exp2(qk * scale2 - m), one FMA per score
(the scale is applied once per row, to the max; the launcher routes scale <= 0 to the plain
path). The key range of a query tile is split in three:
  [t_lo, full_lo)    masked tiles on the window's lower edge,
  [full_lo, full_hi) tiles every query of the tile fully sees: no mask math at all,
  [full_hi, t_hi)    masked tiles on the causal diagonal and the Sk edge;
tiles outside [t_lo, t_hi) (above the diagonal, below the window) are never loaded.
Padding masks are per key and therefore applied on every tile.

Backward: the preprocess, then one launch
-----------------------------------------
1. preprocess: delta_i = rowsum(dO_i * O_i) - dlse_i (dlse: gradient flowing into lse, since
   d lse_i / d s_ij = p_ij); it also zeroes the fp32 dQ accumulator of the atomic mode.
2. `_attn_bwd`, programs [0, key tiles * B*Hkv): one per (BLOCK_N key tile, batch*kv_head);
   K, V, dK, dV stay resident while the program walks the BLOCK_M query tiles that can see its
   keys, for each query head of the GQA group (dK/dV come out summed over the group: K/V are
   never repeated). It computes S^T = K Q^T and dP^T = V dO^T, so the chained products have the
   BLOCK_N rows of the key tile: with 8 warps on Hopper the two warpgroups take 64 rows each
   and no product is computed twice (BLOCK_N >= 16 * num_warps, `keep`). P is recomputed from
   the saved lse. Default: dQ = dS K (BLOCK_M rows, on wgmma for BLOCK_M >= 64) is added to an
   fp32 buffer with relaxed atomics (plain reductions: no memory barrier; the order of the
   adds is not fixed, so dQ is not bitwise reproducible), then cast.
3. deterministic=True: the same launch has a second set of programs after the first, one per
   (query tile, batch*head), with the tile roles swapped (BLOCK_N queries owned, BLOCK_M keys
   streamed, so their chained products have BLOCK_N rows too), writing dQ with plain stores.
   No atomics: bitwise reproducible; the two halves overlap on the GPU (FlexAttention's
   scheme) instead of running as two launches.

Program order
-------------
Every kernel runs on one grid axis: (tile, batch*head) pairs are folded onto axis 0 (up to
2**31 - 1 programs; CUDA caps axes 1 and 2 at 65,535, which B*H alone passes at B = 4096,
H = 16, see kernels/_grid.py) and `_tile_and_head` decodes them. With a causal mask the work
per tile varies (the last query tile sees all keys, the first one tile): heads are grouped in
sections whose K/V fit in L2, and inside a section the tiles run longest first (forward and
dQ: descending query tiles; dK/dV: ascending key tiles), so the last wave holds the shortest
programs.

Dropout
-------
Applied to the normalized probabilities; kept ones are scaled by 1/(1-p). The keep bit of
element (b, h, i, j) is philox(seed, ((b*Hq + h)*Sq + i)*Sk + j) >= p (64-bit counter), so
the backward, and `attention_dropout_keep_mask`, regenerate exactly the same mask. The seed is
read from an int64 device tensor inside the kernel (no host sync). lse is that of the
undropped probabilities.

Precision
---------
Every tl.dot takes operands in the input dtype and accumulates in fp32; softmax statistics,
lse, delta and the dQ atomics are fp32. For fp16/bf16 the P and dS tiles are rounded to the
input dtype before their dots (as FlashAttention does). For fp32 inputs the dots use
input_precision="ieee" (true fp32 FMA; Triton's default on NVIDIA would be tf32, which
would make fp32 mean ~fp16 accuracy). tanh is computed from exp2 (no libdevice), the same code
on the GPU and under the interpreter.

Configurations
--------------
Block sizes, warps, stages and the USE_TMA / WARP_SPECIALIZE flags are data:
attention_configs.json beside this file, one entry per configuration key (kernels/configs.py:
arch, dtype, padded head dim, feature flags, Sq/Sk power-of-two buckets), so a feature that
needs more registers (dropout, ALiBi, ...) gets its own non-spilling entry. The committed
entries are checked by compiling for sm_90a and sm_80 without a GPU (scripts/static_table.py:
registers, spills, shared memory, wgmma); `benchmarks/tune_attention.py` times the candidates
on a GPU and writes the table. USE_TMA loads the streamed tiles through tensor descriptors
(made in the kernel; the copy engine zero-fills the edges, so no masks), WARP_SPECIALIZE splits
the loop into producer and consumer warps; the launchers fall back to pointer loads when a
tensor breaks TMA's alignment rules. `keep(config)` drops configs that cannot fit or waste
wgmma. With GPTFAST_AUTOTUNE=1 (on a GPU), the kernels are wrapped in triton.autotune over the
kept candidates instead, one tuning per configuration key. Under TRITON_INTERPRET=1 small
blocks are used for speed; the kernel code path is the same (`config_override` runs the TMA
and warp-specialized paths there too).
"""
from __future__ import annotations

import collections
import contextlib
import os
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._grid import checked_grid
from ._interpreter import ensure_bf16
from . import configs

# Launch counter, so a test can prove a model dispatches here.
LAUNCHES: collections.Counter = collections.Counter()

# Tests set this to True: outputs are then filled with NaN before launch, so an element
# the kernel forgot to write fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False


# ============================================================================================
# Triton helpers
# ============================================================================================


@triton.jit
def _dropout_keep(seed, bh, rows, cols, Sq, Sk, dropout_p):
    """Keep bit for elements (rows, cols) of head bh (= b*Hq + h); rows/cols broadcast to 2D.

    The one RNG formula used by the forward, both backward halves and the mask kernel."""
    counter = (bh.to(tl.int64) * Sq + rows.to(tl.int64)) * Sk + cols.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _tanh(u):
    # tanh through exp of a non-positive argument: no overflow for any |u|, and the same code
    # on every backend (no libdevice), so the interpreter runs what the GPU runs.
    e = tl.exp2(-2.8853900817779268 * tl.abs(u))  # exp(-2|u|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _tile_and_head(pid, n_rows, n_heads, section, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
    """(tile, batch*head) of program `pid` among cdiv(n_rows, BLOCK) * n_heads programs folded
    onto grid axis 0 (see `tiles_x_heads_grid`).

    Heads come in sections of `section` heads (the last may be narrower). Inside a section the
    head runs fastest and the tile slowest, so the programs running at once share few K/V
    tensors (a section is sized to fit them in L2); REVERSE walks the tiles from the last:
    with a causal mask the last query tiles see the most keys, so the longest programs start
    first and the last wave holds the shortest ones (longest-processing-time-first). With
    section = 1 this is the plain order, tile fastest."""
    n_tiles = tl.cdiv(n_rows, BLOCK)
    per_section = n_tiles * section
    s = pid // per_section
    local = pid - s * per_section
    width = tl.minimum(section, n_heads - s * section)
    tile = local // width
    bh = s * section + (local - tile * width)
    if REVERSE:
        tile = n_tiles - 1 - tile
    return tile, bh


@triton.jit
def _key_tiles_of_query_tile(start_m, Sq, Sk, window,
                             IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles a query tile [start_m, start_m + BLOCK_M) must visit, split in three ranges
    (t_lo <= full_lo <= full_hi <= t_hi): [t_lo, full_lo) and [full_hi, t_hi) need masks,
    [full_lo, full_hi) are fully visible to every row of the tile (and inside Sk).

    Everything is clamped at 0 before dividing: Triton integer division truncates toward 0."""
    offset = Sk - Sq
    hi = Sk
    full_end = Sk  # keys below full_end (tile-aligned down) are visible to every row
    if IS_CAUSAL:
        # The tile's last row, start_m + BLOCK_M - 1, sees keys up to start_m + BLOCK_M - 1 + offset.
        hi = tl.minimum(Sk, tl.maximum(start_m + BLOCK_M + offset, 0))
        # Its first row sees keys up to start_m + offset.
        full_end = tl.minimum(Sk, tl.maximum(start_m + offset + 1, 0))
    t_hi = (hi + BLOCK_N - 1) // BLOCK_N
    t_lo = t_hi * 0
    full_lo = t_lo
    if HAS_WINDOW:
        # The first row sees keys from start_m + offset - window + 1 on ...
        lo = tl.maximum(start_m + offset - window + 1, 0)
        t_lo = tl.minimum(lo // BLOCK_N, t_hi)
        # ... the last row only from start_m + BLOCK_M - 1 + offset - window + 1 on.
        first_full = tl.maximum(start_m + BLOCK_M + offset - window, 0)
        full_lo = tl.minimum(tl.maximum((first_full + BLOCK_N - 1) // BLOCK_N, t_lo), t_hi)
    full_hi = tl.minimum(tl.maximum(full_end // BLOCK_N, full_lo), t_hi)
    return t_lo, full_lo, full_hi, t_hi


@triton.jit
def _query_tiles_of_key_tile(start_n, Sq, Sk, window,
                             IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles (BLOCK_M rows) that can see any key of the key tile [start_n, start_n +
    BLOCK_N), split like `_key_tiles_of_query_tile`: [full_lo, full_hi) see every key of it."""
    offset = Sk - Sq
    # Causal needs i >= j - offset, the window i < j - offset + window. Clamp at 0 before
    # dividing (truncating division).
    q_lo = 0
    q_hi = Sq
    first_full = 0  # first row that sees every key of the tile (w.r.t. the causal edge)
    full_end = Sq   # rows below this see every key of the tile (w.r.t. the window edge)
    if IS_CAUSAL:
        q_lo = tl.minimum(tl.maximum(start_n - offset, 0), Sq)
        first_full = tl.maximum(start_n + BLOCK_N - 1 - offset, 0)
    if HAS_WINDOW:
        q_hi = tl.minimum(Sq, tl.maximum(start_n + BLOCK_N - 1 - offset + window, 0))
        full_end = tl.minimum(Sq, tl.maximum(start_n - offset + window, 0))
    t_hi = (q_hi + BLOCK_M - 1) // BLOCK_M
    t_lo = tl.minimum(q_lo // BLOCK_M, t_hi)
    full_lo = tl.minimum(tl.maximum((first_full + BLOCK_M - 1) // BLOCK_M, t_lo), t_hi)
    full_hi = tl.minimum(tl.maximum(full_end // BLOCK_M, full_lo), t_hi)
    # A key tile that crosses Sk is masked on every query tile.
    full_hi = tl.where(start_n + BLOCK_N <= Sk, full_hi, full_lo)
    return t_lo, full_lo, full_hi, t_hi


@triton.jit
def _rows(src, start, n_rows, stride_row, offs_d, MASK_ROWS: tl.constexpr,
          TRANSPOSED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of one (batch, head) slice, (BLOCK, BLOCK_D), or
    (BLOCK_D, BLOCK) when TRANSPOSED; zeros past n_rows and past HEAD_DIM.

    USE_TMA: `src` is a tensor descriptor (shape [n_rows, HEAD_DIM]); the copy engine
    zero-fills out-of-bounds rows and columns itself, so no mask is needed. Otherwise `src`
    points at row 0 and loads are masked only where needed: rows on edge tiles (MASK_ROWS),
    columns when the head dim is padded (HEAD_DIM < BLOCK_D)."""
    if USE_TMA:
        t = src.load([start, 0])
        if TRANSPOSED:
            t = tl.trans(t)
    else:
        # The tile's first row as one scalar pointer (uniform math, once per tile) plus offsets
        # that do not depend on the tile (computed once, outside the loop): the per-load
        # address math is then a single 64-bit add.
        rows = tl.arange(0, BLOCK)
        first = src + start * stride_row
        if TRANSPOSED:
            ptrs = first + (rows[None, :] * stride_row + offs_d[:, None])
            r_in = rows[None, :] < n_rows - start
            d_in = offs_d[:, None] < HEAD_DIM
        else:
            ptrs = first + (rows[:, None] * stride_row + offs_d[None, :])
            r_in = rows[:, None] < n_rows - start
            d_in = offs_d[None, :] < HEAD_DIM
        if MASK_ROWS:
            if HEAD_DIM == BLOCK_D:
                t = tl.load(ptrs, mask=r_in, other=0.0)
            else:
                t = tl.load(ptrs, mask=r_in & d_in, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=d_in, other=0.0)
    return t


@triton.jit
def _slice_source(base, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """What `_rows` loads from: a tensor descriptor of the (n_rows, HEAD_DIM) slice at `base`
    (USE_TMA; the launcher checked TMA's alignment rules), or the pointer itself."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK, BLOCK_D])
    else:
        return base


@triton.jit
def _group_source(base, GROUP, stride_head, n_rows, stride_row, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """`_slice_source` for the GROUP heads of a GQA group starting at `base`: a 3-D tensor
    descriptor [GROUP, n_rows, HEAD_DIM] loaded one head's tile at a time (USE_TMA), or the
    pointer (the caller adds the head offset)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[GROUP, n_rows, HEAD_DIM],
                                         strides=[stride_head, stride_row, 1],
                                         block_shape=[1, BLOCK, BLOCK_D])
    else:
        return base


@triton.jit
def _scores(s, qk_scale, cap_scale, softcap2, slope2, rows, cols, offset,
            HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Raw q.k products -> scores in base-2 units (log2(e) folded in), with the softcap
    softcap * tanh(scale * q.k / softcap) and the ALiBi bias -slope * |row + offset - col|.
    Returns (scores, tanh) (tanh for the softcap's derivative; 0 without softcap).
    Used where the scale cannot be folded into the exponent's FMA (softcap, ALiBi)."""
    t = 0.0
    if HAS_SOFTCAP:
        t = _tanh(s * cap_scale)
        s = softcap2 * t
    else:
        s = s * qk_scale
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(rows + offset - cols).to(tl.float32)
    return s, t


# ============================================================================================
# Forward
# ============================================================================================


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, KPM, stride_kpmn,
                    seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale,
                    softcap2, dropout_p, drop_scale, tile_lo, tile_hi,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                    WARP_SPECIALIZE: tl.constexpr):
    offset = Sk - Sq
    for start_n in tl.range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N,
                            warp_specialize=WARP_SPECIALIZE):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _rows(k_src, start_n, Sk, stride_kn, offs_d, MASKED, True, HEAD_DIM, BLOCK_D,
                   BLOCK_N, USE_TMA)                                       # (BLOCK_D, BLOCK_N)
        v = _rows(v_src, start_n, Sk, stride_vn, offs_d, MASKED, False, HEAD_DIM, BLOCK_D,
                  BLOCK_N, USE_TMA)                                        # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)                   # raw q.k
        if not FOLD_SCALE:
            s, _ = _scores(s, qk_scale, cap_scale, softcap2, slope2, offs_m[:, None],
                           offs_n[None, :], offset, HAS_SOFTCAP, HAS_ALIBI)
        if MASKED:
            visible = offs_n[None, :] < Sk
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + offset - window)
            s = tl.where(visible, s, float("-inf"))
        if HAS_KPM:
            real = tl.load(KPM + offs_n * stride_kpmn, mask=offs_n < Sk, other=0)
            s = tl.where(real[None, :] != 0, s, float("-inf"))

        if FOLD_SCALE:
            # The row max of the raw products, scaled once per row (qk_scale > 0: the launcher
            # makes sure), and the scale folded into the exponent: one FMA per score.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) = NaN never happens (its p and alpha are then exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if FOLD_SCALE:
            p = tl.exp2(s * qk_scale - m_safe[:, None])
        else:
            p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer uses the undropped p
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Sq, Sk, dropout_p)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, SLOPES, KPM, SEED,
              stride_qz, stride_qh, stride_qm,
              stride_kz, stride_kh, stride_kn,
              stride_vz, stride_vh, stride_vn,
              stride_oz, stride_oh, stride_om,
              stride_lz, stride_lh,
              stride_kpmz, stride_kpmn,
              H, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p, drop_scale,
              n_heads, section,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              FOLD_SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
              USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """One program per (query tile, batch*head); causal: the longest tiles first."""
    pid_m, bh = _tile_and_head(tl.program_id(0), Sq, n_heads, section, BLOCK_M, IS_CAUSAL)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    # 64-bit batch/head offsets: B*H*S*d overflows int32 for long sequences.
    q_base = Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kz + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vz + hk.to(tl.int64) * stride_vh
    o_base = OUT + b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
    lse_base = LSE + b.to(tl.int64) * stride_lz + h.to(tl.int64) * stride_lh
    kpm_base = KPM + b.to(tl.int64) * stride_kpmz
    k_src = _slice_source(k_base, Sk, stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    v_src = _slice_source(v_base, Sk, stride_vn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Sq
    d_mask = offs_d < HEAD_DIM
    # With TMA the query tile comes through a descriptor too (Triton's Hopper warp
    # specialization needs every load of the kernel to be a descriptor load).
    q_src = _slice_source(q_base, Sq, stride_qm, HEAD_DIM, BLOCK_D, BLOCK_M, USE_TMA)
    q = _rows(q_src, start_m, Sq, stride_qm, offs_d, True, False, HEAD_DIM, BLOCK_D, BLOCK_M,
              USE_TMA)

    qk_scale = softmax_scale * 1.4426950408889634  # fold log2(e): exp -> exp2
    cap_scale = softmax_scale / softcap
    softcap2 = softcap * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    t_lo, full_lo, full_hi, t_hi = _key_tiles_of_query_tile(
        start_m, Sq, Sk, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if WARP_SPECIALIZE:
        # Triton's Hopper warp specialization (3.6) handles one loop per kernel: every key
        # tile in a single specialized loop, with the mask math on each of them.
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
            seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale, softcap2,
            dropout_p, drop_scale, t_lo, t_hi, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI,
            HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, FOLD_SCALE, HEAD_DIM, BLOCK_D, BLOCK_N,
            DOT_PRECISION, USE_TMA, True)
    else:
        if HAS_WINDOW:  # lower window edge (only a window has one)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
                seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale,
                softcap2, dropout_p, drop_scale, t_lo, full_lo, True, IS_CAUSAL, HAS_WINDOW,
                HAS_ALIBI, HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, FOLD_SCALE, HEAD_DIM, BLOCK_D,
                BLOCK_N, DOT_PRECISION, USE_TMA, False)
        acc, l_i, m_i = _attn_fwd_inner(  # interior: no mask math
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
            seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale, softcap2,
            dropout_p, drop_scale, full_lo, full_hi, False, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI,
            HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, FOLD_SCALE, HEAD_DIM, BLOCK_D, BLOCK_N,
            DOT_PRECISION, USE_TMA, False)
        acc, l_i, m_i = _attn_fwd_inner(  # diagonal and Sk edge
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
            seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale, softcap2,
            dropout_p, drop_scale, full_hi, t_hi, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI,
            HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, FOLD_SCALE, HEAD_DIM, BLOCK_D, BLOCK_N,
            DOT_PRECISION, USE_TMA, False)

    # l == 0 exactly when the row saw no visible key (otherwise its max term contributes 1).
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_in[:, None] & d_mask[None, :])
    tl.store(lse_base + offs_m, lse, mask=m_in)


# ============================================================================================
# Backward
# ============================================================================================


@triton.jit
def _attn_bwd_preprocess(OUT, DO, DLSE, DELTA, DQ_ACC,
                         stride_oz, stride_oh, stride_om,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         H, Sq,
                         HAS_DLSE: tl.constexpr, ZERO_DQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, fp32, stored (B*H, Sq) contiguous (as are DLSE/lse).
    ZERO_DQ: also zero these rows of the fp32 dQ accumulator (B*H, Sq, HEAD_DIM) that the
    atomic backward adds into (one launch fewer than a separate memset)."""
    pid_m = tl.program_id(0) % tl.cdiv(Sq, BLOCK_M)
    bh = tl.program_id(0) // tl.cdiv(Sq, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Sq
    mask = m_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + b.to(tl.int64) * stride_oz + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    # dO may be an expanded scalar (every stride 0): its last stride is a real argument.
    do = tl.load(DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * Sq + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + row, mask=m_in, other=0.0)
    tl.store(DELTA + row, delta, mask=m_in)
    if ZERO_DQ:
        tl.store(DQ_ACC + row[:, None] * HEAD_DIM + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=mask)


@triton.jit
def _attn_bwd_kv_inner(dk, dv, k, v, key_real, q_src, do_src, LSEh, DELTAh, DQh, SLOPESh,
                       stride_qh, stride_qm, stride_doh, stride_dom, stride_dok, stride_dqh,
                       stride_dqm, seed, bh0, offs_n, offs_d, GROUP, Sq, Sk, window, qk_scale,
                       cap_scale, softcap2, softmax_scale, dropout_p, drop_scale, tile_lo,
                       tile_hi, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_GQA: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
                       ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Walk query tiles [tile_lo, tile_hi) for one key tile, for each of the GROUP query heads
    that share it (GQA; the sources point at the group's first head).

    One flat loop over (head, tile) rather than a loop over heads around the tile loop: the
    nest kept more state live across its inner loops and spilled at d=128 (280-300 B in every
    config tried). Works on transposed (key, query) tiles so P^T and dS^T feed the dK/dV dots
    directly: every chained product has the key tile's BLOCK_N rows (the warps split them,
    none is computed twice). WITH_DK / WITH_DV: which of the two it accumulates (the other is
    returned as passed); dQ only with dK."""
    offset = Sk - Sq
    d_mask = offs_d < HEAD_DIM
    n_tiles = tile_hi - tile_lo
    n_iter = n_tiles
    slope2_0 = 0.0  # ALiBi: the first head's slope, the only one without GQA
    if HAS_ALIBI:
        slope2_0 = tl.load(SLOPESh).to(tl.float32) * 1.4426950408889634
    if HAS_GQA:
        n_iter = GROUP * n_tiles
    for it in range(0, n_iter):
        q_g = q_src
        do_g = do_src
        dq_g = DQh
        lse_g = LSEh
        delta_g = DELTAh
        bh = bh0
        i = it
        if HAS_GQA:
            g = it // n_tiles  # the group's head, tile i of its range
            i = it - g * n_tiles
            bh = bh0 + g
            lse_g = LSEh + g.to(tl.int64) * Sq
            delta_g = DELTAh + g.to(tl.int64) * Sq
            dq_g = DQh + g.to(tl.int64) * stride_dqh
            if not USE_TMA:
                q_g = q_src + g.to(tl.int64) * stride_qh
                do_g = do_src + g.to(tl.int64) * stride_doh
        start_m = (tile_lo + i) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < Sq
        if USE_TMA:
            if HAS_GQA:  # 3-D descriptors over the group's heads
                qT = tl.trans(tl.reshape(q_g.load([g, start_m, 0]), [BLOCK_M, BLOCK_D]))
                do = tl.reshape(do_g.load([g, start_m, 0]), [BLOCK_M, BLOCK_D])
            else:
                qT = _rows(q_g, start_m, Sq, stride_qm, offs_d, MASKED, True, HEAD_DIM,
                           BLOCK_D, BLOCK_M, USE_TMA)                       # (BLOCK_D, BLOCK_M)
                do = _rows(do_g, start_m, Sq, stride_dom, offs_d, MASKED, False, HEAD_DIM,
                           BLOCK_D, BLOCK_M, USE_TMA)                       # (BLOCK_M, BLOCK_D)
        else:
            qT = _rows(q_g, start_m, Sq, stride_qm, offs_d, MASKED, True, HEAD_DIM, BLOCK_D,
                       BLOCK_M, USE_TMA)                                    # (BLOCK_D, BLOCK_M)
            # dO's last stride is an argument (an expanded scalar has stride 0 everywhere).
            do_ptrs = do_g + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok
            if MASKED:
                do = tl.load(do_ptrs, mask=m_in[:, None] & d_mask[None, :], other=0.0)
            elif HEAD_DIM == BLOCK_D:
                do = tl.load(do_ptrs)
            else:
                do = tl.load(do_ptrs, mask=d_mask[None, :], other=0.0)
        lse = tl.load(lse_g + offs_m, mask=m_in, other=0.0)
        # A dead row (lse = -inf) must get p = 0: use +inf so exp2(s - lse) = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = 0.0
        if WITH_DK:
            delta = tl.load(delta_g + offs_m, mask=m_in, other=0.0)
        slope2 = slope2_0
        if HAS_ALIBI:
            if HAS_GQA:
                slope2 = tl.load(SLOPESh + g).to(tl.float32) * 1.4426950408889634

        sT = tl.dot(k, qT, input_precision=DOT_PRECISION)                  # (BLOCK_N, BLOCK_M)
        if HAS_SOFTCAP or HAS_ALIBI:
            sT, tT = _scores(sT, qk_scale, cap_scale, softcap2, slope2, offs_m[None, :],
                             offs_n[:, None], offset, HAS_SOFTCAP, HAS_ALIBI)
            pT = tl.exp2(sT - lse2[None, :])
        else:
            pT = tl.exp2(sT * qk_scale - lse2[None, :])  # the scale folded: one FMA
        # Invisible entries can overflow exp2 (their score was never part of lse):
        # select them away with where, never multiply by a 0/1 mask (inf * 0 = NaN).
        if MASKED:
            visible = (offs_n[:, None] < Sk) & m_in[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[:, None] > offs_m[None, :] + offset - window)
            pT = tl.where(visible, pT, 0.0)
        if HAS_KPM:
            pT = tl.where(key_real[:, None], pT, 0.0)

        if HAS_DROPOUT:
            keepT = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Sq, Sk, dropout_p)
        if WITH_DV:
            pdT = pT
            if HAS_DROPOUT:
                pdT = tl.where(keepT, pT * drop_scale, 0.0)
            dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WITH_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)   # (dO V^T)^T
            if HAS_DROPOUT:
                dpT = tl.where(keepT, dpT * drop_scale, 0.0)
            dsT = pT * (dpT - delta[None, :])
            if HAS_SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)  # d softcap*tanh(x/softcap) / dx
            ds_lo = dsT.to(qT.dtype)
            dk = tl.dot(ds_lo, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # The partial dQ of these BLOCK_M queries, added with relaxed fp32 reductions: no
            # ordering is needed between them (acq_rel, the default, costs a memory barrier
            # and an L1 invalidate per atomic). Computed as the product with more rows, so
            # that it runs on wgmma (64 rows per warpgroup): dQ^T = K^T dS^T (BLOCK_D rows)
            # when the head dim is the longer side, else dQ = dS K (BLOCK_M rows).
            if BLOCK_D > BLOCK_M:
                dqT = tl.dot(tl.trans(k), ds_lo, input_precision=DOT_PRECISION) * softmax_scale
                tl.atomic_add(dq_g + offs_m[None, :] * stride_dqm + offs_d[:, None], dqT,
                              mask=m_in[None, :] & d_mask[:, None], sem="relaxed")
            else:
                dq = tl.dot(tl.trans(ds_lo), k, input_precision=DOT_PRECISION) * softmax_scale
                tl.atomic_add(dq_g + offs_m[:, None] * stride_dqm + offs_d[None, :], dq,
                              mask=m_in[:, None] & d_mask[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, KPM,
                       stride_kpmn, seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale,
                       cap_scale, softcap2, dropout_p, drop_scale, tile_lo, tile_hi,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       USE_TMA: tl.constexpr):
    """Walk key tiles [tile_lo, tile_hi) for one query tile: dQ += dS K."""
    offset = Sk - Sq
    for start_n in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < Sk
        kT = _rows(k_src, start_n, Sk, stride_kn, offs_d, MASKED, True, HEAD_DIM, BLOCK_D,
                   BLOCK_N, USE_TMA)                                       # (BLOCK_D, BLOCK_N)
        vT = _rows(v_src, start_n, Sk, stride_vn, offs_d, MASKED, True, HEAD_DIM, BLOCK_D,
                   BLOCK_N, USE_TMA)                                       # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)
        if HAS_SOFTCAP or HAS_ALIBI:
            s, t = _scores(s, qk_scale, cap_scale, softcap2, slope2, offs_m[:, None],
                           offs_n[None, :], offset, HAS_SOFTCAP, HAS_ALIBI)
            p = tl.exp2(s - lse2[:, None])
        else:
            p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            visible = n_in[None, :] & (offs_m[:, None] < Sq)
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + offset - window)
            p = tl.where(visible, p, 0.0)
        if HAS_KPM:
            real = tl.load(KPM + offs_n * stride_kpmn, mask=n_in, other=0)
            p = tl.where(real[None, :] != 0, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Sq, Sk, dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dkdv_program(pid, Q, K, V, DO, LSE, DELTA, DK, DV, DQ, SLOPES, KPM, SEED,
                           stride_qz, stride_qh, stride_qm,
                           stride_kz, stride_kh, stride_kn,
                           stride_vz, stride_vh, stride_vn,
                           stride_doz, stride_doh, stride_dom, stride_dok,
                           stride_dkz, stride_dkh, stride_dkn,
                           stride_dvz, stride_dvh, stride_dvn,
                           stride_dqz, stride_dqh, stride_dqm,
                           stride_kpmz, stride_kpmn,
                           H, HKV, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p,
                           drop_scale, n_kv_heads, section_kv,
                           IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_GQA: tl.constexpr, WITH_DK: tl.constexpr,
                           WITH_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           USE_TMA: tl.constexpr):
    """dK and/or dV (WITH_DK, WITH_DV) of one (key tile, batch*kv_head), summed over the GQA
    group's query heads (no atomics for them); with ATOMIC_DQ (and dK) also the dQ of every
    query tile it meets, added to the fp32 DQ with relaxed atomics. Causal: the first key
    tiles are seen by the most query tiles, so the plain order is already longest-first."""
    pid_n, bhk = _tile_and_head(pid, Sk, n_kv_heads, section_kv, BLOCK_N, False)
    b = bhk // HKV
    hk = bhk % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < Sk
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_in[:, None] & d_mask[None, :]
    k_src = _slice_source(K + b.to(tl.int64) * stride_kz + hk.to(tl.int64) * stride_kh, Sk,
                          stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    v_src = _slice_source(V + b.to(tl.int64) * stride_vz + hk.to(tl.int64) * stride_vh, Sk,
                          stride_vn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    k = _rows(k_src, start_n, Sk, stride_kn, offs_d, True, False, HEAD_DIM, BLOCK_D, BLOCK_N,
              USE_TMA)
    v = _rows(v_src, start_n, Sk, stride_vn, offs_d, True, False, HEAD_DIM, BLOCK_D, BLOCK_N,
              USE_TMA)
    key_real = n_in
    if HAS_KPM:  # this program's keys are fixed: load their padding bits once
        key_real = tl.load(KPM + b.to(tl.int64) * stride_kpmz + offs_n * stride_kpmn,
                           mask=n_in, other=0) != 0
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    qk_scale = softmax_scale * 1.4426950408889634
    cap_scale = softmax_scale / softcap
    softcap2 = softcap * 1.4426950408889634

    t_lo, full_lo, full_hi, t_hi = _query_tiles_of_key_tile(
        start_n, Sq, Sk, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    h0 = hk * GROUP  # the group's first query head
    bh0 = b * H + h0
    q_base = Q + b.to(tl.int64) * stride_qz + h0.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_doz + h0.to(tl.int64) * stride_doh
    if HAS_GQA:
        q_src = _group_source(q_base, GROUP, stride_qh, Sq, stride_qm, HEAD_DIM, BLOCK_D,
                              BLOCK_M, USE_TMA)
        do_src = _group_source(do_base, GROUP, stride_doh, Sq, stride_dom, HEAD_DIM, BLOCK_D,
                               BLOCK_M, USE_TMA)
    else:
        q_src = _slice_source(q_base, Sq, stride_qm, HEAD_DIM, BLOCK_D, BLOCK_M, USE_TMA)
        do_src = _slice_source(do_base, Sq, stride_dom, HEAD_DIM, BLOCK_D, BLOCK_M, USE_TMA)
    dq_h = DQ + b.to(tl.int64) * stride_dqz + h0.to(tl.int64) * stride_dqh
    lse_h = LSE + bh0.to(tl.int64) * Sq
    delta_h = DELTA + bh0.to(tl.int64) * Sq
    slopes_h = SLOPES + h0
    # Masked leading tiles, the interior (no mask math), masked trailing tiles: the loop is
    # unrolled when compiled (part is a constant), three tile loops of their own.
    for part in tl.static_range(3):
        if part == 0:
            lo = t_lo
            hi = full_lo
        elif part == 1:
            lo = full_lo
            hi = full_hi
        else:
            lo = full_hi
            hi = t_hi
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, key_real, q_src, do_src, lse_h, delta_h, dq_h, slopes_h,
            stride_qh, stride_qm, stride_doh, stride_dom, stride_dok, stride_dqh, stride_dqm,
            seed, bh0, offs_n, offs_d, GROUP, Sq, Sk, window, qk_scale, cap_scale, softcap2,
            softmax_scale, dropout_p, drop_scale, lo, hi, part != 1, IS_CAUSAL, HAS_WINDOW,
            HAS_ALIBI, HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, HAS_GQA, WITH_DK, WITH_DV, ATOMIC_DQ,
            HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, USE_TMA)

    if WITH_DK:
        dk = dk * softmax_scale  # d s / d k = scale * q
        tl.store(DK + b.to(tl.int64) * stride_dkz + hk.to(tl.int64) * stride_dkh
                 + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)
    if WITH_DV:
        tl.store(DV + b.to(tl.int64) * stride_dvz + hk.to(tl.int64) * stride_dvh
                 + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)


@triton.jit
def _attn_bwd_dq_program(pid, Q, K, V, DO, LSE, DELTA, DQ, SLOPES, KPM, SEED,
                         stride_qz, stride_qh, stride_qm,
                         stride_kz, stride_kh, stride_kn,
                         stride_vz, stride_vh, stride_vn,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         stride_dqz, stride_dqh, stride_dqm,
                         stride_kpmz, stride_kpmn,
                         H, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p,
                         drop_scale, n_heads, section,
                         IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         USE_TMA: tl.constexpr):
    """dQ of one (query tile of BLOCK_M rows, batch*head), walking BLOCK_N key tiles, with
    plain stores (deterministic). Causal: the longest tiles first, as in the forward."""
    pid_m, bh = _tile_and_head(pid, Sq, n_heads, section, BLOCK_M, IS_CAUSAL)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Sq
    qd_mask = m_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _rows(Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh, start_m, Sq,
              stride_qm, offs_d, True, False, HEAD_DIM, BLOCK_D, BLOCK_M, False)
    do = tl.load(DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=m_in, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=m_in, other=0.0)
    k_src = _slice_source(K + b.to(tl.int64) * stride_kz + hk.to(tl.int64) * stride_kh, Sk,
                          stride_kn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    v_src = _slice_source(V + b.to(tl.int64) * stride_vz + hk.to(tl.int64) * stride_vh, Sk,
                          stride_vn, HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA)
    kpm_base = KPM + b.to(tl.int64) * stride_kpmz
    qk_scale = softmax_scale * 1.4426950408889634
    cap_scale = softmax_scale / softcap
    softcap2 = softcap * 1.4426950408889634
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    t_lo, full_lo, full_hi, t_hi = _key_tiles_of_query_tile(
        start_m, Sq, Sk, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, kpm_base,
            stride_kpmn, seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale,
            cap_scale, softcap2, dropout_p, drop_scale, t_lo, full_lo, True, IS_CAUSAL,
            HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D,
            BLOCK_N, DOT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(  # interior: no mask math
        dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale, softcap2,
        dropout_p, drop_scale, full_lo, full_hi, False, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI,
        HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
        USE_TMA)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_src, v_src, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, cap_scale, softcap2,
        dropout_p, drop_scale, full_hi, t_hi, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI,
        HAS_KPM, HAS_DROPOUT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
        USE_TMA)
    dq = dq * softmax_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, SLOPES, KPM, SEED,
              stride_qz, stride_qh, stride_qm,
              stride_kz, stride_kh, stride_kn,
              stride_vz, stride_vh, stride_vn,
              stride_doz, stride_doh, stride_dom, stride_dok,
              stride_dkz, stride_dkh, stride_dkn,
              stride_dvz, stride_dvh, stride_dvn,
              stride_dqz, stride_dqh, stride_dqm,
              stride_kpmz, stride_kpmn,
              H, HKV, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p, drop_scale,
              n_heads, n_kv_heads, section, section_kv,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_GQA: tl.constexpr, ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """The backward in one launch. LSE/DELTA are (B*H, Sq) contiguous fp32.

    Programs [0, cdiv(Sk, BLOCK_N) * B*Hkv) each own a key tile of BLOCK_N keys and stream
    BLOCK_M-query tiles past it (dK, dV; with ATOMIC_DQ also dQ, by fp32 atomics). Without
    ATOMIC_DQ (deterministic) the programs after them each own a query tile of BLOCK_N queries
    and stream BLOCK_M-key tiles past it, writing dQ with plain stores: the two halves run in
    the same launch and overlap, and the tile roles swap so that both halves' chained
    products have BLOCK_N rows.

    Head dims over 128 (BLOCK_D = 256): dK and dV together (2 x BLOCK_N x 256 fp32) do not fit
    one program's registers at the 64 rows a warpgroup's wgmma needs, so each key tile gets
    two programs, the first computing dV (products S^T, dV), the second dK and the atomic dQ
    (S^T, dP^T, dK, dQ^T): one S^T product more than the fused form, in exchange for wgmma on
    64-row tiles with nothing duplicated and no spilled accumulator."""
    pid = tl.program_id(0)
    n_kv_programs = tl.cdiv(Sk, BLOCK_N) * n_kv_heads
    N_ROLES: tl.constexpr = 2 if BLOCK_D > 128 else 1
    # The dK/dV range: one role (dK and dV together), or over 128 wide two (dV programs, then
    # dK programs, which also do the atomic dQ). Unrolled when compiled: a branch per role.
    # (role is a constant in each copy: role == 0 computes dV, the last role dK.)
    for role in tl.static_range(N_ROLES):
        first = role * n_kv_programs
        if (pid >= first) & (pid < first + n_kv_programs):
            _attn_bwd_dkdv_program(
                pid - first, Q, K, V, DO, LSE, DELTA, DK, DV, DQ, SLOPES, KPM, SEED,
                stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                stride_vz, stride_vh, stride_vn, stride_doz, stride_doh, stride_dom, stride_dok,
                stride_dkz, stride_dkh, stride_dkn, stride_dvz, stride_dvh, stride_dvn,
                stride_dqz, stride_dqh, stride_dqm, stride_kpmz, stride_kpmn,
                H, HKV, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p, drop_scale,
                n_kv_heads, section_kv, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
                HAS_SOFTCAP, HAS_GQA, role == N_ROLES - 1, role == 0,
                ATOMIC_DQ and role == N_ROLES - 1, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, DOT_PRECISION, USE_TMA)
    if not ATOMIC_DQ:
        first_dq = N_ROLES * n_kv_programs
        if pid >= first_dq:
            _attn_bwd_dq_program(
                pid - first_dq, Q, K, V, DO, LSE, DELTA, DQ, SLOPES, KPM, SEED,
                stride_qz, stride_qh, stride_qm, stride_kz, stride_kh, stride_kn,
                stride_vz, stride_vh, stride_vn, stride_doz, stride_doh, stride_dom, stride_dok,
                stride_dqz, stride_dqh, stride_dqm, stride_kpmz, stride_kpmn,
                H, GROUP, Sq, Sk, window, softmax_scale, softcap, dropout_p, drop_scale,
                n_heads, section, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
                HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_M, DOT_PRECISION, USE_TMA)


# ============================================================================================
# Dropout keep-mask (for tests / debugging)
# ============================================================================================


@triton.jit
def _dropout_mask_kernel(SEED, MASK, Sq, Sk, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One grid axis (see dropout_mask_grid): key tile fastest, then query tile, then b*h.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(Sk, BLOCK_N)
    pid_n = pid % n_tiles
    pid_m = (pid // n_tiles) % tl.cdiv(Sq, BLOCK_M)
    bh = pid // (n_tiles * tl.cdiv(Sq, BLOCK_M))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(SEED)
    keep = _dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], Sq, Sk, dropout_p)
    ptrs = MASK + (bh.to(tl.int64) * Sq + offs_m[:, None]) * Sk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < Sq) & (offs_n[None, :] < Sk))


# ============================================================================================
# Configurations
# ============================================================================================

# The committed configurations are data: attention_configs.json beside this file, keyed and
# matched as kernels/configs.py describes (kind, arch, dtype, padded head dim, feature flags,
# power-of-two Sq/Sk buckets). Kinds: "fwd" (BLOCK_M query x BLOCK_N key tile), "bwd" (the
# backward launch: dK/dV programs own BLOCK_N keys and stream BLOCK_M queries; deterministic
# dQ programs own BLOCK_N queries and stream BLOCK_M keys), "bwd_pre" (delta rows per
# program). fwd and bwd also take the flag USE_TMA (the streamed tiles through tensor
# descriptors: TMA on sm_90+), fwd the flag WARP_SPECIALIZE (its loop split into a producer
# warpgroup and consumer warpgroups); both default to 0 (pointer loads, no specialization), so
# a GPU run can A/B them. The backward has no warp-specialized form: Triton's Hopper
# warp-specialization pass (3.6 and 3.8) fails on it (see DEVELOPERS.md).
_FEATURES = {"IS_CAUSAL": "causal", "HAS_WINDOW": "window", "HAS_ALIBI": "alibi",
             "HAS_KPM": "kpm", "HAS_DROPOUT": "dropout", "HAS_SOFTCAP": "softcap"}

SUPPORTED_HEAD_DIMS = tuple(range(8, 257, 8))  # every multiple of 8 up to 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def head_dim_supported(d: int) -> bool:
    """Every multiple of 8 from 8 to 256: the kernels pad the head dim to the next power of
    two (>= 16) inside their tiles, and 8 elements are TMA's 16-byte row granule at 16 bits."""
    return 8 <= d <= 256 and d % 8 == 0


class Config(NamedTuple):
    """A candidate configuration (the tables hold the same numbers)."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    USE_TMA: int = 0
    WARP_SPECIALIZE: int = 0


# Candidates tried by GPTFAST_AUTOTUNE=1 and benchmarks/tune_attention.py (filtered by keep()).
# Hopper-aware: 64/128-row tiles for wgmma, 2-4 stages of cp.async or TMA, warp specialization
# with TMA at 4 warps (Triton 3.6 compiles it on sm_90a at 4 warps, not 8).
_CANDIDATES = ([Config(bm, bn, w, s) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128)
                for w in (4, 8) for s in (1, 2, 3)]
               + [Config(bm, bn, w, s, 1) for bm in (64, 128) for bn in (64, 128)
                  for w in (4, 8) for s in (2, 3)]
               + [Config(bm, bn, 4, s, 1, 1) for bm in (64, 128) for bn in (64, 128)
                  for s in (2, 3)])


def candidates(kind: str, head_dim: int, dtype: torch.dtype, capability: Tuple[int, int],
               features: Tuple[str, ...] = ()) -> List[Config]:
    """The kept candidates for one configuration key (what the tuners sweep)."""
    elt = torch.empty((), dtype=dtype).element_size()
    return [c for c in _CANDIDATES if keep(c, kind, head_dim, elt, capability, features)]


def tuning_candidates(kind: str, head_dim: int, dtype: torch.dtype,
                      capability: Tuple[int, int], features: Tuple[str, ...],
                      committed: configs.KernelConfig, limit: int = 8) -> List[Config]:
    """What benchmarks/tune_attention.py times for one key, at most `limit`: the committed
    config first (the baseline), the same tiles through TMA, the best warp-specialized
    candidate, then the other kept candidates, larger tiles first (fewer per-score overheads
    on Hopper), 2-3 stages before 1 or 4."""
    first = Config(**{f: int(committed.kwargs().get(f, 0)) for f in Config._fields})
    kept = candidates(kind, head_dim, dtype, capability, features)

    def prior(c: Config):
        return (-(c.BLOCK_M * c.BLOCK_N), -c.num_warps, abs(c.num_stages - 2.5), c.USE_TMA,
                c.WARP_SPECIALIZE)
    ranked = sorted(kept, key=prior)
    picks = [first]
    tma = first._replace(USE_TMA=1, WARP_SPECIALIZE=0)
    if keep(tma, kind, head_dim, torch.empty((), dtype=dtype).element_size(), capability,
            features):
        picks.append(tma)
    picks += [c for c in ranked if c.WARP_SPECIALIZE][:1]
    picks += [c for c in ranked if not c.WARP_SPECIALIZE]
    out: List[Config] = []
    for c in picks:
        if c not in out:
            out.append(c)
    return out[:limit]


def _smem_limit(capability: Tuple[int, int]) -> int:
    return configs.shared_memory_limit(configs.arch_name(capability))


def keep(config, kind: str, head_dim: int, elt_bytes: int,
         capability: Tuple[int, int] = (9, 0), features: Tuple[str, ...] = ()) -> bool:
    """False for configs known to be invalid or slow: dot tiles under 16, a shared-memory
    estimate over the arch's limit, fp32 tiles that would spill registers (persistent
    accumulators > 128 registers a thread, or with the transient score tiles > 192), and on
    sm_90 with 16-bit inputs tiles that waste wgmma: its warps split the rows of chained
    products (16 per warp, 64 per warpgroup), so chained products need >= 16 * num_warps rows
    or two warpgroups compute the same tile (forward: BLOCK_M; backward: BLOCK_N, both
    halves), and the atomic dQ product (not chained; computed with max(BLOCK_M, BLOCK_D) rows)
    needs 64. TMA and warp specialization need sm_90; warp specialization needs TMA and 4
    warps (Triton 3.6 compiles it on sm_90a at 4 warps, not 8) and is for the forward only;
    the backward with atomic dQ takes TMA only up to d=64 (it spills at d=128).
    `config`: anything with BLOCK_M, BLOCK_N, num_warps, num_stages (and optionally USE_TMA,
    WARP_SPECIALIZE) attributes."""
    bm, bn, warps, stages = config.BLOCK_M, config.BLOCK_N, config.num_warps, config.num_stages
    tma = getattr(config, "USE_TMA", 0)
    ws = getattr(config, "WARP_SPECIALIZE", 0)
    if bm < 16 or bn < 16 or warps not in (1, 2, 4, 8, 16) or stages < 1:
        return False
    hopper = capability[0] >= 9
    if (tma or ws) and not hopper:
        return False
    if ws and (not tma or warps != 4 or kind != "fwd"):
        return False
    if tma and kind == "bwd" and "deterministic" not in features and head_dim > 64:
        return False  # TMA with atomic dQ at d=128 spilled 44-424 B in every config tried
    d = _block_d(head_dim)
    threads = 32 * warps
    if kind == "fwd":
        # Streamed K and V tiles per pipeline stage + the resident Q tile.
        smem = stages * 2 * bn * d * elt_bytes + bm * d * elt_bytes
        persistent = bm * d  # O accumulator
        transient = bm * bn  # S / P tile
        chained_rows = bm
    elif kind == "bwd":
        # dK/dV half: streamed Q and dO tiles per stage + resident K, V + the dS^T tile (the
        # dQ half, roles swapped, needs the same).
        smem = stages * 2 * bm * d * elt_bytes + 2 * bn * d * elt_bytes + bm * bn * elt_bytes
        # dK, dV; over 128 wide (BLOCK_D = 256) one of them per program (see _attn_bwd).
        persistent = (1 if d > 128 else 2) * bn * d
        transient = 2 * bm * bn  # S^T, dP^T
        chained_rows = bn
        if hopper and elt_bytes == 2 and "deterministic" not in features and max(bm, d) < 64:
            return False  # the atomic dQ product (max(BLOCK_M, BLOCK_D) rows) would be mma.sync
    else:
        raise ValueError(kind)
    if hopper and elt_bytes == 2 and chained_rows < 16 * warps:
        return False
    if kind == "bwd" and "deterministic" not in features:
        transient += max(bm, d) * min(bm, d)  # the atomic dQ tile
    # Budgets calibrated on the static table (sm_90a, Triton 3.6/3.8): the backward keeps
    # more live values per score than these counts show (P^T and dS^T in 16 bits, the
    # transposed dS in shared memory), so it gets less headroom.
    limit = 192 if kind == "fwd" else 176
    return (smem <= _smem_limit(capability) and persistent / threads <= 128
            and (persistent + transient) / threads <= limit)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _interpreting() -> bool:
    return configs.interpreting()


def _features(flags: dict, **more: bool) -> Tuple[str, ...]:
    """Names of the optional features that are on: the kernels' flags plus `more`."""
    return tuple(name for flag, name in _FEATURES.items() if flags[flag]) + \
        tuple(name for name, on in more.items() if on)


# kind -> KernelConfig that every launch of that kind uses instead of the table's (tests run
# the TMA and warp-specialized code paths under the interpreter with it; the tuning command
# times its candidates with it).
_OVERRIDE: Dict[str, configs.KernelConfig] = {}


@contextlib.contextmanager
def config_override(**by_kind: Mapping[str, int]) -> Iterator[None]:
    """`with config_override(fwd={...}, bwd={...}):` launches of those kinds use exactly these
    parameters (missing flags default to 0), whatever the table says."""
    before = dict(_OVERRIDE)
    table = configs.load("attention")
    for kind, params in by_kind.items():
        spec = table.kinds[kind]
        full = {**spec.defaults, **params}
        if set(full) != set(spec.params):
            raise ValueError(f"config_override({kind}=...): expected {list(spec.params)}, "
                             f"got {sorted(params)}")
        _OVERRIDE[kind] = configs.KernelConfig({p: int(full[p]) for p in spec.params})
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(before)


def get_config(kind: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int],
               features: Tuple[str, ...] = (), lengths: Tuple[int, ...] = ()) -> configs.KernelConfig:
    """The config a launch uses: an override, else the table's entry for its key on the GPU it
    runs on, or the small interpreter config. lengths: (Sq, Sk) for fwd/bwd, () for bwd_pre."""
    if _OVERRIDE and kind in _OVERRIDE:
        return _OVERRIDE[kind]
    table = configs.load("attention")
    target = configs.launch_target(device)
    if target is None:
        return table.interpreter[kind]
    return table.lookup(table.key(kind, target, dtype, head_dim, features, lengths))


def _autotune_enabled(device: torch.device) -> bool:
    return os.environ.get("GPTFAST_AUTOTUNE", "0") == "1" and device.type == "cuda" and not _interpreting()


_AUTOTUNED: dict = {}  # (kernel name, ConfigKey, reset_to_zero) -> triton.autotune wrapper


def _autotuned(kernel, kind: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               features: Tuple[str, ...], lengths: Tuple[int, int], reset_to_zero=None,
               tma_ok: bool = True):
    """triton.autotune over the kept candidates, one tuner per configuration key: a launch
    tunes once per (arch, dtype, head dim, features, Sq/Sk power-of-two bucket), the key the
    committed table uses (autotuned_entries() turns the results into table entries).
    `tma_ok`: whether the launch's tensors can be TMA descriptors (`tma_compatible`); if not,
    the TMA and warp-specialized candidates are left out, as `_launch_flags` drops them."""
    table = configs.load("attention")
    target = configs.launch_target(device)
    key = table.key(kind, target, dtype, head_dim, features, lengths)
    cache_key = (kernel.__name__, key, tuple(reset_to_zero or ()), tma_ok)
    if cache_key not in _AUTOTUNED:
        flags = table.kinds[kind].defaults
        cands = [triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N,
                                **{f: bool(getattr(c, f)) for f in flags}},
                               num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in candidates(kind, head_dim, dtype, target.capability, features)
                 if tma_ok or not c.USE_TMA]
        # key=[]: the tuner is already per configuration key, so it tunes on its first launch
        # and never again (Triton would otherwise re-tune for every new value of a key arg).
        _AUTOTUNED[cache_key] = triton.autotune(configs=cands, key=[],
                                                reset_to_zero=reset_to_zero)(kernel)
    return _AUTOTUNED[cache_key]


def autotuned_entries(why: str) -> list:
    """attention_configs.json entries for every key tuned in this process (GPTFAST_AUTOTUNE=1)."""
    table = configs.load("attention")
    out = []
    for (_, key, _), tuner in _AUTOTUNED.items():
        for best in tuner.cache.values():
            params = {k: int(v) for k, v in best.kwargs.items()}
            out.append(configs.entry_for(key, table, dict(params, num_warps=best.num_warps,
                                                          num_stages=best.num_stages), why,
                                         exact=True))
    return out


# ============================================================================================
# Launch grids and program order (pure functions: the tests check them at shapes too large
# to run here)
# ============================================================================================


def tiles_x_heads_grid(n_rows: int, block: int, n_heads: int) -> Tuple[int]:
    """Grid of the forward and preprocess kernels: cdiv(n_rows, block) row tiles times n_heads
    (batch * heads) programs, folded onto axis 0 (decoded by `_tile_and_head`). B * H alone
    can exceed the 65,535 that CUDA allows on axes 1 and 2."""
    return checked_grid(triton.cdiv(n_rows, block) * n_heads)


def backward_grid(Sq: int, Sk: int, block_n: int, n_heads: int, n_kv_heads: int,
                  deterministic: bool, head_dim: int = 128) -> Tuple[int]:
    """Grid of `_attn_bwd`: the dK/dV programs (key tiles x batch*kv_heads; twice that for head
    dims over 128, where dV and dK have programs of their own), then, for the deterministic
    backward, the dQ programs (query tiles of BLOCK_N rows x batch*heads)."""
    n = triton.cdiv(Sk, block_n) * n_kv_heads * (2 if _block_d(head_dim) > 128 else 1)
    if deterministic:
        n += triton.cdiv(Sq, block_n) * n_heads
    return checked_grid(n)


def dropout_mask_grid(Sq: int, Sk: int, block_m: int, block_n: int, n_heads: int) -> Tuple[int]:
    """Grid of `_dropout_mask_kernel`: (query tiles, key tiles, batch * heads) on axis 0."""
    return checked_grid(triton.cdiv(Sq, block_m) * triton.cdiv(Sk, block_n) * n_heads)


# K/V bytes that the programs running at once should share through L2 (H100/H200: 50 MiB of
# L2; leave room for Q, O and the other operands).
L2_BUDGET = 32 << 20


def head_section(n_heads: int, kv_bytes_per_head: int, ordered: bool) -> int:
    """Heads per section of the program order (`_tile_and_head`): with a causal mask, as many
    heads as fit their K/V in L2_BUDGET, so a wave that runs the longest tiles of a section's
    heads first finds their K/V in L2; without (`ordered` False) 1: the plain order, tile
    fastest."""
    if not ordered:
        return 1
    return max(1, min(n_heads, L2_BUDGET // max(1, kv_bytes_per_head)))


def program_order(n_rows: int, block: int, n_heads: int, section: int,
                  reverse: bool) -> List[Tuple[int, int]]:
    """(tile, batch*head) of every program id, in launch order: the host-side statement of
    `_tile_and_head`, for the tests that check the kernel's decoding and for reading."""
    n_tiles = triton.cdiv(n_rows, block)
    out = []
    for pid in range(n_tiles * n_heads):
        s, local = divmod(pid, n_tiles * section)
        width = min(section, n_heads - s * section)
        tile, lane = divmod(local, width)
        out.append((n_tiles - 1 - tile if reverse else tile, s * section + lane))
    return out


# ============================================================================================
# Launchers
# ============================================================================================


def _alloc(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 ("ieee"), not Triton's tf32 default. For fp16/bf16 the value is
    # irrelevant (the tensor cores take them natively); "tf32" is the NVIDIA default.
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_compatible(*tensors: Tensor) -> bool:
    """Whether every (batch, head) slice of these (B, H, S, d) tensors can be a TMA descriptor:
    16-byte aligned base and row stride, unit last stride, and at least one 16-byte row."""
    for t in tensors:
        elt = t.element_size()
        if (t.stride(-1) != 1 or t.shape[-1] * elt < 16 or t.data_ptr() % 16
                or any((s * elt) % 16 or s == 0 for s in t.stride()[:-1])):
            return False
    return True


def _tma_allocator(size: int, alignment: int, stream) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch per program, which Triton
    asks `triton.set_allocator`'s allocator for at launch. Install torch's caching allocator
    unless the user set one. Per thread (the allocator is a context variable, and autograd
    runs the backward in a thread of its own)."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_allocator)


def _launch_flags(kind: str, cfg: configs.KernelConfig, *tensors: Tensor) -> Dict[str, bool]:
    """The flags of a launch (USE_TMA; fwd also WARP_SPECIALIZE): the config's, with TMA (and
    the warp specialization that needs it) dropped when a tensor breaks TMA's alignment
    rules. Meta tensors (the static table) have 16-byte aligned data pointers."""
    tma = bool(cfg.USE_TMA) and tma_compatible(*tensors)
    if tma and tensors[0].device.type == "cuda":
        _ensure_tma_allocator()
    flags = dict(USE_TMA=tma)
    if kind == "fwd":
        flags["WARP_SPECIALIZE"] = bool(cfg.WARP_SPECIALIZE) and tma
    return flags


def _launch_options(cfg: configs.KernelConfig) -> Dict[str, int]:
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


class _Extras(NamedTuple):
    slopes: Tensor
    kpm: Tensor
    stride_kpmz: int
    stride_kpmn: int
    seed: Tensor
    window: int
    drop_scale: float
    softcap: float


def head_span(t: Tensor) -> int:
    """Elements spanned by one (batch, head) slice of a (B, H, S, d) tensor. The kernels use
    64-bit offsets for batch and head but 32-bit ones inside a slice (cheaper address math)."""
    return (t.shape[2] - 1) * t.stride(2) + t.shape[3]


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, alibi_slopes, window,
           key_padding_mask, dropout_p, seed, softcap) -> _Extras:
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, S, d)"
    B, Hq, Sq, d = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == d, (q.shape, k.shape, v.shape)
    Hkv = k.shape[1]
    assert Hkv >= 1 and Hq % Hkv == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert q.dtype == k.dtype == v.dtype and q.dtype in DTYPES, (q.dtype, k.dtype, v.dtype)
    assert q.device == k.device == v.device
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, \
        "the last dim of q, k, v must be contiguous"
    assert head_dim_supported(d), f"head dim {d} not supported (a multiple of 8 up to 256)"
    assert max(head_span(t) for t in (q, k, v)) < 2**31, \
        "row offsets within one (batch, head) slice must fit in 32 bits"
    if window is not None:
        assert causal, "window is only supported together with causal=True"
    assert softcap is None or softcap > 0, f"softcap must be positive or None, got {softcap}"
    dummy = q  # stands in for absent pointers (never read: the constexpr flag is off)
    slopes = dummy
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (Hq,), alibi_slopes.shape
        slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    kpm, s_kz, s_kn = dummy, 0, 0
    if key_padding_mask is not None:
        assert key_padding_mask.shape == (B, k.shape[2]), key_padding_mask.shape
        kpm = key_padding_mask.to(device=q.device, dtype=torch.bool).view(torch.uint8)
        s_kz, s_kn = kpm.stride()
    seed_t = dummy
    drop_scale = 1.0
    if dropout_p > 0.0:
        assert dropout_p < 1.0, "dropout_p must be < 1"
        assert seed is not None, "dropout needs a seed tensor"
        seed_t = seed
        drop_scale = 1.0 / (1.0 - dropout_p)
    return _Extras(slopes, kpm, s_kz, s_kn, seed_t, int(window) if window is not None else 0,
                   drop_scale, float(softcap) if softcap is not None else 1.0)


def _flags(causal, window, alibi_slopes, key_padding_mask, dropout_p, softcap, d, dtype):
    return dict(IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None,
                HAS_DROPOUT=dropout_p > 0.0, HAS_SOFTCAP=softcap is not None, HEAD_DIM=d,
                BLOCK_D=_block_d(d), DOT_PRECISION=_dot_precision(dtype))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                      alibi_slopes: Optional[Tensor] = None, window: Optional[int] = None,
                      key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                      seed: Optional[Tensor] = None,
                      softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Returns out (B, Hq, Sq, d) in q.dtype and lse (B, Hq, Sq) fp32 (natural log; -inf for
    rows that see no key, whose out is 0). See the module docstring for the semantics."""
    LAUNCHES["attention_fwd"] += 1
    ex = _check(q, k, v, causal, alibi_slopes, window, key_padding_mask, dropout_p, seed, softcap)
    ensure_bf16(q)
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = _alloc((B, Hq, Sq, d), q.dtype, q.device)
    lse = _alloc((B, Hq, Sq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    section = head_section(B * Hq, 2 * Sk * d * k.element_size() // (Hq // Hkv), bool(causal))
    args = (q, k, v, out, lse, ex.slopes, ex.kpm, ex.seed,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            ex.stride_kpmz, ex.stride_kpmn,
            Hq, Hq // Hkv, Sq, Sk, ex.window, float(softmax_scale), ex.softcap, float(dropout_p),
            ex.drop_scale, B * Hq, section)
    flags = _flags(causal, window, alibi_slopes, key_padding_mask, dropout_p, softcap, d, q.dtype)
    # The scale folds into the exponent's FMA (row max taken on the raw products) when it is
    # positive and nothing but masks sits between q.k and the exponent.
    flags["FOLD_SCALE"] = softmax_scale > 0 and alibi_slopes is None and softcap is None
    features = _features(flags)
    if _autotune_enabled(q.device):
        kernel = _autotuned(_attn_fwd, "fwd", q.device, q.dtype, d, features, (Sq, Sk),
                            tma_ok=tma_compatible(q, k, v))
        _ensure_tma_allocator()
        kernel[lambda meta: tiles_x_heads_grid(Sq, meta["BLOCK_M"], B * Hq)](*args, **flags)
    else:
        cfg = get_config("fwd", q.device, q.dtype, d, features, (Sq, Sk))
        _attn_fwd[tiles_x_heads_grid(Sq, cfg.BLOCK_M, B * Hq)](
            *args, **flags, **_launch_flags("fwd", cfg, q, k, v), **_launch_options(cfg))
    return out, lse


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       causal: bool, softmax_scale: float, alibi_slopes: Optional[Tensor] = None,
                       window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                       dlse: Optional[Tensor] = None, deterministic: bool = False,
                       softcap: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes/dtypes of q, k, v; dk/dv summed over each GQA group).

    `do` may have any strides (stride 0 included). One launch after the preprocess: by
    default dQ is accumulated with fp32 atomics (relaxed) and cast; deterministic=True: no
    atomics (the launch's second half computes dQ), bitwise reproducible."""
    LAUNCHES["attention_bwd"] += 1
    ex = _check(q, k, v, causal, alibi_slopes, window, key_padding_mask, dropout_p, seed, softcap)
    ensure_bf16(q, do, out)
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert do.shape == q.shape and out.shape == q.shape and lse.shape == (B, Hq, Sq)
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if out.stride(-1) != 1:
        out = out.contiguous()
    # lse/delta/dlse are small fp32 (B*H, Sq) rows: the kernels index them contiguously.
    lse = lse.to(torch.float32).contiguous()
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        # No query or no key: every gradient is zero.
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    delta = _alloc((B, Hq, Sq), torch.float32, q.device)
    has_dlse = dlse is not None
    dlse_t = dlse.to(torch.float32).contiguous() if has_dlse else lse
    BLOCK_D = _block_d(d)
    if deterministic:
        dq = _alloc(q.shape, q.dtype, q.device)
        dq_acc = dq  # the dQ programs store into it
    else:
        # fp32 accumulator for the atomics, zeroed by the preprocess kernel, cast at the end
        # (for fp32 inputs it is dq itself).
        dq_acc = _alloc((B, Hq, Sq, d), torch.float32, q.device)
    pre = get_config("bwd_pre", q.device, q.dtype, None, ("dlse",) if has_dlse else ())
    pre_m = pre.BLOCK_M
    _attn_bwd_preprocess[tiles_x_heads_grid(Sq, pre_m, B * Hq)](
        out, do, dlse_t, delta, dq_acc,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), do.stride(3),
        Hq, Sq, HAS_DLSE=has_dlse, ZERO_DQ=not deterministic, HEAD_DIM=d, BLOCK_D=BLOCK_D,
        **pre.kwargs())

    flags = _flags(causal, window, alibi_slopes, key_padding_mask, dropout_p, softcap, d, q.dtype)
    kv_bytes = 2 * Sk * d * k.element_size()
    args = (q, k, v, do, lse, delta, dk, dv, dq_acc, ex.slopes, ex.kpm, ex.seed,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2), do.stride(3),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
            ex.stride_kpmz, ex.stride_kpmn,
            Hq, Hkv, Hq // Hkv, Sq, Sk, ex.window, float(softmax_scale), ex.softcap,
            float(dropout_p), ex.drop_scale, B * Hq, B * Hkv,
            head_section(B * Hq, kv_bytes // (Hq // Hkv), bool(causal)),
            head_section(B * Hkv, 2 * Sq * d * q.element_size() * (Hq // Hkv), bool(causal)))
    # The dK/dV programs loop over a GQA group (GROUP > 1), which costs registers: own key.
    features = _features(flags, deterministic=deterministic, gqa=Hq != Hkv)
    if _autotune_enabled(q.device):
        kernel = _autotuned(_attn_bwd, "bwd", q.device, q.dtype, d, features, (Sq, Sk),
                            reset_to_zero=None if deterministic else ["DQ"],
                            tma_ok=tma_compatible(q, do, k, v))
        _ensure_tma_allocator()
        kernel[lambda meta: backward_grid(Sq, Sk, meta["BLOCK_N"], B * Hq, B * Hkv,
                                          deterministic, d)](
            *args, **flags, HAS_GQA=Hq != Hkv, ATOMIC_DQ=not deterministic)
    else:
        cfg = get_config("bwd", q.device, q.dtype, d, features, (Sq, Sk))
        _attn_bwd[backward_grid(Sq, Sk, cfg.BLOCK_N, B * Hq, B * Hkv, deterministic, d)](
            *args, **flags, HAS_GQA=Hq != Hkv, ATOMIC_DQ=not deterministic,
            **_launch_flags("bwd", cfg, q, do, k, v), **_launch_options(cfg))
    if deterministic:
        return dq, dk, dv
    return dq_acc.to(q.dtype), dk, dv


def attention_dropout_keep_mask(seed: Tensor, B: int, H: int, Sq: int, Sk: int,
                                dropout_p: float, device) -> Tensor:
    """(B, H, Sq, Sk) bool: exactly the keep-mask the attention kernels use for this seed."""
    device = torch.device(device)
    if not torch.is_tensor(seed):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    mask = torch.empty((B, H, Sq, Sk), dtype=torch.uint8, device=device)
    if mask.numel() == 0:
        return mask.view(torch.bool)
    BM, BN = 32, 32
    _dropout_mask_kernel[dropout_mask_grid(Sq, Sk, BM, BN, B * H)](
        seed, mask, Sq, Sk, float(dropout_p), BLOCK_M=BM, BLOCK_N=BN)
    return mask.view(torch.bool)
