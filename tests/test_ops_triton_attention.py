"""The public attention op on backend="triton": the kernels behind the custom ops, autograd,
opcheck, torch.compile, and the GPT model dispatching to them. On CPU this runs under
TRITON_INTERPRET=1 (tests/conftest.py), with small shapes."""
import pytest
import torch

import gptfast
from gptfast.kernels import attention as attn_kernels
from gptfast.model import GPT, get_config
from oracles import attention_oracle

pytestmark = pytest.mark.attention_kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_attention(monkeypatch):
    monkeypatch.setattr(attn_kernels, "POISON_OUTPUTS", True)


@pytest.mark.parametrize("kw", [dict(), dict(Hkv=1, padding=True), dict(Sq=9, alibi=True),
                                dict(window=5, deterministic=True),
                                dict(Hkv=1, softcap=2.0, deterministic=True)], ids=str)
def test_attention_triton_through_the_public_api(kw, poison_attention):
    kw = dict(kw)
    B, Hq, Sq, Sk, d = 2, 2, kw.pop("Sq", 21), 21, 32
    Hkv = kw.pop("Hkv", 2)
    q = torch.randn(B, Hq, Sq, d, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, d, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, d, device=DEVICE, requires_grad=True)
    opts = dict(causal=True)
    if kw.pop("padding", False):
        mask = torch.ones(B, Sk, dtype=torch.bool, device=DEVICE)
        mask[0, :4] = False
        opts["key_padding_mask"] = mask
    if kw.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(Hq, device=DEVICE) + 0.1
    opts.update(kw)
    before = attn_kernels.LAUNCHES["attention_bwd"]
    out, lse = gptfast.attention(q, k, v, return_lse=True, backend="triton", **opts)
    g = torch.randn_like(out)
    # the lse is differentiable too: its gradient flows through the kernel's dlse input
    lse_term = torch.where(lse.isfinite(), lse, 0.0).sum()
    got = torch.autograd.grad((out * g).sum() + lse_term, (q, k, v))
    assert attn_kernels.LAUNCHES["attention_bwd"] == before + 1
    opts.pop("deterministic", None)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = gptfast.attention(qd, kd, vd, return_lse=True, backend="torch", **opts)
    want = torch.autograd.grad((ref_out * g.double()).sum()
                               + torch.where(ref_lse.isfinite(), ref_lse, 0.0).sum(), (qd, kd, vd))
    oracle_out, _ = attention_oracle(q.detach(), k.detach(), v.detach(), **opts)
    torch.testing.assert_close(out.double(), oracle_out, atol=2e-5, rtol=1e-4)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=5e-5, rtol=1e-4)


def test_opcheck_triton_attention_ops():
    # autograd lives outside the ops (gptfast.ops.attention._Attention), so the ops are
    # checked on detached inputs; gradcheck below covers the public function's gradients
    q = torch.randn(1, 2, 9, 32, device=DEVICE)
    k = torch.randn(1, 1, 13, 32, device=DEVICE)
    v = torch.randn(1, 1, 13, 32, device=DEVICE)
    ops = torch.ops.gptfast
    args = (q, k, v, None, None, None, True, 0.2, None, 0.0)
    torch.library.opcheck(ops.triton_attention_fwd, args)
    out, lse = ops.triton_attention_fwd(*args)
    dout = torch.randn(1, 9, 2, 32, device=DEVICE).transpose(1, 2)  # any strides
    torch.library.opcheck(ops.triton_attention_bwd,
                          (dout, torch.randn_like(lse), q, k, v, out, lse, None, None, None, True,
                           0.2, None, 0.0, True))
    # softcap (the schema's last, optional argument)
    torch.library.opcheck(ops.triton_attention_fwd, args + (3.0,))
    out, lse = ops.triton_attention_fwd(*args, 3.0)
    torch.library.opcheck(ops.triton_attention_bwd,
                          (dout, torch.randn_like(lse), q, k, v, out, lse, None, None, None, True,
                           0.2, None, 0.0, False, 3.0))


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
def test_gradcheck_triton_attention():
    # fp32 is the widest dtype the kernels take; fast mode keeps the interpreted calls few
    q, k, v = (torch.randn(1, 2, s, 32, device=DEVICE, requires_grad=True) for s in (5, 7, 7))
    slopes = torch.rand(2, device=DEVICE)

    def fn(q, k, v):
        out, lse = gptfast.attention(q, k, v, alibi_slopes=slopes, return_lse=True,
                                     backend="triton")
        return out, lse
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=5e-3, rtol=5e-2,
                                    fast_mode=True)


