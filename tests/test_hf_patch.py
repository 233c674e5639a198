"""gptfast.hf.patch: transformers GPT-2, Llama, BLOOM and Gemma-2 on gptfast's ops.

Every model is built small from its config with random weights (tests/_hf_models.py; nothing is
downloaded). Patched and unpatched models are compared with FlashAttention's rule against a
float64 oracle (the unpatched model in float64 with float64 attention): the patched model's max
error is at most 2x the unpatched model's own error in the same dtype (fp32, bf16) for logits,
3x for gradients and the loss, plus a small atol for values whose own error is ~0. The inputs have a left-padded and a right-padded row; logits
are compared at real tokens only (a padding query sees no key: gptfast returns zeros there,
HF an average; no real position reads them).
"""
import copy
import warnings

import pytest
import torch
import transformers
from transformers.masking_utils import (causal_mask_function, sdpa_mask,
                                        sliding_window_causal_mask_function)

import gptfast
import gptfast.hf
from gptfast.hf._attention import attention_takes_softcap, padding_mask
from gptfast.model import alibi_slopes
from gptfast.ops.reference import attention_visibility

from _hf_models import VOCAB, batch, build, oracle, oracle_loss
from _tolerance import assert_rule

pytestmark = pytest.mark.hf

ARCHS = ["gpt2", "llama", "bloom", "gemma2"]
ATOL = 1e-7  # fp32: below one ulp of the values compared (losses ~5, logits ~1)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loss_and_grads(model, ids, mask, labels, ref=False):
    model.zero_grad()
    loss = (oracle_loss(model, ids, mask, labels) if ref
            else model(ids, attention_mask=mask, labels=labels).loss)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ---- the mask contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("q_len,kv_len,q_off,kv_off,window", [
    (16, 16, 0, 0, None),    # training / prefill
    (1, 12, 11, 0, None),    # decoding with a dynamic cache
    (4, 32, 8, 0, None),     # static cache: 20 empty slots after the queries
    (1, 32, 8, 0, None),     # static cache, decoding
    (16, 16, 0, 0, 4),       # sliding window prefill
    (1, 4, 11, 8, 4),        # sliding-window cache: keys [8, 12)
    (3, 6, 11, 8, 4),        # sliding-window cache, 3 new tokens
])
@pytest.mark.parametrize("padded", [False, True])
def test_mask_matches_hf_mask(q_len, kv_len, q_off, kv_off, window, padded):
    """gptfast's (B, Sk') key padding mask + its bottom-right causal window sees exactly the keys
    HF's own boolean mask shows, and the keys it cuts are ones no query sees."""
    B, seen = 3, q_off + q_len
    mask2d = None
    if padded:
        mask2d = torch.ones(B, seen, dtype=torch.bool)
        mask2d[0, :3] = False           # left padding
        mask2d[1, seen - 2:] = False    # right padding
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    kw = dict(batch_size=B, q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off,
              mask_function=fn, attention_mask=mask2d, local_size=window)
    hf = sdpa_mask(**kw, allow_is_causal_skip=False)[:, 0]                      # (B, Sq, Sk)
    ours = padding_mask(**kw)
    n_keys = ours.shape[1] if ours is not None else kv_len
    assert n_keys == q_off + q_len - kv_off
    seen_by_ours = attention_visibility(q_len, n_keys, causal=True, window=window,
                                        key_padding_mask=ours, device="cpu")
    seen_by_ours = seen_by_ours.expand(B, 1, q_len, n_keys)[:, 0]
    assert torch.equal(seen_by_ours, hf[:, :, :n_keys])
    assert not hf[:, :, n_keys:].any()
    if not padded and n_keys == kv_len:
        assert ours is None  # nothing to mask: the kernel's unmasked path


def test_mask_refuses_other_patterns():
    from transformers.masking_utils import bidirectional_mask_function
    kw = dict(batch_size=2, q_length=8, kv_length=8, attention_mask=None)
    with pytest.raises(ValueError, match="sees a later key"):
        padding_mask(mask_function=bidirectional_mask_function, **kw)
    with pytest.raises(ValueError, match="narrower than 5"):
        padding_mask(mask_function=sliding_window_causal_mask_function(4), local_size=5, **kw)
    with pytest.raises(ValueError, match="wider than 3"):
        padding_mask(mask_function=sliding_window_causal_mask_function(4), local_size=3, **kw)
    with pytest.raises(ValueError, match="custom mask function"):
        padding_mask(mask_function=causal_mask_function, use_vmap=True, **kw)


