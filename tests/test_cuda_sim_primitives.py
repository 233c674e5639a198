"""Each device primitive of csrc/common/, run on the CPU execution layer, against a direct
computation of what the PTX ISA specifies. The layouts below are written from the PTX ISA text
(section 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type" and 9.7.14.5.15
"Warp-level matrix load instruction: ldmatrix"), independently of the C++ layer."""
import math

import pytest
import torch

from _cuda_sim import sim, under_orders

pytestmark = [pytest.mark.cuda_sim, pytest.mark.cuda_sanitize]


# ---- PTX ISA fragment tables (groupID = lane >> 2, threadID_in_group = lane % 4) ----------------

def a_row_col(lane, i):
    """Multiplicand A (16 x 16), element a_i (i < 8) of `lane`."""
    g, t = lane >> 2, lane % 4
    row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_row_col(lane, i):
    """Multiplicand B (16 x 8), element b_i (i < 4)."""
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def c_row_col(lane, i):
    """Accumulator C / D (16 x 8 fp32), element c_i (i < 4)."""
    g, t = lane >> 2, lane % 4
    return g + (8 if i >= 2 else 0), t * 2 + (i & 1)


def _index(row_col, n_elems):
    rows = torch.tensor([[row_col(l, i)[0] for i in range(n_elems)] for l in range(32)])
    cols = torch.tensor([[row_col(l, i)[1] for i in range(n_elems)] for l in range(32)])
    return rows, cols


A_IDX, B_IDX, C_IDX = _index(a_row_col, 8), _index(b_row_col, 4), _index(c_row_col, 4)


def pack_fragment(mat, idx, dtype):
    """(32, n // 2) int32 registers: two 16-bit elements per register, the lower i in the low half."""
    bits = mat.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    elems = bits[idx]                                   # (32, n)
    regs = elems[:, 0::2] | (elems[:, 1::2] << 16)
    return (regs - ((regs >> 31) << 32)).to(torch.int32)


def pack_c(mat):
    return mat[C_IDX].float()


def unpack_d(d):
    out = torch.full((16, 8), float("nan"), dtype=torch.float64)
    out[C_IDX] = d.double()
    return out


def run_mma(A, B, C, dtype):
    a = pack_fragment(A, A_IDX, dtype)
    b = pack_fragment(B, B_IDX, dtype)
    return sim()._test_mma(a, b, pack_c(C), dtype == torch.bfloat16)


def test_fragment_tables_cover_every_element_once():
    for row_col, n, shape in ((a_row_col, 8, (16, 16)), (b_row_col, 4, (16, 8)),
                              (c_row_col, 4, (16, 8))):
        seen = {row_col(lane, i) for lane in range(32) for i in range(n)}
        assert len(seen) == shape[0] * shape[1] == 32 * n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_bit_exact_on_small_integers(dtype):
    """Products and sums of small integers are exact in fp32: D must equal A @ B + C bit for bit."""
    gen = torch.Generator().manual_seed(1)
    A = torch.randint(-8, 9, (16, 16), generator=gen).double()
    B = torch.randint(-8, 9, (16, 8), generator=gen).double()
    C = torch.randint(-100, 101, (16, 8), generator=gen).double()
    d = under_orders(lambda: run_mma(A, B, C, dtype))
    assert torch.equal(unpack_d(d), A @ B + C)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_every_a_and_b_element_lands_where_the_ptx_isa_says(dtype):
    """One-hot A (element a_i of one lane) times a B of distinct values selects one row of B into
    the row given by the table; likewise one-hot B selects a column of A."""
    Bv = torch.arange(1, 129, dtype=torch.float64).reshape(16, 8)
    Av = torch.arange(1, 257, dtype=torch.float64).reshape(16, 16)
    zero_c = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i in range(8):
            r, k = a_row_col(lane, i)
            A = torch.zeros(16, 16, dtype=torch.float64)
            A[r, k] = 1
            D = unpack_d(run_mma(A, Bv, zero_c, dtype))
            want = torch.zeros(16, 8, dtype=torch.float64)
            want[r] = Bv[k]
            assert torch.equal(D, want), f"A element a{i} of lane {lane}"
        for i in range(4):
            k, c = b_row_col(lane, i)
            B = torch.zeros(16, 8, dtype=torch.float64)
            B[k, c] = 1
            D = unpack_d(run_mma(Av, B, zero_c, dtype))
            want = torch.zeros(16, 8, dtype=torch.float64)
            want[:, c] = Av[:, k]
            assert torch.equal(D, want), f"B element b{i} of lane {lane}"


def test_mma_rounds_like_an_fp32_accumulation_of_exact_products():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(16, 16, generator=gen).to(torch.bfloat16).double()
    B = torch.randn(16, 8, generator=gen).to(torch.bfloat16).double()
    C = torch.randn(16, 8, generator=gen).float().double()
    D = unpack_d(run_mma(A, B, C, torch.bfloat16))
    torch.testing.assert_close(D, (A @ B + C).float().double(), atol=0, rtol=2 ** -22)


# ---- ldmatrix ------------------------------------------------------------------------------------

LDM = {0: (1, False), 1: (2, False), 2: (4, False), 3: (1, True), 4: (2, True), 5: (4, True)}


