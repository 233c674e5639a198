"""Plain-PyTorch references for every gptfast op.

These are the `backend="torch"` implementations (the CPU path, and the path for any option a
kernel backend does not support) and the semantics every kernel is tested against:

* `attention` is the definition, written for clarity: it materializes the (B, Hq, Sq, Sk)
  scores. The backend runs `attention_torch`, which gives the same results on PyTorch's fused
  SDPA CPU kernel wherever the options allow (see the section below) and falls back to
  `attention` otherwise.
* `linear_cross_entropy_*` never materialize the full (N, V) logits: they walk the tokens in
  chunks (one reused buffer, turned in place into the gradient), so the extra memory is
  O(chunk x V); with gradients wanted, one pass computes loss and gradients together.
* Everything accumulates in fp32 (fp64 stays fp64) whatever the input dtype.

Masks, with offset = Sk - Sq (bottom-right alignment, what a KV cache needs):

    causal:  key j visible to query i  iff  j <= i + offset
    window W:                          and  j >  i + offset - W
    key_padding_mask[b, j] False:      key j invisible for every query of batch b
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def attention_visibility(Sq: int, Sk: int, *, causal: bool, window: Optional[int],
                         key_padding_mask: Optional[Tensor], device) -> Optional[Tensor]:
    """Bool mask, True where query i may see key j: (Sq, Sk), or (B, 1, Sq, Sk) with padding."""
    visible = None
    if causal or window is not None:
        i = torch.arange(Sq, device=device).unsqueeze(1)  # (Sq, 1)
        j = torch.arange(Sk, device=device).unsqueeze(0)  # (1, Sk)
        diag = i + (Sk - Sq)
        visible = j <= diag
        if window is not None:
            visible = visible & (j > diag - window)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Sk)
        visible = pad if visible is None else (visible & pad)
    return visible


def alibi_bias(slopes: Tensor, Sq: int, Sk: int, dtype: torch.dtype) -> Tensor:
    """(Hq, Sq, Sk) bias  -slope_h * |i + Sk - Sq - j|  (BLOOM's ALiBi, bottom-right aligned)."""
    i = torch.arange(Sq, device=slopes.device).unsqueeze(1)
    j = torch.arange(Sk, device=slopes.device).unsqueeze(0)
    dist = (i + (Sk - Sq) - j).abs().to(dtype)  # (Sq, Sk)
    return -slopes.to(dtype)[:, None, None] * dist


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
              softmax_scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
              window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, dropout_mask: Optional[Tensor] = None,
              softcap: Optional[float] = None):
    """Reference attention. Returns (out, lse); differentiable through both.

    q (B, Hq, Sq, d), k/v (B, Hkv, Sk, d). `dropout_mask` (B, Hq, Sq, Sk) bool (True = keep)
    replaces the random mask, so tests can reproduce a kernel's dropout exactly. `softcap` c:
    scores c * tanh(scale * q.k / c), before ALiBi and the masks.
    lse (B, Hq, Sq) fp32 (fp64 for fp64 input); -inf for a row that sees no key.
    """
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if Hkv != Hq:  # grouped-query: head h reads kv head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)

    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, Sq, Sk, acc)
    visible = attention_visibility(Sq, Sk, causal=causal, window=window,
                                   key_padding_mask=key_padding_mask, device=q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
        # A row with no visible key: give softmax finite inputs (no NaN, also in backward),
        # then zero it out.
        empty = ~visible.any(dim=-1, keepdim=True)  # (..., Sq, 1)
        scores = scores.masked_fill(empty, 0.0)
        p = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
        lse = torch.logsumexp(scores, dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    else:
        p = torch.softmax(scores, dim=-1)
        lse = torch.logsumexp(scores, dim=-1)
    lse = lse.expand(B, Hq, Sq)

    if dropout_p > 0.0 or dropout_mask is not None:
        keep = dropout_mask if dropout_mask is not None else torch.rand_like(p) >= dropout_p
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(acc)).to(q.dtype)  # (B, Hq, Sq, d)
    return out, lse


# --------------------------------------------------------------------------------------------
# attention, the "torch" backend: PyTorch's fused SDPA CPU kernel wherever it means the same
# --------------------------------------------------------------------------------------------
#
# `attention` above materializes the (B, Hq, Sq, Sk) scores and is slow; PyTorch's CPU
# flash-attention kernel is blocked (no S x S buffer) and vectorized. Every gptfast option is
# expressed through its two knobs, `is_causal` (top-left aligned: only right for Sq == Sk) and
# an additive float `attn_mask`:
#   causal, Sq == Sk                  is_causal=True
#   causal, Sq == 1 (decoding)        nothing (bottom-right alignment: the query sees every key)
#   other causal, window, padding     a 0 / -inf bias, (Sq, Sk) or (B, 1, Sq, Sk)
#   ALiBi                             -slope * |i + Sk - Sq - j| added to that bias, (.., Hq, Sq, Sk)
#   GQA                               the kernel reads kv head h // (Hq // Hkv) itself
# A row that sees no key is unmasked for the kernel and its output zeroed afterwards: zeros,
# and exactly zero gradients (its upstream gradient is zero, so is the softmax's), whatever
# the kernel would do with a fully masked row.
# Kept on `attention`: dropout (gptfast's own mask and seed), return_lse (the kernel's lse has
# no gradient), trainable ALiBi slopes, the score softcap (not expressible as a bias: SDPA
# has none), and tensors that are not on the CPU.


def sdpa_cpu_kernel(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor],
                    is_causal: bool, scale: float):
    """The ONE call into PyTorch's SDPA made by the torch backend -> (out, lse).

    It calls PyTorch's CPU flash-attention kernel itself, never `F.scaled_dot_product_attention`
    and never gptfast's override of the aten op (gptfast/sdpa.py, active under
    TRITON_INTERPRET=1): `_cpu_flash.cpu_flash_attention` calls the kernel PyTorch had before
    the override, so the torch backend cannot loop back into gptfast.
    """
    from ._cpu_flash import cpu_flash_attention
    return cpu_flash_attention(q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


_GQA_NATIVE: Optional[bool] = None  # probed once, on the first eager call


def _sdpa_cpu_takes_gqa() -> bool:
    """Does this torch's CPU kernel read grouped key/value heads itself? Inside a
    torch.compile trace nothing is probed: the heads are repeated (right either way)."""
    global _GQA_NATIVE
    if _GQA_NATIVE is None:
        if torch.compiler.is_compiling():
            return False
        _GQA_NATIVE = _probe_sdpa_cpu_gqa()
    return _GQA_NATIVE


def _probe_sdpa_cpu_gqa() -> bool:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        try:
            out, _ = sdpa_cpu_kernel(q, k, v, attn_mask=None, is_causal=True, scale=0.3)
        except Exception:  # noqa: BLE001 - an older kernel refuses: expand the heads instead
            return False
        ref, _ = sdpa_cpu_kernel(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                 attn_mask=None, is_causal=True, scale=0.3)
    return bool(torch.allclose(out, ref, atol=1e-10))


def sdpa_unsupported(q: Tensor, *, alibi_slopes: Optional[Tensor], dropout_p: float,
                     return_lse: bool, softcap: Optional[float] = None) -> Optional[str]:
    """None when `attention_torch` runs these inputs on PyTorch's fused SDPA CPU kernel, else
    a sentence saying why the plain reference runs them (and materializes the S x S scores)."""
    if q.device.type != "cpu":
        return f"{q.device.type} tensors (the fused SDPA path is the CPU's)"
    if softcap is not None:
        return "softcap (SDPA has no score softcap)"
    if dropout_p > 0.0:
        return "dropout_p > 0 (gptfast's dropout mask and seed are not SDPA's)"
    if return_lse:
        return "return_lse=True (SDPA's kernel returns no differentiable lse)"
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        return "alibi_slopes requires grad (SDPA's mask takes no gradient)"
    return None


def attention_torch_path(q: Tensor, *, alibi_slopes: Optional[Tensor] = None,
                         dropout_p: float = 0.0, return_lse: bool = False,
                         softcap: Optional[float] = None) -> str:
    """What `attention_torch` runs for these inputs, in words (for `gptfast.explain`)."""
    why = sdpa_unsupported(q, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                           return_lse=return_lse, softcap=softcap)
    if why is None:
        return "PyTorch's fused SDPA CPU kernel (no S x S scores)"
    return f"the plain reference, which materializes the S x S scores: {why}"


def attention_torch(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                    softmax_scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
                    window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, return_lse: bool = False,
                    softcap: Optional[float] = None):
    """The "torch" backend: `attention`'s semantics, on PyTorch's fused SDPA CPU kernel where
    `sdpa_unsupported` allows, else `attention` itself. Returns (out, lse); lse is None on the
    SDPA path (it is computed only for return_lse=True)."""
    if sdpa_unsupported(q, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                        return_lse=return_lse, softcap=softcap) is not None:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                         alibi_slopes=alibi_slopes, window=window,
                         key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                         softcap=softcap)
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if Hkv != Hq and not _sdpa_cpu_takes_gqa():  # (B, Hkv, Sk, d) -> (B, Hq, Sk, d)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    in_dtype = q.dtype
    if alibi_slopes is not None and in_dtype in (torch.float16, torch.bfloat16):
        # The bias takes the inputs' dtype; ALiBi distances in bf16 would lose the slopes.
        q, k, v = q.float(), k.float(), v.float()

    plain = window is None and key_padding_mask is None and alibi_slopes is None
    empty = None
    if plain and (not causal or Sq == 1):       # every query sees every key
        out, _ = sdpa_cpu_kernel(q, k, v, attn_mask=None, is_causal=False, scale=scale)
    elif plain and Sq == Sk:                    # top-left == bottom-right
        out, _ = sdpa_cpu_kernel(q, k, v, attn_mask=None, is_causal=True, scale=scale)
    else:
        visible = attention_visibility(Sq, Sk, causal=causal, window=window,
                                       key_padding_mask=key_padding_mask, device=q.device)
        bias = None
        if visible is not None:                 # (Sq, Sk) or (B, 1, Sq, Sk)
            if key_padding_mask is not None or (causal and Sq > Sk):
                empty = ~visible.any(dim=-1, keepdim=True)      # (.., Sq, 1)
                visible = visible | empty
            bias = torch.where(visible, torch.zeros((), dtype=q.dtype, device=q.device),
                               torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        if alibi_slopes is not None:            # (Hq, Sq, Sk) + (.., Sq, Sk)
            ab = alibi_bias(alibi_slopes.detach(), Sq, Sk, q.dtype)
            bias = ab if bias is None else bias + ab
            if bias.dim() == 3:                 # the kernel takes 2-D or 4-D masks
                bias = bias.unsqueeze(0)
        out, _ = sdpa_cpu_kernel(q, k, v, attn_mask=bias, is_causal=False, scale=scale)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.to(in_dtype), None


# --------------------------------------------------------------------------------------------
# cross-entropy over given logits
# --------------------------------------------------------------------------------------------


def _row_losses(x: Tensor, targets: Tensor, *, ignore_index: int, label_smoothing: float,
                z_loss: float, softcap: Optional[float]):
    """Per-row loss and lse of fp32/fp64 logits x (n, V). Ignored rows give loss 0 and lse 0
    (no gradient reaches them); targets out of [0, V) give NaN (the GPU contract: no
    device-side assert, no host sync)."""
    V = x.shape[-1]
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=-1)  # (n,)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    safe_t = torch.where(in_range, targets, torch.zeros_like(targets))
    x_y = x.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    loss = lse - x_y
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss > 0.0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(in_range, loss, torch.full_like(loss, float("nan")))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, torch.where(valid, lse, torch.zeros_like(lse))


