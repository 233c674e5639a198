"""A small, readable GPT built on the fused gptfast ops (nanoGPT style: one flat file).

    GPTConfig / PRESETS / get_config / count_params    -- configuration and parameter counts
    alibi_slopes                                       -- ALiBi's per-head slopes (BLOOM)
    GPT                                                -- the decoder (GPT-1, GPT-2, GPT-3, BLOOM shapes)
    shift_targets / scheduled_sampling_inputs          -- training helpers
    GPTForSequenceClassification                       -- fine-tuning head
    param_groups                                       -- AdamW parameter groups

Every attention call goes through `gptfast.attention` and the training loss through
`gptfast.linear_cross_entropy`, so the (B*T, vocab) logits are never materialized in training.

Shapes: B batch, T sequence length, C = n_embd, nh = n_head, nkv = n_kv_head, hs = head size,
V = vocab_size.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import gptfast  # gptfast.attention / gptfast.linear_cross_entropy are looked up at call time

__all__ = [
    "GPTConfig", "PRESETS", "get_config", "count_params", "alibi_slopes", "GPT", "shift_targets",
    "scheduled_sampling_inputs", "GPTForSequenceClassification", "param_groups",
    "explain_paths",
]


# ----------------------------------------------------------------------------- config

@dataclass
class GPTConfig:
    block_size: int = 1024            # maximum context length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: Optional[int] = None     # FFN width; None -> 4 * n_embd
    n_kv_head: Optional[int] = None   # key/value heads; None -> n_head (multi-head); < n_head: GQA
    dropout: float = 0.0              # embedding and residual dropout
    attn_dropout: float = 0.0         # dropout on the attention probabilities
    bias: bool = True                 # biases in the Linear layers and LayerNorms
    ln_position: str = "pre"          # "pre" (GPT-2/3) or "post" (GPT-1, original Transformer)
    final_ln: bool = True             # LayerNorm after the last block (GPT-2/3: yes, GPT-1: no)
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True       # the output projection reuses the token embedding
    position: str = "learned"         # "learned" absolute embeddings (GPT) or "alibi" biases (BLOOM)
    embedding_ln: bool = False        # LayerNorm right after the token embedding (BLOOM)
    backend: str = "auto"             # gptfast op backend: "auto" | "cuda" | "triton" | "torch"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("n_inner", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int or None, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {value!r}")
        if self.position not in ("learned", "alibi"):
            raise ValueError(
                f"GPTConfig.position must be 'learned' or 'alibi', got {self.position!r}")
        if self.ln_position not in ("pre", "post"):
            raise ValueError(
                f"GPTConfig.ln_position must be 'pre' or 'post', got {self.ln_position!r}")
        if self.backend not in ("auto", "cuda", "triton", "torch"):
            raise ValueError(f"GPTConfig.backend must be 'auto', 'cuda', 'triton' or 'torch', "
                             f"got {self.backend!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# Byte-level tokenizer ids used by the small presets: 256 bytes, then BOS, EOS, PAD.
BYTE_VOCAB_SIZE, BOS_ID, EOS_ID, PAD_ID = 259, 256, 257, 258

_GPT2 = dict(block_size=1024, vocab_size=50257, ln_position="pre", final_ln=True,
             dropout=0.1, attn_dropout=0.1)
_GPT3 = dict(block_size=2048, vocab_size=50257, ln_position="pre", final_ln=True)
# BLOOM (BigScience 2022): ALiBi instead of positions, a LayerNorm after the embedding, 250880
# tokens. block_size is the training length; ALiBi itself has no maximum.
_BLOOM = dict(block_size=2048, vocab_size=250880, ln_position="pre", final_ln=True,
              position="alibi", embedding_ln=True)

PRESETS: dict[str, dict] = {
    # GPT-1 (Radford et al. 2018): post-LN, no final LayerNorm, 40478 BPE tokens.
    "gpt1": dict(block_size=512, vocab_size=40478, n_layer=12, n_head=12, n_embd=768,
                 n_inner=3072, ln_position="post", final_ln=False, dropout=0.1, attn_dropout=0.1),
    # GPT-2 (Radford et al. 2019).
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 (Brown et al. 2020, Table 2.1), dense attention throughout (the paper alternates dense
    # and locally banded sparse layers; that pattern is not modelled here). Two rows of the table
    # are internally inconsistent (d_model != n_heads * d_head); we keep d_head = 128 and d_model:
    #   1.3B: table says n_heads 24, d_head 128, d_model 2048  -> n_head 16 (16 * 128 = 2048)
    #   13B:  table says d_model 5140, n_heads 40, d_head 128  -> n_embd 5120 (40 * 128)
    "gpt3-125m": dict(_GPT3, n_layer=12, n_head=12, n_embd=768),
    "gpt3-350m": dict(_GPT3, n_layer=24, n_head=16, n_embd=1024),
    "gpt3-760m": dict(_GPT3, n_layer=24, n_head=16, n_embd=1536),
    "gpt3-1.3b": dict(_GPT3, n_layer=24, n_head=16, n_embd=2048),
    "gpt3-2.7b": dict(_GPT3, n_layer=32, n_head=32, n_embd=2560),
    "gpt3-6.7b": dict(_GPT3, n_layer=32, n_head=32, n_embd=4096),
    "gpt3-13b": dict(_GPT3, n_layer=40, n_head=40, n_embd=5120),
    "gpt3-175b": dict(_GPT3, n_layer=96, n_head=96, n_embd=12288),
    # BLOOM (the bigscience/bloom-* checkpoints; gptfast.hf.load_bloom reads them).
    "bloom-560m": dict(_BLOOM, n_layer=24, n_head=16, n_embd=1024),
    "bloom-1b1": dict(_BLOOM, n_layer=24, n_head=16, n_embd=1536),
    "bloom-1b7": dict(_BLOOM, n_layer=24, n_head=16, n_embd=2048),
    "bloom-3b": dict(_BLOOM, n_layer=30, n_head=32, n_embd=2560),
    "bloom-7b1": dict(_BLOOM, n_layer=30, n_head=32, n_embd=4096),
    "bloom-176b": dict(_BLOOM, n_layer=70, n_head=112, n_embd=14336),
    # Small CPU presets on the byte-level vocabulary (256 bytes + BOS/EOS/PAD).
    "tiny": dict(block_size=128, vocab_size=BYTE_VOCAB_SIZE, n_layer=2, n_head=4, n_embd=64),
    # ~0.85M parameters: a few minutes of training on a 2-core CPU.
    "demo": dict(block_size=256, vocab_size=BYTE_VOCAB_SIZE, n_layer=4, n_head=4, n_embd=128),
}


def get_config(name: str, **overrides) -> GPTConfig:
    """The preset `name` as a GPTConfig, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid names: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def count_params(name_or_config: Union[str, GPTConfig], **overrides) -> int:
    """Number of parameters (tied embedding counted once). Built on the meta device: free."""
    if isinstance(name_or_config, str):
        config = get_config(name_or_config, **overrides)
    else:
        config = dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params()


