"""CPU tests for gptfast.generate: KV cache, sampling, eos handling, beam search (tiny presets)."""
import pytest
import torch

from gptfast.generate import KVCache, beam_search, generate, sample_next, sequence_score
from gptfast.model import GPT, get_config

EOS, PAD = 257, 258


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT(get_config("tiny", **overrides)).eval()


def prompt(B=3, T=5, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_head=1), dict(ln_position="post", final_ln=False)])
def test_cache_logits_match_full_forward(overrides):
    model = tiny(**overrides)
    idx = prompt(T=12)
    full = model.logits(idx)                                                   # (B, T, V)
    cache = KVCache.for_model(model, batch_size=3, max_len=12)
    assert cache.k.shape == (2, 3, model.config.n_kv_head, 12, 16)
    k_buffer = cache.k
    last, _ = model(idx[:, :7], kv_cache=cache)                               # prefill 7
    torch.testing.assert_close(last[:, 0], full[:, 6], rtol=1e-5, atol=1e-5)
    for t in range(7, 12):                                                     # decode 1 by 1
        last, _ = model(idx[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(last[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.pos == 12 and cache.k is k_buffer                              # never reallocated
    with pytest.raises(ValueError, match="block_size|max_len|overflow"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_head=2)])
def test_greedy_with_cache_equals_without(overrides):
    model = tiny(**overrides)
    idx = prompt()
    a = generate(model, idx, 40, greedy=True, use_cache=True)
    b = generate(model, idx, 40, greedy=True, use_cache=False)
    assert a.shape == (3, 45) and torch.equal(a[:, :5], idx)
    assert torch.equal(a, b)


def test_sampling_with_cache_equals_without_same_seed():
    model = tiny()
    idx = prompt()
    a = generate(model, idx, 20, temperature=0.8, top_k=50, top_p=0.9,
                 generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 20, temperature=0.8, top_k=50, top_p=0.9, use_cache=False,
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny()
    idx = prompt()
    greedy = generate(model, idx, 20, greedy=True)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, idx, 20, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, idx, 20, top_p=1e-6, generator=g), greedy)
    assert torch.equal(generate(model, idx, 20, temperature=0.0), greedy)


def test_sample_next_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    seen = set(sample_next(logits, top_p=0.75, generator=g).tolist())
    assert seen == {0, 1}
    seen = set(sample_next(logits, top_k=3, generator=g).tolist())
    assert seen == {0, 1, 2}
    counts = torch.bincount(sample_next(logits, generator=g), minlength=4).float() / 2000
    assert (counts - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.05


def test_generation_stops_when_eos_is_argmax():
    model = tiny()
    with torch.no_grad():   # final hidden state = 10 * e_EOS direction -> EOS is always argmax
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(10 * model.wte.weight[EOS])
    idx = prompt()
    out, lengths = generate(model, idx, 30, greedy=True, eos_id=EOS, return_lengths=True)
    assert out.shape == (3, 6) and (out[:, -1] == EOS).all()
    assert lengths.tolist() == [6, 6, 6]


def test_eos_per_row_then_fill():
    model = tiny()
    idx = prompt()
    free = generate(model, idx, 30, greedy=True)
    eos = int(free[0, 5 + 3])                                # row 0 emits it at its 4th new token
    out, lengths = generate(model, idx, 30, greedy=True, eos_id=eos, pad_id=PAD,
                            return_lengths=True)
    for b in range(3):
        hits = (free[b, 5:] == eos).nonzero()
        end = 5 + int(hits[0]) + 1 if len(hits) else free.size(1)
        assert lengths[b] == end
        assert torch.equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == PAD).all()
    if (lengths < free.size(1)).all():
        assert out.size(1) == int(lengths.max())            # loop stopped when all rows ended


def test_generate_validation_and_mode_restored():
    model = tiny().train()
    with pytest.raises(ValueError, match="block_size"):
        generate(model, prompt(T=100), 29)
    with pytest.raises(ValueError, match="idx"):
        generate(model, prompt().float(), 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt(), 3, top_p=0.0)
    for bad in (float("nan"), float("inf"), -1.0):           # before torch.multinomial sees it
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate(model, prompt(), 3, temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt(), 3, top_p=float("nan"))
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, prompt()[:1], 3, 2, length_penalty=float("nan"))
    out = generate(model, prompt(T=100), 28, greedy=True)
    assert out.shape == (3, 128) and model.training
    assert torch.equal(generate(model, prompt(), 0), prompt())


def test_beam_search_one_beam_is_greedy():
    model = tiny()
    idx = prompt(B=1)
    greedy = generate(model, idx, 25, greedy=True)
    tokens, score = beam_search(model, idx, 25, num_beams=1)
    assert torch.equal(tokens, greedy)
    assert score == pytest.approx(sequence_score(model, greedy, 5).item(), abs=1e-4)


def test_beam_search_beats_greedy():
    model = tiny()
    for seed in range(3):
        idx = prompt(B=1, seed=seed)
        greedy = generate(model, idx, 20, greedy=True)
        tokens, score = beam_search(model, idx, 20, num_beams=4)
        assert tokens.shape == (1, 25)
        assert score == pytest.approx(sequence_score(model, tokens, 5).item(), abs=1e-4)
        assert score >= sequence_score(model, greedy, 5).item() - 1e-6


def test_beam_search_with_eos_and_length_penalty():
    model = tiny()
    idx = prompt(B=1)
    free = generate(model, idx, 20, greedy=True)
    eos = int(free[0, 7])                                  # a token the model likes early on
    for lp in (0.0, 1.0, 2.0):
        tokens, score = beam_search(model, idx, 20, num_beams=3, eos_id=eos, length_penalty=lp)
        gen = tokens[0, 5:]
        assert (gen[:-1] != eos).all() and (gen[-1] == eos or len(gen) == 20)
        assert score == pytest.approx(sequence_score(model, tokens, 5, lp).item(), abs=1e-4)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, idx, 5, num_beams=0)
    with pytest.raises(ValueError, match="idx"):
        beam_search(model, prompt(B=2), 5, num_beams=2)