def test_masks_registered_in_both_interfaces():
    gptfast.hf.register()
    assert transformers.AttentionInterface._global_mapping["gptfast"] is not None
    assert transformers.AttentionMaskInterface._global_mapping["gptfast"] is padding_mask


# ---- patched vs unpatched ------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [
    pytest.param("torch", torch.float32, id="torch-fp32"),
    pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("triton", torch.bfloat16, id="triton-bf16")])
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_unpatched(arch, backend, dtype):
    """Loss, every parameter gradient, and the logits (cross_entropy=False) of the patched model
    against the float64 oracle, next to the unpatched model's errors in the same dtype: 2x for
    logits, 3x for gradients and for the loss (one scalar: in bf16 its error is a single draw,
    measured between 0.3x and 2.7x the unpatched model's over seeds, where the max over the
    logits stays within 0.7x-1.5x)."""
    model = build(arch)
    ref = oracle(model)
    model = model.to(dtype)
    patched = copy.deepcopy(model)
    report = gptfast.hf.patch(patched, backend=backend)
    assert report.attention.startswith("gptfast") and "linear_cross_entropy" in report.cross_entropy
    ids, mask, labels = batch()
    ref_loss, ref_grads = _loss_and_grads(ref, ids, mask, labels, ref=True)
    base_loss, base_grads = _loss_and_grads(model, ids, mask, labels)
    out = patched(ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # the fused loss keeps no logits
    patched.zero_grad()
    out.loss.backward()
    assert_rule(f"{arch} loss", out.loss.detach(), ref_loss, base_loss, 3, ATOL)
    for name, p in patched.named_parameters():
        assert p.grad is not None, name
        assert_rule(f"{arch} grad {name}", p.grad, ref_grads[name], base_grads[name], 3, ATOL)

    gptfast.hf.patch(patched, backend=backend, cross_entropy=False)
    real = mask.bool()
    with torch.no_grad():
        logits = patched(ids, attention_mask=mask).logits
        assert_rule(f"{arch} logits", logits[real], ref(ids, attention_mask=mask).logits[real],
                    model(ids, attention_mask=mask).logits[real], 2, ATOL)


def test_ops_get_the_backend_dropout_and_heads(monkeypatch):
    """What reaches gptfast.attention: the backend, the layer's dropout in training (0 in eval),
    the grouped-query heads unrepeated, Gemma-2's window on its sliding layers only, BLOOM's
    slopes; and the loss op gets the output embedding and Gemma-2's softcap."""
    calls = []
    real_attention, real_lce = gptfast.attention, gptfast.linear_cross_entropy

    def spy_attention(q, k, v, **kw):
        calls.append(("attention", tuple(q.shape), tuple(k.shape), kw))
        return real_attention(q, k, v, **kw)

    def spy_lce(h, w, t, **kw):
        calls.append(("lce", tuple(h.shape), tuple(w.shape), kw))
        return real_lce(h, w, t, **kw)

    monkeypatch.setattr(gptfast, "attention", spy_attention)
    monkeypatch.setattr(gptfast, "linear_cross_entropy", spy_lce)
    ids, mask, labels = batch()
    for arch, dropout_field in [("gpt2", "attn_pdrop"), ("llama", "attention_dropout"),
                                ("bloom", "attention_dropout"), ("gemma2", "attention_dropout")]:
        model = build(arch, **{dropout_field: 0.25})
        gptfast.hf.patch(model, backend="torch")
        for training in (True, False):
            calls.clear()
            model.train(training)
            model(ids, attention_mask=mask, labels=labels)
            attn = [c for c in calls if c[0] == "attention"]
            assert len(attn) == 2 and sum(c[0] == "lce" for c in calls) == 1, (arch, calls)
            for layer, (_, q, k, kw) in enumerate(attn):
                assert kw["backend"] == "torch" and kw["causal"] is True
                assert kw["dropout_p"] == (0.25 if training else 0.0), (arch, kw)
                assert kw["key_padding_mask"].shape == (2, 16)
                if arch == "llama":
                    assert (q[1], k[1]) == (4, 2)  # grouped-query: k/v heads not repeated
                if arch == "gemma2":
                    assert kw["window"] == (4 if layer == 0 else None)  # sliding, full, ...
                if arch == "bloom":
                    assert torch.equal(kw["alibi_slopes"].cpu(), alibi_slopes(3))
            _, h, w, kw = calls[-1]
            assert h == (32, model.config.hidden_size) and w == (VOCAB, model.config.hidden_size)
            assert kw["softcap"] == (30.0 if arch == "gemma2" else None)


def test_alibi_slopes_match_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    for n in list(range(1, 21)) + [32, 112]:
        hf = build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]    # slope * 1
        exact = torch.tensor([2.0 ** (-8 * (i + 1) / 2 ** (n - 1).bit_length())
                              for i in range(n)], dtype=torch.float64)
        # gptfast rounds the exact slope once (as BLOOM's Megatron code did); HF raises an
        # fp32-rounded base to a power in fp32, a few ulps off for the small slopes
        torch.testing.assert_close(alibi_slopes(n), hf, rtol=1e-6, atol=0, msg=str(n))
        if n & (n - 1) == 0:  # a power of two: one geometric sequence
            torch.testing.assert_close(alibi_slopes(n).double(), exact, rtol=6e-8, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma2_score_softcap(backend):
    """Gemma-2's default attn_logit_softcapping=50: attention stays on the model's own
    implementation (and patch warns) until gptfast.attention takes `softcap`; the loss is fused
    either way. backend="triton": the softcap runs inside the attention kernels (here the
    tiny model's scores are small: a cap of 0.1 changes q_proj's gradient by about a third)."""
    model = build("gemma2", attn_logit_softcapping=50.0 if backend == "torch" else 0.1)
    ref, patched = oracle(model), copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = gptfast.hf.patch(patched, backend=backend)
    if attention_takes_softcap():
        assert report.attention == "gptfast" and not caught
    else:
        assert "attn_logit_softcapping=" in report.attention
        assert any("soft-caps attention" in str(w.message) for w in caught)
        assert patched.config._attn_implementation == "eager"
    assert "softcap 30.0" in report.cross_entropy
    ids, mask, labels = batch()
    ref_loss, ref_grads = _loss_and_grads(ref, ids, mask, labels, ref=True)
    base_loss, base_grads = _loss_and_grads(model, ids, mask, labels)
    from gptfast.kernels import attention as attn_kernels
    launches = attn_kernels.LAUNCHES["attention_fwd"]
    loss, grads = _loss_and_grads(patched, ids, mask, labels)
    if backend == "triton" and attention_takes_softcap():  # the kernels ran the capped scores
        assert attn_kernels.LAUNCHES["attention_fwd"] > launches
    assert_rule("gemma2 softcap loss", loss, ref_loss, base_loss, 2, ATOL)
    for name in grads:
        assert_rule(f"gemma2 softcap grad {name}", grads[name], ref_grads[name],
                    base_grads[name], 3, ATOL)


# ---- the loss's HF options -----------------------------------------------------------------------

def test_loss_options_as_hf():
    """num_items_in_batch (the Trainer's gradient accumulation), shift_labels, ignore_index,
    labels given positionally, return_dict=False."""
    model = build("llama")
    patched = copy.deepcopy(model)
    gptfast.hf.patch(patched, backend="torch")
    ids, mask, labels = batch()
    close = dict(rtol=1e-5, atol=1e-6)
    for kw in [dict(num_items_in_batch=torch.tensor(7)), dict(num_items_in_batch=5),
               dict(shift_labels=torch.roll(labels, -1, 1).masked_fill(ids == 3, -100))]:
        want = model(ids, attention_mask=mask, labels=labels, **kw).loss
        torch.testing.assert_close(patched(ids, attention_mask=mask, labels=labels, **kw).loss,
                                   want, **close)
    # GPT-2's forward: (input_ids, cache/past_key_values, attention_mask, token_type_ids,
    # position_ids, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels)
    gpt2 = build("gpt2")
    want = gpt2(ids, attention_mask=mask, labels=labels).loss
    gptfast.hf.patch(gpt2, backend="torch")
    got = gpt2(ids, None, mask, None, None, None, None, None, labels)
    torch.testing.assert_close(got.loss, want, **close)
    as_tuple = gpt2(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0
    torch.testing.assert_close(as_tuple[0], want, **close)
    no_labels = gpt2(ids, attention_mask=mask)  # no labels: the model's own forward, logits
    assert no_labels.loss is None and no_labels.logits.shape == (2, 16, VOCAB)
    with pytest.raises(ValueError, match="logits_to_keep"):
        gpt2(ids, labels=labels, logits_to_keep=1)


# ---- generation: caches, alignment, sliding windows ---------------------------------------------

@pytest.mark.parametrize("arch,cache", [("llama", "dynamic"), ("llama", "static"),
                                        ("gemma2", "dynamic"), ("bloom", "dynamic")])
def test_generate_matches_unpatched(arch, cache):
    """Greedy generation from a left-padded batch: prefill, then one token at a time through
    the cache (static: the keys after the last query are empty slots gptfast cuts; Gemma-2:
    8 new tokens run past its sliding window of 4)."""
    model = build(arch)
    patched = copy.deepcopy(model)
    gptfast.hf.patch(patched, backend="torch")
    ids, mask, _ = batch(S=8)
    mask[1] = 1  # left padding only: generation appends on the right
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = model.generate(ids, **kw)
    got = patched.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")


# ---- training ------------------------------------------------------------------------------------

def test_training_steps_track_unpatched():
    """Four AdamW steps of a patched GPT-2 on the interpreted Triton kernels, from the same
    weights as an unpatched copy: the losses follow the unpatched run's and go down."""
    ids, mask, labels = batch()
    losses = {}
    for name in ("unpatched", "patched"):
        model = build("gpt2").train()
        if name == "patched":
            gptfast.hf.patch(model, backend="triton")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(4):
            loss = model(ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["patched"][-1] < losses["patched"][0] - 0.1, losses
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["unpatched"]),
                               rtol=1e-4, atol=1e-5)


# ---- unpatch, refusals ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_the_model(arch):
    model = build(arch)
    ids, mask, labels = batch()
    before = model(ids, attention_mask=mask, labels=labels)
    impl, keys = model.config._attn_implementation, list(model.state_dict())
    gptfast.hf.patch(model, backend="torch")
    assert gptfast.hf.is_patched(model) and list(model.state_dict()) == keys
    gptfast.hf.patch(model, backend="torch")  # patching again replaces the patch
    assert gptfast.hf.unpatch(model) and not gptfast.hf.unpatch(model)
    assert model.config._attn_implementation == impl
    assert "forward" not in vars(model) and not model.base_model._forward_hooks
    assert not any("forward" in vars(m) or hasattr(m, "_gptfast_backend")
                   for m in model.modules())
    after = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


def test_unpatch_keeps_another_librarys_forward_wrapper():
    """A forward set on the instance before patch (accelerate's hooks do this) is the one the
    patched model calls, and it is back after unpatch."""
    model = build("bloom")
    calls = []
    original = model.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapper
    gptfast.hf.patch(model, backend="torch")
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels)
    assert calls == [1]
    gptfast.hf.unpatch(model)
    assert model.forward is wrapper