def alibi_slopes(n_head: int) -> torch.Tensor:
    """(n_head,) fp32 ALiBi slopes (Press et al. 2022), as BLOOM computes them.

    For a power of two n: slope_h = 2^(-8 (h+1) / n), a geometric sequence. Otherwise the n' =
    largest power of two below n gets that sequence, and the remaining n - n' heads take every
    other slope of the sequence for 2 n' (the odd powers), so slopes stay interleaved.
    """
    def geometric(n):  # 2^(-8/n), 2^(-16/n), ..., 2^(-8)
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    n = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(n) + geometric(2 * n)[0::2][: n_head - n]
    return torch.tensor(slopes, dtype=torch.float32)


# ----------------------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)        # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True                                         # scaled init
        self.attn_dropout = config.attn_dropout
        self.backend = config.backend
        self.resid_dropout = nn.Dropout(config.dropout)
        # ALiBi: not learned, not saved; GPT._apply keeps them fp32 when the model is cast
        slopes = alibi_slopes(config.n_head) if config.position == "alibi" else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def forward(self, x, kv_cache=None, key_padding_mask=None):
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        qkv = self.c_attn(x)                                                     # (B, T, (nh+2nkv)*hs)
        q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)                                 # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)                                # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)                                # (B, nkv, T, hs)
        if kv_cache is not None:
            # write this step's keys at [pos, pos+T), attend over everything cached so far
            k, v = kv_cache.update(self.layer_idx, k, v)                         # (B, nkv, pos+T, hs)
        # bottom-right aligned causal mask: query i (absolute pos+i) sees keys j <= pos+i
        y = gptfast.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                              alibi_slopes=self.alibi_slopes,
                              dropout_p=self.attn_dropout if self.training else 0.0,
                              backend=self.backend)                              # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)                                   # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=config.bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.c_proj.residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")                             # (B, T, n_inner)
        return self.dropout(self.c_proj(x))                                      # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.pre_ln = config.ln_position == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, key_padding_mask=None):
        if self.pre_ln:   # GPT-2/3: x + f(LN(x))
            x = x + self.attn(self.ln_1(x), kv_cache, key_padding_mask)
            x = x + self.mlp(self.ln_2(x))
        else:             # GPT-1: LN(x + f(x))
            x = self.ln_1(x + self.attn(x, kv_cache, key_padding_mask))
            x = self.ln_2(x + self.mlp(x))
        return x


