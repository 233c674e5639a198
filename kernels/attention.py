"""FlashAttention-2 style attention in Triton: forward, backward, and the dropout keep-mask.

Only kernels and thin launchers live here (no autograd: `gptfast.ops` owns that).

Layout and masks
----------------
q is (B, Hq, Sq, d); k, v are (B, Hkv, Sk, d) with Hq % Hkv == 0 (query head h reads kv head
h // (Hq // Hkv)). Only the last dim must be contiguous: every other stride is passed to the
kernels, so q/k/v may be transposed slices of one fused QKV buffer. Masks are aligned
bottom-right, offset = Sk - Sq (the last query sees the last key, what a KV cache needs):

    causal:            key j visible to query i  iff  j <= i + offset
    window W (causal):                          and  j >  i + offset - W
    key_padding_mask:                           and  key_padding_mask[b, j]
    alibi:             score_ij = scale * q_i.k_j - slope_h * |i + offset - j|

A row that sees no key has lse = -inf, an output of exactly 0 and zero gradients.

Forward (one program per (BLOCK_M query tile, batch*head))
----------------------------------------------------------
The query tile stays in registers while K/V tiles stream past it. Online softmax in fp32:
running max m, running sum l, accumulator acc, rescaled by exp2(m_old - m_new) whenever the
max grows. Scores are kept in base-2 units (log2(e) folded into the scale, alibi slope
too) so the exponentials are exp2. The key range of a query tile is split in three:
  [t_lo, full_lo)    masked tiles on the window's lower edge,
  [full_lo, full_hi) tiles every query of the tile fully sees: no mask math at all,
  [full_hi, t_hi)    masked tiles on the causal diagonal and the Sk edge;
tiles outside [t_lo, t_hi) (above the diagonal, below the window) are never loaded.
Padding masks are per key and therefore applied on every tile.

Backward
--------
1. preprocess: delta_i = rowsum(dO_i * O_i) - dlse_i (dlse: gradient flowing into lse, since
   d lse_i / d s_ij = p_ij).
2. dK/dV: one program per (BLOCK_N key tile, batch*kv_head); K, V, dK, dV stay in registers
   while the program walks the query tiles that can see its keys, for each query head of the
   GQA group (so dK/dV come out already summed over the group: K/V are never repeated).
   P is recomputed from the saved lse. Default: dQ is accumulated in the same loop with fp32
   atomics (fastest; the order of the atomic adds is not fixed, so dQ is not bitwise
   reproducible).
3. deterministic=True: the dK/dV kernel skips dQ and a separate dQ kernel (one program per
   query tile, walking the key tiles like the forward) writes dQ with plain stores. Neither
   kernel uses atomics, so the result is bitwise reproducible.

Grids
-----
Every kernel runs on one grid axis: (tile, batch*head) pairs are folded onto axis 0 (up to
2**31 - 1 programs) with the tile index fastest, and `_tile_and_head` decodes them. CUDA caps
axes 1 and 2 at 65,535, which B*H alone passes at B = 4096, H = 16 (see kernels/_grid.py).

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
would make fp32 mean ~fp16 accuracy).

Configurations
--------------
Block sizes, warps and stages are data: attention_configs.json beside this file, one entry per
configuration key (kernels/configs.py: arch, dtype, padded head dim, feature flags, Sq/Sk
power-of-two buckets), so a feature that needs more registers (dropout, ALiBi, ...) gets its
own non-spilling entry. The entries are FA2-style defaults checked by compiling for sm_90a and
sm_80 without a GPU (scripts/static_table.py: registers, spills, shared memory, wgmma), NOT
timed on hardware. `keep(config)` drops configs that cannot fit (shared memory estimate over
the arch's limit, fp32 accumulators that would spill registers, dot tiles under 16). With
GPTFAST_AUTOTUNE=1 (on a GPU), the kernels are wrapped in triton.autotune over the kept
candidate configs instead, one tuning per configuration key. Under TRITON_INTERPRET=1 small
blocks are used for speed; the kernel code path is the same.
"""
from __future__ import annotations

import collections
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._grid import checked_grid
from ._interpreter import ensure_bf16
from . import configs

