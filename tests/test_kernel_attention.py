"""Tests of the Triton attention kernels (`gptfast.kernels.attention`) against a float64 oracle.

Tolerance (FlashAttention's rule): the kernel's max error against the float64 reference must
be <= 2x (outputs, lse) or 3x (gradients) the max error of PyTorch's own same-dtype eager
attention against that reference, plus a tiny atol. NaN never passes. Outputs are poisoned
with NaN before every launch, so an element a kernel forgets to write fails.

Without a GPU the kernels run under TRITON_INTERPRET=1 on small shapes, in fp32, fp16 and bf16
(bf16 through gptfast's fix of the interpreter, kernels/_interpreter.py: every option runs in
bf16 at least once); the GPU-marked tests cover every head dim and long sequences.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gptfast.kernels import attention as A  # noqa: E402

from _attention_ref import (attention_grads, attention_references,  # noqa: E402
                            padding_mask as _padding_mask)
from _tolerance import assert_rule as _assert_rule  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

pytestmark = pytest.mark.attention_kernel

ATOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
GRAD_ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(A, "POISON_OUTPUTS", True)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def run_case(*, B=1, Hq=2, Hkv=None, Sq=64, Sk=64, d=32, dtype=torch.float32, causal=False,
             alibi=False, window=None, padding=None, dropout_p=0.0, dlse=False,
             deterministic=False, backward=True, fused_qkv=False, do_kind="randn",
             device=DEVICE, seed=0, softcap=None, scale=None, q_scale=1.0):
    """Run forward (+ backward) through the kernels and check them against the oracle."""
    Hkv = Hq if Hkv is None else Hkv
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if fused_qkv:
        # q, k, v as transposed slices of one (B, S, Hq + 2*Hkv, d) buffer: nothing contiguous.
        assert Sq == Sk
        buf = randn(B, Sq, Hq + 2 * Hkv, d)
        q = buf[:, :, :Hq].transpose(1, 2)
        k = buf[:, :, Hq:Hq + Hkv].transpose(1, 2)
        v = buf[:, :, Hq + Hkv:].transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q, k, v = randn(B, Hq, Sq, d), randn(B, Hkv, Sk, d), randn(B, Hkv, Sk, d)
    if q_scale != 1.0:  # larger scores (softcap tests: scores beyond the cap)
        q = (q.float() * q_scale).to(dtype)
    scale = d ** -0.5 if scale is None else scale
    slopes = (torch.rand(Hq, generator=gen) * 0.5 + 0.05).to(device) if alibi else None
    kpm = _padding_mask(B, Sk, padding, device) if padding else None
    seed_t = keep = None
    if dropout_p > 0:
        seed_t = torch.tensor([1234 + seed], dtype=torch.int64, device=device)
        keep = A.attention_dropout_keep_mask(seed_t, B, Hq, Sq, Sk, dropout_p, device)
    opts = dict(causal=causal, softmax_scale=scale, alibi_slopes=slopes, window=window,
                key_padding_mask=kpm, dropout_p=dropout_p, softcap=softcap)

    out, lse = A.attention_forward(q, k, v, **opts, seed=seed_t)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, d) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)

    leaves64, leaves_eager, (ref_o, ref_l), (eag_o, eag_l) = attention_references(
        q, k, v, keep=keep, dtype=dtype, **opts)
    _assert_rule("out", out, ref_o, eag_o, 2, ATOL[dtype])
    _assert_rule("lse", lse, ref_l, eag_l.float(), 2, ATOL[dtype])
    if not backward:
        return out, lse, None

    if do_kind == "ones":  # what out.sum().backward() produces: an expanded scalar, stride 0
        do = torch.ones((), dtype=dtype, device=device).expand(B, Hq, Sq, d)
    else:
        do = randn(B, Hq, Sq, d)
    dlse_t = torch.randn(B, Hq, Sq, generator=gen).to(device) if dlse else None
    grads = A.attention_backward(do, q, k, v, out, lse, **opts, seed=seed_t, dlse=dlse_t,
                                 deterministic=deterministic)

    ref_g = attention_grads(ref_o, ref_l, leaves64, do, dlse_t, torch.float64)
    eag_g = attention_grads(eag_o, eag_l, leaves_eager, do, dlse_t, dtype)
    for name, g, t, r, e in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_g, eag_g):
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        _assert_rule(name, g, r, e, 3, GRAD_ATOL[dtype])
    return out, lse, grads


# --------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: fp32 / fp16 / bf16
# --------------------------------------------------------------------------------------------

BF16 = pytest.param(torch.bfloat16, id="bf16")
ALL_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"), BF16]

SHAPES = [(113, 203), (128, 217), (1, 239), (200, 67), (64, 64)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_shapes(shape, causal, dtype):
    Sq, Sk = shape
    i = SHAPES.index(shape)
    # Vary head dim, batch and an odd head count across shapes to keep the run short.
    run_case(B=1 + i % 2, Hq=3 if i % 2 == 0 else 2, Sq=Sq, Sk=Sk, d=(32, 64)[i % 2],
             dtype=dtype, causal=causal)


@pytest.mark.parametrize("d,dtype", [(96, torch.float32), (96, torch.float16),
                                     (96, torch.bfloat16), (128, torch.float32),
                                     (128, torch.float16), (128, torch.bfloat16),
                                     (256, torch.float16), (256, torch.bfloat16)])
def test_head_dims(d, dtype):
    # 256: forward and backward (backward with the small d=256 blocks).
    run_case(Hq=1, Sq=70, Sk=90, d=d, dtype=dtype, causal=True)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa4:2", "mqa4:1"])
def test_gqa(hkv, dtype):
    run_case(B=2, Hq=4, Hkv=hkv, Sq=97, Sk=130, d=32, dtype=dtype, causal=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padding", ["right", "left", "empty"])
def test_key_padding(padding, causal, dtype):
    out, lse, grads = run_case(B=3, Hq=2, Sq=90, Sk=120, d=32, causal=causal, padding=padding,
                               dtype=dtype)
    if padding == "empty":  # batch row 0 sees no key at all: zeros, -inf, zero grads
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
        assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))
        assert torch.equal(grads[1][0], torch.zeros_like(grads[1][0]))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_padding_16bit_gqa(dtype):
    run_case(B=2, Hq=4, Hkv=2, Sq=64, Sk=100, d=64, dtype=dtype, causal=True, padding="left")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(causal, dtype):
    run_case(Hq=3, Sq=100, Sk=150, d=32, causal=causal, alibi=True, dtype=dtype)


@pytest.mark.parametrize("window,shape,dtype", [(1, (64, 64), torch.float32),
                                                (17, (113, 203), torch.float32),
                                                (40, (200, 67), torch.float32),
                                                (64, (128, 217), torch.float32),
                                                (17, (113, 203), torch.bfloat16),
                                                (40, (200, 67), torch.bfloat16)])
def test_window(window, shape, dtype):
    run_case(Hq=2, Sq=shape[0], Sk=shape[1], d=32, causal=True, window=window, dtype=dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_window_alibi_padding_gqa_16bit(dtype):
    run_case(B=2, Hq=4, Hkv=2, Sq=96, Sk=96, d=64, dtype=dtype, causal=True, window=33,
             alibi=True, padding="right")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_causal_more_queries_than_keys_dead_rows(dtype):
    # Sq > Sk with bottom-right alignment: the first Sq - Sk queries see nothing.
    out, lse, grads = run_case(Hq=2, Sq=80, Sk=30, d=32, causal=True, dtype=dtype)
    assert torch.equal(out[:, :, :50], torch.zeros_like(out[:, :, :50]))
    assert torch.isinf(lse[:, :, :50]).all()
    assert torch.equal(grads[0][:, :, :50], torch.zeros_like(grads[0][:, :, :50]))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dlse(causal, dtype):
    run_case(Hq=2, Sq=77, Sk=120, d=32, causal=causal, dlse=True, padding="empty", B=2,
             dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_fused_qkv_strides(dtype):
    run_case(B=2, Hq=4, Hkv=2, Sq=75, Sk=75, d=32, dtype=dtype, causal=True, fused_qkv=True)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_stride0_grad_output(deterministic, dtype):
    run_case(Hq=2, Sq=60, Sk=90, d=32, causal=True, do_kind="ones", deterministic=deterministic,
             dtype=dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_deterministic(dtype):
    kw = dict(B=1, Hq=4, Hkv=2, Sq=81, Sk=100, d=32, dtype=dtype, causal=True, padding="left",
              deterministic=True)
    _, _, g1 = run_case(**kw)
    _, _, g2 = run_case(**kw)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_deterministic_window_alibi(dtype):
    run_case(Hq=2, Sq=100, Sk=100, d=32, causal=True, window=30, alibi=True, deterministic=True,
             dtype=dtype)


def test_dropout_mask_statistics():
    p = 0.3
    seed = torch.tensor([42], dtype=torch.int64, device=DEVICE)
    m = A.attention_dropout_keep_mask(seed, 2, 2, 64, 100, p, DEVICE)
    assert m.dtype == torch.bool and m.shape == (2, 2, 64, 100)
    n = m.numel()
    frac = m.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(frac - (1 - p)) < 6 * sigma, frac
    # Same seed: same mask; another seed: a different one; heads/rows are not copies.
    assert torch.equal(m, A.attention_dropout_keep_mask(seed, 2, 2, 64, 100, p, DEVICE))
    other = A.attention_dropout_keep_mask(seed + 1, 2, 2, 64, 100, p, DEVICE)
    assert (m != other).float().mean().item() > 0.3
    assert not torch.equal(m[0, 0], m[0, 1]) and not torch.equal(m[0, 0], m[1, 0])
    assert not torch.equal(m[0, 0, 0], m[0, 0, 1])


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dropout_matches_reference(dtype, deterministic):
    run_case(B=1, Hq=2, Hkv=1, Sq=70, Sk=90, d=32, dtype=dtype, causal=True, dropout_p=0.25,
             deterministic=deterministic)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_dropout_window_alibi_padding(dtype):
    run_case(B=2, Hq=1, Sq=50, Sk=70, d=32, causal=True, window=40, alibi=True,
             padding="right", dropout_p=0.4, dlse=True, dtype=dtype)


def test_dropout_changes_output_and_is_reproducible():
    q = torch.randn(1, 2, 40, 32, device=DEVICE)
    k = torch.randn(1, 2, 40, 32, device=DEVICE)
    v = torch.randn(1, 2, 40, 32, device=DEVICE)
    s = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    o0, l0 = A.attention_forward(q, k, v, causal=True, softmax_scale=0.2)
    o1, l1 = A.attention_forward(q, k, v, causal=True, softmax_scale=0.2, dropout_p=0.5, seed=s)
    o2, _ = A.attention_forward(q, k, v, causal=True, softmax_scale=0.2, dropout_p=0.5, seed=s)
    assert torch.equal(o1, o2) and not torch.allclose(o0, o1)
    torch.testing.assert_close(l0, l1)  # lse is that of the undropped probabilities


def test_launch_counter():
    before_f, before_b = A.LAUNCHES["attention_fwd"], A.LAUNCHES["attention_bwd"]
    run_case(Hq=1, Sq=16, Sk=16, d=32)
    assert A.LAUNCHES["attention_fwd"] == before_f + 1
    assert A.LAUNCHES["attention_bwd"] == before_b + 1


def test_empty_key_sequence():
    q = torch.randn(1, 2, 5, 32, device=DEVICE)
    k = torch.randn(1, 2, 0, 32, device=DEVICE)
    out, lse = A.attention_forward(q, k, k, causal=False, softmax_scale=0.2)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


@pytest.mark.parametrize("d", [8, 16, 40, 80, 112])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_every_multiple_of_8(d, dtype):
    """Head dims that are not powers of two are padded inside the tiles (8 -> 16, 40 -> 64,
    80 and 112 -> 128): forward and both backward modes. d=8 and 16 also take the dQ = dS K
    form of the atomic backward (BLOCK_D <= BLOCK_M), the others dQ^T = K^T dS^T."""
    run_case(Hq=2, Hkv=1, Sq=37, Sk=45, d=d, dtype=dtype, causal=True,
             deterministic=d in (16, 80))
    if d in (8, 112):
        run_case(Hq=1, Sq=33, Sk=33, d=d, dtype=dtype, causal=False, deterministic=True)


@pytest.mark.parametrize("d", [72, 96])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_power_of_two_head_dims(d, dtype):
    """72 and 96 (padded to 128 inside the tiles, 56 and 32 zero columns), GQA, causal with
    Sq != Sk, both backward modes, in every dtype."""
    run_case(Hq=2, Hkv=1, Sq=33, Sk=40, d=d, dtype=dtype, causal=True,
             deterministic=(d == 96) == (dtype == torch.float16))


@pytest.mark.parametrize("d", [160, 256])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_wide_heads_split_dk_dv(d, dtype):
    """Head dims over 128 (BLOCK_D = 256): each key tile gets a dV program and a dK (+ atomic
    dQ) program. Both backward modes, a GQA group (summed by both), and with dropout, softcap
    and a window: each role regenerates the same keep bits and masks."""
    for det in (False, True):
        run_case(Hq=2, Hkv=1, Sq=33, Sk=45, d=d, dtype=dtype, causal=True, deterministic=det)
    run_case(Hq=2, Hkv=1, Sq=40, Sk=40, d=d, dtype=dtype, causal=True, window=17,
             dropout_p=0.2, softcap=5.0, deterministic=d == 160)


def test_head_dims_rejected():
    q = torch.randn(1, 1, 8, 20, device=DEVICE)
    with pytest.raises(AssertionError, match="multiple of 8"):
        A.attention_forward(q, q, q, causal=True, softmax_scale=0.1)
    assert A.head_dim_supported(80) and A.head_dim_supported(8) and A.head_dim_supported(256)
    assert not any(A.head_dim_supported(d) for d in (0, 4, 12, 264, 512))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_softcap(dtype, deterministic):
    """Scores softcap * tanh(scale q.k / softcap) (Gemma-2's attention): q scaled up so that
    many scores pass the cap (tanh saturates), forward and gradients."""
    run_case(B=2, Hq=2, Hkv=1, Sq=70, Sk=90, d=32, dtype=dtype, causal=True, softcap=5.0,
             q_scale=3.0, dlse=True, deterministic=deterministic)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_softcap_with_every_option(dtype):
    run_case(B=2, Hq=2, Sq=60, Sk=60, d=64, dtype=dtype, causal=True, softcap=20.0,
             q_scale=2.0, alibi=True, window=25, padding="left", dropout_p=0.2)


@pytest.mark.parametrize("scale", [-0.2, 0.0, 1e-3], ids=["negative", "zero", "tiny"])
def test_softmax_scale_of_any_sign(scale):
    """The scale is folded into the exponent only when positive (the row max is taken on the
    raw products); zero and negative scales take the scale-first path."""
    run_case(Hq=2, Sq=40, Sk=50, d=32, causal=True, padding="right", scale=scale)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_program_order_does_not_change_results(dtype, monkeypatch):
    """Longest-first order and head sections only reorder programs: the forward and the
    deterministic backward are bitwise the same for any section width (1 = the plain order,
    tile fastest; 2; every head), and the atomic backward the same up to the order of its fp32
    dQ sums."""
    gen = torch.Generator(device="cpu").manual_seed(5)
    B, H, Hkv, Sq, Sk, d = 1, 3, 3, 40, 45, 16
    q, k, v, do = (torch.randn(*s, generator=gen).to(DEVICE, dtype)
                   for s in ((B, H, Sq, d), (B, Hkv, Sk, d), (B, Hkv, Sk, d), (B, H, Sq, d)))
    opts = dict(causal=True, softmax_scale=d ** -0.5)
    results = []
    for width in (1, 2, B * H):  # 3 sections of 1 head, sections of 2 and 1, one section
        monkeypatch.setattr(A, "head_section", lambda n, _b, ordered, w=width: min(w, n))
        out, lse = A.attention_forward(q, k, v, **opts)
        det = A.attention_backward(do, q, k, v, out, lse, **opts, deterministic=True)
        atomic = A.attention_backward(do, q, k, v, out, lse, **opts, deterministic=False)
        results.append((out, lse, det, atomic))
    out0, lse0, det0, atomic0 = results[0]
    for out, lse, det, atomic in results[1:]:
        assert torch.equal(out, out0) and torch.equal(lse, lse0)
        assert all(torch.equal(a, b) for a, b in zip(det, det0))
        for a, b in zip(atomic, atomic0):
            torch.testing.assert_close(a, b, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                       atol=1e-2 if dtype != torch.float32 else 1e-5)
    # Outputs are NaN-poisoned: finite means every program of the grid wrote its tile (the
    # values themselves are checked against the oracle by the other tests, same order).
    assert all(torch.isfinite(t).all() for t in (out0, *det0, *atomic0))


TMA = dict(fwd=dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=1),
           bwd=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1, USE_TMA=1))
TMA_WS = dict(TMA, fwd=dict(TMA["fwd"], WARP_SPECIALIZE=1))


@pytest.mark.parametrize("variant", [TMA, TMA_WS], ids=["tma", "tma+ws"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), BF16])
def test_tma_and_warp_specialized_paths(variant, dtype, monkeypatch):
    """The USE_TMA code path (tensor descriptors: the copy engine's zero fill replaces the
    masks, d=40 is padded to 64 by it) and the WARP_SPECIALIZE one (a single loop over every
    key tile, masks on each), run by the interpreter exactly as compiled for the GPU."""
    seen = []
    flags = A._launch_flags
    monkeypatch.setattr(A, "_launch_flags", lambda *a: seen.append(flags(*a)) or seen[-1])
    with A.config_override(**variant):
        for det in (False, True):
            run_case(B=2, Hq=4, Hkv=2, Sq=70, Sk=90, d=40, dtype=dtype, causal=True,
                     padding="left", deterministic=det)
        run_case(Hq=2, Sq=50, Sk=50, d=16, dtype=dtype, causal=True, window=20, alibi=True,
                 softcap=10.0)
    assert seen and all(f["USE_TMA"] for f in seen)
    assert all(f.get("WARP_SPECIALIZE", False) == bool(variant["fwd"].get("WARP_SPECIALIZE"))
               for f in seen if "WARP_SPECIALIZE" in f)


def test_tma_falls_back_to_pointer_loads():
    """A tensor TMA cannot describe (a row stride that is not a multiple of 16 bytes: a slice
    of 5 heads of d=8 fp16 in a fused buffer) runs the pointer loads: same results."""
    x = torch.randn(1, 13, 3 * 5 * 8, device=DEVICE, dtype=torch.float16)[..., 4:]  # misaligned
    q = x[..., :40].unflatten(-1, (5, 8)).transpose(1, 2)
    assert not A.tma_compatible(q)
    assert A.tma_compatible(torch.randn(1, 2, 3, 8, dtype=torch.float16))
    with A.config_override(**TMA):
        got = A._launch_flags("fwd", A.get_config("fwd", q.device, q.dtype, 8), q, q, q)
    assert got == {"USE_TMA": False, "WARP_SPECIALIZE": False}


def test_program_order_longest_first():
    """The launch order that `_tile_and_head` decodes, read back from the kernel itself (an
    interpreted probe kernel stores each program's (tile, head)): a permutation of every
    (tile, head) pair, equal to the host statement `program_order`, and with a causal mask the
    longest query tiles first within each section of heads."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(OUT, n_rows, n_heads, section, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
        tile, bh = A._tile_and_head(tl.program_id(0), n_rows, n_heads, section, BLOCK, REVERSE)
        tl.store(OUT + 2 * tl.program_id(0), tile)
        tl.store(OUT + 2 * tl.program_id(0) + 1, bh)

    for n_rows, block, heads, section, reverse in [(100, 16, 5, 2, True), (64, 32, 3, 1, False),
                                                   (65, 16, 7, 7, True), (17, 16, 4, 3, False)]:
        n = triton.cdiv(n_rows, block) * heads
        out = torch.full((n, 2), -1, dtype=torch.int32, device=DEVICE)
        probe[(n,)](out, n_rows, heads, section, BLOCK=block, REVERSE=reverse)
        got = [tuple(r) for r in out.tolist()]
        assert got == A.program_order(n_rows, block, heads, section, reverse)
        assert sorted(got) == [(t, h) for t in range(triton.cdiv(n_rows, block))
                               for h in range(heads)]
        if reverse:  # inside each section, tiles never increase along the launch order
            for s0 in range(0, heads, section):
                tiles = [t for t, h in got if s0 <= h < s0 + section]
                assert tiles == sorted(tiles, reverse=True)
    assert A.head_section(64, 2 << 20, ordered=True) == 16   # 32 MiB of K/V per section
    assert A.head_section(64, 2 << 20, ordered=False) == 1
    assert A.head_section(4, 1, ordered=True) == 4


# --------------------------------------------------------------------------------------------
# GPU only: all head dims, long sequences (bf16 and fp16)
# --------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [8, 16, 32, 40, 64, 80, 96, 112, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1023, 1024), (1024, 1023), (113, 203)])
def test_gpu_head_dims_shapes(shape, causal, d, dtype):
    run_case(B=2, Hq=3, Sq=shape[0], Sk=shape[1], d=d, dtype=dtype, causal=causal)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_long(d, dtype):
    run_case(B=1, Hq=2, Sq=4096, Sk=4096, d=d, dtype=dtype, causal=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa8:2", "mqa8:1"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_gqa(hkv, dtype, deterministic):
    run_case(B=2, Hq=8, Hkv=hkv, Sq=1000, Sk=1000, d=128, dtype=dtype, causal=True,
             deterministic=deterministic)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("padding", ["right", "left", "empty"])
def test_gpu_padding(padding, dtype):
    run_case(B=3, Hq=4, Hkv=2, Sq=700, Sk=1023, d=64, dtype=dtype, causal=True, padding=padding,
             alibi=True)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_deterministic(dtype):
    kw = dict(B=2, Hq=8, Hkv=2, Sq=1024, Sk=1024, d=128, dtype=dtype, causal=True,
              padding="left", deterministic=True)
    _, _, g1 = run_case(**kw)
    _, _, g2 = run_case(**kw)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["bf16", "fp16"])
def test_gpu_dropout_window_fused(dtype):
    run_case(B=2, Hq=4, Hkv=2, Sq=1024, Sk=1024, d=64, dtype=dtype, causal=True, window=256,
             dropout_p=0.1, fused_qkv=True, dlse=True)


@pytest.mark.gpu
@gpu_only
def test_gpu_dropout_statistics():
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    m = A.attention_dropout_keep_mask(seed, 2, 4, 1024, 1024, 0.1, "cuda")
    assert abs(m.float().mean().item() - 0.9) < 1e-3


# --------------------------------------------------------------------------------------------
# Tile-boundary sweeps: the fully-visible/masked tile split depends on (offset, window) modulo
# the block sizes, so sweep every residue (block sizes are 16/32 under the interpreter).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_causal_offset_sweep(deterministic):
    for offset in list(range(0, 17)) + [-1, -7, -16, -17]:
        run_case(Hq=1, Sq=40, Sk=40 + offset, d=32, causal=True, deterministic=deterministic)


def test_window_sweep():
    # Small windows (no fully visible tile) and, from 48 on, every residue of window mod 16
    # with fully visible tiles between the window edge and the diagonal.
    cases = [(1, 0), (2, 5), (15, 0), (17, 9), (33, -3), (50, 7)] + [(w, 0) for w in range(48, 64)]
    for window, offset in cases:
        run_case(Hq=1, Sq=90, Sk=90 + offset, d=32, causal=True, window=window,
                 deterministic=window % 2 == 0)