class GPT(nn.Module):
    """Decoder-only Transformer with (by default) tied embeddings and learned absolute positions,
    or ALiBi and an embedding LayerNorm (config.position == "alibi", BLOOM).

    forward(idx, targets=None, *, kv_cache=None, key_padding_mask=None) -> (logits, loss):
      * with targets (B, T): (None, loss); loss = mean next-token cross-entropy over targets
        != -100, computed by gptfast.linear_cross_entropy (no logits materialized). Targets are
        already aligned with the outputs: use `shift_targets(idx)` for teacher forcing.
      * without targets: (logits of the LAST position only, shape (B, 1, V), None).
    kv_cache: an object with `.pos` (int, positions already cached) and
      `.update(layer_idx, k, v) -> (k_all, v_all)` (see gptfast.generate.KVCache). The new tokens
      sit at absolute positions [pos, pos+T); the cache advances by T after the forward.
    key_padding_mask: (B, Sk) bool, True = real token, Sk = (cache.pos if cache else 0) + T.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = (nn.Embedding(config.block_size, config.n_embd)
                    if config.position == "learned" else None)
        self.ln_emb = (nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
                       if config.embedding_ln else None)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = (nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
                     if config.final_ln else nn.Identity())
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.n_embd, config.vocab_size, bias=False))
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 * n_layer)), zero biases
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_proj", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast buffers too; the ALiBi slopes stay fp32 (the kernels read fp32)
        super()._apply(fn, recurse)
        for block in self.h:
            slopes = block.attn.alibi_slopes
            if slopes is not None and slopes.dtype != torch.float32:
                block.attn.alibi_slopes = alibi_slopes(self.config.n_head).to(slopes.device)
        return self

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, C) output projection: the token embedding when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())    # parameters() yields shared ones once
        return n - self.wpe.weight.numel() if exclude_positions and self.wpe is not None else n

    def _check_inputs(self, idx, kv_cache, key_padding_mask):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            desc = (f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor)
                    else type(idx).__name__)
            raise ValueError(f"idx must be a 2-D torch.long tensor (B, T), got {desc}")
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        if T == 0:
            raise ValueError("idx must contain at least one position (T > 0)")
        if start + T > self.config.block_size:
            what = f"sequence length {T}" if start == 0 else f"cache position {start} + length {T}"
            raise ValueError(f"{what} = {start + T} exceeds block_size {self.config.block_size}")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                             or tuple(key_padding_mask.shape) != (B, start + T)):
            raise ValueError(f"key_padding_mask must be bool of shape {(B, start + T)}, got "
                             f"{tuple(key_padding_mask.shape)} {key_padding_mask.dtype}")
        return start

    def forward_hidden(self, idx, *, kv_cache=None, key_padding_mask=None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the final LayerNorm when config.final_ln."""
        start = self._check_inputs(idx, kv_cache, key_padding_mask)
        B, T = idx.shape
        x = self.wte(idx)                                                           # (B, T, C)
        if self.wpe is not None:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.wpe(pos)
        if self.ln_emb is not None:
            x = self.ln_emb(x)
        x = self.drop(x)
        for block in self.h:
            x = block(x, kv_cache, key_padding_mask)                                # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)                                                         # (B, T, C)

    def forward(self, idx, targets=None, *, kv_cache=None, key_padding_mask=None):
        if targets is not None and (not isinstance(targets, torch.Tensor)
                                    or tuple(targets.shape) != tuple(idx.shape)):
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {got}")
        x = self.forward_hidden(idx, kv_cache=kv_cache, key_padding_mask=key_padding_mask)
        B, T, C = x.shape
        if targets is not None:
            loss = gptfast.linear_cross_entropy(x.view(-1, C), self.output_weight,
                                                targets.reshape(-1), ignore_index=-100,
                                                backend=self.config.backend)
            return None, loss
        logits = F.linear(x[:, -1:, :], self.output_weight)                         # (B, 1, V)
        return logits, None

    def logits(self, idx, *, key_padding_mask=None) -> torch.Tensor:
        """Logits at every position (B, T, V). Materializes them: for small inputs and tests."""
        return F.linear(self.forward_hidden(idx, key_padding_mask=key_padding_mask),
                        self.output_weight)


