"""The public ops on a real GPU: "auto" picks the kernels, autocast, validation without a host
sync by default, compile and opcheck with compiled (not interpreted) Triton. Run by
`make gpu-check`; skipped cleanly without CUDA."""
import pytest
import torch

import gptfast
from gptfast.kernels import attention as attn_kernels
from gptfast.kernels import cross_entropy as ce_kernels
from gptfast.model import GPT, get_config

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_auto_picks_the_kernels_on_gpu():
    q = torch.randn(1, 2, 64, 64, device=CUDA, dtype=torch.bfloat16)
    assert gptfast.explain(gptfast.attention, q, q, q).backend in ("cuda", "triton")
    h, w = torch.randn(8, 64, device=CUDA), torch.randn(100, 64, device=CUDA)
    t = torch.randint(0, 100, (8,), device=CUDA)
    assert gptfast.explain(gptfast.linear_cross_entropy, h, w, t).backend in ("cuda", "triton")


def test_out_of_range_targets_give_nan_rows_and_validate_raises():
    h, w = torch.randn(8, 64, device=CUDA), torch.randn(100, 64, device=CUDA)
    t = torch.randint(0, 100, (8,), device=CUDA)
    t[3] = 100
    rows = gptfast.linear_cross_entropy(h, w, t, reduction="none")
    assert rows[3].isnan() and rows[torch.arange(8, device=CUDA) != 3].isfinite().all()
    with pytest.raises(ValueError, match="targets"):
        gptfast.linear_cross_entropy(h, w, t, validate=True)
    with pytest.raises(ValueError, match="targets"):
        gptfast.cross_entropy(h @ w.t(), t, validate=True)


def test_gpt_training_step_under_autocast_runs_the_fused_kernels_compiled():
    torch._dynamo.reset()
    cfg = get_config("tiny", n_head=2, block_size=128)  # head size 32, backend "auto"
    model = GPT(cfg).to(CUDA)
    idx = torch.randint(0, cfg.vocab_size, (4, 128), device=CUDA)
    a0, c0 = attn_kernels.LAUNCHES["attention_bwd"], ce_kernels.LAUNCHES["lce_bwd"]
    step = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 tied embedding, bf16 activations
        _, loss = step(idx, targets=idx.roll(-1, 1))
    loss.backward()
    assert attn_kernels.LAUNCHES["attention_bwd"] == a0 + cfg.n_layer
    assert ce_kernels.LAUNCHES["lce_bwd"] == c0 + 1
    assert model.wte.weight.grad.dtype == torch.float32
    ref = GPT(get_config("tiny", n_head=2, block_size=128, backend="torch")).to(CUDA)
    ref.load_state_dict(model.state_dict())
    _, ref_loss = ref(idx, targets=idx.roll(-1, 1))
    assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()


def test_opcheck_on_gpu():
    # the ops carry no autograd (it lives in gptfast.ops.attention._Attention etc.): detached
    # inputs; compiled (not interpreted) Triton behind them
    ops = torch.ops.gptfast
    q = torch.randn(2, 4, 70, 64, device=CUDA, dtype=torch.float16)
    k = torch.randn(2, 2, 90, 64, device=CUDA, dtype=torch.float16)
    v = torch.randn(2, 2, 90, 64, device=CUDA, dtype=torch.float16)
    args = (q, k, v, None, None, None, True, 0.125, None, 0.0)
    torch.library.opcheck(ops.triton_attention_fwd, args)
    out, lse = ops.triton_attention_fwd(*args)
    torch.library.opcheck(ops.triton_attention_bwd,
                          (torch.randn_like(out), None, q, k, v, out, lse, None, None, None, True,
                           0.125, None, 0.0, False))
    h = torch.randn(40, 64, device=CUDA, dtype=torch.bfloat16)
    w = torch.randn(1000, 64, device=CUDA, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (40,), device=CUDA)
    torch.library.opcheck(ops.triton_linear_cross_entropy_fwd,
                          (h, w, t, None, -100, 0.0, 0.0, None))
    torch.library.opcheck(ops.triton_linear_cross_entropy_fwd_grad,
                          (h, w, t, None, -100, 0.0, 0.0, None, 1, 1 << 30))