def test_gpt_model_attention_dispatches_to_triton_and_compiles():
    torch._dynamo.reset()
    cfg = get_config("tiny", n_layer=2, n_head=2, block_size=16, backend="triton")
    model = GPT(cfg).to(DEVICE)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device=DEVICE)
    fwd, bwd = attn_kernels.LAUNCHES["attention_fwd"], attn_kernels.LAUNCHES["attention_bwd"]
    compiled = torch.compile(model, fullgraph=True)
    _, loss = compiled(idx, targets=idx.roll(-1, 1))
    loss.backward()
    # one launch per layer, forward and backward: nothing fell back to the reference
    assert attn_kernels.LAUNCHES["attention_fwd"] == fwd + cfg.n_layer
    assert attn_kernels.LAUNCHES["attention_bwd"] == bwd + cfg.n_layer
    ref = GPT(get_config("tiny", n_layer=2, n_head=2, block_size=16, backend="torch")).to(DEVICE)
    ref.load_state_dict(model.state_dict())
    _, ref_loss = ref(idx, targets=idx.roll(-1, 1))
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(Hkv=1, padding=True, window=7),
                                dict(alibi=True, deterministic=True), dict(softcap=3.0)], ids=str)
def test_attention_triton_bf16_through_the_public_api(kw):
    """bf16 on backend="triton" (on CPU: the interpreter, made right for bf16 by gptfast):
    FlashAttention's rule against float64, with PyTorch's own bf16 eager attention as the
    yardstick: out and lse within 2x its error, gradients within 3x."""
    from _attention_ref import attention_ref
    from _tolerance import assert_rule
    kw = dict(kw)
    B, Hq, S, d = 2, 2, 40, 32
    Hkv = kw.pop("Hkv", Hq)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, S, d, generator=gen).to(DEVICE, torch.bfloat16)
               for h in (Hq, Hkv, Hkv))
    opts = dict(causal=True, window=kw.pop("window", None))
    if kw.pop("padding", False):
        mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        mask[0, :5] = False
        opts["key_padding_mask"] = mask
    if kw.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(Hq, generator=gen).to(DEVICE) + 0.1
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = gptfast.attention(*leaves, return_lse=True, backend="triton", **opts, **kw)
    assert out.dtype == torch.bfloat16
    g_out = torch.randn(out.shape, generator=gen).to(DEVICE, torch.bfloat16)
    g_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    got = torch.autograd.grad([out, torch.where(lse.isfinite(), lse, 0.0)], leaves,
                              [g_out, g_lse])

    ref_opts = dict(opts, softmax_scale=d ** -0.5, softcap=kw.get("softcap"))
    results = []
    for dt in (torch.float64, torch.bfloat16):  # the oracle, then PyTorch eager in bf16
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l_ = attention_ref(*ls, **ref_opts, dtype=dt)
        grads = torch.autograd.grad([o, torch.where(l_.isfinite(), l_, 0.0)], ls,
                                    [g_out.to(dt), g_lse.to(dt)])
        results.append((o, l_, *grads))
    for name, got_t, ref, eager, mult in zip(("out", "lse", "dq", "dk", "dv"),
                                             (out, lse, *got), *results, (2, 2, 3, 3, 3)):
        assert_rule(name, got_t, ref, eager.float() if name == "lse" else eager, mult,
                    8e-3 if mult == 2 else 1.6e-2)
