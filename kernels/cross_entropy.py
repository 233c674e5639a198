"""Triton kernels for cross-entropy on logits and for fused linear + cross-entropy.

No autograd lives here: `gptfast/ops/` wraps these launchers into custom ops.

Semantics (per row n; x = logits, all math in fp32 whatever the storage dtype)
------------------------------------------------------------------------------
    softcap c:        x <- c * tanh(x / c)                        (before anything else)
    lse              = logsumexp_j x_j
    loss_row         = (1 - eps) * (lse - x_y) + eps * (lse - mean_j x_j) + z * lse^2
    dloss/dx (row)   = g * [(1 - eps)(p - onehot_y) + eps (p - 1/V) + 2 z lse p] + g_lse * p
                     = p * (g (1 + 2 z lse) + g_lse) - g (1 - eps) onehot_y - g eps / V
    (then multiplied by 1 - tanh^2 when softcapped)
    target == ignore_index : loss 0, lse 0 (not computed), no gradient from the loss or the
                             lse; the lean kernels skip those rows entirely (no GEMM work).
    target outside [0, V)  : loss NaN and gradient row NaN (masked loads, never an OOB read).
No launcher syncs with the host: the number of valid rows lives on the device and kernels
read it (dead row tiles run a zero-trip loop).

Fused linear cross-entropy: two schedules  (N tokens, D hidden, V vocab, b = bytes/elem)
-------------------------------------------------------------------------------------
Their memory is planned before anything is allocated (cross_entropy_plan.py, which also
says what `gptfast.linear_cross_entropy_memory` counts); the launchers size every buffer from
that plan.
lean (memory_budget None or <= LEAN_MAX_BUDGET = 64 MiB; the default)
    forward : one kernel, grid (row tiles, vocab splits), row tile fastest so that the
              programs running together read the same weight tiles. Each program computes
              logit tiles H[rows] @ W[vtile].T on chip (tl.dot over D, fp32 accumulator), keeps
              an online max / sum-exp / target-logit / sum-of-logits per row, and writes 4 fp32
              partials per (row, split); a tiny kernel combines the splits into loss and lse.
              The split count fills whole waves (plan.forward_splits). FLOPs 2NDV.
    backward: per chunk of <= 32 MiB of fp32 dH rows, one kernel over (row tiles x vocab
              tiles) in grouped order: GROUP_N row tiles sweep the vocabulary together, so
              their H rows and fp32 dH rows stay in L2 while the weight tiles stream past.
              Each program recomputes its logit tile (2NDV in all), forms the fp32 gradient
              tile G in registers, casts it to the input dtype for the tensor cores (fp32
              accumulation), and for each BLOCK_DB (64) columns of D adds G @ W[vtile] into the
              fp32 dH chunk (fp32 atomics) and G^T @ H[rows] into dW (4NDV):
                DW_ACCUM 1 (atomic): 16-bit atomic adds straight into the 16-bit gradient
                          (one rounding per add; 8-wide `atom.add.noftz.v8.bf16` on sm_90),
                DW_ACCUM 2 (lock):   a lock per (vocab tile, D block) and a read-modify-write
                          (fp32 add, one rounding per add) - for GPUs without 16-bit atomics
                          (bf16 atomics need sm_90; on sm_80 Triton emits a CAS loop),
                DW_ACCUM 3 (fp32):   fp32 atomics into a full-size fp32 buffer (V·D·4 bytes
                          more: not lean; for the accumulation microbenchmark).
              fp32 inputs accumulate straight into both fp32 gradients. After each chunk a
              small kernel rounds the fp32 dH rows into the gradient. Extra memory: 32 MiB,
              whatever the shape. FLOPs 6NDV backward, 8NDV forward + backward. Atomic traffic
              ~ N V D (4 / BLOCK_V + b / BLOCK_N) bytes to L2. The order of the atomic adds
              makes dH / dW non-deterministic in the last bits. Optional gradient filtering
              (filter_eps): a tile whose every |G| < filter_eps x (|g| + |g_lse|) of its row
              skips its back-products (no dW/dH work or atomics for it).
budgeted (memory_budget > LEAN_MAX_BUDGET, reduction "sum" / "mean")
    Token chunks of C rows, C and the accumulators sized from the whole budget
    (plan.budgeted_layout); cuBLAS for all three products:
        logits_c (input dtype) = H_c @ W^T (+ bias)        torch.mm / addmm      2CDV
        loss, lse, G_c          = ONE fused row kernel: online pass, then the gradient written
                                  over the logits in place (uniform upstream gradient)
        dH_c                    = G_c @ W                   torch.mm into dH      2CDV
        dW                     += G_c^T @ H_c               addmm into an fp32 accumulator
                                  (out_dtype=float32) when it fits half the budget, else
                                  addmm_ into the 16-bit gradient (one rounding per chunk)
        db32                   += sum_rows G_c
    FLOPs 6NDV in total (no recompute). Bytes per chunk ~ C V b (1 write + 2 reads + 1 write
    by the row kernel, 2 reads by the GEMMs). The gradient is for an upstream gradient that
    is uniform over rows (1 for "sum", 1/n_valid for "mean", n_valid counted on the device)
    and no lse gradient; the caller scales by the scalar upstream gradient, in place.
    Ignored rows do cost GEMM work here (skipping them would need their count on the host);
    their G rows are zero. Reduction "none" returns grads=None from the lean forward:
    per-row upstream gradients are only known later, so the lean backward recomputes.

Offsets: every row / vocab index is cast to int64 before it is multiplied by a stride, so
N*V, V*D and N*D beyond 2**31 are fine.

Precision notes: the lean kernels compute logits, lse and losses in fp32; the gradient tile G
is rounded to the input dtype only as a tensor-core operand (as any cuBLAS-based fused CE
does; with fp16 inputs, probabilities below ~6e-8 flush to zero there); dH accumulates in
fp32; dW accumulates in fp32 within a tile (BLOCK_N rows) and then, for 16-bit inputs, in the
gradient's own dtype: N / BLOCK_N roundings per element (64 at N = 8192, BLOCK_N = 128), a
bounded cost measured by tests/test_kernel_cross_entropy.py::test_lean_dw_accumulation_depth.
The budgeted schedule computes 16-bit logits (as PyTorch's own bf16 matmul does), the loss and
lse from them in fp32. A target outside [0, V) makes its row's gradient NaN, which also
reaches every dW row the row touches (its loss is NaN anyway).

Block sizes: data in cross_entropy_configs.json (kernels/configs.py: kind, arch, dtype,
feature flags, row bucket). The sm_90 entries are reasoned defaults checked by compiling for
sm_90a without a GPU (scripts/static_table.py: registers, spills, shared memory, wgmma), NOT
tuned on hardware. Under TRITON_INTERPRET=1 small blocks keep the CPU tests fast; the kernels
themselves are identical.
"""
import collections