def reduce_rows(loss_rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """mean | sum | none, the way F.cross_entropy reduces (mean over non-ignored rows; an
    all-ignored batch gives 0 for sum and NaN for mean)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    n_valid = (targets != ignore_index).sum()
    return loss_rows.sum() / n_valid


def cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None):
    """Reference cross-entropy on (N, V) logits: (loss_rows, lse), both fp32, differentiable.
    Rows whose target is ignore_index: loss 0, lse 0, no gradient."""
    x = logits.to(_acc_dtype(logits.dtype))
    return _row_losses(x, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                       z_loss=z_loss, softcap=softcap)


# --------------------------------------------------------------------------------------------
# linear cross-entropy: chunks of tokens, logits never materialized whole
# --------------------------------------------------------------------------------------------

# Logit elements per chunk by default: 5 * 2**20 fp32 values = 20 MiB. Each chunk's logits
# live in one buffer, reused from chunk to chunk and turned in place into probabilities and
# then the gradient (softcap adds a second buffer of the same size). Tuned on a CPU at
# (N, D, V) = (1024, 768, 50257), one thread: the chunk's matmuls have M = 104 rows (smaller
# chunks lose matmul efficiency, and every chunk reads and writes all of dweight), and the
# peak stays under 0.4x that of materialized logits (benchmarks/bench_cpu.py).
CHUNK_ELEMENTS = 5 << 20
DEFAULT_WORKSPACE = 4 * CHUNK_ELEMENTS  # bytes


def chunk_rows(N: int, V: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(N, chunk_elements // max(V, 1)))


def linear_cross_entropy_torch_path(N: int, V: int, *, one_pass: bool,
                                    memory_budget: Optional[int],
                                    softcap: Optional[float]) -> str:
    """What the torch backend runs for a linear cross-entropy, in words (gptfast.explain)."""
    rows = chunk_rows(N, V, chunk_elements(memory_budget, softcap))
    how = ("gradients computed in the same pass" if one_pass
           else "forward keeps the lse, backward recomputes the logits")
    return f"chunks of {rows} rows, the {N} x {V} logits never materialized; {how}"


def chunk_elements(memory_budget: Optional[int], softcap: Optional[float]) -> int:
    """Logit elements per chunk for a working-memory budget in bytes (None: the default)."""
    budget = DEFAULT_WORKSPACE if memory_budget is None else memory_budget
    return max(1 << 12, budget // (8 if softcap is not None else 4))


class _Chunks:
    """Walks hidden (N, D) in chunks of rows; each chunk's logits x (n, V) go into one fp32
    (fp64) buffer, reused from chunk to chunk. Holds what every chunk needs."""

    def __init__(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                 *, ignore_index: int, softcap: Optional[float], chunk_elements: int):
        self.acc = _acc_dtype(hidden.dtype)
        self.N, self.V = hidden.shape[0], weight.shape[0]
        self.hidden, self.targets = hidden, targets
        self.w = weight.to(self.acc)                        # (V, D); no copy for fp32 weights
        self.b = None if bias is None else bias.to(self.acc)
        self.softcap = softcap
        self.valid = targets != ignore_index                # (N,)
        self.in_range = (targets >= 0) & (targets < self.V)
        self.safe_t = torch.where(self.in_range, targets, torch.zeros_like(targets))
        self.rows = chunk_rows(self.N, self.V, chunk_elements)
        self.buf = hidden.new_empty((min(self.rows, self.N), self.V), dtype=self.acc)
        self.th_buf = torch.empty_like(self.buf) if softcap is not None else None

    def __iter__(self):
        for s in range(0, self.N, self.rows):
            yield s, min(s + self.rows, self.N)

    def logits_(self, s: int, e: int):
        """x = hidden[s:e] @ W.T (+ bias), softcapped; returns (h (n, D) acc dtype, x, th)
        with th = tanh(raw / softcap) (None without softcap)."""
        h = self.hidden[s:e].to(self.acc)
        x = self.buf[:e - s]
        torch.mm(h, self.w.t(), out=x)                     # (n, V)
        if self.b is not None:
            x.add_(self.b)
        th = None
        if self.softcap is not None:
            th = torch.tanh(x.div_(self.softcap), out=self.th_buf[:e - s])
            torch.mul(th, self.softcap, out=x)
        return h, x, th

    def gradient_(self, s: int, e: int, p: Tensor, th: Optional[Tensor], coef: Tensor,
                  gr: Optional[Tensor], label_smoothing: float) -> Tensor:
        """Turn p (n, V), holding softmax(x) * (something per row), into d(loss)/d(raw logits)
        in place: p * coef - label_smoothing / V * gr - (1 - label_smoothing) * gr * onehot,
        times the softcap's derivative. coef (n,) includes whatever scales p's rows to the
        softmax."""
        p.mul_(coef.unsqueeze(-1))
        if gr is not None:
            if label_smoothing > 0.0:
                p.sub_((label_smoothing / self.V * gr).unsqueeze(-1))
            hit = -(1.0 - label_smoothing) * self.in_range[s:e].to(p.dtype) * gr
            p.scatter_add_(-1, self.safe_t[s:e].unsqueeze(-1), hit.unsqueeze(-1))
        if th is not None:
            p.mul_(th.mul_(th).neg_().add_(1.0))            # d softcap(x) / dx = 1 - tanh^2
        return p

    def backprop_(self, s: int, e: int, h: Tensor, g: Tensor, dhidden: Tensor, dweight: Tensor,
                  dbias: Optional[Tensor]) -> None:
        """dhidden[s:e] = g @ W; dweight += g.T @ h; dbias += sum of g's rows."""
        if dhidden.dtype == self.acc:
            torch.mm(g, self.w, out=dhidden[s:e])
        else:
            dhidden[s:e] = g @ self.w
        dweight.addmm_(g.t(), h)                            # (V, D), accumulated in place
        if dbias is not None:
            dbias.add_(g.sum(0))


def _chunk_losses_(x: Tensor, c: _Chunks, s: int, e: int, *, label_smoothing: float,
                   z_loss: float):
    """Loss and lse of the rows s:e from their logits x (n, V), overwriting x with
    exp(x - rowmax) (the softmax times sumexp). Returns (loss_rows, lse, sumexp); ignored rows
    get loss 0 and lse 0."""
    t = c.safe_t[s:e].unsqueeze(-1)
    x_y = x.gather(-1, t).squeeze(-1)                       # the target's logit
    x_mean = x.mean(dim=-1) if label_smoothing > 0.0 else None
    m = x.amax(dim=-1, keepdim=True)
    sumexp = x.sub_(m).exp_().sum(dim=-1)
    lse = m.squeeze(-1) + sumexp.log()
    loss = lse - x_y
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x_mean)
    if z_loss > 0.0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(c.in_range[s:e], loss, torch.full_like(loss, float("nan")))
    valid = c.valid[s:e]
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, torch.where(valid, lse, torch.zeros_like(lse)), sumexp


