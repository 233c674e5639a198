"""Autoregressive decoding for gptfast.model.GPT: a static KV cache, sampling, beam search.

    KVCache          -- preallocated (n_layer, B, n_kv_head, max_len, hs) key/value buffers
    generate         -- prefill + decode: greedy, temperature, top-k, top-p; stops at eos_id
    beam_search      -- beam search over the KV cache (batch 1), length-penalized scores
    sample_next      -- one sampling step on (B, V) logits
    sequence_score   -- the beam-search score of given sequences (to compare decoders)

Both decoders put the model in eval mode for the call (no dropout) and restore its mode after.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "generate", "beam_search", "sample_next", "sequence_score"]


class KVCache:
    """A static key/value cache, allocated once.

    k, v: (n_layer, B, n_kv_head, max_len, hs). `pos` counts the positions already cached. During
    a forward over T new tokens every layer calls `update(layer, k, v)`, which writes the new keys
    at [pos, pos+T) and returns k[..., :pos+T, :] / v[..., :pos+T, :] (views, no copy) for the
    attention; the model then calls `advance(T)`. The queries sit at the end of the key range, so
    the bottom-right aligned causal mask of gptfast.attention is exactly the right one.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_size: int,
                 *, dtype: torch.dtype = torch.float32, device=None):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: Optional[int] = None, *,
                  dtype: Optional[torch.dtype] = None, device=None) -> "KVCache":
        """A cache shaped for `model` (dtype/device of its weights by default).
        max_len defaults to (and may not exceed) config.block_size."""
        cfg = model.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= cfg.block_size:
            raise ValueError(f"max_len must be in [1, block_size={cfg.block_size}], got {max_len}")
        w = model.wte.weight
        return cls(cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_size,
                   dtype=dtype or w.dtype, device=device or w.device)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv_head, T, hs) at [pos, pos+T); return all keys/values so far."""
        B, _, T, _ = k.shape
        end = self.pos + T
        if B != self.batch_size:
            raise ValueError(f"KVCache batch size is {self.batch_size}, got keys for batch {B}")
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: position {self.pos} + {T} new > max_len "
                             f"{self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]   # (B, nkv, end, hs)

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Row b of the cache becomes old row index[b] (beam search); len(index) == batch_size."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.k.device)
        if index.shape != (self.batch_size,):
            raise ValueError(f"reorder index must have shape ({self.batch_size},), "
                             f"got {tuple(index.shape)}")
        p = self.pos
        self.k[:, :, :, :p] = self.k[:, index, :, :p]
        self.v[:, :, :, :p] = self.v[:, index, :, :p]


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, greedy: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V). greedy or temperature == 0: argmax. Otherwise sample
    softmax(logits / temperature) restricted to the top_k tokens and then to the smallest set of
    most likely tokens whose probability reaches top_p (nucleus; the top token is always kept)."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature                                        # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)       # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs         # probability of the better tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)          # (B,)


def _check_prompt(model, idx, max_new_tokens):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        desc = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx)
        raise ValueError(f"idx must be a 2-D torch.long tensor (B, T), got {desc}")
    if idx.size(1) == 0:
        raise ValueError("idx must hold a non-empty prompt (T >= 1)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    total, block = idx.size(1) + max_new_tokens, model.config.block_size
    if total > block:
        raise ValueError(f"prompt length {idx.size(1)} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds block_size {block}; shorten the prompt or max_new_tokens")


class _eval_mode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, greedy: bool = False,
             eos_id: Optional[int] = None, pad_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, return_lengths: bool = False):
    """Continue the prompts idx (B, T) by up to max_new_tokens tokens.

    Returns out (B, T + n) with n <= max_new_tokens, and with return_lengths=True also lengths
    (B,): each row's length up to and including its first eos_id (T + n when it never ended).
    Once a row has emitted eos_id it emits pad_id (eos_id when pad_id is None); decoding stops
    as soon as every row has ended. T + max_new_tokens must fit in config.block_size (else
    ValueError). use_cache=False re-runs the whole sequence each step (same result, slower).
    """
    _check_prompt(model, idx, max_new_tokens)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    B, T = idx.shape
    total = T + max_new_tokens
    fill = pad_id if pad_id is not None else eos_id
    out = torch.empty(B, total, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    lengths = torch.full((B,), T, dtype=torch.long, device=idx.device)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    n = 0
    with _eval_mode(model):
        cache = KVCache.for_model(model, B, total) if use_cache else None
        if max_new_tokens > 0:
            logits, _ = model(idx, kv_cache=cache)                              # prefill: (B, 1, V)
        while n < max_new_tokens:
            nxt = sample_next(logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p,
                              greedy=greedy, generator=generator)                # (B,)
            if eos_id is not None:
                nxt = torch.where(finished, fill, nxt)
                lengths += (~finished).long()
                finished |= nxt == eos_id
            else:
                lengths += 1
            out[:, T + n] = nxt
            n += 1
            if n == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            if use_cache:
                logits, _ = model(out[:, T + n - 1:T + n], kv_cache=cache)     # (B, 1, V)
            else:
                logits, _ = model(out[:, :T + n])
    out = out[:, :T + n]
    return (out, lengths) if return_lengths else out


@torch.no_grad()
def sequence_score(model, seq: torch.Tensor, prompt_len: int,
                   length_penalty: float = 1.0) -> torch.Tensor:
    """(B,) scores as beam_search defines them: the sum of the log-probabilities of the tokens
    after the prompt, divided by (number of those tokens) ** length_penalty."""
    n = seq.size(1) - prompt_len
    if n <= 0:
        raise ValueError(f"seq (length {seq.size(1)}) has no tokens after prompt_len {prompt_len}")
    with _eval_mode(model):
        logp = F.log_softmax(model.logits(seq).float(), dim=-1)                 # (B, L, V)
    gen = seq[:, prompt_len:]                                                   # (B, n)
    tok_logp = logp[:, prompt_len - 1:-1].gather(-1, gen.unsqueeze(-1)).squeeze(-1)  # (B, n)
    return tok_logp.sum(dim=1) / n ** length_penalty


@torch.no_grad()
def beam_search(model, idx: torch.Tensor, max_new_tokens: int, num_beams: int, *,
                eos_id: Optional[int] = None, length_penalty: float = 1.0):
    """Beam search from one prompt idx (1, T), decoding with a KV cache of num_beams rows.

    A hypothesis' score is sum(log p(token)) / (generated length) ** length_penalty, the length
    counting its eos_id. Hypotheses end at eos_id or after max_new_tokens. Search stops early only
    when no running beam can still beat the num_beams best finished ones. Returns (tokens
    (1, T + n), score) for the best hypothesis; num_beams=1 is greedy decoding.
    """
    _check_prompt(model, idx, max_new_tokens)
    if idx.size(0) != 1:
        raise ValueError(f"beam_search takes one prompt, idx must be (1, T), got {tuple(idx.shape)}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if not (isinstance(length_penalty, (int, float)) and math.isfinite(length_penalty)):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if max_new_tokens == 0:
        return idx.clone(), 0.0
    nb, T, device = num_beams, idx.size(1), idx.device
    finished: list[tuple[float, torch.Tensor]] = []    # (score, tokens (T + n,)), best first

    def add_finished(score, tokens):
        finished.append((score, tokens))
        finished.sort(key=lambda st: st[0], reverse=True)
        del finished[nb:]

    with _eval_mode(model):
        cache = KVCache.for_model(model, nb, T + max_new_tokens)
        beams = idx.expand(nb, T).clone()                                       # (nb, T)
        logits, _ = model(beams, kv_cache=cache)                                # (nb, 1, V)
        # all beams start equal: only beam 0 may expand at the first step
        beam_sums = torch.full((nb,), float("-inf"), device=device)
        beam_sums[0] = 0.0
        for step in range(max_new_tokens):
            n_gen = step + 1
            logp = F.log_softmax(logits[:, -1, :].float(), dim=-1)              # (nb, V)
            V = logp.size(-1)
            cand = (beam_sums[:, None] + logp).view(-1)                         # (nb * V,)
            top_sums, top_ids = cand.topk(min(2 * nb, cand.numel()))
            src, tok, sums = [], [], []
            for rank, (s, i) in enumerate(zip(top_sums.tolist(), top_ids.tolist())):
                if s == float("-inf"):
                    break
                b, t = divmod(i, V)
                if eos_id is not None and t == eos_id:
                    if rank < nb:   # an ending among the nb best continuations
                        add_finished(s / n_gen ** length_penalty,
                                     torch.cat([beams[b], beams.new_tensor([t])]))
                    continue
                src.append(b), tok.append(t), sums.append(s)
                if len(src) == nb:
                    break
            if not src:             # every continuation ended
                beams = beams[:0]
                break
            while len(src) < nb:    # fewer live continuations than beams: pad with dead ones
                src.append(src[0]), tok.append(tok[0]), sums.append(float("-inf"))
            src_t = torch.tensor(src, device=device)
            tok_t = torch.tensor(tok, device=device)
            beams = torch.cat([beams[src_t], tok_t[:, None]], dim=1)            # (nb, T + n_gen)
            beam_sums = torch.tensor(sums, device=device)
            if n_gen == max_new_tokens:
                break
            if len(finished) == nb:
                # a running sum only decreases; its best possible normalized score:
                best = beam_sums.max().item()
                denom = max_new_tokens if length_penalty > 0 else n_gen
                if finished[-1][0] >= best / denom ** length_penalty:
                    beams = beams[:0]
                    break
            cache.reorder(src_t)
            logits, _ = model(tok_t[:, None], kv_cache=cache)                   # (nb, 1, V)
        n_run = beams.size(1) - T
        for b in range(beams.size(0)):
            if beam_sums[b] > float("-inf"):
                add_finished(beam_sums[b].item() / n_run ** length_penalty, beams[b])
    score, tokens = finished[0]
    return tokens.unsqueeze(0), score
