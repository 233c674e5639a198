"""Launch grids of every kernel launcher against CUDA's limits (2**31 - 1 programs on axis 0,
65,535 on axes 1 and 2), at shapes far too large to run here.

The Triton interpreter does not enforce the limits, so the launchers are called on `meta`
tensors (shapes and strides, no memory) with each kernel swapped for a recorder of the grid it
is launched with: the real launcher code computes the real grid, and nothing runs. Whether the
kernels decode the folded program ids right is what the small-shape kernel tests check."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from gptfast.kernels import _grid, configs  # noqa: E402
from gptfast.kernels import attention as A  # noqa: E402
from gptfast.kernels import cross_entropy as ce  # noqa: E402

META = torch.device("meta")
CUDA_MAX = (2**31 - 1, 65_535, 65_535)
# B = 4096 sequences of 16 heads: 65,536 (batch, head) pairs, one more than axis 1 allows.
B, H, S = 4096, 16, 8192


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records the grid."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k.isupper()}
            self.log.append((self.name, tuple(grid(meta) if callable(grid) else grid), kwargs))
        return launch


def _record(monkeypatch, module, names):
    log = []
    for name in names:
        monkeypatch.setattr(module, name, _Recorder(name, log))
    return log


def _target(monkeypatch, cap):
    """Launchers pick the configs and grids of a GPU of capability `cap` with 132 SMs (an
    H100/H200); None: the small interpreter configs (with 132 SMs for the lean CE's splits)."""
    target = configs.Target(cap or (9, 0), 132)
    monkeypatch.setattr(configs, "_COMPILE_TARGET", target if cap is not None else None)
    if cap is None:
        monkeypatch.setattr(ce, "_num_sms", lambda device: 132)
    return target


def _assert_within_limits(log, expected_kernels):
    assert {name for name, _, _ in log} == set(expected_kernels), log
    for name, grid, _ in log:
        assert 1 <= len(grid) <= 3, (name, grid)
        for axis, (n, cap) in enumerate(zip(grid, CUDA_MAX)):
            assert 1 <= n <= cap, f"{name}: grid {grid}, axis {axis} over CUDA's {cap}"


ATTN_KERNELS = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd", "_dropout_mask_kernel")


@pytest.mark.parametrize("cap", [None, (9, 0), (8, 0)], ids=["interpreter", "sm90", "sm80"])
@pytest.mark.parametrize("d,hkv", [(64, H), (128, 2)], ids=["d64_mha", "d128_gqa"])
def test_attention_grids_fit_cuda_limits_at_b4096_h16(monkeypatch, cap, d, hkv):
    log = _record(monkeypatch, A, ATTN_KERNELS)
    _target(monkeypatch, cap)  # the blocks the GPU would use
    q = torch.empty(B, H, S, d, dtype=torch.bfloat16, device=META)
    k = torch.empty(B, hkv, S, d, dtype=torch.bfloat16, device=META)
    seed = torch.empty(1, dtype=torch.int64, device=META)
    out, lse = A.attention_forward(q, k, k, causal=True, softmax_scale=0.1, window=256,
                                   dropout_p=0.1, seed=seed)
    for deterministic in (False, True):
        A.attention_backward(q, q, k, k, out, lse, causal=True, softmax_scale=0.1,
                             deterministic=deterministic)
    A.attention_dropout_keep_mask(seed, B, H, 1024, 1024, 0.1, META)
    _assert_within_limits(log, ATTN_KERNELS)
    # Every (tile, batch*head) pair still gets its program.
    for name, grid, kw in log:
        if name == "_dropout_mask_kernel":
            assert grid == (triton.cdiv(1024, 32) ** 2 * B * H,)
            continue
        if name == "_attn_bwd":  # dK/dV programs, then (deterministic) the dQ programs
            n = triton.cdiv(S, kw["BLOCK_N"]) * B * hkv
            if not kw["ATOMIC_DQ"]:
                n += triton.cdiv(S, kw["BLOCK_N"]) * B * H
            assert grid == (n,), (name, grid)
            continue
        assert grid == (triton.cdiv(S, kw["BLOCK_M"]) * B * H,), (name, grid)


CE_KERNELS = ("_ce_fwd_kernel", "_ce_bwd_kernel", "_ce_fused_kernel", "_lce_fwd_kernel",
              "_lce_combine_kernel", "_lce_bwd_kernel", "_lce_dh_store_kernel")


@pytest.mark.parametrize("cap", [None, (9, 0), (8, 0)], ids=["interpreter", "sm90", "sm80"])
def test_cross_entropy_grids_fit_cuda_limits(monkeypatch, cap):
    log = _record(monkeypatch, ce, CE_KERNELS)
    _target(monkeypatch, cap)
    # A 16M-entry vocabulary: 131,072 vocabulary tiles even at BLOCK_V = 128, twice what axis 1
    # allows (so the lean backward's old (row tiles, vocab tiles) grid fails here).
    N, V, D = 1 << 16, 1 << 24, 256
    h = torch.empty(N, D, dtype=torch.bfloat16, device=META)
    w = torch.empty(V, D, dtype=torch.bfloat16, device=META)
    t = torch.empty(N, dtype=torch.int64, device=META)
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=None)
    loss, lse, _ = ce.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
    g = torch.empty(N, dtype=torch.float32, device=META)
    ce.linear_cross_entropy_backward(g, g, h, w, t, None, lse, **opts)
    ce.linear_cross_entropy_backward(None, g, h, w, t, None, lse, **opts)  # lse only
    n_lean = sum(name == "_lce_bwd_kernel" for name, _, _ in log)
    ce.linear_cross_entropy_backward(g, None, h, w, t, None, lse, dw_accumulation="lock",
                                     filter_eps=2.0**-12, **opts)
    logits = torch.empty(N, 50304, dtype=torch.bfloat16, device=META)
    _, lse2 = ce.cross_entropy_forward(logits, t, **opts)
    ce.cross_entropy_backward(g, None, logits, t, lse2, **opts)
    # The budgeted schedule, a few chunks of a smaller problem (its loop runs on the host).
    n2, v2 = 1 << 16, 128256
    ce.linear_cross_entropy_forward(h[:n2], w[:v2], t[:n2], None, reduction="mean",
                                    memory_budget=1 << 30, **opts)
    _assert_within_limits(log, CE_KERNELS)
    # The lean backward runs one launch per chunk of fp32 dH rows; together they cover the
    # N rows, each with every vocabulary tile.
    bwd = [(grid, kw) for name, grid, kw in log if name == "_lce_bwd_kernel"][:n_lean // 2]
    chunk = N if h.dtype == torch.float32 else ce.plan.dh_chunk_rows(N, D)
    assert len(bwd) == triton.cdiv(N, chunk) > 1
    for i, (grid, kw) in enumerate(bwd):
        rows = min(chunk, N - i * chunk)
        assert kw["GROUP_N"] >= 1 and chunk % kw["BLOCK_N"] == 0
        assert grid == (triton.cdiv(rows, kw["BLOCK_N"]) * triton.cdiv(V, kw["BLOCK_V"]),)


def test_grid_functions():
    assert A.tiles_x_heads_grid(S, 128, B * H) == (64 * 65_536,)
    assert A.dropout_mask_grid(100, 70, 32, 32, 3) == (4 * 3 * 3,)
    (rows, splits), per_split = ce.lean_forward_grid(10, 50257, 32, 64, 132)
    assert rows == 1 and splits * per_split >= triton.cdiv(50257, 64) and splits <= 2 * 132
    assert ce.lean_backward_grid(100, 1000, 32, 64) == (4 * 16,)
    # Whole waves: at N = 8192 with 128-row tiles the old rule's 5 splits made 2.42 waves of
    # 132 programs; the plan fills one wave.
    (rows, splits), _ = ce.lean_forward_grid(8192, 128256, 128, 128, 132)
    assert rows * splits <= 132 and rows * splits > 0.9 * 132
    with pytest.raises(ValueError, match="axis 0 has 2147483648 programs"):
        A.tiles_x_heads_grid(2**31, 1, 1)
    with pytest.raises(ValueError, match="axis 1 has 65536 programs"):
        _grid.checked_grid(1, 65_536)