def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, targets: Tensor,
                                 bias: Optional[Tensor], *, ignore_index: int,
                                 label_smoothing: float, z_loss: float, softcap: Optional[float],
                                 chunk_elements: int = CHUNK_ELEMENTS):
    """(loss_rows, lse) of hidden @ weight.T (+ bias), chunk by chunk. Both fp32 (fp64 in)."""
    c = _Chunks(hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap,
                chunk_elements=chunk_elements)
    loss_rows = hidden.new_empty(c.N, dtype=c.acc)
    lse = hidden.new_empty(c.N, dtype=c.acc)
    for s, e in c:
        _, x, _ = c.logits_(s, e)
        loss_rows[s:e], lse[s:e], _ = _chunk_losses_(x, c, s, e, label_smoothing=label_smoothing,
                                                     z_loss=z_loss)
    return loss_rows, lse


def _grads_like(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype):
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    dbias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
        if bias is not None else None
    return dhidden, dweight, dbias


def _as_param_dtypes(dhidden, dweight, dbias, weight, bias):
    return (dhidden, dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))


def linear_cross_entropy_backward(grad_rows: Optional[Tensor], grad_lse: Optional[Tensor],
                                  hidden: Tensor, weight: Tensor, targets: Tensor,
                                  bias: Optional[Tensor], lse: Tensor, *, ignore_index: int,
                                  label_smoothing: float, z_loss: float,
                                  softcap: Optional[float],
                                  chunk_elements: int = CHUNK_ELEMENTS):
    """(dhidden, dweight, dbias) recomputing each chunk's logits; accumulates dweight in fp32."""
    c = _Chunks(hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap,
                chunk_elements=chunk_elements)
    dhidden, dweight, dbias = _grads_like(hidden, weight, bias, c.acc)
    # Ignored rows have lse 0 (not their logsumexp): +inf there makes their softmax 0 (never
    # exp overflowing into inf * 0), and no loss or lse gradient reaches them.
    lse = lse.to(c.acc)
    lse_p = lse.masked_fill(~c.valid, float("inf"))
    for s, e in c:
        h, x, th = c.logits_(s, e)
        p = x.sub_(lse_p[s:e].unsqueeze(-1)).exp_()         # softmax, in place
        coef = torch.zeros(e - s, dtype=c.acc, device=x.device)
        gr = None
        if grad_rows is not None:
            # Ignored rows carry no gradient, even when the upstream one is inf/NaN (mean of
            # an all-ignored batch divides by zero).
            gr = torch.where(c.valid[s:e], grad_rows[s:e].to(c.acc), 0.0)
            coef = gr * (1.0 + 2.0 * z_loss * lse[s:e])     # nll, smoothing and z-loss parts
        if grad_lse is not None:
            coef = coef + torch.where(c.valid[s:e], grad_lse[s:e].to(c.acc), 0.0)
        g = c.gradient_(s, e, p, th, coef, gr, label_smoothing)
        c.backprop_(s, e, h, g, dhidden, dweight, dbias)
    return _as_param_dtypes(dhidden, dweight, dbias, weight, bias)


