"""CPU tests for gptfast.model (tiny configs; the big presets are only built on the meta device)."""
import math

import pytest
import torch
import torch.nn.functional as F

import gptfast
from gptfast.model import (
    GPT, PRESETS, GPTConfig, GPTForSequenceClassification, alibi_slopes, count_params, get_config,
    param_groups, scheduled_sampling_inputs, shift_targets,
)

PAD = 258


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(get_config("tiny", **overrides))


def batch(B=3, T=16, V=259, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


# ----------------------------------------------------------------------------- configs

def test_param_counts_exact():
    assert count_params("gpt1") == 116_534_784
    assert count_params("gpt2") == 124_439_808
    assert count_params(get_config("gpt2")) == 124_439_808
    assert count_params("bloom-560m") == 559_214_592  # bigscience/bloom-560m's own count


def test_gpt3_175b_on_meta():
    n = count_params("gpt3-175b")
    assert abs(n - 175e9) / 175e9 < 0.01, n


@pytest.mark.parametrize("name,nominal", [
    ("gpt2-medium", 355e6), ("gpt2-large", 774e6), ("gpt2-xl", 1.558e9),
    ("gpt3-125m", 125e6), ("gpt3-350m", 350e6), ("gpt3-760m", 760e6), ("gpt3-1.3b", 1.3e9),
    ("gpt3-2.7b", 2.7e9), ("gpt3-6.7b", 6.7e9), ("gpt3-13b", 13e9),
    ("bloom-1b1", 1.065e9), ("bloom-1b7", 1.722e9), ("bloom-3b", 3.003e9), ("bloom-7b1", 7.069e9),
    ("bloom-176b", 176.2e9),
])
def test_preset_sizes_near_nominal(name, nominal):
    assert abs(count_params(name) - nominal) / nominal < 0.05


def test_presets_shapes():
    g1 = get_config("gpt1")
    assert (g1.ln_position, g1.final_ln, g1.block_size, g1.vocab_size, g1.n_inner) == \
        ("post", False, 512, 40478, 3072)
    for name in PRESETS:
        cfg = get_config(name)
        if name.startswith("gpt3"):
            assert (cfg.block_size, cfg.vocab_size, cfg.n_inner) == (2048, 50257, 4 * cfg.n_embd)
        if name in ("tiny", "demo"):
            assert cfg.vocab_size == 259
    assert get_config("gpt3-175b").n_layer == 96 and get_config("gpt3-175b").n_embd == 12288
    assert get_config("tiny", vocab_size=300).vocab_size == 300


def test_every_preset_takes_the_fused_attention_kernels():
    """On a GPU every preset's head dim runs on the fused Triton kernels (GPT-3 2.7B's and
    BLOOM-3B's 80, GPT-3 760M's 96 included), not the reference."""
    from gptfast.ops.attention import head_dim_supported
    dims = {name: get_config(name).head_size for name in PRESETS}
    assert {dims["gpt3-2.7b"], dims["gpt3-760m"], dims["gpt2-xl"]} == {80, 96, 64}
    assert [name for name, d in dims.items() if not head_dim_supported(d)] == []


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="gpt2-medium") as e:
        get_config("gpt5")
    assert "gpt5" in str(e.value)
    with pytest.raises(ValueError, match="n_embdd"):
        get_config("tiny", n_embdd=3)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_embd=66), "n_embd"), (dict(n_kv_head=3), "n_kv_head"), (dict(ln_position="mid"), "ln_position"),
    (dict(dropout=1.5), "dropout"), (dict(n_layer=0), "n_layer"), (dict(attn_dropout=-0.1), "attn_dropout"),
])
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **overrides)


def test_config_defaults_resolved():
    cfg = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=8)
    assert cfg.n_inner == 32 and cfg.n_kv_head == 2 and cfg.head_size == 4


# ----------------------------------------------------------------------------- forward / loss