import torch
import triton
import triton.language as tl

from ._grid import checked_grid
from ._interpreter import ensure_bf16
from . import configs
from . import cross_entropy_plan as plan
from .cross_entropy_plan import DW_ATOMIC, DW_FP32, DW_LOCK, DW_MODES, LEAN_MAX_BUDGET

__all__ = [
    "cross_entropy_forward",
    "cross_entropy_backward",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_backward",
    "LAUNCHES",
    "POISON_OUTPUTS",
    "LEAN_MAX_BUDGET",
]

# Incremented once per public launcher call; tests use it to prove which path ran.
LAUNCHES = collections.Counter()

# Debug: fill freshly allocated outputs with NaN so any element a kernel forgets to write
# shows up. Accumulators that must start at zero are never poisoned.
POISON_OUTPUTS = False


# --------------------------------------------------------------------------------------
# Block configuration
# --------------------------------------------------------------------------------------
# The committed block sizes are data: cross_entropy_configs.json beside this file, keyed and
# matched as kernels/configs.py describes (kind, arch, dtype, feature flags, a power-of-two
# bucket of the rows for the lean kernels). Kinds: ce_fwd / ce_bwd / ce_fused (row kernels:
# one program per row, BLOCK_V elements per step), lce_fwd / lce_bwd / lce_dh_store (lean
# fused kernels).
def _config(kind, device, dtype, features=(), lengths=()):
    """A fresh dict of the constexpr blocks and launch options a launch uses: the table's entry
    for its key on the GPU it runs on, or the small interpreter config."""
    table = configs.load("cross_entropy")
    target = configs.launch_target(device)
    if target is None:
        return table.interpreter[kind].kwargs()
    return table.lookup(table.key(kind, target, dtype, None, features, lengths)).kwargs()


def _on(**features):
    """The names of the features that are on."""
    return tuple(name for name, on in features.items() if on)


def _row_config(kind, logits, **features):
    """(launch options, BLOCK_V) of a row kernel over (n, v) logits: the entry's vocabulary
    block, never wider than the row."""
    cfg = _config(kind, logits.device, logits.dtype, _on(**features))
    return cfg, min(cfg.pop("BLOCK_V"), triton.next_power_of_2(logits.shape[1]))


def _num_sms(device):
    target = configs.launch_target(device)
    return target.num_sms if target is not None else 4


def _dot_precision(dtype):
    # "ieee" keeps fp32 inputs exact (Triton's default for fp32 would be TF32); the
    # setting has no effect on 16-bit operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _check_options(label_smoothing, z_loss, softcap):
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # tanh through exp of a non-positive argument: no overflow for any |u|, and the same
    # code on every backend (no libdevice dependency).
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss, ignore_index,
              HAS_SMOOTHING: tl.constexpr):
    """loss_row and the lse to store, from the row statistics (scalars or vectors)."""
    loss = lse - x_target
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    loss += z_loss * lse * lse
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    lse = tl.where(ignored, 0.0, lse)
    return loss, lse


@triton.jit
def _grad_tile(x_raw, cols, target, lse, g, g_lse, V, label_smoothing, z_loss, softcap,
               HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr):
    """d loss / d x_raw for a tile. x_raw is (R, C) or (C,) fp32; the per-row values
    target, lse, g, g_lse are already broadcast to x_raw's rank by the caller."""
    if HAS_SOFTCAP:
        t = _tanh(x_raw / softcap)
        x = softcap * t
    else:
        x = x_raw
    p = tl.exp(x - lse)
    # g (1 + 2 z lse) multiplies p: (1-eps) p + eps p + 2 z lse p, all weighted by g.
    coef = g * (1.0 + 2.0 * z_loss * lse)
    if HAS_GLSE:
        coef += g_lse
    # p * coef - g(1-eps) at the target: both terms in fp32, so p_y - 1 keeps its precision.
    dx = p * coef - tl.where(cols == target, g * (1.0 - label_smoothing), 0.0)
    dx -= g * (label_smoothing / V)
    if HAS_SOFTCAP:
        dx = dx * (1.0 - t * t)
    in_range = (target >= 0) & (target < V)
    return tl.where(in_range, dx, float("nan"))


