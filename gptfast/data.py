"""Byte-level tokenizer, the embedded default corpus, a resumable batch sampler and a unigram baseline.

Nothing here downloads anything: the default corpus is the Python standard library's own
``.py`` sources, which exist on every machine that runs this code.
"""
from __future__ import annotations

import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "load_corpus",
    "stdlib_files",
    "text_files",
    "BatchSampler",
    "fixed_batches",
    "unigram_baseline",
    "get_tokenizer",
    "tokenizer_state",
]


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------
class ByteTokenizer:
    """ids 0..255 are raw bytes (UTF-8 for text); 256 = BOS, 257 = EOS, 258 = PAD."""

    kind = "byte"
    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, text: Union[str, bytes], bos: bool = False, eos: bool = False) -> List[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = list(data)
        if bos:
            ids.insert(0, self.BOS)
        if eos:
            ids.append(self.EOS)
        return ids

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, BOS=256, EOS=257, PAD=258)"


def get_tokenizer(kind: str = "byte", state: Optional[dict] = None):
    """The tokenizer a checkpoint names: "byte", or "hf" (a Hugging Face tokenizer, rebuilt
    from the `state` the checkpoint carries: see tokenizer_state)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf" and isinstance(state, dict) and "json" in state:
        from .hf.tokenizer import HFTokenizer
        return HFTokenizer.from_state(state)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'byte', or 'hf' with its state)")


def tokenizer_state(tok) -> Optional[dict]:
    """What a checkpoint stores besides `tok.kind` to rebuild `tok` (None for bytes)."""
    return tok.state() if hasattr(tok, "state") else None


# --------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_files() -> Tuple[Path, List[Path]]:
    """(root, sorted .py files of the standard library, skipping site-packages and test dirs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    return b"\x00" in head


def text_files(folder: Path) -> List[Path]:
    """All text files (no NUL byte in the first 8 KiB) under ``folder``, sorted, hidden entries skipped."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in filenames:
            p = Path(dirpath) / f
            if f.startswith(".") or not p.is_file():
                continue
            if not _looks_binary(p):
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _is_val(rel: str, val_fraction: float) -> bool:
    """Stable (process- and machine-independent) hash split by relative path."""
    return (zlib.crc32(rel.encode("utf-8")) % 10_000) < round(val_fraction * 10_000)


def _id_dtype(tok) -> torch.dtype:
    """The narrowest integer type of the token streams: int16 below 32768 ids (bytes)."""
    return torch.int16 if tok.vocab_size <= 2 ** 15 else torch.int32


def _doc_tokens(data: bytes, tok=None) -> torch.Tensor:
    """One document's ids. Bytes: BOS + bytes + EOS (int16). Another tokenizer (e.g. a Hugging
    Face one, gptfast.hf.load_tokenizer): its ids for the UTF-8 text, then EOS; BOS first only
    when it has one distinct from EOS (GPT-2 separates documents with <|endoftext|> alone)."""
    if tok is None or tok.kind == "byte":
        out = torch.empty(len(data) + 2, dtype=torch.int16)
        out[0] = ByteTokenizer.BOS
        out[-1] = ByteTokenizer.EOS
        if data:
            out[1:-1] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)
        return out
    bos = tok.bos_id is not None and tok.bos_id != tok.eos_id
    ids = tok.encode(data.decode("utf-8", errors="replace"), bos=bos, eos=tok.eos_id is not None)
    return torch.tensor(ids, dtype=_id_dtype(tok))


def _cat(chunks: Sequence[torch.Tensor], dtype: torch.dtype = torch.int16) -> torch.Tensor:
    return torch.cat(list(chunks)) if chunks else torch.empty(0, dtype=dtype)


@dataclass
class Corpus:
    """Token streams (1-D int16 tensors of ids; int32 for vocabularies over 32768) for training
    and validation."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    n_train_docs: int
    n_val_docs: int
    tokenizer: ByteTokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> str:
        return (
            f"{self.source}: {self.n_train_docs} train docs / {len(self.train):,} tokens, "
            f"{self.n_val_docs} val docs / {len(self.val):,} tokens"
        )