@pytest.mark.parametrize("overrides", [
    {}, dict(ln_position="post", final_ln=False), dict(n_kv_head=2), dict(tie_embeddings=False),
    dict(bias=False, n_inner=96), dict(position="alibi", embedding_ln=True),
])
def test_teacher_forcing_loss_matches_manual_shift(overrides):
    model = tiny(**overrides).eval()
    idx = batch()
    idx[1, -4:] = PAD
    targets = shift_targets(idx, pad_id=PAD)
    assert (targets[:, -1] == -100).all() and (targets[1, -5:] == -100).all()
    assert torch.equal(targets[0, :-1], idx[0, 1:])
    logits, loss = model(idx, targets)
    assert logits is None and loss.dim() == 0
    full = model.logits(idx)                                                   # (B, T, V)
    ref = F.cross_entropy(full[:, :-1].reshape(-1, full.size(-1)), idx[:, 1:].reshape(-1),
                          ignore_index=PAD)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_last_position_logits():
    model = tiny().eval()
    idx = batch()
    logits, loss = model(idx)
    assert loss is None and logits.shape == (3, 1, 259)
    torch.testing.assert_close(logits, model.logits(idx)[:, -1:], rtol=1e-5, atol=1e-5)
    assert model.forward_hidden(idx).shape == (3, 16, 64)


def test_tied_embedding_and_init():
    model = tiny()
    assert model.output_weight is model.wte.weight
    assert model.num_params() == count_params("tiny")
    std = 0.02 / math.sqrt(2 * model.config.n_layer)
    w = model.h[0].mlp.c_proj.weight
    assert abs(w.std().item() - std) / std < 0.1
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_alibi_preset_shape():
    """BLOOM style: no position embedding, a LayerNorm after the token embedding, ALiBi slopes
    as a non-persistent fp32 buffer (not in the state_dict, fp32 after a cast)."""
    model = tiny(position="alibi", embedding_ln=True)
    assert model.wpe is None and model.ln_emb is not None
    assert model.num_params() == model.num_params(exclude_positions=True) == \
        count_params("tiny") - 128 * 64 + 2 * 64
    assert not any("alibi" in k for k in model.state_dict())
    assert torch.equal(model.h[1].attn.alibi_slopes, alibi_slopes(4))
    assert torch.equal(alibi_slopes(4), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]))
    model.to(torch.bfloat16)
    assert model.h[0].attn.alibi_slopes.dtype == torch.float32
    assert model.wte.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="GPTConfig.position"):
        get_config("tiny", position="rope")