def ldmatrix_expected(src, num, trans):
    """Lanes 8j..8j+7 give rows 0..7 of matrix j (here rows 8j..8j+7 of src). Register j of lane t:
    (row t/4, cols 2(t%4), 2(t%4)+1) of matrix j, or with .trans (rows 2(t%4), 2(t%4)+1, col t/4);
    the first element in the low half."""
    m = src.to(torch.int64) & 0xFFFF  # (32, 8)
    out = torch.zeros(32, 4, dtype=torch.int64)
    for t in range(32):
        g, q = t // 4, t % 4
        for j in range(num):
            if trans:
                lo, hi = m[8 * j + 2 * q, g], m[8 * j + 2 * q + 1, g]
            else:
                lo, hi = m[8 * j + g, 2 * q], m[8 * j + g, 2 * q + 1]
            out[t, j] = int(lo) | (int(hi) << 16)
    return (out - ((out >> 31) << 32)).to(torch.int32)


@pytest.mark.parametrize("variant", sorted(LDM), ids=[f"x{n}{'_trans' if t else ''}"
                                                     for n, t in LDM.values()])
@pytest.mark.parametrize("pitch", [8, 24])
def test_ldmatrix_every_register_element(variant, pitch):
    src = (torch.arange(256, dtype=torch.int32) * 37 % 65521 - 32000).to(torch.int16)
    got = under_orders(lambda: sim()._test_ldmatrix(src, variant, pitch))
    num, trans = LDM[variant]
    assert torch.equal(got, ldmatrix_expected(src.reshape(32, 8), num, trans))


# ---- shuffles, votes, reductions -----------------------------------------------------------------

def test_shuffles_and_ballot():
    x = torch.randn(96)
    out = under_orders(lambda: sim()._test_shuffles(x))
    lane = torch.arange(96) % 32
    base = torch.arange(96) - lane
    assert torch.equal(out[0], x[base + (lane ^ 5)])
    assert torch.equal(out[1], x[base + (7 * lane + 3) % 32])
    down = torch.where(lane + 3 < 32, lane + 3, lane)
    up = torch.where(lane - 3 >= 0, lane - 3, lane)
    assert torch.equal(out[2], x[base + down])
    assert torch.equal(out[3], x[base + up])
    for w in range(3):
        bits = sum(1 << i for i in range(32) if x[32 * w + i] > 0)
        assert torch.all(out[4, 32 * w:32 * w + 32] == float(bits))


def test_block_and_warp_reductions():
    x = torch.randn(5, 256)
    out = under_orders(lambda: sim()._test_reductions(x))
    torch.testing.assert_close(out[:, 0], x.sum(1), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, 1], x[:, :32].max(1).values)


# ---- cp.async, atomics, exp2 ---------------------------------------------------------------------

@pytest.mark.parametrize("size,src_size", [(4, 4), (8, 8), (8, 3), (16, 16), (16, 5), (16, 0)])
def test_cp_async_copies_and_zero_fills(size, src_size):
    src = torch.randint(1, 256, (64 * size,), dtype=torch.uint8)
    got = under_orders(lambda: sim()._test_cp_async(src, size, src_size))
    want = src.view(64, size).clone()
    want[:, src_size:] = 0
    assert torch.equal(got.view(64, size), want)


def test_atomics_sum_exactly_in_any_block_order():
    vals = torch.randint(-50, 51, (640,)).float()
    got = under_orders(lambda: sim()._test_atomics(vals, 7))
    assert torch.equal(got, vals.view(-1, 7).sum(0) if vals.numel() % 7 == 0 else
                       torch.stack([vals[i::7].sum() for i in range(7)]))


def test_atomic_sums_follow_the_block_order():
    """Control for the order checks: fp32 atomics really accumulate in block order on the layer
    (2^24 + 1 + 1 = 2^24 in that order, but 1 + 1 + 2^24 = 2^24 + 2), so a kernel whose
    results depend on atomic order cannot pass the bit-equality checks by accident."""
    from gptfast import cuda_sim
    vals = torch.zeros(192)
    vals[0], vals[64], vals[128] = 2.0 ** 24, 1.0, 1.0   # one value per block of 64 threads
    got = {}
    for order in ("forward", "reverse"):
        with cuda_sim.settings(block_order=order):
            got[order] = float(sim()._test_atomics(vals, 1))
    assert got == {"forward": 2.0 ** 24, "reverse": 2.0 ** 24 + 2}


def test_exp2_approx_within_two_ulp_with_flush_to_zero():
    x = torch.cat([torch.linspace(-125, 127, 3001), torch.tensor([0.0, -0.0, 1e-40, -1e-40, -130.0,
                                                                  -149.5, 200.0, -math.inf,
                                                                  math.inf])])
    y = sim()._test_exp2(x)
    ref = torch.exp2(x.double())
    normal = (ref >= 2.0 ** -126) & (ref < 2.0 ** 128)
    ulp = torch.where(normal, ref * 2.0 ** -23, torch.ones_like(ref))
    assert ((y.double() - ref).abs()[normal] <= 2 * ulp[normal]).all()
    assert torch.all(y[x.abs() == 1e-40] == 1.0)      # subnormal input -> 2^0
    assert torch.all(y[(x == -130.0) | (x == -149.5) | (x == -math.inf)] == 0.0)  # flushed
    assert y[x == 200.0].isinf().all()
