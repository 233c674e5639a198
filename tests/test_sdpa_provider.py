"""gptfast as PyTorch's SDPA flash implementation (gptfast/sdpa.py), proven on CPU tensors: with
TRITON_INTERPRET=1, activation also overrides the CPU flash ops, so F.scaled_dot_product_attention
runs gptfast's Triton kernels (counted by their launch counter) and is compared against PyTorch's
math backend. The CUDA adapters run on CPU tensors too (called directly, with stand-ins for the
kernels they fall through to), checked against the ops' meta registrations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptfast
from gptfast import sdpa
from gptfast.kernels import attention as attn_kernels
from gptfast.ops import backends, reference

pytestmark = pytest.mark.attention_kernel
needs_interpreter = pytest.mark.skipif(not backends.interpreter_enabled(),
                                       reason="the CPU proof needs TRITON_INTERPRET=1")


@pytest.fixture
def provider():
    assert torch.nn.attention.current_flash_attention_impl() != "gptfast"
    gptfast.use_for_sdpa()
    assert torch.nn.attention.current_flash_attention_impl() == "gptfast"
    yield sdpa._ACTIVE
    torch.nn.attention.restore_flash_attention_impl()
    assert not sdpa.active()


class Counts:
    """Kernel launches and fall-throughs of one block of code."""

    def __init__(self, prov):
        self.prov = prov

    def __enter__(self):
        self.f0, self.b0 = attn_kernels.LAUNCHES["attention_fwd"], attn_kernels.LAUNCHES["attention_bwd"]
        self.t0 = self.prov.fallthroughs
        return self

    def __exit__(self, *exc):
        self.fwd = attn_kernels.LAUNCHES["attention_fwd"] - self.f0
        self.bwd = attn_kernels.LAUNCHES["attention_bwd"] - self.b0
        self.fallthroughs = self.prov.fallthroughs - self.t0


def _math(*args, **kw):
    with sdpa_kernel(SDPBackend.MATH):  # PyTorch's reference, never reaches the override
        return F.scaled_dot_product_attention(*args, **kw)


def _inputs(B=2, Hq=2, Hkv=2, Sq=24, Sk=24, d=32, bshd=False):
    def make(H, S):
        t = torch.randn(B, S, H, d).transpose(1, 2) if bshd else torch.randn(B, H, S, d)
        return t.requires_grad_()
    return make(Hq, Sq), make(Hkv, Sk), make(Hkv, Sk)


# ---- F.scaled_dot_product_attention through the provider (CPU, interpreter) --------------------

@needs_interpreter
@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(Sq=9, Sk=24),
                                dict(is_causal=True, scale=0.3, bshd=True),
                                dict(is_causal=True, Hq=4, Hkv=2, enable_gqa=True)], ids=str)
def test_sdpa_runs_gptfast_and_matches_math(provider, kw):
    kw = dict(kw)
    shape = {n: kw.pop(n) for n in ("Hq", "Hkv", "Sq", "Sk", "bshd") if n in kw}
    q, k, v = _inputs(**shape)
    g = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    with Counts(provider) as c:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        got = torch.autograd.grad(out, (q, k, v), g)
    assert (c.fwd, c.bwd, c.fallthroughs) == (1, 1, 0)
    ref = _math(q, k, v, **kw)
    want = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("case", ["attn_mask", "causal Sq != Sk", "head dim 36", "fp64"])
def test_sdpa_falls_through_to_pytorch_where_gptfast_cannot(provider, case):
    # head dim 36: not a multiple of 8, which the kernels need
    q, k, v = _inputs(Sq=7 if case == "causal Sq != Sk" else 24, d=36 if case == "head dim 36" else 32)
    kw = dict(is_causal=True)
    if case == "attn_mask":
        kw = dict(attn_mask=torch.rand(24, 24) > 0.3)
    if case == "fp64":
        q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    with Counts(provider) as c:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
        out.sum().backward()
    assert (c.fwd, c.bwd) == (0, 0) and c.fallthroughs == 2  # forward and backward, never an error
    ref = _math(q.detach(), k.detach(), v.detach(), **kw)  # top-left causal alignment kept
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_restore_gives_pytorch_its_kernels_back():
    q, k, v = _inputs()
    gptfast.use_for_sdpa()
    torch.nn.attention.restore_flash_attention_impl()
    f0 = attn_kernels.LAUNCHES["attention_fwd"]
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert attn_kernels.LAUNCHES["attention_fwd"] == f0
    sdpa.use_for_sdpa()
    sdpa.restore()  # gptfast's own undo, for PyTorch versions without restore_flash_attention_impl
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert attn_kernels.LAUNCHES["attention_fwd"] == f0 and not sdpa.active()
    from gptfast.ops import _cpu_flash
    assert _cpu_flash.ORIGINAL is None  # nothing captured outlives the provider


@needs_interpreter
def test_pytorch_cpu_flash_kernel_bypasses_the_provider(provider):
    q, k, v = _inputs()
    with Counts(provider) as c:
        out, lse = sdpa.cpu_flash_attention(q, k, v, is_causal=True)
        out.sum().backward()
    assert (c.fwd, c.bwd, c.fallthroughs) == (0, 0, 0)
    ref = _math(q.detach(), k.detach(), v.detach(), is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert q.grad is not None and q.grad.isfinite().all()


@needs_interpreter
@pytest.mark.parametrize("kw", [dict(), dict(key_padding_mask=True), dict(Sq=9, window=4)],
                         ids=str)
def test_torch_backend_never_loops_through_the_provider(provider, kw):
    # gptfast.attention's "torch" backend on CPU tensors runs PyTorch's CPU flash kernel: with
    # gptfast active as the SDPA provider (which overrides that kernel's op) it still gets
    # PyTorch's own kernel, no gptfast launch and no fall-through.
    kw = dict(kw)
    q, k, v = _inputs(Sq=kw.pop("Sq", 24), Hq=4, Hkv=2)
    if kw.pop("key_padding_mask", False):
        kw["key_padding_mask"] = torch.ones(2, 24, dtype=torch.bool)
        kw["key_padding_mask"][0, :5] = False
    with Counts(provider) as c:
        out = gptfast.attention(q, k, v, causal=True, backend="torch", **kw)
        out.sum().backward()
    assert (c.fwd, c.bwd, c.fallthroughs) == (0, 0, 0)
    assert "SDPA" in gptfast.explain(gptfast.attention, q, k, v, **kw).torch_path
    ref, _ = reference.attention(q.detach(), k.detach(), v.detach(), causal=True, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert q.grad.isfinite().all()


# ---- a nanoGPT-style model, unchanged, trained through the provider ----------------------------

class Block(nn.Module):
    def __init__(self, C, nh):
        super().__init__()
        self.nh = nh
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, V=64, C=64, nh=2, L=2, T=32):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block(C, nh) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def _train(model, steps, data):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for idx in data[:steps]:
        loss = model(idx, idx.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_interpreter
def test_unchanged_nanogpt_style_model_trains_through_the_provider(provider, one_thread):
    torch.manual_seed(1)
    model = TinyGPT()
    ref_model = TinyGPT()
    ref_model.load_state_dict(model.state_dict())
    data = [torch.randint(0, 64, (2, 32)) for _ in range(3)]
    with Counts(provider) as c:
        losses = _train(model, 3, data)
    assert (c.fwd, c.bwd, c.fallthroughs) == (3 * 2, 3 * 2, 0)  # every layer, every step
    sdpa.restore()
    ref = _train(ref_model, 3, data)
    gptfast.use_for_sdpa()  # the fixture restores it again
    assert losses[-1] < losses[0]
    for a, b in zip(losses, ref):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))


def _attention_layer(x, w_qkv, nh=2):
    B, T, C = x.shape
    q, k, v = (x @ w_qkv).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, C)


@needs_interpreter
def test_provider_under_torch_compile(provider, one_thread):
    # Inductor trusts the flash ops' meta registrations for the strides of out, lse and the
    # gradients: the compiled step only matches eager if the overrides honour them
    torch._dynamo.reset()
    x = torch.randn(2, 32, 64, requires_grad=True)
    w = (torch.randn(64, 192) * 0.1).requires_grad_()
    g = torch.randn(2, 32, 64)
    eager = _attention_layer(x, w)
    g_eager = torch.autograd.grad(eager, (x, w), g)
    compiled = torch.compile(_attention_layer, fullgraph=True)
    with Counts(provider) as c:
        out = compiled(x, w)
        grads = torch.autograd.grad(out, (x, w), g)
    assert (c.fwd, c.bwd) == (1, 1)  # the compiled graph's flash ops run gptfast's kernels
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads, g_eager):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


# ---- the adapters against the ops' meta registrations ---------------------------------------------

class _Original:
    """Stand-in for a captured PyTorch kernel: records the call instead of running it."""

    def __init__(self):
        self.calls = 0

    def call_boxed(self, keyset, *args, **kwargs):
        self.calls += 1
        return "fell through"


def _adapters():
    return sdpa.Provider({name: _Original() for name in sdpa._ADAPTERS})


def _meta(t):
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _assert_like_meta(got, want):
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride()), (g, w)
        else:
            assert g == w


KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@needs_interpreter
@pytest.mark.parametrize("bshd", [False, True], ids=["bhsd", "bshd-memory"])
def test_sdpa_flash_adapter_matches_meta_and_math(bshd):
    prov = _adapters()
    q, k, v = (t.detach() for t in _inputs(Hq=4, Hkv=2, Sq=20, Sk=20, bshd=bshd))
    aten = torch.ops.aten
    got = prov.sdpa_flash_forward(KEYSET, q, k, v, 0.0, True, False, scale=0.2)
    want = aten._scaled_dot_product_flash_attention.default(_meta(q), _meta(k), _meta(v), 0.0,
                                                             True, False, scale=0.2)
    _assert_like_meta(got, want)
    out, lse = got[0], got[1]
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), softmax_scale=0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)
    dout = torch.randn(q.shape)
    grads = prov.sdpa_flash_backward(KEYSET, dout, q, k, v, out, lse, None, None, 20, 20, 0.0,
                                     True, got[6], got[7], scale=0.2)
    want = aten._scaled_dot_product_flash_attention_backward.default(
        _meta(dout), _meta(q), _meta(k), _meta(v), _meta(out), _meta(lse), None, None, 20, 20,
        0.0, True, _meta(got[6]), _meta(got[7]), scale=0.2)
    _assert_like_meta(grads, want)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    r, _ = reference.attention(qd, kd, vd, softmax_scale=0.2)
    for a, e in zip(grads, torch.autograd.grad(r, (qd, kd, vd), dout.double())):
        torch.testing.assert_close(a.double(), e, atol=5e-5, rtol=1e-4)
    assert all(o.calls == 0 for o in prov.original.values())


@needs_interpreter
def test_flash_attention_adapter_fa2_layout_window_and_meta():
    # aten::_flash_attention_forward: (B, S, H, d), causal bottom-right, FA2 windows
    prov = _adapters()
    q, k, v = torch.randn(2, 9, 2, 32), torch.randn(2, 21, 2, 32), torch.randn(2, 21, 2, 32)
    kw = dict(scale=None, window_size_left=4, window_size_right=0)
    got = prov.flash_forward(KEYSET, q, k, v, None, None, 9, 21, 0.0, True, False, **kw)
    want = torch.ops.aten._flash_attention_forward.default(
        _meta(q), _meta(k), _meta(v), None, None, 9, 21, 0.0, True, False, **kw)
    _assert_like_meta(got, want)
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    ref, _ = reference.attention(qh, kh, vh, causal=True, window=5)  # left 4 = gptfast's window 5
    torch.testing.assert_close(got[0].transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-4)
    dout = torch.randn(q.shape)
    grads = prov.flash_backward(KEYSET, dout, q, k, v, got[0], got[1], None, None, 9, 21, 0.0,
                                True, got[2], got[3], **kw)
    want = torch.ops.aten._flash_attention_backward.default(
        _meta(dout), _meta(q), _meta(k), _meta(v), _meta(got[0]), _meta(got[1]), None, None, 9,
        21, 0.0, True, _meta(got[2]), _meta(got[3]), **kw)
    _assert_like_meta(grads, want)
    # what gptfast cannot express falls through: varlen, a right window, a debug mask
    assert prov.flash_forward(KEYSET, q, k, v, torch.zeros(3, dtype=torch.int32), None, 9, 21,
                              0.0, True, False) == "fell through"
    assert prov.flash_forward(KEYSET, q, k, v, None, None, 9, 21, 0.0, False, False,
                              window_size_left=-1, window_size_right=3) == "fell through"
    assert prov.flash_forward(KEYSET, q, k, v, None, None, 9, 21, 0.0, True, True) \
        == "fell through"
    assert prov.flash_forward(KEYSET, q, k, v, None, None, 9, 21, 0.0, True, False,
                              alibi_slopes=torch.rand(2)) == "fell through"
    assert prov.original["_flash_attention_forward"].calls == 4


@needs_interpreter
def test_cpu_flash_adapter_matches_meta():
    prov = _adapters()
    q, k, v = (t.detach() for t in _inputs(bshd=True))
    aten = torch.ops.aten
    got = prov.cpu_flash_forward(KEYSET, q, k, v, 0.0, True)
    _assert_like_meta(got, aten._scaled_dot_product_flash_attention_for_cpu.default(
        _meta(q), _meta(k), _meta(v), 0.0, True))
    dout = torch.randn(q.shape)
    grads = prov.cpu_flash_backward(KEYSET, dout, q, k, v, got[0], got[1], 0.0, True)
    _assert_like_meta(grads, aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
        _meta(dout), _meta(q), _meta(k), _meta(v), _meta(got[0]), _meta(got[1]), 0.0, True))
    # dropout: the CPU op has no RNG state for its backward, so it falls through
    assert prov.cpu_flash_forward(KEYSET, q, k, v, 0.2, True) == "fell through"


@needs_interpreter
def test_sdpa_flash_adapter_dropout_regenerates_the_mask_in_backward():
    prov = _adapters()
    q, k, v = (t.detach() for t in _inputs(B=1, Sq=16, Sk=16))
    p = 0.25
    out, lse, _, _, _, _, rng_state, offset, _ = prov.sdpa_flash_forward(KEYSET, q, k, v, p,
                                                                         True, False)
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,) and offset.shape == ()
    seed = rng_state.view(torch.int64)[:1]
    keep = attn_kernels.attention_dropout_keep_mask(seed, 1, 2, 16, 16, p, "cpu")
    assert 0.5 < keep.float().mean() < 0.95  # dropout happened
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = reference.attention(qd, kd, vd, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    dout = torch.randn(q.shape)
    grads = prov.sdpa_flash_backward(KEYSET, dout, q, k, v, out, lse, None, None, 16, 16, p,
                                     True, rng_state, offset)
    for a, e in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double())):
        torch.testing.assert_close(a.double(), e, atol=5e-5, rtol=1e-4)