def load_corpus(
    data: Optional[Union[str, os.PathLike]] = None,
    *,
    max_bytes: Optional[int] = None,
    val_fraction: float = 0.05,
    tokenizer=None,
) -> Corpus:
    """Load a corpus as BOS…EOS-wrapped documents and split it deterministically.

    ``data=None``: the standard library's ``.py`` sources. ``data`` = a text file (one document) or
    a folder (every text file in it, sorted by relative path, one document each).
    Documents go to validation when a stable CRC32 hash of their relative path falls in the
    ``val_fraction`` bucket (at least one document when there are two or more); a single document
    is split by position instead (its last ``val_fraction`` of tokens). ``max_bytes`` caps the total
    text read, with ~``val_fraction`` of the budget for validation. ``tokenizer``: the byte-level
    one by default, or any with its interface (``gptfast.hf.load_tokenizer``).
    """
    tok = tokenizer or ByteTokenizer()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if data is None:
        root, files = stdlib_files()
        source = f"python stdlib ({root})"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data path not found: {data}")
        if path.is_dir():
            root, files = path, text_files(path)
            source = str(path)
        else:
            root, files = path.parent, [path]
            source = str(path)
    if not files:
        raise ValueError(f"empty corpus: no text files found in {source}")

    rels = [f.relative_to(root).as_posix() for f in files]
    is_val = [_is_val(r, val_fraction) for r in rels]
    if len(files) >= 2 and not any(is_val):
        # guarantee a validation document: the one with the smallest hash
        i = min(range(len(rels)), key=lambda j: (zlib.crc32(rels[j].encode("utf-8")), rels[j]))
        is_val[i] = True
    if len(files) >= 2 and all(is_val):
        is_val[-1] = False

    budget_val = None if max_bytes is None else max(1, int(max_bytes * val_fraction))
    budget_train = None if max_bytes is None else max(1, int(max_bytes) - budget_val)
    train_chunks: List[torch.Tensor] = []
    val_chunks: List[torch.Tensor] = []
    used = {True: 0, False: 0}
    n_text = 0  # bytes of text read
    budget = {True: budget_val, False: budget_train}
    for f, v in zip(files, is_val):
        b = budget[v]
        if b is not None and used[v] >= b:
            if all(budget[k] is not None and used[k] >= budget[k] for k in (True, False)):
                break
            continue
        raw = f.read_bytes()
        if len(files) == 1:
            if b is not None:
                raw = raw[: int(max_bytes)]
            if not raw:
                break
            n_text += len(raw)
            toks = _doc_tokens(raw, tok)
            n_val = max(1, int(len(toks) * val_fraction))
            train_chunks.append(toks[:-n_val].clone())
            val_chunks.append(toks[-n_val:].clone())
            break
        if b is not None:
            raw = raw[: b - used[v]]
        if not raw:
            continue
        used[v] += len(raw)
        n_text += len(raw)
        (val_chunks if v else train_chunks).append(_doc_tokens(raw, tok))

    if n_text == 0 or not train_chunks:
        raise ValueError(f"empty corpus: {source} contains no text")
    single = len(files) == 1
    return Corpus(
        train=_cat(train_chunks, _id_dtype(tok)),
        val=_cat(val_chunks, _id_dtype(tok)),
        source=source,
        n_train_docs=1 if single else len(train_chunks),
        n_val_docs=1 if single else len(val_chunks),
        tokenizer=tok,
    )


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------
def _windows(tokens: torch.Tensor, starts: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(block_size + 1)
    w = tokens[idx].long()
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """Random (B, T+1) windows from a token stream -> (x, y), y = x shifted by one.

    Uses its own seeded ``torch.Generator`` (CPU), so ``state_dict()``/``load_state_dict()`` give a
    bit-for-bit identical batch sequence after a resume.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
    ):
        if tokens.dim() != 1:
            raise ValueError("tokens must be a 1-D tensor")
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"token stream too short ({len(tokens)} tokens) for block_size {block_size}: "
                f"need at least {block_size + 1}"
            )
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.batches_drawn = 0

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.block_size  # starts in [0, len - T - 1]
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator)
        x, y = _windows(self.tokens, starts, self.block_size)
        self.batches_drawn += 1
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {
            "rng_state": self.generator.get_state(),
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng_state"])
        self.batches_drawn = int(state.get("batches_drawn", 0))


def fixed_batches(
    tokens: torch.Tensor, batch_size: int, block_size: int, n_batches: int, seed: int = 0
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, reproducible list of (x, y) batches (for validation), on CPU.

    When the stream is too short for one full window it is an error; when it holds fewer windows
    than requested, windows overlap (starts evenly spaced).
    """
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"validation split too short ({len(tokens)} tokens) for block_size {block_size}; "
            f"use more data or a smaller --block-size"
        )
    g = torch.Generator().manual_seed(int(seed))
    high = len(tokens) - block_size
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, high, (batch_size,), generator=g)
        out.append(_windows(tokens, starts, block_size))
    return out


# --------------------------------------------------------------------------------------
# baseline
# --------------------------------------------------------------------------------------
def unigram_baseline(
    train_tokens: Union[torch.Tensor, Sequence[int]],
    val_tokens: Union[torch.Tensor, Sequence[int]],
    vocab_size: int = ByteTokenizer.vocab_size,
) -> float:
    """Cross-entropy (nats/token) of ``val_tokens`` under the add-one-smoothed unigram
    distribution of ``train_tokens``."""
    tr = torch.as_tensor(train_tokens).long().flatten()
    va = torch.as_tensor(val_tokens).long().flatten()
    if va.numel() == 0:
        raise ValueError("unigram_baseline: empty validation tokens")
    vocab_size = max(int(vocab_size), int(tr.max()) + 1 if tr.numel() else 0, int(va.max()) + 1)
    counts = torch.bincount(tr, minlength=vocab_size).double() + 1.0
    logp = counts.log() - math.log(float(counts.sum()))
    return float(-logp[va].mean())