# ----------------------------------------------------------------------------- training helpers

def shift_targets(idx: torch.Tensor, pad_id: Optional[int] = None,
                  ignore_index: int = -100) -> torch.Tensor:
    """Teacher-forcing targets: targets[:, t] = idx[:, t+1]; the last position and (when pad_id
    is given) positions whose target is padding get ignore_index."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D (B, T), got shape {tuple(idx.shape)}")
    targets = torch.full_like(idx, ignore_index)
    targets[:, :-1] = idx[:, 1:]
    if pad_id is not None:
        targets[targets == pad_id] = ignore_index
    return targets


def scheduled_sampling_inputs(model: GPT, idx: torch.Tensor, p: float,
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Scheduled sampling (Bengio et al., 2015) with greedy predictions.

    Each position t >= 1 is replaced, with probability p, by the model's greedy prediction for it
    (argmax of the logits at t-1 from one no-grad pass over idx, in the model's current mode).
    Returns idx itself when p == 0. Targets stay `shift_targets(idx)` of the original sequence.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    if p == 0.0:
        return idx
    with torch.no_grad():
        pred = model.logits(idx).argmax(dim=-1)                                     # (B, T)
    pred_for = torch.cat([idx[:, :1], pred[:, :-1]], dim=1)     # (B, T): prediction FOR position t
    draw_device = idx.device if generator is None else generator.device
    draw = torch.rand(idx.shape, generator=generator, device=draw_device).to(idx.device)
    replace = draw < p                                                               # (B, T)
    replace[:, 0] = False
    return torch.where(replace, pred_for, idx)


class GPTForSequenceClassification(nn.Module):
    """GPT + pooling over real (non-pad) tokens + linear head -> (B, num_classes) logits.

    pooling: "last" (the last real token of each row; GPT-1 style), "mean" or "max".
    pad_id: token id treated as padding (None: every token is real).
    """

    POOLINGS = ("last", "mean", "max")

    def __init__(self, gpt: GPT, num_classes: int, pooling: str = "last",
                 pad_id: Optional[int] = None):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {self.POOLINGS}, got {pooling!r}")
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.gpt, self.pooling, self.pad_id = gpt, pooling, pad_id
        self.dropout = nn.Dropout(gpt.config.dropout)
        self.head = nn.Linear(gpt.config.n_embd, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def real_mask(self, idx: torch.Tensor) -> torch.Tensor:
        if self.pad_id is None:
            return torch.ones_like(idx, dtype=torch.bool)
        return idx != self.pad_id                                                   # (B, T)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden states, (B, T) bool mask -> (B, C). Rows with no real token -> 0."""
        B, T, C = h.shape
        if self.pooling == "last":
            positions = torch.arange(T, device=h.device).expand(B, T)
            last = torch.where(mask, positions, 0).amax(dim=1)                      # (B,)
            pooled = h[torch.arange(B, device=h.device), last]                      # (B, C)
        elif self.pooling == "mean":
            m = mask.unsqueeze(-1).to(h.dtype)                                      # (B, T, 1)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)               # (B, C)
        else:
            pooled = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1) # (B, C)
        return torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = self.real_mask(idx)                                                  # (B, T)
        kpm = None if self.pad_id is None else mask
        h = self.gpt.forward_hidden(idx, key_padding_mask=kpm)                      # (B, T, C)
        return self.head(self.dropout(self.pool(h, mask)))                          # (B, classes)

    def loss(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(idx), labels)


