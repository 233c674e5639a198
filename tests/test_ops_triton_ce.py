"""The public cross-entropy ops on backend="triton": the kernels behind the custom ops, autograd,
opcheck, torch.compile, and the GPT model dispatching to them. On CPU this runs under
TRITON_INTERPRET=1 (tests/conftest.py), with small shapes."""
import pytest
import torch
import torch.nn.functional as F

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
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)  # ignored rows: 0
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
    torch.library.opcheck(ops.triton_linear_cross_entropy_bwd,
                          (g, None, h, w, t, b, lse, *opts, 2.0 ** -12))
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


@pytest.mark.parametrize("op,budget", [("linear_cross_entropy", None),
                                       ("linear_cross_entropy", 1 << 30),
                                       ("cross_entropy", None)],
                         ids=["linear_lean", "linear_budgeted", "logits"])
@pytest.mark.parametrize("mode", ["lse_only", "loss_and_lse"])
def test_lse_gradient_triton_matches_float64(mode, op, budget):
    """return_lse=True with the lse in the loss: the Triton backend once crashed when only the
    lse had a gradient (both schedules), and the budgeted schedule whenever the lse was used.
    Checked against float64 for each schedule, with an lse gradient on every row (ignored
    rows: lse 0, no gradient, as in the oracle)."""
    h, w, b, t = _lce_inputs(bias=True)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    g_lse = torch.rand(t.shape, device=DEVICE) + 0.5
    params = (h, w, b)

    def objective(loss, lse):
        lse_term = (lse * g_lse.to(lse.dtype)).sum()
        return lse_term if mode == "lse_only" else loss + lse_term

    if op == "linear_cross_entropy":
        loss, lse = gptfast.linear_cross_entropy(h, w, t, bias=b, return_lse=True,
                                                 memory_budget=budget, backend="triton", **opts)
    else:
        loss, lse = gptfast.cross_entropy(h @ w.t() + b, t, return_lse=True, backend="triton",
                                          **opts)
    got = torch.autograd.grad(objective(loss, lse), params)
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref_loss, ref_lse = cross_entropy_oracle(p64[0] @ p64[1].t() + p64[2], t, **opts)
    want = torch.autograd.grad(objective(ref_loss, ref_lse), p64)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("dhidden", "dweight", "dbias"), got, want):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("budget", [None, 1 << 30], ids=["lean", "budgeted"])
def test_linear_cross_entropy_triton_bf16_through_the_public_api(budget):
    """bf16 on backend="triton" (on CPU: the interpreter, made right for bf16 by gptfast):
    FlashAttention's rule against float64 with PyTorch's own bf16 eager computation (bf16
    logits, bf16 cross-entropy, bf16 autograd) as the yardstick."""
    from _tolerance import assert_rule
    h, w, b, t = _lce_inputs(dtype=torch.bfloat16, bias=True)
    opts = dict(label_smoothing=0.1, reduction="mean")
    loss, lse = gptfast.linear_cross_entropy(h, w, t, bias=b, return_lse=True,
                                             memory_budget=budget, backend="triton", **opts)
    assert loss.dtype == lse.dtype == torch.float32
    got = torch.autograd.grad(loss, (h, w, b))
    results = []
    for dt in (torch.float64, torch.bfloat16):  # the oracle, then PyTorch eager in bf16
        ps = [p.detach().to(dt).requires_grad_() for p in (h, w, b)]
        ref = F.cross_entropy(ps[0] @ ps[1].t() + ps[2], t, ignore_index=-100, **opts)
        results.append((ref, *torch.autograd.grad(ref, ps)))
    for name, g, r, e, mult in zip(("loss", "dhidden", "dweight", "dbias"), (loss, *got),
                                   *results, (2, 3, 3, 3)):
        assert_rule(name, g, r, e, mult, 1e-6)


def test_cross_entropy_triton_bf16_through_the_public_api():
    from _tolerance import assert_rule
    x = (torch.randn(45, 1000, device=DEVICE) * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 1000, (45,), device=DEVICE)
    t[3] = -100
    loss = gptfast.cross_entropy(x, t, label_smoothing=0.1, backend="triton")
    gx, = torch.autograd.grad(loss, x)
    assert gx.dtype == torch.bfloat16
    results = []
    for dt in (torch.float64, torch.bfloat16):
        xs = x.detach().to(dt).requires_grad_()
        ref = F.cross_entropy(xs, t, label_smoothing=0.1)
        results.append((ref, *torch.autograd.grad(ref, xs)))
    for name, g, r, e, mult in zip(("loss", "dlogits"), (loss, gx), *results, (2, 3)):
        assert_rule(name, g, r, e, mult, 1e-6)


def test_gradient_filtering_through_the_public_api():
    """filter_eps reaches the lean backward (a tile of a dead vocabulary block gets no dW),
    and the gradients stay those of float64 within the kernel tests' tolerance."""
    h, w, b, t = _lce_inputs(bias=True)
    with torch.no_grad():
        b[-65:] = -60.0                # the last vocabulary tiles: no row reaches them
    t = torch.where(t >= w.shape[0] - 65, 0, t)
    before = dict(ce_kernels.LAUNCHES)
    loss = gptfast.linear_cross_entropy(h, w, t, bias=b, filter_eps=2.0 ** -12,
                                        backend="triton")
    dh, dw, db = torch.autograd.grad(loss, (h, w, b))
    assert ce_kernels.LAUNCHES["lce_bwd"] == before.get("lce_bwd", 0) + 1
    assert (dw[-65:] == 0).all()       # skipped
    assert (db[-65:] != 0).all()       # the bias gradient is never filtered
    p64 = [p.detach().double().requires_grad_() for p in (h, w, b)]
    ref, _ = cross_entropy_oracle(p64[0] @ p64[1].t() + p64[2], t)
    want = torch.autograd.grad(ref, p64)
    for a, e in zip((dh, dw, db), want):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)