# --------------------------------------------------------------------------------------
# Cross-entropy on materialized logits: one program per row
# --------------------------------------------------------------------------------------
@triton.jit
def _row_forward(x_row, target, ignored, V, ignore_index, label_smoothing, z_loss, softcap,
                 HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """(loss, lse) of one row of logits at x_row (any float dtype), one online pass."""
    in_range = (target >= 0) & (target < V)
    # Ignored rows run zero iterations: no logits are read for them.
    n_steps = tl.where(ignored, 0, tl.cdiv(V, BLOCK_V))
    m = float("-inf")  # running max
    s = 0.0            # running sum of exp(x - m)
    sum_x = 0.0        # for label smoothing
    for step in range(0, n_steps):
        cols = step * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # An ignored row ran no steps (s = 0): give it a finite lse before the loss formula.
    lse = tl.where(ignored, 0.0, m + tl.log(tl.where(ignored, 1.0, s)))

    # Gather the target logit directly; the mask keeps out-of-range targets from reading.
    x_target = tl.load(x_row + target, mask=in_range & (~ignored), other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * _tanh(x_target / softcap)
    return _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss, ignore_index,
                     HAS_SMOOTHING)


@triton.jit
def _row_gradient(x_row, dx_row, target, ignored, lse, g, g_lse, V, label_smoothing, z_loss,
                  softcap, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
                  BLOCK_V: tl.constexpr):
    """Writes d loss / d x of one row to dx_row (which may alias x_row: every element is
    loaded before it is stored, by the same program). Ignored rows get zeros."""
    g = tl.where(ignored, 0.0, g)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask & (~ignored), other=0.0).to(tl.float32)
        dx = _grad_tile(x, cols, target, lse, g, g_lse, V, label_smoothing, z_loss, softcap,
                        HAS_SOFTCAP, HAS_GLSE)
        dx = tl.where(ignored, 0.0, dx)
        tl.store(dx_row + cols, dx.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(
    LOGITS, TARGETS, LOSS, LSE,
    V, stride_xn, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    loss, lse = _row_forward(LOGITS + row * stride_xn, target, target == ignore_index, V,
                             ignore_index, label_smoothing, z_loss, softcap,
                             HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(
    LOGITS, TARGETS, LSE, GRAD_ROWS, GRAD_LSE, DLOGITS,
    V, stride_xn, stride_dn, stride_g, stride_gl,
    ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    g = tl.load(GRAD_ROWS + row * stride_g).to(tl.float32)
    g_lse = 0.0
    if HAS_GLSE:
        g_lse = tl.load(GRAD_LSE + row * stride_gl).to(tl.float32)
    _row_gradient(LOGITS + row * stride_xn, DLOGITS + row * stride_dn, target,
                  target == ignore_index, tl.load(LSE + row), g, g_lse, V, label_smoothing,
                  z_loss, softcap, HAS_SOFTCAP, HAS_GLSE, BLOCK_V)


@triton.jit
def _ce_fused_kernel(
    LOGITS, TARGETS, G_SCALE, LOSS, LSE,
    V, stride_xn, ignore_index, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The budgeted schedule's row kernel: loss and lse (one online pass), then the gradient
    for the uniform upstream gradient G_SCALE[0] written over the logits in place. The
    second pass re-reads the row (from L2 while the row is recent)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_xn
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    loss, lse = _row_forward(x_row, target, ignored, V, ignore_index, label_smoothing, z_loss,
                             softcap, HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    _row_gradient(x_row, x_row, target, ignored, lse, tl.load(G_SCALE), 0.0, V,
                  label_smoothing, z_loss, softcap, HAS_SOFTCAP, False, BLOCK_V)


def _ce_forward(logits, targets, loss, lse, ignore_index, label_smoothing, z_loss, softcap):
    """Launch the row forward kernel writing into loss / lse (views are fine)."""
    n, v = logits.shape
    if n == 0:
        return
    cfg, block_v = _row_config("ce_fwd", logits, softcap=softcap is not None,
                               smoothing=label_smoothing > 0)
    _ce_fwd_kernel[checked_grid(n)](
        logits, targets, loss, lse,
        v, logits.stride(0), ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_V=block_v, **cfg,
    )


def _ce_backward(grad_rows, grad_lse, logits, targets, lse, out, ignore_index,
                 label_smoothing, z_loss, softcap):
    n, v = logits.shape
    if n == 0:
        return
    has_glse = grad_lse is not None
    cfg, block_v = _row_config("ce_bwd", logits, softcap=softcap is not None, glse=has_glse)
    _ce_bwd_kernel[checked_grid(n)](
        logits, targets, lse, grad_rows, grad_lse if has_glse else lse, out,
        v, logits.stride(0), out.stride(0), grad_rows.stride(0),
        grad_lse.stride(0) if has_glse else 0,
        ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_GLSE=has_glse, BLOCK_V=block_v, **cfg,
    )


def _ce_fused(logits, targets, g_scale, loss, lse, ignore_index, label_smoothing, z_loss,
              softcap):
    """loss, lse into `loss` / `lse`, and the gradient (upstream g_scale[0] per row) written
    over `logits` (rows of any stride, the vocabulary contiguous)."""
    n, v = logits.shape
    if n == 0:
        return
    cfg, block_v = _row_config("ce_fused", logits, softcap=softcap is not None,
                               smoothing=label_smoothing > 0)
    _ce_fused_kernel[checked_grid(n)](
        logits, targets, g_scale, loss, lse,
        v, logits.stride(0), ignore_index, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_V=block_v, **cfg,
    )


def _check_logits(logits, targets):
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,), got {tuple(targets.shape)}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary (last) dimension")


def _rows_vector(t, n, name):
    """(N,) view of an upstream-gradient tensor; stride 0 (expanded) is kept as is."""
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t


def _upstream(grad_rows, grad_lse, n, device):
    """(grad_rows, grad_lse) as (N,) vectors, or None when neither carries a gradient.

    grad_rows None (only the returned lse is used in the loss) becomes a stride-0 zero vector,
    so the kernels need no variant for it; grad_lse None switches their lse term off."""
    if grad_rows is None and grad_lse is None:
        return None
    if grad_rows is None:
        grad_rows = torch.zeros((), dtype=torch.float32, device=device)
    grad_rows = _rows_vector(grad_rows, n, "grad_rows")
    if grad_lse is not None:
        grad_lse = _rows_vector(grad_lse, n, "grad_lse")
    return grad_rows, grad_lse


def cross_entropy_forward(logits, targets, *, ignore_index, label_smoothing, z_loss, softcap):
    """loss_rows (N,) fp32 and lse (N,) fp32 from logits (N, V) of any float dtype.

    The row stride is arbitrary; the vocabulary dimension must be contiguous. One online
    log-sum-exp pass per row."""
    LAUNCHES["ce_fwd"] += 1
    _check_logits(logits, targets)
    ensure_bf16(logits)
    targets = targets.contiguous()  # kernels index targets / lse with unit stride
    _check_options(label_smoothing, z_loss, softcap)
    n = logits.shape[0]
    loss = _new((n,), torch.float32, logits.device)
    lse = _new((n,), torch.float32, logits.device)
    _ce_forward(logits, targets, loss, lse, ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse


def cross_entropy_backward(grad_rows, grad_lse, logits, targets, lse, *, ignore_index,
                           label_smoothing, z_loss, softcap, inplace=False):
    """dlogits (N, V) in logits' dtype. inplace=True overwrites and returns `logits`.

    grad_rows: (N,) upstream gradient of loss_rows (stride 0 allowed), or None when only the
    lse gets a gradient; grad_lse: (N,) or None."""
    LAUNCHES["ce_bwd"] += 1
    _check_logits(logits, targets)
    ensure_bf16(logits, grad_rows, grad_lse)
    targets, lse = targets.contiguous(), lse.contiguous()
    _check_options(label_smoothing, z_loss, softcap)
    n = logits.shape[0]
    out = logits if inplace else _new(logits.shape, logits.dtype, logits.device)
    grads = _upstream(grad_rows, grad_lse, n, logits.device)
    if grads is None:
        return out.zero_()
    _ce_backward(*grads, logits, targets, lse, out, ignore_index,
                 label_smoothing, z_loss, softcap)
    return out


# --------------------------------------------------------------------------------------
# Fused linear cross-entropy, lean schedule
# --------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                 stride_hn, stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_V) tile of H[rows] @ W[cols].T (+ bias). rows, cols are int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        # W tile loaded as (BLOCK_D, BLOCK_V) so that the dot needs no transpose.
        w = tl.load(W + cols[None, :] * stride_wv + dd[:, None] * stride_wd,
                    mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_rows(ROW_ORDER, N_VALID, TARGETS, pid_n, BLOCK_N: tl.constexpr):
    """Rows of this row tile in the compacted order (valid rows first).

    Returns (alive, slots, rows int64, row_mask, targets): slots are the tile's positions in
    that order, rows the original row ids; alive is False when the whole tile lies past the
    valid rows, and then the caller's loops run zero times."""
    n_valid = tl.load(N_VALID)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = slots < n_valid
    rows = tl.load(ROW_ORDER + slots, mask=row_mask, other=0).to(tl.int64)
    target = tl.load(TARGETS + rows, mask=row_mask, other=0)
    alive = pid_n * BLOCK_N < n_valid
    return alive, slots, rows, row_mask, target


@triton.jit
def _lce_fwd_kernel(
    H, W, BIAS, TARGETS, ROW_ORDER, N_VALID,
    PART_MAX, PART_SUMEXP, PART_XT, PART_SUMX,  # (splits, N) fp32, indexed by original row
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, softcap, tiles_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    alive, _, rows, row_mask, target = _tile_rows(ROW_ORDER, N_VALID, TARGETS, pid_n,
                                                  BLOCK_N)

    first_tile = pid_s * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - first_tile)
    n_tiles = tl.where(alive, n_tiles, 0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, n_tiles):
        cols = ((first_tile + t) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < V
        x = _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(col_mask[None, :], x, float("-inf"))
        # A target outside [0, V) never matches a column: its loss is set to NaN later.
        x_target += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1)
        # Every split owns >= 1 tile with >= 1 real column, so m is finite after step 0.
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new

    part = pid_s.to(tl.int64) * N + rows
    store_mask = row_mask & alive
    tl.store(PART_MAX + part, m, mask=store_mask)
    tl.store(PART_SUMEXP + part, s, mask=store_mask)
    tl.store(PART_XT + part, x_target, mask=store_mask)
    tl.store(PART_SUMX + part, sum_x, mask=store_mask)


@triton.jit
def _lce_combine_kernel(
    PART_MAX, PART_SUMEXP, PART_XT, PART_SUMX, TARGETS, LOSS, LSE,
    N, V, n_splits, ignore_index, label_smoothing, z_loss,
    HAS_SMOOTHING: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    target = tl.load(TARGETS + rows, mask=mask, other=ignore_index)
    # Ignored rows have no partials (their tiles never ran): do not read them.
    live = mask & (target != ignore_index)
    # Split sp of a row lives at offset sp * N + row; advancing pointers by N keeps the
    # offset arithmetic in 64 bits.
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    part_max = PART_MAX + rows
    for _sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(part_max, mask=live, other=0.0))
        part_max += N
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK,), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK,), dtype=tl.float32)
    part_max = PART_MAX + rows
    part_sumexp = PART_SUMEXP + rows
    part_xt = PART_XT + rows
    part_sumx = PART_SUMX + rows
    for _sp in range(0, n_splits):
        m_sp = tl.load(part_max, mask=live, other=0.0)
        s += tl.load(part_sumexp, mask=live, other=0.0) * tl.exp(m_sp - m)
        x_target += tl.load(part_xt, mask=live, other=0.0)
        sum_x += tl.load(part_sumx, mask=live, other=0.0)
        part_max += N
        part_sumexp += N
        part_xt += N
        part_sumx += N
    # Rows without partials (ignored, or past N) get a finite placeholder; _row_loss zeroes
    # the ignored ones and the rest are not stored.
    lse = m + tl.log(tl.where(live, s, 1.0))
    loss, lse = _row_loss(lse, x_target, sum_x, target, V, label_smoothing, z_loss,
                          ignore_index, HAS_SMOOTHING)
    tl.store(LOSS + rows, loss, mask=mask)
    tl.store(LSE + rows, lse, mask=mask)


@triton.jit
def _add_dw(DW, LOCKS, cols, col_mask, dd, d_mask, dw, stride_dwv, lock_id,
            DW_LOCK: tl.constexpr):
    """dW[cols, dd] += dw (fp32 (BLOCK_V, BLOCK_DB)), in DW's dtype.

    Atomic (DW_LOCK False): the tile rounded to DW's dtype, then atomic adds (fp32: 4-wide;
    bf16/fp16 on sm_90: 8-wide; each add rounds the sum once). Lock: spin on one int32 per
    (vocabulary tile, D block), read the slice through L2 (.cg: another program on this SM
    may have cached an older copy in L1), add in fp32, round once, store, release."""
    ptrs = DW + cols[:, None] * stride_dwv + dd[None, :]
    mask = col_mask[:, None] & d_mask[None, :]
    if DW_LOCK:
        lock = LOCKS + lock_id
        while tl.atomic_cas(lock, 0, 1, sem="acquire") != 0:
            pass
        cur = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ptrs, (cur.to(tl.float32) + dw).to(DW.dtype.element_ty), mask=mask,
                 cache_modifier=".cg")
        tl.debug_barrier()  # every thread's store is issued before the release
        tl.atomic_xchg(lock, 0, sem="release")
    else:
        tl.atomic_add(ptrs, dw.to(DW.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _lce_bwd_kernel(
    H, W, BIAS, TARGETS, ROW_ORDER, N_VALID, LSE, GRAD_ROWS, GRAD_LSE,
    DH, DW, DB, LOCKS,  # DH: fp32, zeroed (the chunk's rows, or all N for fp32 inputs)
    V, D, first_tile, chunk_rows,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_g, stride_gl, stride_dhn, stride_dwv,
    label_smoothing, z_loss, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GLSE: tl.constexpr,
    HAS_FILTER: tl.constexpr, DH_BY_SLOT: tl.constexpr, DW_LOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DB: tl.constexpr, GROUP_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One grid axis (see lean_backward_grid), grouped: GROUP_N row tiles of the chunk, row
    # tile fastest, sweep the vocabulary tiles together.
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(chunk_rows, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(V, BLOCK_V)
    group = pid // per_group
    first = group * GROUP_N
    group_size = tl.minimum(row_tiles - first, GROUP_N)
    pid_n = first + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    alive, slots, rows, row_mask, target = _tile_rows(ROW_ORDER, N_VALID, TARGETS,
                                                      first_tile + pid_n, BLOCK_N)
    # fp32 dH rows: the chunk's own buffer (16-bit inputs) or the gradient (fp32 inputs).
    if DH_BY_SLOT:
        dh_rows = (slots - first_tile * BLOCK_N).to(tl.int64)
    else:
        dh_rows = rows
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(GRAD_ROWS + rows * stride_g, mask=row_mask, other=0.0).to(tl.float32)
    g_lse = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_GLSE:
        g_lse = tl.load(GRAD_LSE + rows * stride_gl, mask=row_mask, other=0.0).to(tl.float32)

    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]
    d_blocks = tl.cdiv(D, BLOCK_DB)

    # A dead row tile (all rows ignored) runs this loop zero times: no GEMM, no atomics.
    for _once in range(0, tl.where(alive, 1, 0)):
        x = _logits_tile(H, W, BIAS, rows, row_mask, cols, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
        grad = _grad_tile(x, cols[None, :], target[:, None], lse[:, None], g[:, None],
                          g_lse[:, None], V, label_smoothing, z_loss, softcap,
                          HAS_SOFTCAP, HAS_GLSE)
        grad = tl.where(tile_mask, grad, 0.0)
        if HAS_BIAS:  # the bias gradient is never filtered
            tl.atomic_add(DB + cols, tl.sum(grad, axis=0), mask=col_mask, sem="relaxed")
        n_blocks = d_blocks
        if HAS_FILTER:
            # Skip the back-products when every entry is below filter_eps times its row's
            # upstream gradient: under bf16 resolution of the row's O(1) entries.
            scale = filter_eps * (tl.abs(g) + tl.abs(g_lse))
            over = tl.max(tl.abs(grad) - scale[:, None], axis=1)
            n_blocks = tl.where(tl.max(over, axis=0) > 0.0, d_blocks, 0)
        # fp32 gradient -> input dtype for the tensor cores; the products accumulate in fp32.
        grad_op = grad.to(H.dtype.element_ty)
        for j in range(0, n_blocks):
            dd = j * BLOCK_DB + tl.arange(0, BLOCK_DB)
            d_mask = dd < D
            w = tl.load(W + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            h = tl.load(H + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            dh = tl.dot(grad_op, w, input_precision=DOT_PRECISION)             # (BLOCK_N, BLOCK_DB)
            dw = tl.dot(tl.trans(grad_op), h, input_precision=DOT_PRECISION)   # (BLOCK_V, BLOCK_DB)
            tl.atomic_add(DH + dh_rows[:, None] * stride_dhn + dd[None, :], dh,
                          mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
            _add_dw(DW, LOCKS, cols, col_mask, dd, d_mask, dw, stride_dwv,
                    pid_v * d_blocks + j, DW_LOCK)


@triton.jit
def _lce_dh_store_kernel(
    DH32, ROW_ORDER, DH, first_slot, chunk_rows, D, stride_dhn,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """DH[order[first_slot + r]] = DH32[r] rounded to DH's dtype, r < chunk_rows: the chunk's
    fp32 rows into the 16-bit gradient (rows past the valid ones hold zeros: ignored rows)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < chunk_rows
    rows = tl.load(ROW_ORDER + first_slot + r, mask=r_mask, other=0).to(tl.int64)
    src = DH32 + r.to(tl.int64)[:, None] * D
    dst = DH + rows[:, None] * stride_dhn
    for c0 in range(0, D, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (cc < D)[None, :]
        x = tl.load(src + cc[None, :], mask=mask, other=0.0)
        tl.store(dst + cc[None, :], x.to(DH.dtype.element_ty), mask=mask)


def _valid_row_order(targets, ignore_index):
    """(order, n_valid): row ids with the non-ignored rows first (stable), and their count as a
    1-element device tensor. Computed on the device; nothing is read back by the host."""
    ignored = targets == ignore_index
    order = torch.argsort(ignored.to(torch.int8), stable=True)
    n_valid = (~ignored).sum(dtype=torch.int32).reshape(1)
    return order, n_valid


def _check_linear(hidden, weight, targets, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)}"
                         f" and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,), got {tuple(targets.shape)}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError("hidden, weight and bias must share one dtype")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,), got {tuple(bias.shape)}")


def lean_forward_grid(n, v, block_n, block_v, num_sms):
    """((row tiles, vocab splits), vocab tiles per split) of the lean forward.

    The split count fills whole waves (cross_entropy_plan.forward_splits): at most
    4 * num_sms splits on axis 1 (far under CUDA's 65,535), each with at least one tile (so
    its running max becomes finite)."""
    splits, per_split = plan.forward_splits(n, v, block_n, block_v, num_sms)
    return checked_grid(triton.cdiv(n, block_n), splits), per_split


def lean_backward_grid(rows, v, block_n, block_v):
    """Grid of one lean backward launch over `rows` rows: (row tiles x vocab tiles) folded onto
    axis 0 (the kernel decodes the grouped order); vocabulary tiles alone pass 65,535 from
    V ~ 4.2M at BLOCK_V = 64, so they cannot ride on axis 1."""
    return checked_grid(triton.cdiv(rows, block_n) * triton.cdiv(v, block_v))


def _lean_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap):
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    loss = _new((n,), torch.float32, device)
    lse = _new((n,), torch.float32, device)
    if n == 0:
        return loss, lse
    cfg = _config("lce_fwd", device, hidden.dtype,
                  _on(bias=bias is not None, softcap=softcap is not None,
                      smoothing=label_smoothing > 0), (n,))
    block_n, block_v, block_d = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_D")
    order, n_valid = _valid_row_order(targets, ignore_index)

    grid, tiles_per_split = lean_forward_grid(n, v, block_n, block_v, _num_sms(device))
    n_splits = grid[1]

    parts = torch.empty((4, n_splits, n), dtype=torch.float32, device=device)
    _lce_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, order, n_valid,
        parts[0], parts[1], parts[2], parts[3],
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(softcap) if softcap is not None else 1.0, tiles_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(hidden.dtype), **cfg,
    )
    combine_block = 128
    _lce_combine_kernel[checked_grid(triton.cdiv(n, combine_block))](
        parts[0], parts[1], parts[2], parts[3], targets, loss, lse,
        n, v, n_splits, ignore_index, float(label_smoothing), float(z_loss),
        HAS_SMOOTHING=label_smoothing > 0, BLOCK=combine_block,
    )
    return loss, lse


def linear_cross_entropy_backward(grad_rows, grad_lse, hidden, weight, targets, bias, lse, *,
                                  ignore_index, label_smoothing, z_loss, softcap,
                                  filter_eps=None, dw_accumulation=None):
    """Lean backward: (dhidden, dweight, dbias or None), recomputing the logits tile by tile.

    grad_rows: (N,) upstream gradient of loss_rows (stride 0 allowed), or None when only the
    lse gets a gradient; grad_lse: (N,) or None. filter_eps: skip the back-products of a tile
    whose every gradient entry is below filter_eps x its row's upstream gradient (None: off).
    dw_accumulation: "atomic" | "lock" | "fp32" overrides the configuration's DW_ACCUM for
    16-bit inputs (the accumulation microbenchmark and tests; "fp32" is not lean).
    Extra memory (16-bit inputs): cross_entropy_plan.DH_CHUNK_BYTES of fp32 dH rows.
    """
    LAUNCHES["lce_bwd"] += 1
    _check_linear(hidden, weight, targets, bias)
    ensure_bf16(hidden, grad_rows, grad_lse)
    targets, lse = targets.contiguous(), lse.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _check_options(label_smoothing, z_loss, softcap)
    if filter_eps is not None and not filter_eps > 0:
        raise ValueError(f"filter_eps must be positive or None, got {filter_eps}")
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    wide = dtype == torch.float32
    grads = _upstream(grad_rows, grad_lse, n, device)  # None: zero gradients, no launch
    has_glse = grads is not None and grads[1] is not None
    cfg = _config("lce_bwd", device, dtype,
                  _on(bias=bias is not None, softcap=softcap is not None, glse=has_glse,
                      filter=filter_eps is not None), (n,))
    block_n, block_v, block_d = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_V"), cfg.pop("BLOCK_D")
    block_db, group_n = cfg.pop("BLOCK_DB"), cfg.pop("GROUP_N")
    mode = cfg.pop("DW_ACCUM")
    if dw_accumulation is not None:
        if dw_accumulation not in DW_MODES:
            raise ValueError(f"dw_accumulation must be one of {sorted(DW_MODES)}, got "
                             f"{dw_accumulation!r}")
        mode = DW_MODES[dw_accumulation]
    if wide:
        mode = DW_ATOMIC  # fp32 atomics straight into the fp32 gradient

    # fp32 inputs: atomics add into the zeroed outputs themselves. 16-bit: dW into its own
    # zeroed 16-bit gradient (or an fp32 buffer in the fp32 mode), dH through fp32 chunks.
    dh = torch.zeros((n, d), dtype=dtype, device=device) if wide else _new((n, d), dtype, device)
    dw_acc = torch.zeros((v, d), dtype=torch.float32 if mode == DW_FP32 else dtype,
                         device=device)
    db = torch.zeros((v,), dtype=torch.float32, device=device) if bias is not None else None
    if n > 0 and grads is not None:
        grad_rows, grad_lse = grads
        order, n_valid = _valid_row_order(targets, ignore_index)
        chunk = n if wide else plan.dh_chunk_rows(n, d)
        if chunk < n and chunk % block_n:
            raise ValueError(f"lce_bwd config: BLOCK_N={block_n} must divide the dH chunk "
                             f"alignment {plan.ROW_ALIGN}")
        dh32 = None if wide else torch.empty((chunk, d), dtype=torch.float32, device=device)
        locks = (torch.zeros((plan.lock_count(v, d, block_v, block_db),), dtype=torch.int32,
                             device=device) if mode == DW_LOCK else None)
        store = None if wide else _config("lce_dh_store", device, dtype)
        for first in range(0, n, chunk):
            rows = min(chunk, n - first)
            dh_buf = dh if wide else dh32
            if not wide:
                dh32.zero_()
            _lce_bwd_kernel[lean_backward_grid(rows, v, block_n, block_v)](
                hidden, weight, bias if bias is not None else weight, targets, order, n_valid,
                lse, grad_rows, grad_lse if has_glse else grad_rows,
                dh_buf, dw_acc, db if db is not None else dw_acc,
                locks if locks is not None else n_valid,
                v, d, first // block_n, rows,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                grad_rows.stride(0), grad_lse.stride(0) if has_glse else 0,
                dh_buf.stride(0), dw_acc.stride(0), float(label_smoothing), float(z_loss),
                float(softcap) if softcap is not None else 1.0,
                float(filter_eps) if filter_eps is not None else 0.0,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_GLSE=has_glse,
                HAS_FILTER=filter_eps is not None, DH_BY_SLOT=not wide,
                DW_LOCK=mode == DW_LOCK,
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, BLOCK_DB=block_db,
                GROUP_N=group_n, DOT_PRECISION=_dot_precision(dtype), **cfg,
            )
            if not wide:
                s = dict(store)
                block_r, block_c = s.pop("BLOCK_R"), s.pop("BLOCK_C")
                _lce_dh_store_kernel[checked_grid(triton.cdiv(rows, block_r))](
                    dh32, order, dh, first, rows, d, dh.stride(0),
                    BLOCK_R=block_r, BLOCK_C=block_c, **s,
                )
    elif not wide:
        dh.zero_()
    dw = dw_acc.to(dtype) if dw_acc.dtype != dtype else dw_acc
    if db is not None and dtype != torch.float32:
        db = db.to(dtype)
    return dh, dw, db


# --------------------------------------------------------------------------------------
# Fused linear cross-entropy, budgeted schedule: cuBLAS products, one fused row kernel
# --------------------------------------------------------------------------------------
def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b: cuBLAS with an fp32 output where torch has it,
    else (the CPU) fp32 copies of the operands: the same products, fp32 accumulation."""
    if plan.fp32_dw_supported(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _budgeted_forward(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                      softcap, reduction, memory_budget):
    n, d = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    # An fp32 dW accumulator where torch can add 16-bit products into one (the CPU: fp32
    # copies of each chunk's operands, for the tests), else dW accumulates in its gradient.
    fp32_dw = device.type == "cpu" or plan.fp32_dw_supported(device, dtype)
    lay = plan.budgeted_layout(n, d, v, dtype, memory_budget, bias is not None, fp32_dw)
    loss = _new((n,), torch.float32, device)
    lse = _new((n,), torch.float32, device)
    dh = _new((n, d), dtype, device)
    dw32 = torch.zeros((v, d), dtype=torch.float32, device=device) if lay.dw_fp32 else None
    dw = torch.zeros((v, d), dtype=dtype, device=device) if dw32 is None else None
    db32 = torch.zeros((v,), dtype=torch.float32, device=device) if bias is not None else None

    # Uniform upstream gradient per row, kept on the device (no sync): 1 or 1/n_valid.
    if reduction == "mean":
        n_valid = (targets != ignore_index).sum(dtype=torch.float32).clamp_min(1.0)
        g = torch.reciprocal(n_valid).reshape(1)
    else:
        g = torch.ones((1,), dtype=torch.float32, device=device)

    # Logits in the input dtype, rows padded to 16 bytes (aligned cuBLAS and vector loads);
    # the row kernel turns them into the gradient in place.
    buf = torch.empty((lay.chunk_rows, lay.row_stride), dtype=dtype, device=device)
    if lay.row_stride > v:
        # The padding is never written by the products; some CPU GEMMs read a strided row's
        # padding (a NaN left there by an earlier tensor leaked into dH here), so clear it.
        buf[:, v:].zero_()
    for start in range(0, n, lay.chunk_rows):
        stop = min(n, start + lay.chunk_rows)
        h_c, x = hidden[start:stop], buf[:stop - start, :v]
        if bias is not None:
            torch.addmm(bias, h_c, weight.t(), out=x)
        else:
            torch.mm(h_c, weight.t(), out=x)
        _ce_fused(x, targets[start:stop], g, loss[start:stop], lse[start:stop],
                  ignore_index, label_smoothing, z_loss, softcap)
        torch.mm(x, weight, out=dh[start:stop])
        if dw32 is not None:
            _addmm_fp32_(dw32, x.t(), h_c)
        else:
            dw.addmm_(x.t(), h_c)
        if db32 is not None:
            db32 += x.sum(dim=0, dtype=torch.float32)
    del buf, x
    if dw32 is not None:
        dw = dw32 if dtype == torch.float32 else dw32.to(dtype)
        del dw32
    db = None if db32 is None else (db32 if dtype == torch.float32 else db32.to(dtype))
    return loss, lse, (dh, dw, db)


def linear_cross_entropy_forward(hidden, weight, targets, bias, *, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, memory_budget=None):
    """(loss_rows f32 (N,), lse f32 (N,), grads) for logits = hidden @ weight.T (+ bias).

    grads is None for the lean schedule and for reduction "none"; otherwise (dhidden, dweight,
    dbias or None) for a uniform upstream gradient (1 for "sum", 1/n_valid for "mean")."""
    LAUNCHES["lce_fwd"] += 1
    _check_linear(hidden, weight, targets, bias)
    ensure_bf16(hidden)
    targets = targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _check_options(label_smoothing, z_loss, softcap)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    budgeted = memory_budget is not None and memory_budget > plan.LEAN_MAX_BUDGET
    if budgeted and reduction != "none" and hidden.shape[0] > 0:
        return _budgeted_forward(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                 z_loss, softcap, reduction, int(memory_budget))
    loss, lse = _lean_forward(hidden, weight, targets, bias, ignore_index, label_smoothing,
                              z_loss, softcap)
    return loss, lse, None
