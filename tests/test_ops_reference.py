"""The "torch" backend (the references) against float64 oracles written from the definitions."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import gptfast
from oracles import attention_oracle, cross_entropy_oracle

ATTN_CASES = [
    # (B, Hq, Hkv, Sq, Sk, d, options)
    (2, 3, 3, 7, 7, 8, dict(causal=True)),
    (1, 2, 2, 5, 9, 8, dict(causal=True)),            # Sq < Sk: bottom-right aligned
    (1, 2, 2, 9, 4, 8, dict(causal=True)),            # Sq > Sk: first rows see nothing
    (1, 2, 2, 1, 11, 8, dict(causal=True)),           # decoding one token
    (2, 2, 2, 6, 10, 8, dict(causal=False)),
    (2, 4, 2, 6, 6, 8, dict(causal=True)),            # GQA
    (1, 4, 1, 5, 8, 8, dict(causal=True)),            # MQA
    (1, 3, 3, 6, 9, 8, dict(causal=True, alibi=True)),
    (1, 2, 2, 8, 8, 8, dict(causal=True, window=3)),
    (1, 2, 2, 4, 9, 8, dict(causal=True, window=2)),
    (2, 2, 2, 6, 6, 8, dict(causal=True, padding="left")),
    (2, 2, 2, 6, 6, 8, dict(causal=False, padding="right")),
    (2, 2, 1, 5, 7, 8, dict(causal=True, alibi=True, window=4, padding="left",
                            softmax_scale=0.3)),
]


def _attn_inputs(B, Hq, Hkv, Sq, Sk, d, o, dtype=torch.float64):
    q = torch.randn(B, Hq, Sq, d, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, d, dtype=dtype)
    v = torch.randn(B, Hkv, Sk, d, dtype=dtype)
    kw = dict(causal=o["causal"])
    if o.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq) + 0.1
    if o.get("window"):
        kw["window"] = o["window"]
    if o.get("softmax_scale"):
        kw["softmax_scale"] = o["softmax_scale"]
    if o.get("padding"):
        mask = torch.ones(B, Sk, dtype=torch.bool)
        if o["padding"] == "left":
            mask[0, :3] = False
        else:
            mask[0, -3:] = False
        mask[-1, :] = False if B > 1 and o["padding"] == "right" else mask[-1, :]
        kw["key_padding_mask"] = mask
    return q, k, v, kw


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[:6]}-{sorted(c[6])}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_reference_matches_oracle(case, dtype):
    q, k, v, kw = _attn_inputs(*case, dtype=dtype)
    out, lse = gptfast.attention(q, k, v, return_lse=True, backend="torch", **kw)
    ref_out, ref_lse = attention_oracle(q, k, v, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and lse.shape == q.shape[:3]
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=tol, rtol=tol)


def test_attention_matches_sdpa_when_square():
    q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(gptfast.attention(q, k, v, backend="torch"), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [ATTN_CASES[2], ATTN_CASES[5], ATTN_CASES[-1]],
                         ids=["empty-rows", "gqa", "everything"])
def test_attention_reference_gradcheck(case):
    q, k, v, kw = _attn_inputs(*case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = gptfast.attention(q, k, v, return_lse=True, backend="torch", **kw)
        return out, torch.where(lse.isfinite(), lse, 0.0)  # lse of an empty row is -inf
    assert torch.autograd.gradcheck(f, (q, k, v))


def test_attention_empty_rows_give_zero_output_and_grads():
    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 6, dtype=torch.bool)  # every key is padding
    out = gptfast.attention(q, k, v, key_padding_mask=mask, backend="torch")
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_attention_dropout_statistics():
    # v = identity makes out[i, j] = p_ij * keep_ij / (1 - p): the mask can be read off.
    torch.manual_seed(1)
    S, p = 64, 0.3
    q, k = torch.randn(4, 4, S, S, dtype=torch.float64), torch.randn(4, 4, S, S,
                                                                     dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(4, 4, S, S)
    clean = gptfast.attention(q, k, v, causal=False, backend="torch")
    dropped = gptfast.attention(q, k, v, causal=False, dropout_p=p, backend="torch")
    ratio = dropped / clean
    kept = ratio > 0
    assert abs(1 - kept.double().mean().item() - p) < 0.01
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)))
    # Unbiased: the expectation of the dropped output is the clean output.
    assert abs(dropped.sum().item() / clean.sum().item() - 1) < 0.02


# ---- the torch backend's fast path: PyTorch's fused SDPA CPU kernel ----------------------------

@pytest.fixture
def sdpa_only(monkeypatch):
    """Counts the torch backend's calls into SDPA's CPU kernel and fails if the materializing
    reference or F.scaled_dot_product_attention (which an SDPA provider may route to gptfast)
    runs instead."""
    from gptfast.ops import reference
    calls = []
    reference._sdpa_cpu_takes_gqa()                 # its one-time check calls the kernel too
    kernel = reference.sdpa_cpu_kernel

    def counting(*a, **kw):
        calls.append(kw)
        return kernel(*a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("the torch backend left the SDPA path")
    monkeypatch.setattr(reference, "sdpa_cpu_kernel", counting)
    monkeypatch.setattr(reference, "attention", forbidden)
    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    return calls


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"{c[:6]}-{sorted(c[6])}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_sdpa_path_matches_oracle(case, dtype, sdpa_only):
    q, k, v, kw = _attn_inputs(*case, dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = gptfast.attention(q, k, v, backend="torch", **kw)
    assert len(sdpa_only) == 1 and out.dtype == dtype
    ref_out, _ = attention_oracle(q, k, v, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    # gradients against the oracle's (it is plain differentiable float64 PyTorch)
    g = torch.randn_like(ref_out)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    for a, e in zip(got, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), e.double(), atol=100 * tol, rtol=100 * tol)


def test_attention_sdpa_path_gradcheck(sdpa_only):
    q, k, v, kw = _attn_inputs(*ATTN_CASES[-1])     # GQA, ALiBi, window, padding, empty rows
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: gptfast.attention(q, k, v, backend="torch", **kw), (q, k, v))


def test_attention_sdpa_path_empty_rows_and_transposed_inputs(sdpa_only):
    qkv = torch.randn(2, 6, 3, 2, 8, requires_grad=True)          # (B, T, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)                           # (B, H, T, d) views
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :4] = False                                            # left padding: rows 0-3 empty
    out = gptfast.attention(q, k, v, key_padding_mask=mask, backend="torch")
    ref, _ = attention_oracle(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    out.sum().backward()
    dq = qkv.grad[:, :, 0].transpose(1, 2)                         # (B, H, T, d)
    assert torch.equal(dq[0, :, :4], torch.zeros_like(dq[0, :, :4]))
    assert qkv.grad.isfinite().all()


def test_attention_sdpa_path_bf16_alibi(sdpa_only):
    q, k, v, kw = _attn_inputs(1, 4, 4, 64, 64, 16, dict(causal=True, alibi=True),
                               dtype=torch.bfloat16)
    kw["alibi_slopes"] = kw["alibi_slopes"] * 4                     # far keys strongly biased
    out = gptfast.attention(q, k, v, backend="torch", **kw)
    ref, _ = attention_oracle(q, k, v, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_attention_keeps_its_own_path_where_sdpa_differs():
    from gptfast.ops import reference
    q, k, v, kw = _attn_inputs(1, 2, 2, 5, 5, 8, dict(causal=True, alibi=True))
    cases = [(dict(dropout_p=0.1), "dropout"), (dict(return_lse=True), "return_lse")]
    for extra, word in cases:
        assert word in reference.sdpa_unsupported(q, alibi_slopes=None,
                                                  dropout_p=extra.get("dropout_p", 0.0),
                                                  return_lse=extra.get("return_lse", False))
    slopes = kw["alibi_slopes"].requires_grad_()
    assert "alibi_slopes" in reference.sdpa_unsupported(q, alibi_slopes=slopes, dropout_p=0.0,
                                                         return_lse=False)
    out = gptfast.attention(q, k, v, alibi_slopes=slopes, backend="torch")
    out.sum().backward()                                            # slopes get a gradient
    assert slopes.grad is not None and slopes.grad.abs().sum() > 0
    d = gptfast.explain(gptfast.attention, q, k, v, dropout_p=0.1)
    assert "dropout" in str(d) and "S x S" in str(d)
    assert "SDPA" in str(gptfast.explain(gptfast.attention, q, k, v))


# ---- cross-entropy ------------------------------------------------------------------------------

CE_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-2),
    dict(softcap=3.0),
    dict(ignore_index=5),
    dict(label_smoothing=0.2, z_loss=1e-3, softcap=2.0, reduction="sum"),
]


def _ce_inputs(N=37, V=29, ignore_index=-100, dtype=torch.float64):
    x = torch.randn(N, V, dtype=dtype) * 3
    t = torch.randint(0, V, (N,))
    t[::7] = ignore_index
    return x, t


@pytest.mark.parametrize("opts", CE_OPTIONS, ids=str)
def test_cross_entropy_reference(opts):
    x, t = _ce_inputs(ignore_index=opts.get("ignore_index", -100))
    x.requires_grad_()
    loss, lse = gptfast.cross_entropy(x, t, return_lse=True, backend="torch", **opts)
    ref, ref_lse = cross_entropy_oracle(x, t, **opts)
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    gx, = torch.autograd.grad((loss * g).sum(), x)
    rx, = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-6)


def test_cross_entropy_matches_pytorch_and_keeps_shapes():
    x = torch.randn(3, 5, 11)
    t = torch.randint(0, 11, (3, 5))
    t[0, 0] = -100
    ref = F.cross_entropy(x.view(-1, 11), t.view(-1), label_smoothing=0.1, reduction="none")
    out = gptfast.cross_entropy(x, t, label_smoothing=0.1, reduction="none", backend="torch")
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.view(-1), ref)


@pytest.mark.parametrize("op", ["ce", "lce"])
def test_all_ignored_batch_is_nan_for_mean_and_zero_for_sum(op):
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    t = torch.full((6,), -100)

    def loss(reduction):
        if op == "ce":
            return gptfast.cross_entropy(h @ w.t(), t, reduction=reduction)
        return gptfast.linear_cross_entropy(h, w, t, reduction=reduction)
    assert loss("mean").isnan()
    assert loss("sum").item() == 0.0
    loss("mean").backward()
    assert torch.equal(h.grad, torch.zeros_like(h))  # as PyTorch: zero, not NaN, gradients


# ---- linear cross-entropy -------------------------------------------------------------------------

LCE_OPTIONS = CE_OPTIONS + [dict(bias=True), dict(bias=True, softcap=4.0, reduction="none")]


@pytest.mark.parametrize("budget", [None, 1 << 30], ids=["lean", "budgeted"])
@pytest.mark.parametrize("opts", LCE_OPTIONS, ids=str)
def test_linear_cross_entropy_equals_materialized(opts, budget):
    opts = dict(opts)
    N, D, V = 300, 16, 37  # 300 * 37 > one 4096-element chunk: several chunks
    ignore = opts.get("ignore_index", -100)
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if opts.pop("bias", False) \
        else None
    t = torch.randint(0, V, (N,))
    t[::5] = ignore
    loss = gptfast.linear_cross_entropy(h, w, t, bias=b, backend="torch",
                                        memory_budget=budget, **opts)
    logits = h @ w.t() + (b if b is not None else 0)
    ref, _ = cross_entropy_oracle(logits, t, **opts)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
    g = torch.rand_like(ref) + 0.5
    params = [p for p in (h, w, b) if p is not None]
    got = torch.autograd.grad((loss * g).sum(), params)
    want = torch.autograd.grad((ref * g).sum(), params)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("opts", LCE_OPTIONS, ids=str)
def test_linear_cross_entropy_chunks_match_the_oracle(opts):
    # The reference functions themselves, with chunks of 7 rows (and a ragged last one): the
    # one-pass forward+gradient (the CPU default), forward, and the recomputing backward.
    from gptfast.ops import reference
    opts = dict(opts)
    reduction = opts.pop("reduction", "mean")
    N, D, V = 38, 8, 29
    ignore = opts.get("ignore_index", -100)
    o = dict(ignore_index=ignore, label_smoothing=opts.get("label_smoothing", 0.0),
             z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"), chunk_elements=7 * V)
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if opts.get("bias") else None
    t = torch.randint(0, V, (N,))
    t[::5] = ignore
    logits = h @ w.t() + (b if b is not None else 0)
    kw = {k: v for k, v in opts.items() if k != "bias"}
    ref_rows, ref_lse = cross_entropy_oracle(logits, t, reduction="none", **kw)
    params = [p for p in (h, w, b) if p is not None]
    with torch.no_grad():
        rows, lse = reference.linear_cross_entropy_forward(h, w, t, b, **o)
    torch.testing.assert_close(rows, ref_rows, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    g_rows, g_lse = torch.rand(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    want = torch.autograd.grad((ref_rows * g_rows).sum() + (ref_lse * g_lse).sum(), params,
                               retain_graph=True)
    got = reference.linear_cross_entropy_backward(g_rows, g_lse, h.detach(), w.detach(), t,
                                                  None if b is None else b.detach(), lse, **o)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    if reduction == "none":
        return
    red, _ = cross_entropy_oracle(logits, t, reduction=reduction, **kw)
    want = torch.autograd.grad(red, params)
    with torch.no_grad():
        rows, lse, got = reference.linear_cross_entropy_forward_with_grad(
            h, w, t, b, reduction=reduction, **o)
    torch.testing.assert_close(rows, ref_rows, atol=1e-10, rtol=1e-10)
    for a, e in zip([x for x in got if x is not None], want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_linear_cross_entropy_cpu_default_is_one_pass_and_scales_in_place(monkeypatch):
    # CPU, gradients wanted, mean/sum: the torch backend computes the gradients in its forward
    # (one pass over the logits); backward scales them by the upstream gradient in place, or
    # on copies when the graph is kept for a second backward.
    from gptfast.ops import reference
    calls = []
    real = reference.linear_cross_entropy_forward_with_grad
    monkeypatch.setattr(reference, "linear_cross_entropy_forward_with_grad",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    ref = F.cross_entropy(h @ w.t(), t)
    want = torch.autograd.grad(3 * ref, (h, w))
    loss = gptfast.linear_cross_entropy(h, w, t)
    assert calls == [1]
    got = torch.autograd.grad(3 * loss, (h, w), retain_graph=True)
    again = torch.autograd.grad(3 * loss, (h, w))              # the saved gradients unchanged
    for a, b, e in zip(got, again, want):
        torch.testing.assert_close(a, e)
        torch.testing.assert_close(b, e)
    with torch.no_grad():                                       # no gradients: forward only
        gptfast.linear_cross_entropy(h, w, t)
    assert calls == [1]


def test_linear_cross_entropy_against_torch_functional():
    h, w = torch.randn(64, 32), torch.randn(100, 32)
    t = torch.randint(0, 100, (64,))
    ref = F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(gptfast.linear_cross_entropy(h, w, t), ref)


def test_linear_cross_entropy_lse_gradient_and_z_loss():
    N, D, V = 20, 8, 13
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    for budget in (None, 1 << 30):
        loss, lse = gptfast.linear_cross_entropy(h, w, t, z_loss=1e-2, return_lse=True,
                                                 memory_budget=budget)
        ref, ref_lse = cross_entropy_oracle(h @ w.t(), t, z_loss=1e-2)
        torch.testing.assert_close(lse, ref_lse)
        got = torch.autograd.grad(loss + (lse ** 3).mean(), (h, w))
        want = torch.autograd.grad(ref + (ref_lse ** 3).mean(), (h, w))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_linear_cross_entropy_gradcheck():
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 6, -100, 3, 2, 2, 5, 4])
    assert torch.autograd.gradcheck(
        lambda h, w, b: gptfast.linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1,
                                                     z_loss=0.01, softcap=2.0,
                                                     reduction="none"), (h, w, b))


def test_tied_embedding_gradients_add():
    V, D = 23, 8
    wte = torch.nn.Embedding(V, D).double()
    idx = torch.randint(0, V, (4, 6))
    h = torch.tanh(wte(idx))  # the tied weight is used twice: input and output
    loss = gptfast.linear_cross_entropy(h, wte.weight, idx.roll(-1, 1))
    g, = torch.autograd.grad(loss, wte.weight)
    h2 = torch.tanh(F.embedding(idx, wte.weight))
    ref = F.cross_entropy((h2 @ wte.weight.t()).view(-1, V), idx.roll(-1, 1).view(-1))
    g2, = torch.autograd.grad(ref, wte.weight)
    torch.testing.assert_close(g, g2)


def test_linear_cross_entropy_peak_memory_far_below_materialized():
    # Separate processes, peak RSS growth: N x V fp32 logits (and their gradient) are ~1.6 GB
    # when materialized; the chunked op needs O(chunk x V).
    code = textwrap.dedent("""
        import resource, sys, torch, torch.nn.functional as F, gptfast
        torch.set_num_threads(1)
        N, D, V = 4096, 64, 50000
        h = torch.randn(N, D, requires_grad=True); w = torch.randn(V, D, requires_grad=True)
        t = torch.randint(0, V, (N,))
        h.grad = torch.zeros_like(h); w.grad = torch.zeros_like(w)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.argv[1] == "chunked":
            gptfast.linear_cross_entropy(h, w, t).backward()
        else:
            F.cross_entropy(h @ w.t(), t).backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    grow = {}
    for mode in ("chunked", "materialized"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             check=True)
        grow[mode] = int(res.stdout.split()[-1])
    assert grow["materialized"] > 1.2e9
    assert grow["chunked"] < 0.15 * grow["materialized"], grow