def linear_cross_entropy_forward_with_grad(hidden: Tensor, weight: Tensor, targets: Tensor,
                                           bias: Optional[Tensor], *, ignore_index: int,
                                           label_smoothing: float, z_loss: float,
                                           softcap: Optional[float], reduction: str,
                                           chunk_elements: int = CHUNK_ELEMENTS):
    """One pass over the logits: loss_rows, lse and the gradients for a unit upstream gradient
    of the reduced loss ("sum": 1 per row, "mean": 1 / n_valid per row). Each chunk's logits
    are computed once (6·N·D·V FLOPs in all, against 8 for forward + recomputing backward)."""
    c = _Chunks(hidden, weight, targets, bias, ignore_index=ignore_index, softcap=softcap,
                chunk_elements=chunk_elements)
    dhidden, dweight, dbias = _grads_like(hidden, weight, bias, c.acc)
    loss_rows = hidden.new_empty(c.N, dtype=c.acc)
    lse = hidden.new_empty(c.N, dtype=c.acc)
    unit = torch.ones((), dtype=c.acc, device=hidden.device)
    if reduction == "mean":
        unit = unit / c.valid.sum()
    for s, e in c:
        h, x, th = c.logits_(s, e)
        loss_rows[s:e], lse[s:e], sumexp = _chunk_losses_(
            x, c, s, e, label_smoothing=label_smoothing, z_loss=z_loss)
        gr = torch.where(c.valid[s:e], unit, 0.0)
        coef = gr * (1.0 + 2.0 * z_loss * lse[s:e]) / sumexp   # x holds softmax * sumexp
        g = c.gradient_(s, e, x, th, coef, gr, label_smoothing)
        c.backprop_(s, e, h, g, dhidden, dweight, dbias)
    return loss_rows, lse, _as_param_dtypes(dhidden, dweight, dbias, weight, bias)
