"""Tokenizer, corpus loading/splitting, batch sampler, unigram baseline, checkpoint files."""
import math
import os

import pytest
import torch

from gptfast import checkpoint as ckpt_mod
from gptfast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gptfast.data import (
    BatchSampler,
    ByteTokenizer,
    fixed_batches,
    load_corpus,
    unigram_baseline,
)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.BOS, tok.EOS, tok.PAD, tok.vocab_size) == (256, 257, 258, 259)
    for text in ["", "hello world", "héllo wörld — ✓ 漢字 🐍", "def f(x):\n\treturn x\n"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        wrapped = tok.encode(text, bos=True, eos=True)
        assert wrapped[0] == tok.BOS and wrapped[-1] == tok.EOS and wrapped[1:-1] == ids
        assert tok.decode(wrapped) == text  # specials are dropped
    assert tok.decode(torch.tensor([104, 105, 258, 257])) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid utf-8 -> replacement char


# ---------------------------------------------------------------- corpus
def test_stdlib_corpus_deterministic_and_disjoint():
    a = load_corpus(max_bytes=400_000)
    b = load_corpus(max_bytes=400_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.n_train_docs > 0 and a.n_val_docs > 0
    assert a.train.dtype == torch.int16 and int(a.train.max()) < 259
    assert 300_000 < len(a.train) + len(a.val) < 420_000
    # every document is BOS ... EOS
    for s in (a.train, a.val):
        assert int(s[0]) == ByteTokenizer.BOS and int(s[-1]) == ByteTokenizer.EOS
        assert int((s == ByteTokenizer.BOS).sum()) == int((s == ByteTokenizer.EOS).sum())
    assert int((a.train == ByteTokenizer.BOS).sum()) == a.n_train_docs
    assert int((a.val == ByteTokenizer.BOS).sum()) == a.n_val_docs


def test_split_by_path_is_disjoint_and_stable(tmp_path):
    for i in range(60):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 3)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")  # skipped: not text
    c = load_corpus(tmp_path)
    assert c.n_train_docs + c.n_val_docs == 60
    assert 1 <= c.n_val_docs < 15
    tok = ByteTokenizer()
    train_text = tok.decode(c.train)
    val_text = tok.decode(c.val)
    for i in range(60):
        line = f"document number {i}\n"
        assert (line in train_text) != (line in val_text)  # each doc in exactly one split
    c2 = load_corpus(tmp_path)
    assert torch.equal(c.val, c2.val)


def test_data_single_file_and_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world " * 100)
    c = load_corpus(f)
    assert c.n_train_docs == 1 and len(c.val) > 0
    assert len(c.train) + len(c.val) == 1200 + 2
    assert ByteTokenizer().decode(torch.cat([c.train, c.val])) == "hello world " * 100
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    (d / "x.txt").write_text("x" * 50)
    (d / "sub" / "y.md").write_text("y" * 50)
    (d / ".hidden").write_text("h" * 50)
    c = load_corpus(d)
    assert c.n_train_docs + c.n_val_docs == 2 and c.n_val_docs == 1
    text = ByteTokenizer().decode(torch.cat([c.train, c.val]))
    assert sorted(text) == sorted("x" * 50 + "y" * 50)


def test_max_bytes_cap(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("z" * 10_000)
    c = load_corpus(f, max_bytes=1000)
    assert len(c.train) + len(c.val) == 1002


def test_missing_and_empty_data(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(empty_dir)
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        load_corpus(empty_file)


# ---------------------------------------------------------------- sampler
def test_batch_sampler_shift_and_resume():
    tokens = torch.arange(1000, dtype=torch.int16) % 259
    s = BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    x, y = s.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, (x + 1) % 259)  # consecutive tokens from the stream
    state = s.state_dict()
    expected = [s.next() for _ in range(3)]
    s2 = BatchSampler(tokens, batch_size=4, block_size=16, seed=999)
    s2.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [s2.next() for _ in range(3)]):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # windows reach the end of the stream but never past it
    s3 = BatchSampler(torch.arange(17, dtype=torch.int16), batch_size=2, block_size=16)
    x, y = s3.next()
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[0], torch.arange(1, 17))
    with pytest.raises(ValueError, match="too short"):
        BatchSampler(torch.arange(10, dtype=torch.int16), batch_size=2, block_size=16)


def test_fixed_batches_reproducible():
    tokens = torch.arange(500, dtype=torch.int16)
    a = fixed_batches(tokens, 2, 8, 3, seed=1)
    b = fixed_batches(tokens, 2, 8, 3, seed=1)
    assert len(a) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


# ---------------------------------------------------------------- baseline
def test_unigram_baseline_matches_manual():
    train = [0, 0, 0, 1, 1, 2]
    val = [0, 1, 3]
    V = 5
    counts = [3 + 1, 2 + 1, 1 + 1, 0 + 1, 0 + 1]
    total = sum(counts)
    manual = -sum(math.log(counts[t] / total) for t in val) / len(val)
    assert unigram_baseline(torch.tensor(train), torch.tensor(val), vocab_size=V) == pytest.approx(manual, rel=1e-12)
    # default vocab = 259
    counts = [1] * 259
    for t in train:
        counts[t] += 1
    total = sum(counts)
    manual = -sum(math.log(counts[t] / total) for t in val) / len(val)
    assert unigram_baseline(train, val) == pytest.approx(manual, rel=1e-12)


# ---------------------------------------------------------------- checkpoints
def _state(v):
    return {"model": {"w": torch.full((3, 3), float(v))}, "step": v, "config": {"a": 1, "b": [1, 2]}}


def test_checkpoint_round_trip(tmp_path):
    p = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(p, _state(1))
    s = load_checkpoint(p)
    assert s["step"] == 1 and torch.equal(s["model"]["w"], torch.ones(3, 3))
    assert s["format"] == "gptfast" and s["format_version"] == ckpt_mod.FORMAT_VERSION
    assert os.listdir(p.parent) == ["ckpt.pt"]


def test_checkpoint_atomic_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, _state(1))
    before = p.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial bytes of a checkpoint")  # half-written file, then crash
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(p, _state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert p.read_bytes() == before
    assert load_checkpoint(p)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind

    def interrupted_save(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, _state(3))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(p)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoint_truncated_corrupt_foreign(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state(1))
    data = good.read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"this is not a checkpoint at all" * 10,
        "empty.pt": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=name) as ei:
            load_checkpoint(p)
        assert any(w in str(ei.value) for w in ("corrupt", "truncated", "not a gptfast checkpoint"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a gptfast checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