HEAD_DIMS_FWD = (32, 64, 96, 128, 256)
# d=256 backward runs (and passes the interpreter tests) with the small blocks of the table;
# it is not yet verified on hardware.
HEAD_DIMS_BWD = (32, 64, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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

    The one RNG formula used by the forward, both backward kernels and the mask kernel."""
    counter = (bh.to(tl.int64) * Sq + rows.to(tl.int64)) * Sk + cols.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _tile_and_head(n_rows, BLOCK: tl.constexpr):
    """(tile, batch*head) of this program in a grid of cdiv(n_rows, BLOCK) * B*H programs on
    axis 0 (see `tiles_x_heads_grid`): the tile index runs fastest, so programs sharing one
    head's K/V run together, as they did with (tiles, B*H) on two axes."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_rows, BLOCK)
    return pid % n_tiles, pid // n_tiles


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


# ============================================================================================
# Forward
# ============================================================================================


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, KPM, stride_kpmn,
                    seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale,
                    dropout_p, drop_scale, tile_lo, tile_hi,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offset = Sk - Sq
    d_mask = offs_d < HEAD_DIM
    for start_n in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < Sk
        # K is loaded transposed (BLOCK_D, BLOCK_N) straight from memory: no tl.trans needed.
        if MASKED:
            kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=n_in[None, :] & d_mask[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=n_in[:, None] & d_mask[None, :], other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=d_mask[:, None], other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=d_mask[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # base-2 units
        if HAS_ALIBI:
            dist = tl.abs(offs_m[:, None] + offset - offs_n[None, :]).to(tl.float32)
            s = s - slope2 * dist
        if MASKED:
            visible = n_in[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + offset)
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > offs_m[:, None] + offset - window)
            s = tl.where(visible, s, float("-inf"))
        if HAS_KPM:
            real = tl.load(KPM + offs_n * stride_kpmn, mask=n_in, other=0)
            s = tl.where(real[None, :] != 0, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) = NaN never happens (its p and alpha are then exactly 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
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
              H, GROUP, Sq, Sk, window, softmax_scale, dropout_p, drop_scale,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m, bh = _tile_and_head(Sq, BLOCK_M)
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

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Sq
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_in[:, None] & d_mask[None, :], other=0.0)

    qk_scale = softmax_scale * 1.4426950408889634  # fold log2(e): exp -> exp2
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
    if HAS_WINDOW:  # lower window edge (only a window has one)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
            seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
            t_lo, full_lo, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
            HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(  # interior: no mask math
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
        full_lo, full_hi, False, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
        HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(  # diagonal and Sk edge
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
        full_hi, t_hi, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
        HEAD_DIM, BLOCK_N, DOT_PRECISION)

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
def _attn_bwd_preprocess(OUT, DO, DLSE, DELTA,
                         stride_oz, stride_oh, stride_om,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         H, Sq,
                         HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse, fp32, stored (B*H, Sq) contiguous (as are DLSE/lse)."""
    pid_m, bh = _tile_and_head(Sq, BLOCK_M)
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


@triton.jit
def _attn_bwd_kv_inner(dk, dv, k, v, key_real, Qh, DOh, LSEh, DELTAh, DQh,
                       stride_qm, stride_dom, stride_dok, stride_dqm,
                       seed, bh, slope2, offs_n, offs_d, Sq, Sk, window, qk_scale, softmax_scale,
                       dropout_p, drop_scale, tile_lo, tile_hi,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       ATOMIC_DQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Walk query tiles [tile_lo, tile_hi) for one key tile and one query head.

    Works on transposed (key, query) tiles so P^T and dS^T feed the dK/dV dots directly."""
    offset = Sk - Sq
    d_mask = offs_d < HEAD_DIM
    for start_m in range(tile_lo * BLOCK_M, tile_hi * BLOCK_M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < Sq
        if MASKED:
            qT = tl.load(Qh + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=m_in[None, :] & d_mask[:, None], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok,
                         mask=m_in[:, None] & d_mask[None, :], other=0.0)
        else:
            qT = tl.load(Qh + offs_m[None, :] * stride_qm + offs_d[:, None],
                         mask=d_mask[:, None], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok,
                         mask=d_mask[None, :], other=0.0)
        lse = tl.load(LSEh + offs_m, mask=m_in, other=0.0)
        # A dead row (lse = -inf) must get p = 0: use +inf so exp2(s - lse) = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTAh + offs_m, mask=m_in, other=0.0)

        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_ALIBI:
            dist = tl.abs(offs_m[None, :] + offset - offs_n[:, None]).to(tl.float32)
            sT = sT - slope2 * dist
        pT = tl.exp2(sT - lse2[None, :])
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

        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        if HAS_DROPOUT:
            keepT = _dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], Sq, Sk, dropout_p)
            pdT = tl.where(keepT, pT * drop_scale, 0.0)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        ds_lo = dsT.to(qT.dtype)
        dk = tl.dot(ds_lo, tl.trans(qT), dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_lo), k, input_precision=DOT_PRECISION) * softmax_scale
            tl.atomic_add(DQh + offs_m[:, None] * stride_dqm + offs_d[None, :], dq,
                          mask=m_in[:, None] & d_mask[None, :])
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, SLOPES, KPM, SEED,
                   stride_qz, stride_qh, stride_qm,
                   stride_kz, stride_kh, stride_kn,
                   stride_vz, stride_vh, stride_vn,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn,
                   stride_dvz, stride_dvh, stride_dvn,
                   stride_dqz, stride_dqh, stride_dqm,
                   stride_kpmz, stride_kpmn,
                   H, HKV, GROUP, Sq, Sk, window, softmax_scale, dropout_p, drop_scale,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program per (key tile, batch*kv_head). LSE/DELTA are (B*H, Sq) contiguous fp32."""
    pid_n, bhk = _tile_and_head(Sk, BLOCK_N)
    b = bhk // HKV
    hk = bhk % HKV
    offset = Sk - Sq
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < Sk
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_in[:, None] & d_mask[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kz + hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vz + hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    key_real = n_in
    if HAS_KPM:  # this program's keys are fixed: load their padding bits once
        key_real = tl.load(KPM + b.to(tl.int64) * stride_kpmz + offs_n * stride_kpmn,
                           mask=n_in, other=0) != 0
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    qk_scale = softmax_scale * 1.4426950408889634

    # Query tiles that can see any key of this tile: causal needs i >= j - offset, the window
    # needs i < j - offset + window. Clamp at 0 before dividing (truncating division).
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

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):  # the GQA group's query heads: dK/dV summed here, no atomics
        h = hk * GROUP + g
        bh = b * H + h
        q_h = Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
        do_h = DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
        dq_h = DQ + b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh
        lse_h = LSE + bh.to(tl.int64) * Sq
        delta_h = DELTA + bh.to(tl.int64) * Sq
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, key_real, q_h, do_h, lse_h, delta_h, dq_h,
            stride_qm, stride_dom, stride_dok, stride_dqm, seed, bh, slope2, offs_n, offs_d,
            Sq, Sk, window, qk_scale, softmax_scale, dropout_p, drop_scale, t_lo, full_lo,
            True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT, ATOMIC_DQ,
            HEAD_DIM, BLOCK_M, DOT_PRECISION)
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, key_real, q_h, do_h, lse_h, delta_h, dq_h,
            stride_qm, stride_dom, stride_dok, stride_dqm, seed, bh, slope2, offs_n, offs_d,
            Sq, Sk, window, qk_scale, softmax_scale, dropout_p, drop_scale, full_lo, full_hi,
            False, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT, ATOMIC_DQ,
            HEAD_DIM, BLOCK_M, DOT_PRECISION)
        dk, dv = _attn_bwd_kv_inner(
            dk, dv, k, v, key_real, q_h, do_h, lse_h, delta_h, dq_h,
            stride_qm, stride_dom, stride_dok, stride_dqm, seed, bh, slope2, offs_n, offs_d,
            Sq, Sk, window, qk_scale, softmax_scale, dropout_p, drop_scale, full_hi, t_hi,
            True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT, ATOMIC_DQ,
            HEAD_DIM, BLOCK_M, DOT_PRECISION)

    dk = dk * softmax_scale  # d s / d k = scale * q
    tl.store(DK + b.to(tl.int64) * stride_dkz + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvz + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, KPM, stride_kpmn,
                       seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale,
                       dropout_p, drop_scale, tile_lo, tile_hi,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offset = Sk - Sq
    d_mask = offs_d < HEAD_DIM
    for start_n in range(tile_lo * BLOCK_N, tile_hi * BLOCK_N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < Sk
        if MASKED:
            kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=n_in[None, :] & d_mask[:, None], other=0.0)
            vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None],
                         mask=n_in[None, :] & d_mask[:, None], other=0.0)
        else:
            kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=d_mask[:, None], other=0.0)
            vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None],
                         mask=d_mask[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(offs_m[:, None] + offset - offs_n[None, :]).to(tl.float32)
            s = s - slope2 * dist
        p = tl.exp2(s - lse2[:, None])
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
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SLOPES, KPM, SEED,
                 stride_qz, stride_qh, stride_qm,
                 stride_kz, stride_kh, stride_kn,
                 stride_vz, stride_vh, stride_vn,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm,
                 stride_kpmz, stride_kpmn,
                 H, GROUP, Sq, Sk, window, softmax_scale, dropout_p, drop_scale,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Deterministic dQ: one program per (query tile, batch*head), plain stores."""
    pid_m, bh = _tile_and_head(Sq, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Sq
    qd_mask = m_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qz + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_doz + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=m_in, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=m_in, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kz + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vz + hk.to(tl.int64) * stride_vh
    kpm_base = KPM + b.to(tl.int64) * stride_kpmz
    qk_scale = softmax_scale * 1.4426950408889634
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
            dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
            seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
            t_lo, full_lo, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
            HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
        full_lo, full_hi, False, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
        HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpmn,
        seed, bh, slope2, offs_m, offs_d, Sq, Sk, window, qk_scale, dropout_p, drop_scale,
        full_hi, t_hi, True, IS_CAUSAL, HAS_WINDOW, HAS_ALIBI, HAS_KPM, HAS_DROPOUT,
        HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqz + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


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
# power-of-two Sq/Sk buckets). Kinds: "fwd" (BLOCK_M query x BLOCK_N key tile), "bwd_kv"
# (BLOCK_M query tiles streamed past a BLOCK_N key tile), "bwd_q" (the deterministic dQ
# kernel: BLOCK_M owned queries, BLOCK_N streamed keys), "bwd_pre" (delta rows per program).
_FEATURES = {"IS_CAUSAL": "causal", "HAS_WINDOW": "window", "HAS_ALIBI": "alibi",
             "HAS_KPM": "kpm", "HAS_DROPOUT": "dropout"}


class Config(NamedTuple):
    """A candidate of the autotuner (the tables hold the same four numbers)."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# Candidates tried by GPTFAST_AUTOTUNE=1 (filtered by keep()).
_CANDIDATES = [Config(bm, bn, w, s) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128)
               for w in (4, 8) for s in (1, 2, 3)]


def _smem_limit(capability: Tuple[int, int]) -> int:
    return configs.shared_memory_limit(configs.arch_name(capability))


def keep(config, kind: str, head_dim: int, elt_bytes: int,
         capability: Tuple[int, int] = (9, 0)) -> bool:
    """False for configs known to be invalid or slow: dot tiles under 16, a shared-memory
    estimate over the arch's limit, or fp32 tiles that would spill registers (persistent
    accumulators > 128 registers a thread, or with the transient score tiles > 192).
    `config`: anything with BLOCK_M, BLOCK_N, num_warps, num_stages attributes."""
    bm, bn, warps, stages = config.BLOCK_M, config.BLOCK_N, config.num_warps, config.num_stages
    if bm < 16 or bn < 16 or warps not in (1, 2, 4, 8, 16) or stages < 1:
        return False
    d = _block_d(head_dim)
    threads = 32 * warps
    if kind == "fwd":
        # Streamed K and V tiles per pipeline stage + the resident Q tile.
        smem = stages * 2 * bn * d * elt_bytes + bm * d * elt_bytes
        persistent = bm * d  # O accumulator
        transient = bm * bn  # S / P tile
    elif kind == "bwd_kv":
        # Streamed Q and dO tiles per stage + resident K, V + the dS^T tile.
        smem = stages * 2 * bm * d * elt_bytes + 2 * bn * d * elt_bytes + bm * bn * elt_bytes
        persistent = 2 * bn * d  # dK, dV
        transient = 2 * bm * bn  # S^T, dP^T
    elif kind == "bwd_q":
        # Streamed K and V tiles per stage + resident Q, dO + the dS tile.
        smem = stages * 2 * bn * d * elt_bytes + 2 * bm * d * elt_bytes + bm * bn * elt_bytes
        persistent = bm * d  # dQ
        transient = 2 * bm * bn  # S, dP
    else:
        raise ValueError(kind)
    return (smem <= _smem_limit(capability) and persistent / threads <= 128
            and (persistent + transient) / threads <= 192)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _interpreting() -> bool:
    return configs.interpreting()


def _features(flags: dict, **more: bool) -> Tuple[str, ...]:
    """Names of the optional features that are on: the kernels' flags plus `more`."""
    return tuple(name for flag, name in _FEATURES.items() if flags[flag]) + \
        tuple(name for name, on in more.items() if on)


def get_config(kind: str, device: torch.device, dtype: torch.dtype, head_dim: Optional[int],
               features: Tuple[str, ...] = (), lengths: Tuple[int, ...] = ()) -> configs.KernelConfig:
    """The config a launch uses: the table's entry for its key on the GPU it runs on, or the
    small interpreter config. lengths: (Sq, Sk) for fwd/bwd_kv/bwd_q, () for bwd_pre."""
    table = configs.load("attention")
    target = configs.launch_target(device)
    if target is None:
        return table.interpreter[kind]
    return table.lookup(table.key(kind, target, dtype, head_dim, features, lengths))


def _autotune_enabled(device: torch.device) -> bool:
    return os.environ.get("GPTFAST_AUTOTUNE", "0") == "1" and device.type == "cuda" and not _interpreting()


_AUTOTUNED: dict = {}  # (kernel name, ConfigKey, reset_to_zero) -> triton.autotune wrapper


def _autotuned(kernel, kind: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               features: Tuple[str, ...], lengths: Tuple[int, int], reset_to_zero=None):
    """triton.autotune over the kept candidates, one tuner per configuration key: a launch
    tunes once per (arch, dtype, head dim, features, Sq/Sk power-of-two bucket), the key the
    committed table uses (autotuned_entries() turns the results into table entries)."""
    table = configs.load("attention")
    target = configs.launch_target(device)
    key = table.key(kind, target, dtype, head_dim, features, lengths)
    cache_key = (kernel.__name__, key, tuple(reset_to_zero or ()))
    if cache_key not in _AUTOTUNED:
        elt = torch.empty((), dtype=dtype).element_size()
        candidates = [triton.Config({"BLOCK_M": c.BLOCK_M, "BLOCK_N": c.BLOCK_N},
                                    num_warps=c.num_warps, num_stages=c.num_stages)
                      for c in _CANDIDATES if keep(c, kind, head_dim, elt, target.capability)]
        # key=[]: the tuner is already per configuration key, so it tunes on its first launch
        # and never again (Triton would otherwise re-tune for every new value of a key arg).
        _AUTOTUNED[cache_key] = triton.autotune(configs=candidates, key=[],
                                                reset_to_zero=reset_to_zero)(kernel)
    return _AUTOTUNED[cache_key]


def autotuned_entries(why: str) -> list:
    """attention_configs.json entries for every key tuned in this process (GPTFAST_AUTOTUNE=1)."""
    table = configs.load("attention")
    out = []
    for (_, key, _), tuner in _AUTOTUNED.items():
        for best in tuner.cache.values():
            out.append(configs.entry_for(key, table, dict(best.kwargs, num_warps=best.num_warps,
                                                          num_stages=best.num_stages), why))
    return out


# ============================================================================================
# Launch grids (pure functions: the tests check them at shapes too large to run here)
# ============================================================================================


def tiles_x_heads_grid(n_rows: int, block: int, n_heads: int) -> Tuple[int]:
    """Grid of the forward, backward and preprocess kernels: cdiv(n_rows, block) row tiles
    times n_heads (batch * heads) programs, folded onto axis 0 (decoded by `_tile_and_head`).
    B * H alone can exceed the 65,535 that CUDA allows on axes 1 and 2."""
    return checked_grid(triton.cdiv(n_rows, block) * n_heads)


def dropout_mask_grid(Sq: int, Sk: int, block_m: int, block_n: int, n_heads: int) -> Tuple[int]:
    """Grid of `_dropout_mask_kernel`: (query tiles, key tiles, batch * heads) on axis 0."""
    return checked_grid(triton.cdiv(Sq, block_m) * triton.cdiv(Sk, block_n) * n_heads)


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


class _Extras(NamedTuple):
    slopes: Tensor
    kpm: Tensor
    stride_kpmz: int
    stride_kpmn: int
    seed: Tensor
    window: int
    drop_scale: float


def head_span(t: Tensor) -> int:
    """Elements spanned by one (batch, head) slice of a (B, H, S, d) tensor. The kernels use
    64-bit offsets for batch and head but 32-bit ones inside a slice (cheaper address math)."""
    return (t.shape[2] - 1) * t.stride(2) + t.shape[3]


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, alibi_slopes, window,
           key_padding_mask, dropout_p, seed) -> _Extras:
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, S, d)"
    B, Hq, Sq, d = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == d, (q.shape, k.shape, v.shape)
    Hkv = k.shape[1]
    assert Hkv >= 1 and Hq % Hkv == 0, f"Hq={Hq} must be a multiple of Hkv={Hkv}"
    assert q.dtype == k.dtype == v.dtype and q.dtype in DTYPES, (q.dtype, k.dtype, v.dtype)
    assert q.device == k.device == v.device
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, \
        "the last dim of q, k, v must be contiguous"
    assert d in HEAD_DIMS_FWD, f"head dim {d} not supported (supported: {HEAD_DIMS_FWD})"
    assert max(head_span(t) for t in (q, k, v)) < 2**31, \
        "row offsets within one (batch, head) slice must fit in 32 bits"
    if window is not None:
        assert causal, "window is only supported together with causal=True"
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
    return _Extras(slopes, kpm, s_kz, s_kn, seed_t, int(window) if window is not None else 0, drop_scale)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                      alibi_slopes: Optional[Tensor] = None, window: Optional[int] = None,
                      key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                      seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Returns out (B, Hq, Sq, d) in q.dtype and lse (B, Hq, Sq) fp32 (natural log; -inf for
    rows that see no key, whose out is 0). See the module docstring for the semantics."""
    LAUNCHES["attention_fwd"] += 1
    ex = _check(q, k, v, causal, alibi_slopes, window, key_padding_mask, dropout_p, seed)
    ensure_bf16(q)
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = _alloc((B, Hq, Sq, d), q.dtype, q.device)
    lse = _alloc((B, Hq, Sq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    args = (q, k, v, out, lse, ex.slopes, ex.kpm, ex.seed,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            ex.stride_kpmz, ex.stride_kpmn,
            Hq, Hq // Hkv, Sq, Sk, ex.window, float(softmax_scale), float(dropout_p), ex.drop_scale)
    flags = dict(IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                 HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None,
                 HAS_DROPOUT=dropout_p > 0.0, HEAD_DIM=d, BLOCK_D=_block_d(d),
                 DOT_PRECISION=_dot_precision(q.dtype))
    features = _features(flags)
    if _autotune_enabled(q.device):
        kernel = _autotuned(_attn_fwd, "fwd", q.device, q.dtype, d, features, (Sq, Sk))
        kernel[lambda meta: tiles_x_heads_grid(Sq, meta["BLOCK_M"], B * Hq)](*args, **flags)
    else:
        cfg = get_config("fwd", q.device, q.dtype, d, features, (Sq, Sk))
        _attn_fwd[tiles_x_heads_grid(Sq, cfg.BLOCK_M, B * Hq)](
            *args, **flags, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                       causal: bool, softmax_scale: float, alibi_slopes: Optional[Tensor] = None,
                       window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                       dlse: Optional[Tensor] = None,
                       deterministic: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (shapes/dtypes of q, k, v; dk/dv summed over each GQA group).

    `do` may have any strides (stride 0 included). deterministic=True: no atomics (separate
    dQ kernel), bitwise reproducible. Default: dQ accumulated with fp32 atomics."""
    LAUNCHES["attention_bwd"] += 1
    ex = _check(q, k, v, causal, alibi_slopes, window, key_padding_mask, dropout_p, seed)
    ensure_bf16(q, do, out)
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    assert d in HEAD_DIMS_BWD, f"head dim {d} not supported in backward ({HEAD_DIMS_BWD})"
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
    pre = get_config("bwd_pre", q.device, q.dtype, None, ("dlse",) if has_dlse else ())
    pre_m = pre.BLOCK_M
    _attn_bwd_preprocess[tiles_x_heads_grid(Sq, pre_m, B * Hq)](
        out, do, dlse_t, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), do.stride(3),
        Hq, Sq, HAS_DLSE=has_dlse, HEAD_DIM=d, BLOCK_D=BLOCK_D, **pre.kwargs())

    if deterministic:
        dq = _alloc(q.shape, q.dtype, q.device)
        dq_acc = dq  # unused by the dK/dV kernel (ATOMIC_DQ=False)
    else:
        # fp32 accumulation buffer for the atomics (must start at zero), cast at the end.
        dq_acc = torch.zeros((B, Hq, Sq, d), dtype=torch.float32, device=q.device)
    common = (ex.slopes, ex.kpm, ex.seed)
    flags = dict(IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                 HAS_ALIBI=alibi_slopes is not None, HAS_KPM=key_padding_mask is not None,
                 HAS_DROPOUT=dropout_p > 0.0, HEAD_DIM=d, BLOCK_D=BLOCK_D,
                 DOT_PRECISION=_dot_precision(q.dtype))
    tail = (Sq, Sk, ex.window, float(softmax_scale), float(dropout_p), ex.drop_scale)
    kv_args = (q, k, v, do, lse, delta, dk, dv, dq_acc, *common,
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2), do.stride(3),
               dk.stride(0), dk.stride(1), dk.stride(2),
               dv.stride(0), dv.stride(1), dv.stride(2),
               dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
               ex.stride_kpmz, ex.stride_kpmn,
               Hq, Hkv, Hq // Hkv, *tail)
    features = _features(flags)
    # The dK/dV kernel loops over a GQA group (GROUP > 1), which costs registers: own key.
    kv_features = _features(flags, deterministic=deterministic, gqa=Hq != Hkv)
    autotune = _autotune_enabled(q.device)
    if autotune:
        kernel = _autotuned(_attn_bwd_dkdv, "bwd_kv", q.device, q.dtype, d, kv_features, (Sq, Sk),
                            reset_to_zero=None if deterministic else ["DQ"])
        kernel[lambda meta: tiles_x_heads_grid(Sk, meta["BLOCK_N"], B * Hkv)](
            *kv_args, **flags, ATOMIC_DQ=not deterministic)
    else:
        cfg = get_config("bwd_kv", q.device, q.dtype, d, kv_features, (Sq, Sk))
        _attn_bwd_dkdv[tiles_x_heads_grid(Sk, cfg.BLOCK_N, B * Hkv)](
            *kv_args, **flags, ATOMIC_DQ=not deterministic, BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv

    q_args = (q, k, v, do, lse, delta, dq, *common,
              q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              do.stride(0), do.stride(1), do.stride(2), do.stride(3),
              dq.stride(0), dq.stride(1), dq.stride(2),
              ex.stride_kpmz, ex.stride_kpmn,
              Hq, Hq // Hkv, *tail)
    if autotune:
        kernel = _autotuned(_attn_bwd_dq, "bwd_q", q.device, q.dtype, d, features, (Sq, Sk))
        kernel[lambda meta: tiles_x_heads_grid(Sq, meta["BLOCK_M"], B * Hq)](*q_args, **flags)
    else:
        cfg = get_config("bwd_q", q.device, q.dtype, d, features, (Sq, Sk))
        _attn_bwd_dq[tiles_x_heads_grid(Sq, cfg.BLOCK_M, B * Hq)](
            *q_args, **flags, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


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