def test_alibi_kv_cache_matches_full_forward():
    """ALiBi with a KV cache: the kernel's bias is bottom-right aligned (relative distance), so
    cached decoding gives the logits of the full sequence."""
    from gptfast.generate import KVCache
    model = tiny(position="alibi", embedding_ln=True).eval()
    idx = batch(B=2, T=12)
    full = model.logits(idx)                                                   # (B, T, V)
    cache = KVCache.for_model(model, 2, 12)
    with torch.no_grad():
        model(idx[:, :8], kv_cache=cache)
        for t in range(8, 12):
            step, _ = model(idx[:, t:t + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_attention_uses_strided_qkv_views(monkeypatch):
    model = tiny().eval()
    seen = []
    real = gptfast.attention

    def spy(q, k, v, **kw):
        seen.append((q.shape, k.shape, q.is_contiguous(), kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(gptfast, "attention", spy)
    model(batch(T=8))
    assert len(seen) == 2
    qshape, kshape, contiguous, kw = seen[0]
    assert qshape == (3, 4, 8, 16) and kshape == (3, 4, 8, 16) and not contiguous
    assert kw["causal"] is True and kw["dropout_p"] == 0.0
    seen.clear()
    train_model = tiny(attn_dropout=0.25).train()
    train_model(batch(T=8))
    assert seen[0][3]["dropout_p"] == 0.25


def test_bad_inputs_raise_naming_argument():
    model = tiny()
    with pytest.raises(ValueError, match="idx"):
        model(batch().float())
    with pytest.raises(ValueError, match="idx"):
        model(batch()[0])
    with pytest.raises(ValueError, match=r"129.*block_size 128"):
        model(batch(T=129))
    with pytest.raises(ValueError, match="targets"):
        model(batch(), batch()[:, :-1])
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(batch(), key_padding_mask=torch.ones(3, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------- scheduled sampling

def test_scheduled_sampling_p0_is_teacher_forcing():
    model = tiny().eval()
    idx = batch()
    mixed = scheduled_sampling_inputs(model, idx, 0.0)
    assert torch.equal(mixed, idx)
    targets = shift_targets(idx)
    torch.testing.assert_close(model(mixed, targets)[1], model(idx, targets)[1], rtol=0, atol=0)


def test_scheduled_sampling_p1_uses_predictions():
    model = tiny().eval()
    idx = batch()
    mixed = scheduled_sampling_inputs(model, idx, 1.0, generator=torch.Generator().manual_seed(0))
    pred = model.logits(idx).argmax(-1)
    assert torch.equal(mixed[:, 0], idx[:, 0])
    assert torch.equal(mixed[:, 1:], pred[:, :-1])


def test_scheduled_sampling_fraction():
    model = tiny().eval()
    idx = batch(B=8, T=64)
    mixed = scheduled_sampling_inputs(model, idx, 0.5, generator=torch.Generator().manual_seed(0))
    pred = model.logits(idx).argmax(-1)
    from_model = (mixed[:, 1:] == pred[:, :-1]) & (mixed[:, 1:] != idx[:, 1:])
    assert ((mixed[:, 1:] == idx[:, 1:]) | (mixed[:, 1:] == pred[:, :-1])).all()
    assert 0.3 < from_model.float().mean().item() < 0.7
    with pytest.raises(ValueError, match="p must"):
        scheduled_sampling_inputs(model, idx, 1.5)


# ----------------------------------------------------------------------------- classification

@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_classification_pooling_right_padded(pooling):
    gpt = tiny().eval()
    clf = GPTForSequenceClassification(gpt, 5, pooling=pooling, pad_id=PAD).eval()
    lengths = [10, 6, 1]
    idx = batch(T=10)
    for b, n in enumerate(lengths):
        idx[b, n:] = PAD
    out = clf(idx)
    assert out.shape == (3, 5)
    for b, n in enumerate(lengths):
        h = gpt.forward_hidden(idx[b:b + 1, :n])[0]                            # (n, C) no padding
        pooled = {"last": h[-1], "mean": h.mean(0), "max": h.amax(0)}[pooling]
        torch.testing.assert_close(out[b], clf.head(pooled), rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 3, 4])
    torch.testing.assert_close(clf.loss(idx, labels), F.cross_entropy(out, labels))


def test_classification_bad_pooling():
    with pytest.raises(ValueError, match="pooling"):
        GPTForSequenceClassification(tiny(), 2, pooling="first")


def test_param_groups():
    model = tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    assert sum(p is model.wte.weight for p in decay["params"]) == 1
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


# ----------------------------------------------------------------------------- compile / autocast

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    model = tiny(n_layer=1)
    idx = batch(B=2, T=32)
    targets = shift_targets(idx)
    _, loss = model(idx, targets)
    loss.backward()
    ref_loss, ref_grads = loss.detach(), _grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    _, loss_c = compiled(idx, targets)
    loss_c.backward()
    torch.testing.assert_close(loss_c.detach(), ref_loss, rtol=1e-4, atol=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_autocast_bf16_training_step():
    model = tiny()
    idx = batch()
    targets = shift_targets(idx)
    _, ref = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, targets)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    assert model.wte.weight.dtype == torch.float32 and model.wte.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
