"""The module wrappers forward their options to the functional ops."""
import torch
import torch.nn.functional as F

import gptfast


def test_linear_cross_entropy_loss_module():
    h, w = torch.randn(12, 8, requires_grad=True), torch.randn(30, 8)
    t = torch.randint(0, 30, (12,))
    t[0] = 7
    loss_fn = gptfast.nn.LinearCrossEntropyLoss(ignore_index=7, label_smoothing=0.1,
                                                reduction="sum")
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=7, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss_fn(h, w, t), ref)
    assert "label_smoothing=0.1" in repr(loss_fn)


def test_cross_entropy_loss_module():
    x, t = torch.randn(5, 9), torch.randint(0, 9, (5,))
    torch.testing.assert_close(gptfast.nn.CrossEntropyLoss()(x, t), F.cross_entropy(x, t))


def test_causal_attention_module_drops_only_in_training():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    attn = gptfast.nn.CausalAttention(dropout_p=0.5).eval()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attn(q, k, v), ref, atol=1e-5, rtol=1e-5)
    attn.train()
    assert not torch.allclose(attn(q, k, v), ref)
