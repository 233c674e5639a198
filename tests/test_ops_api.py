"""The public API's contract: errors, backend choice, autocast, torch.compile and opcheck."""
import importlib
import subprocess
import sys

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
    # fp32 inputs: the CUDA attention kernels decline fp32 (mma.sync); on CPU tensors without
    # GPTFAST_CUDA_SIM the reason is that they need CUDA tensors
    with pytest.raises(BackendError,
                       match=r"backend='cuda'.*(CUDA tensors|no fp32 form).*can: .*torch"):
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
    (dict(filter_eps=0.0), "filter_eps: expected None or a number in"),
    (dict(filter_eps=True), "filter_eps: expected None or a number in"),
    (dict(filter_eps=2.0 ** -12, memory_budget=1 << 30), "filter_eps: gradient filtering is a"),
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


# ---- the op boundary: schemas, fakes, autograd outside the ops ---------------------------------

def test_every_op_is_declared_once_with_identical_schemas_per_backend():
    from gptfast.ops import _library
    for name in _library.SCHEMAS:
        schemas = {}
        for backend in _library.KERNEL_BACKENDS:
            overload = _library.op(backend, name)
            text = str(overload._schema)
            assert text.startswith(f"gptfast::{backend}_{name}(")
            assert "backend" not in text  # the op is the backend: no string argument picks one
            assert torch.Tag.pt2_compliant_tag in overload.tags
            schemas[backend] = text.split("(", 1)[1]
        assert len(set(schemas.values())) == 1, schemas
    # the triton ops have kernels for CUDA and for CPU (the interpreter); autograd is not theirs
    for name in _library.SCHEMAS:
        qual = _library.qualname("triton", name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CUDA")


def test_fakes_give_the_documented_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.gptfast
    with FakeTensorMode():
        q = torch.empty(2, 4, 5, 32, dtype=torch.bfloat16).transpose(1, 2).transpose(1, 2)
        k = torch.empty(2, 8, 2, 32, dtype=torch.bfloat16).transpose(1, 2)  # (B, Hkv, Sk, d)
        out, lse = ops.triton_attention_fwd(q, k, k, None, None, None, True, 0.1, None, 0.0)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
        dq, dk, dv = ops.cuda_attention_bwd(out, None, q, k, k, out, lse, None, None, None, True,
                                            0.1, None, 0.0, False)
        assert dk.shape == k.shape and dk.is_contiguous() and dq.dtype == q.dtype
        h, w = torch.empty(6, 16, dtype=torch.float16), torch.empty(40, 16, dtype=torch.float16)
        t = torch.empty(6, dtype=torch.long)
        rows, lse = ops.triton_linear_cross_entropy_fwd(h, w, t, None, -100, 0.0, 0.0, None)
        assert rows.shape == (6,) and rows.dtype == torch.float32 == lse.dtype
        dh, dw, db = ops.cuda_linear_cross_entropy_bwd(rows, None, h, w, t, None, lse, -100,
                                                       0.0, 0.0, None)
        assert dh.shape == h.shape and dw.dtype == w.dtype and db.numel() == 0
        loss, *_ = ops.triton_linear_cross_entropy_fwd_grad(h, w, t, None, -100, 0.0, 0.0, None,
                                                            1, 1 << 30)
        assert loss.shape == ()


def test_eager_calls_skip_the_dispatcher_only_when_nothing_can_tell():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from gptfast.ops import _library, _triton
    x, p = torch.randn(2), torch.nn.Parameter(torch.randn(2))
    name = "attention_fwd"
    assert _library.kernel("triton", name, x, p) is _triton.attention_fwd  # plain: direct
    assert _library.kernel("cuda", name, x) is _library.OPS[("cuda", name)]  # a C++ kernel

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Spy():  # a dispatch mode must see the op
        assert _library.kernel("triton", name, x) is _library.OPS[("triton", name)]
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert _library.kernel("triton", name, fake) is _library.OPS[("triton", name)]


@pytest.mark.parametrize("budget", [None, 1 << 30], ids=["lean", "budgeted"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_linear_cross_entropy(reduction, budget):
    # the torch backend runs the same autograd.Function as the kernels, with the reference's
    # hand-written backward: gradcheck in fp64 checks it (and the reduction inside it)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (7,))
    t[3] = -100

    def fn(h, w, b):
        loss, lse = gptfast.linear_cross_entropy(
            h, w, t, bias=b, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
            memory_budget=budget, return_lse=True, backend="torch")
        return loss, lse.sum() if reduction == "none" else lse[1] * 0.5
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_gradcheck_cross_entropy_and_attention():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (6,))
    assert torch.autograd.gradcheck(
        lambda x: gptfast.cross_entropy(x, t, z_loss=1e-2, return_lse=True), (x,))
    q, k, v = (t.double().requires_grad_() for t in qkv(Hq=2, Hkv=1, Sq=3, Sk=5, d=4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: gptfast.attention(q, k, v, return_lse=True, window=3), (q, k, v))


def test_unused_lse_gets_no_gradient_work(monkeypatch):
    # set_materialize_grads(False): backward receives None for the unused lse, so the lean
    # backward runs without a grad_lse input (and gives the plain loss's gradient); the
    # one-pass schedule (the CPU default of the torch backend) recomputes nothing at all.
    ce = importlib.import_module("gptfast.ops.cross_entropy")  # the module, not the function
    real = ce._torch_lce_bwd
    for budget, expected in ((ce.LEAN_BUDGET, [None]), (None, [])):
        h, w, t, b = _lce_args()
        loss, lse = gptfast.linear_cross_entropy(h, w, t, bias=b, return_lse=True,
                                                 memory_budget=budget, backend="torch")
        seen = []

        def spy(g, grad_lse, *a):
            seen.append(grad_lse)
            return real(g, grad_lse, *a)
        monkeypatch.setattr(ce, "_torch_lce_bwd", spy)
        loss.backward()
        assert seen == expected
        h2 = h.detach().clone().requires_grad_()
        F.cross_entropy(h2 @ w.detach().t() + b.detach(), t).backward()
        torch.testing.assert_close(h.grad, h2.grad)


def test_no_grad_builds_no_autograd_node():
    h, w, t, b = _lce_args()
    with torch.no_grad():
        loss = gptfast.linear_cross_entropy(h, w, t, bias=b)
    assert loss.grad_fn is None and not loss.requires_grad
    q, k, v = (x.requires_grad_() for x in qkv())
    with torch.no_grad():
        assert gptfast.attention(q, k, v).grad_fn is None


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
    q = torch.empty_strided((1, 1, 3, 32), (0, 0, 2**30, 1), device="meta", dtype=torch.float16)
    from gptfast.ops.attention import _triton_support, facts
    reason = _triton_support(facts(q, q, q, needs_grad=False))
    assert reason and "2**31" in reason
    small = torch.empty(1, 1, 3, 32, device="meta", dtype=torch.float16)
    assert _triton_support(facts(small, small, small, needs_grad=True)) is None


# ---- import ---------------------------------------------------------------------------------------

def test_import_registers_the_sdpa_provider_and_imports_neither_dynamo_nor_triton():
    code = ("import sys, torch, gptfast; from torch.nn import attention as a; "
            "print('gptfast' in a.list_flash_attention_impls(), a.current_flash_attention_impl(),"
            " gptfast.sdpa.active(), 'torch._dynamo' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    # registered with PyTorch's registry, never activated on import; and `import gptfast` stays
    # cheap (torch._dynamo and Triton are imported when first needed)
    assert out == ["True", "None", "False", "False", "False"]