def test_a_failed_patch_leaves_nothing_behind(monkeypatch):
    """transformers refusing the switch (it only warns) is an error, and what patch had already
    changed is undone."""
    model = build("llama")
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl: None)
    with pytest.raises(RuntimeError, match="did not switch"):
        gptfast.hf.patch(model)
    assert not gptfast.hf.is_patched(model) and model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_gptfast_backend") for m in model.modules())


def test_unknown_architecture_names_the_supported_ones():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"'mistral'\) is not supported.*GPT-2 \(gpt2\), Llama "
                                         r"\(llama\), BLOOM \(bloom\), Gemma-2 \(gemma2\)"):
        gptfast.hf.patch(transformers.MistralForCausalLM(cfg))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        gptfast.hf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        gptfast.hf.patch(build("gpt2"), backend="cudnn")
    with pytest.raises(ValueError, match="cross-attention"):
        gptfast.hf.patch(build("gpt2", add_cross_attention=True))


def test_bare_model_gets_attention_only():
    model = transformers.GPT2Model(build("gpt2").config)
    report = gptfast.hf.patch(model, backend="torch")
    assert report.attention == "gptfast" and report.cross_entropy.startswith("unchanged")


def test_packed_sequences_refused():
    """Two sequences packed in one row (position_ids restart, no attention_mask): HF masks
    across them; the kernel cannot, so the mask interface refuses instead of mixing them."""
    model = build("llama")
    gptfast.hf.patch(model, backend="torch")
    ids = torch.randint(2, VOCAB, (1, 16))
    packed = torch.cat([torch.arange(10), torch.arange(6)])[None]
    # HF looks for packing only without a cache and without an attention_mask (training)
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=packed, use_cache=False)
    model(ids, position_ids=torch.arange(16)[None], use_cache=False)  # one sequence: fine


def test_bloom_mask_with_holes_refused():
    model = build("bloom")
    gptfast.hf.patch(model, backend="torch")
    ids, mask, _ = batch()
    mask[1, 6] = 0  # a hole inside row 1's real tokens: ALiBi positions would differ
    with pytest.raises(ValueError, match="one run"):
        model(ids, attention_mask=mask)


def test_4d_mask_refused():
    """A 4-D mask goes straight to the layers (HF does not rebuild it): gptfast says it cannot
    use it instead of ignoring it."""
    model = build("llama")
    gptfast.hf.patch(model, backend="torch")
    ids, _, _ = batch()
    mask4d = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(ids, attention_mask=mask4d)
