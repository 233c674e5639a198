"""The public API's contract: errors, backend choice, autocast, torch.compile and opcheck."""
import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.ops.backends import BackendError


def qkv(B=1, Hq=2, Hkv=2, Sq=5, Sk=5, d=8, dtype=torch.float32):
    return (torch.randn(B, Hq, Sq, d, dtype=dtype), torch.randn(B, Hkv, Sk, d, dtype=dtype),
            torch.randn(B, Hkv, Sk, d, dtype=dtype))


# ---- bad input: each error names the argument ----------------------------------------------

@pytest.mark.parametrize("mutate, exc, words", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D"),
    (lambda q, k, v: (q, k.int(), v), TypeError, "k: expected dtype"),
    (lambda q, k, v: (q, k, v[..., :4]), ValueError, "k and v"),
    (lambda q, k, v: (torch.randn(1, 3, 5, 8), k, v), ValueError, "must divide"),
    (lambda q, k, v: (q, k, v.double()), TypeError, "v has dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k is on meta"),
    (lambda q, k, v: ([1.0], k, v), TypeError, "q: expected a torch.Tensor"),
])
def test_attention_bad_tensors(mutate, exc, words):
    with pytest.raises(exc, match=words):
        gptfast.attention(*mutate(*qkv()))


@pytest.mark.parametrize("kw, words", [
    (dict(key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), "key_padding_mask: expected shape"),
    (dict(key_padding_mask=torch.ones(1, 5)), "key_padding_mask: expected dtype"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes: expected shape"),
    (dict(window=0), "window"),
    (dict(window=2, causal=False), "window"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(softmax_scale=float("nan")), "softmax_scale"),
    (dict(backend="flash"), "backend must be one of"),
])
def test_attention_bad_options(kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        gptfast.attention(*qkv(), **kw)


def test_unavailable_backend_says_why_and_lists_the_able():
    with pytest.raises(BackendError, match=r"backend='cuda'.*CUDA tensors.*can: .*torch"):
        gptfast.attention(*qkv(), backend="cuda")
    with pytest.raises(BackendError, match="cuda"):
        gptfast.linear_cross_entropy(torch.randn(4, 8), torch.randn(9, 8),
                                     torch.randint(0, 9, (4,)), backend="cuda")


@pytest.mark.parametrize("targets, words", [
    (torch.tensor([0, 1, 9, 2]), r"targets: expected class indices in \[0, 9\).*got 9"),
    (torch.tensor([0, -1, 2, 2]), "got -1"),
    (torch.tensor([0, 1, 2]), "targets: expected shape"),
    (torch.tensor([0.0, 1, 2, 3]), "targets: expected dtype"),
])
def test_cross_entropy_bad_targets(targets, words):
    h, w = torch.randn(4, 8), torch.randn(9, 8)
    with pytest.raises((ValueError, TypeError), match=words):
        gptfast.linear_cross_entropy(h, w, targets)
    with pytest.raises((ValueError, TypeError), match=words):
        gptfast.cross_entropy(h @ w.t(), targets)


@pytest.mark.parametrize("kw, words", [
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(softcap=0.0), "softcap"),
    (dict(memory_budget=-5), "memory_budget"),
    (dict(bias=torch.randn(8)), "bias: expected shape"),
])
def test_linear_cross_entropy_bad_options(kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        gptfast.linear_cross_entropy(torch.randn(4, 8), torch.randn(9, 8),
                                     torch.randint(0, 9, (4,)), **kw)


def test_linear_cross_entropy_shape_and_dtype_errors():
    t = torch.randint(0, 9, (4,))
    with pytest.raises(ValueError, match="hidden: expected shape"):
        gptfast.linear_cross_entropy(torch.randn(4, 7), torch.randn(9, 8), t)
    with pytest.raises(TypeError, match="weight has dtype"):
        gptfast.linear_cross_entropy(torch.randn(4, 8), torch.randn(9, 8).double(), t)


def test_ignore_index_is_not_out_of_range():
    h, w = torch.randn(4, 8), torch.randn(9, 8)
    loss = gptfast.linear_cross_entropy(h, w, torch.tensor([1, -100, 2, 3]))
    assert loss.isfinite()


# ---- backend choice ---------------------------------------------------------------------------

def test_explain_names_the_backend_and_the_reasons():
    d = gptfast.explain(gptfast.attention, *qkv())
    assert d.backend == "torch"  # no GPU here; the interpreter is never picked by "auto"
    text = str(d)
    assert "cuda" in text and "triton" in text and "runs on 'torch'" in text
    d = gptfast.explain("linear_cross_entropy", torch.randn(4, 8), torch.randn(9, 8),
                        torch.randint(0, 9, (4,)))
    assert d.backend == "torch" and d.reasons["cuda"]
    with pytest.raises(ValueError, match="unknown op"):
        gptfast.explain("nope")


def test_report_lists_every_op():
    text = gptfast.report()
    for op in ("attention", "cross_entropy", "linear_cross_entropy"):
        assert op in text
    assert "torch" in text


# ---- autocast ---------------------------------------------------------------------------------

def test_autocast_fp32_tied_embedding_with_bf16_activations():
    wte = torch.nn.Embedding(50, 16)
    idx = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(wte(idx), torch.eye(16))  # bf16 activations
        assert h.dtype == torch.bfloat16
        loss = gptfast.linear_cross_entropy(h.view(-1, 16), wte.weight, idx.roll(-1).view(-1))
    loss.backward()
    assert wte.weight.grad.dtype == torch.float32
    ref = F.cross_entropy(wte(idx).view(-1, 16) @ wte.weight.t(), idx.roll(-1).view(-1))
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


def test_autocast_attention_follows_the_autocast_dtype():
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gptfast.attention(q, k.bfloat16(), v)
    assert out.dtype == torch.bfloat16


# ---- torch.compile and opcheck -----------------------------------------------------------------

def test_fullgraph_compile_of_a_training_step():
    torch._dynamo.reset()
    wte = torch.nn.Parameter(torch.randn(40, 16) * 0.1)
    proj = torch.nn.Linear(16, 48)

    def loss_fn(idx):
        x = wte[idx]  # (B, T, C)
        B, T, C = x.shape
        q, k, v = proj(x).view(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = gptfast.attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return gptfast.linear_cross_entropy(y.reshape(-1, C), wte, idx.roll(-1, 1).view(-1))

    # Forward and loss traced as one graph (fullgraph: any graph break is an error);
    # AOTAutograd compiles the matching backward graph, run by .backward().
    idx = torch.randint(0, 40, (2, 6))
    eager = loss_fn(idx)
    eager.backward()
    g_eager = wte.grad.clone()
    wte.grad = None
    proj.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True)(idx)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(wte.grad, g_eager, atol=1e-5, rtol=1e-4)


def _lce_args(bias=True):
    h, w = torch.randn(13, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True) if bias else None
    t = torch.randint(0, 11, (13,))
    t[2] = -100
    return h, w, t, b


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_cross_entropy_ops(bias):
    h, w, t, b = _lce_args(bias)
    opts = (-100, 0.1, 1e-3, 3.0)
    ops = torch.ops.gptfast
    torch.library.opcheck(ops.linear_cross_entropy_fwd, (h, w, t, b, *opts, "torch"))
    _, lse = ops.linear_cross_entropy_fwd(h, w, t, b, *opts, "torch")
    g = torch.rand(13)
    torch.library.opcheck(ops.linear_cross_entropy_bwd,
                          (g, None, h.detach(), w.detach(), t, b if b is None else b.detach(),
                           lse.detach(), *opts, "torch"))
    torch.library.opcheck(ops.linear_cross_entropy_fwd_grad,
                          (h, w, t, b, *opts, "mean", 1 << 30, "torch"))


def test_opcheck_cross_entropy_ops():
    x = torch.randn(9, 17, requires_grad=True)
    t = torch.randint(0, 17, (9,))
    opts = (-100, 0.0, 1e-3, None)
    torch.library.opcheck(torch.ops.gptfast.cross_entropy_fwd, (x, t, *opts, False, "torch"))
    _, lse = torch.ops.gptfast.cross_entropy_fwd(x, t, *opts, False, "torch")
    torch.library.opcheck(torch.ops.gptfast.cross_entropy_bwd,
                          (torch.rand(9), torch.rand(9), x.detach(), t, lse.detach(), *opts,
                           "torch"))
    torch.library.opcheck(torch.ops.gptfast.cross_entropy_bwd_,
                          (torch.rand(9), None, x.detach().clone(), t, lse.detach(), *opts,
                           "torch"))


def test_stride_zero_upstream_gradient():
    h, w, t, b = _lce_args()
    loss = gptfast.linear_cross_entropy(h, w, t, bias=b, reduction="none")
    loss.sum().backward()  # the upstream gradient is an expanded (stride 0) tensor
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(h2 @ w.detach().t() + b.detach(), t, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h2.grad)


def test_triton_declines_head_slices_beyond_32_bit_offsets():
    # A (batch, head) slice spanning 2**31 elements (here through a huge sequence stride, on
    # the meta device so nothing is allocated) is declined with a reason, not overflowed.
    q = torch.empty_strided((1, 1, 3, 32), (0, 0, 2**30, 1), device="meta")
    from gptfast.ops.attention import _triton_support
    reason = _triton_support(dict(dtype=torch.float16, head_dim=32, needs_grad=False,
                                  qkv=(q, q, q)))
    assert reason and "2**31" in reason
