"""Tiny transformers models for the gptfast.hf tests, built from configs with random weights
(nothing is downloaded). Each has head dim 32 (a head dim the Triton kernels take), 2 layers,
and the feature of its architecture that gptfast must honour."""
import torch

VOCAB = 128


def config(arch: str, **overrides):
    import transformers as tf
    if arch == "gpt2":      # learned positions, Conv1D layers, tied embedding
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
    elif arch == "llama":   # RoPE, grouped-query heads (4 query, 2 key/value), untied output
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif arch == "bloom":   # ALiBi with 3 heads (not a power of two: interleaved slopes)
        cfg = tf.BloomConfig(vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=3,
                             hidden_dropout=0.0, attention_dropout=0.0,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
    elif arch == "gemma2":  # sliding window 4 (shorter than the test sequences) on every other
                            # layer, grouped-query heads, final logit softcap
        cfg = tf.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                              max_position_embeddings=64, attn_logit_softcapping=None,
                              final_logit_softcapping=30.0, bos_token_id=0, eos_token_id=1,
                              pad_token_id=0)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(arch: str, seed: int = 0, **overrides):
    """The *ForCausalLM model of `arch`, random weights, eval mode, eager attention."""
    import transformers as tf
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM,
           "bloom": tf.BloomForCausalLM, "gemma2": tf.Gemma2ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(config(arch, **overrides))
    with torch.no_grad():  # HF inits some norms/biases to constants: make every weight random
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if arch != "bloom":  # BLOOM's attention is eager only (it has no interface to set)
        model.set_attn_implementation("eager")
    return model.eval()


def batch(B: int = 2, S: int = 16, seed: int = 1):
    """ids (B, S); attention_mask with row 0 left-padded (5 tokens) and row 1 right-padded (3);
    labels = ids, -100 at padding and at row 0's first real token (HF predicts it from a padding
    position, whose output is meaningless)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, S - 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100
    return ids, mask, labels


# ---- the float64 oracle -------------------------------------------------------------------------
# The unpatched model in float64 is the reference, but HF's eager attention computes its softmax
# in fp32 (Llama, BLOOM, Gemma-2) and turns a float64 mask's minimum into -inf there (NaN rows
# with left padding). The oracle therefore runs the model's own code with attention done in
# float64 from HF's boolean mask (and, for BLOOM, HF's own ALiBi tensor): independent of gptfast.
ORACLE = "gptfast_test_oracle"


def _oracle_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      softcap=None, **kwargs):
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = query @ key.transpose(-1, -2) * scale                              # (B, H, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:  # bool (B, 1, Sq, Sk), sliding window included
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    return (torch.softmax(scores, -1) @ value).transpose(1, 2), None


def _oracle_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def _bloom_oracle_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None,
                          **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add
    q, k, v = self._reshape(self.query_key_value(hidden_states))                # (B, H, S, d)
    B, H, S, d = q.shape
    scores = q @ k.transpose(-1, -2) * self.inv_norm_factor + alibi.view(B, H, 1, -1)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    y = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, S, H * d)
    return dropout_add(self.dense(y), residual, 0.0, False), None


def oracle(model):
    """A float64 copy of `model` (unpatched) with its attention in float64."""
    import copy
    import types
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, _oracle_mask)
    ref = copy.deepcopy(model).double()
    ref.config._attn_implementation = ORACLE
    if ref.config.model_type == "bloom":
        for m in ref.modules():
            if type(m).__name__ == "BloomAttention":
                m.forward = types.MethodType(_bloom_oracle_forward, m)
    return ref


def oracle_loss(ref, ids, mask, labels):
    """HF's causal-LM loss from the oracle's float64 logits (HF's own loss casts logits to fp32)."""
    import torch.nn.functional as F
    logits = ref(ids, attention_mask=mask).logits                               # (B, S, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)