# ----------------------------------------------------------------------------- which paths run

def explain_paths(model_or_config: Union[str, GPTConfig, "GPT"], *, device=None,
                  batch_size: int = 1, seq_len: Optional[int] = None, training: bool = True,
                  dtype: Optional[torch.dtype] = None) -> dict:
    """Which backend (and, on "torch", which path) the model's attention and loss take here.

    Returns {"attention": Decision, "linear_cross_entropy": Decision} for a training step
    (training=True: gradients, dropout as configured) or a decoding forward (no gradients,
    the loss op's entry describes the prompt's loss). device: default cuda when available;
    dtype: default bf16 on CUDA (what `gptfast train` autocasts to), else fp32. Nothing of
    the model's size is allocated: the inputs are expanded views of one small row.
    """
    if isinstance(model_or_config, GPT):
        config = model_or_config.config
    elif isinstance(model_or_config, GPTConfig):
        config = model_or_config
    else:
        config = get_config(model_or_config)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    T = seq_len or config.block_size
    B, nh, nkv, hs = batch_size, config.n_head, config.n_kv_head, config.head_size

    def rows(*shape):  # a (.., last) tensor of `shape` backed by one row of `last` elements
        return torch.zeros(shape[-1], device=device, dtype=dtype,
                           requires_grad=training).expand(*shape)

    with torch.set_grad_enabled(training):
        q, k, v = rows(B, nh, T, hs), rows(B, nkv, T, hs), rows(B, nkv, T, hs)
        attn = gptfast.explain(gptfast.attention, q, k, v, causal=True,
                               dropout_p=config.attn_dropout if training else 0.0,
                               backend=config.backend)
        hidden = rows(B * T, config.n_embd)
        weight = rows(config.vocab_size, config.n_embd)
        targets = torch.zeros(B * T, dtype=torch.long, device=device)
        loss = gptfast.explain(gptfast.linear_cross_entropy, hidden, weight, targets,
                               backend=config.backend)
        from .ops import reference
        materializes = attn.backend == "torch" and reference.sdpa_unsupported(
            q, alibi_slopes=None, dropout_p=config.attn_dropout if training else 0.0,
            return_lse=False) is not None
    report = PathReport(attention=attn, linear_cross_entropy=loss)
    report.attention_materializes_scores = materializes
    return report


class PathReport(dict):
    """{"attention": Decision, "linear_cross_entropy": Decision}, printed one after the other;
    `.attention_materializes_scores`: the attention runs on the plain reference, which keeps
    (B, nh, T, T) scores (the memory preflight of `gptfast train` counts them)."""

    attention_materializes_scores = False

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.values())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on 2-D weights (matmul weights, embeddings), none on biases and
    LayerNorm parameters. Shared (tied) parameters appear once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():    # named_parameters() deduplicates tied parameters
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
