"""gptfast as SDPA's flash implementation on a real GPU (run by `make gpu-check`; skipped
cleanly without CUDA): F.scaled_dot_product_attention in bf16 through the provider, against
PyTorch's math backend and its own flash kernel (captured at activation), dropout, fall-through,
and torch.compile."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptfast
from gptfast import sdpa
from gptfast.kernels import attention as attn_kernels

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture
def provider():
    gptfast.use_for_sdpa()
    yield sdpa._ACTIVE
    sdpa.restore()


def _qkv(B=2, Hq=8, Hkv=8, Sq=256, Sk=256, d=64, dtype=torch.bfloat16):
    def make(H, S):  # (B, H, S, d) views of (B, S, H, d) memory, as models produce them
        return torch.randn(B, S, H, d, device=CUDA, dtype=dtype).transpose(1, 2).requires_grad_()
    return make(Hq, Sq), make(Hkv, Sk), make(Hkv, Sk)


def _math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(Sq=100, Sk=300),
                                dict(is_causal=True, Hkv=2, enable_gqa=True, d=128)], ids=str)
def test_sdpa_flash_path_runs_gptfast(provider, kw):
    kw = dict(kw)
    shape = {n: kw.pop(n) for n in ("Hkv", "Sq", "Sk", "d") if n in kw}
    q, k, v = _qkv(**shape)
    g = torch.randn(q.shape, device=CUDA, dtype=q.dtype)
    f0 = attn_kernels.LAUNCHES["attention_fwd"]
    t0 = provider.fallthroughs
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        got = torch.autograd.grad(out, (q, k, v), g)
    assert provider.fallthroughs == t0  # gptfast ran forward and backward
    backend = gptfast.explain(gptfast.attention, q, k, v).backend
    if backend == "triton":
        assert attn_kernels.LAUNCHES["attention_fwd"] == f0 + 1
    assert out.dtype == q.dtype and out.stride() == q.stride()  # empty_like(query)
    ref = _math(q, k, v, **kw)
    want = torch.autograd.grad(ref, (q, k, v), g.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, e, t in zip(got, want, (q, k, v)):
        assert a.stride() == t.stride()  # the gradients in the inputs' memory order (meta)
        torch.testing.assert_close(a.float(), e, atol=5e-2, rtol=5e-2)


def test_sdpa_falls_through_to_pytorch_flash(provider):
    q, k, v = _qkv(d=40)  # head dim gptfast has no kernel for; PyTorch's flash takes it
    t0 = provider.fallthroughs
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
    assert provider.fallthroughs == t0 + 2
    torch.testing.assert_close(out.float(), _math(q, k, v, is_causal=True), atol=2e-2, rtol=2e-2)


def test_sdpa_dropout_is_reproducible_and_differentiable(provider):
    q, k, v = _qkv(Sq=128, Sk=128)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.manual_seed(0)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
        torch.manual_seed(0)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
        a.sum().backward()
    assert torch.equal(a, b)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(a, plain)
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))


def test_flash_attention_forward_fa2_semantics(provider):
    # aten::_flash_attention_forward: (B, S, H, d), causal aligned bottom-right
    q = torch.randn(2, 64, 4, 64, device=CUDA, dtype=torch.float16)
    k = torch.randn(2, 200, 4, 64, device=CUDA, dtype=torch.float16)
    v = torch.randn_like(k)
    args = (q, k, v, None, None, 64, 200, 0.0, True, False)
    ours = torch.ops.aten._flash_attention_forward(*args)
    theirs = provider.original["_flash_attention_forward"].call_boxed(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
    torch.testing.assert_close(ours[0], theirs[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ours[1], theirs[1], atol=2e-3, rtol=2e-3)


def test_sdpa_provider_under_torch_compile(provider):
    torch._dynamo.reset()
    q, k, v = _qkv()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().sum()
    eager = f(q, k, v)
    g_eager = torch.autograd.grad(eager, (q, k, v))
    t0 = provider.fallthroughs
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    g = torch.autograd.grad(compiled, (q, k, v))
    assert provider.fallthroughs == t0
    torch.testing.assert_close(compiled, eager, atol=1e-2, rtol=1e-3)
    for a, e in zip(g, g_eager):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
