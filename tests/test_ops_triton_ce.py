"""The public cross-entropy ops on backend="triton": the kernels behind the custom ops, autograd,
opcheck, torch.compile, and the GPT model dispatching to them. On CPU this runs under
TRITON_INTERPRET=1 (tests/conftest.py), with small shapes."""
import pytest
import torch

import gptfast
from gptfast.kernels import cross_entropy as ce_kernels
from gptfast.model import GPT, get_config
from oracles import cross_entropy_oracle

pytestmark = pytest.mark.ce_kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ce_kernels, "POISON_OUTPUTS", True)


def _lce_inputs(N=70, D=32, V=257, dtype=torch.float32, bias=False):
    h = (torch.randn(N, D, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=DEVICE) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, device=DEVICE) * 0.5).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), device=DEVICE)
    t[::9] = -100
    return h, w, b, t


@pytest.mark.parametrize("budget", [None, 1 << 30], ids=["lean", "budgeted"])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="none", bias=True),
                                  dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
                                       reduction="sum")], ids=str)
def test_linear_cross_entropy_triton_matches_oracle(opts, budget):
    opts = dict(opts)
    h, w, b, t = _lce_inputs(bias=opts.pop("bias", False))
    before = dict(ce_kernels.LAUNCHES)
    loss = gptfast.linear_cross_entropy(h, w, t, bias=b, memory_budget=budget,
                                        backend="triton", **opts)
    params = [p for p in (h, w, b) if p is not None]
    g = torch.rand_like(loss) + 0.5
    got = torch.autograd.grad((loss * g).sum(), params)
    assert ce_kernels.LAUNCHES["lce_fwd"] > before.get("lce_fwd", 0)
    logits = h.double() @ w.double().t() + (b.double() if b is not None else 0)
    ref, _ = cross_entropy_oracle(logits, t, **opts)
    want = torch.autograd.grad((ref * g.double()).sum(), params)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e.double(), atol=1e-5, rtol=1e-4)


def test_cross_entropy_triton_matches_oracle():
    x = (torch.randn(45, 1000, device=DEVICE) * 2).requires_grad_()
    t = torch.randint(0, 1000, (45,), device=DEVICE)
    t[3] = -100
    loss, lse = gptfast.cross_entropy(x, t, label_smoothing=0.1, return_lse=True,
                                      backend="triton")
    ref, ref_lse = cross_entropy_oracle(x.double(), t, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double()[t != -100], ref_lse[t != -100], atol=1e-5, rtol=1e-5)
    gx, = torch.autograd.grad(loss, x)
    rx, = torch.autograd.grad(ref, x)
    torch.testing.assert_close(gx.double(), rx.double(), atol=1e-6, rtol=1e-4)


def test_cross_entropy_inplace_backward_reuses_the_logits_buffer():
    h = torch.randn(33, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(300, 16, device=DEVICE)
    t = torch.randint(0, 300, (33,), device=DEVICE)
    ptrs = []

    def keep_ptr(grad):  # the gradient reaching the logits is the logits buffer itself
        ptrs.append(grad.data_ptr())
    logits = h @ w.t()
    logits.register_hook(keep_ptr)
    ptr = logits.data_ptr()
    loss = gptfast.cross_entropy(logits, t, z_loss=1e-3, inplace_backward=True,
                                 backend="triton")
    del logits
    loss.backward()
    assert ptrs == [ptr]
    ref, _ = cross_entropy_oracle(h.detach().double() @ w.double().t(), t, z_loss=1e-3)
    h2 = h.detach().double().requires_grad_()
    ref2, _ = cross_entropy_oracle(h2 @ w.double().t(), t, z_loss=1e-3)
    g2, = torch.autograd.grad(ref2, h2)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), g2, atol=1e-5, rtol=1e-4)


def test_opcheck_triton_cross_entropy_ops():
    # autograd lives outside the ops: they are checked on detached inputs, every op once
    h, w, b, t = (x.detach() if x is not None and x.is_floating_point() else x
                  for x in _lce_inputs(N=20, V=129, bias=True))
    opts = (-100, 0.1, 1e-3, 5.0)
    ops = torch.ops.gptfast
    torch.library.opcheck(ops.triton_linear_cross_entropy_fwd, (h, w, t, b, *opts))
    _, lse = ops.triton_linear_cross_entropy_fwd(h, w, t, b, *opts)
    g = torch.rand(20, device=DEVICE)
    torch.library.opcheck(ops.triton_linear_cross_entropy_bwd,
                          (g, torch.rand(20, device=DEVICE), h, w, t, b, lse, *opts))
    torch.library.opcheck(ops.triton_linear_cross_entropy_bwd,
                          (g.new_ones(()).expand(20), None, h, w, t, None, lse, *opts))
    torch.library.opcheck(ops.triton_linear_cross_entropy_fwd_grad,
                          (h, w, t, b, *opts, 1, 1 << 30))
    x = torch.randn(9, 130, device=DEVICE)
    tx = torch.randint(0, 130, (9,), device=DEVICE)
    torch.library.opcheck(ops.triton_cross_entropy_fwd, (x, tx, *opts))
    _, lse = ops.triton_cross_entropy_fwd(x, tx, *opts)
    torch.library.opcheck(ops.triton_cross_entropy_bwd,
                          (torch.rand(9, device=DEVICE), None, x, tx, lse, *opts))
    torch.library.opcheck(ops.triton_cross_entropy_bwd_,
                          (torch.rand(9, device=DEVICE), torch.rand(9, device=DEVICE), x.clone(),
                           tx, lse, *opts))


@pytest.mark.filterwarnings("ignore:Input #.*double precision")
@pytest.mark.parametrize("budget", [None, 1 << 30], ids=["lean", "budgeted"])
def test_gradcheck_triton_linear_cross_entropy(budget):
    h, w, b, t = _lce_inputs(N=9, D=16, V=40, bias=True)

    def fn(h, w, b):
        return gptfast.linear_cross_entropy(h, w, t, bias=b, z_loss=1e-2, memory_budget=budget,
                                            backend="triton")
    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-2, atol=2e-3, rtol=5e-2,
                                    fast_mode=True)


def test_fullgraph_compile_through_triton_loss():
    torch._dynamo.reset()
    h, w, _, t = _lce_inputs(N=24, V=129)
    fn = torch.compile(lambda h, w: gptfast.linear_cross_entropy(h, w, t, backend="triton"),
                       fullgraph=True)
    loss = fn(h, w)
    loss.backward()
    ref = gptfast.linear_cross_entropy(h.detach(), w.detach(), t, backend="torch")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert w.grad is not None and w.grad.isfinite().all()


def test_gpt_model_loss_dispatches_to_the_triton_kernel():
    cfg = get_config("tiny", n_layer=1, n_head=2, block_size=16, backend="triton")  # hs 32
    model = GPT(cfg).to(DEVICE)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device=DEVICE)
    before = dict(ce_kernels.LAUNCHES)
    _, loss = model(idx, targets=idx.roll(-1, 1))
    loss.backward()
    assert ce_kernels.LAUNCHES["lce_fwd"] == before.get("lce_fwd", 0) + 1
    assert ce_kernels.LAUNCHES["lce_bwd"] == before.get("lce_bwd", 0) + 1
    ref_model = GPT(get_config("tiny", n_layer=1, n_head=2, block_size=16,
                               backend="torch")).to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    _, ref = ref_model(idx, targets=idx.roll(-1, 1))
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
