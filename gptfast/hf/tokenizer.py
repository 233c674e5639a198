"""A Hugging Face model folder's tokenizer, through the `tokenizers` package.

    tok = load_tokenizer("gpt2-folder")   # tokenizer.json, or vocab.json + merges.txt
    ids = tok.encode("héllo   world")     # the ids the model was trained on
    text = tok.decode(ids)                # == "héllo   world"

The interface is gptfast.data.ByteTokenizer's (kind, vocab_size, bos_id/eos_id/pad_id,
encode(text, bos=, eos=), decode(ids)), so training and generation take either.
`encode` adds no special token unless asked (bos=/eos=), like GPT-2's tokenizer.
vocab.json + merges.txt (GPT-2's original files) make GPT-2's byte-level BPE: its pre-tokenizer
regex, no prefix space, byte-level decoding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


class HFTokenizer:
    """A `tokenizers.Tokenizer` with gptfast's tokenizer interface."""

    kind = "hf"

    def __init__(self, tokenizer, path: Optional[PathLike] = None, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None):
        self.tokenizer, self.path = tokenizer, None if path is None else str(path)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ByteTokenizer's constant names (BOS/EOS/PAD), for code written against it
    BOS = property(lambda self: self.bos_id)
    EOS = property(lambda self: self.eos_id)
    PAD = property(lambda self: self.pad_id)

    def state(self) -> dict:
        """Everything to rebuild it (plain strings and ints: a checkpoint carries it)."""
        return dict(json=self.tokenizer.to_str(), path=self.path, bos_id=self.bos_id,
                    eos_id=self.eos_id, pad_id=self.pad_id)

    @classmethod
    def from_state(cls, state: dict) -> "HFTokenizer":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(state["json"]), state.get("path"), state.get("bos_id"),
                   state.get("eos_id"), state.get("pad_id"))

    def encode(self, text: Union[str, bytes], bos: bool = False, eos: bool = False) -> List[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        for flag, tid, name in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
            if flag and tid is None:
                raise ValueError(f"{name}=True, but the tokenizer at {self.path} has no "
                                 f"{name} token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Union[Iterable[int], torch.Tensor]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def _byte_level_bpe(vocab: Path, merges: Path):
    """GPT-2's tokenizer from its original files."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    try:
        bpe = BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise ValueError(f"{vocab} + {merges}: not a BPE vocabulary and merge list "
                         f"({type(e).__name__}: {e})") from e
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _token_id(tok, value) -> Optional[int]:
    """A special token named in tokenizer_config.json / special_tokens_map.json: a string, or
    a dict with "content" (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _read_json(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    return obj if isinstance(obj, dict) else {}


def load_tokenizer(path: PathLike) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder (or a tokenizer.json file).

    Special tokens: bos/eos/pad from tokenizer_config.json or special_tokens_map.json, else
    config.json's bos_token_id / eos_token_id / pad_token_id."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        folder, file = path.parent, path
    elif path.is_dir():
        folder, file = path, path / "tokenizer.json"
    else:
        raise FileNotFoundError(f"{path}: not found (expected a Hugging Face model folder with "
                                f"tokenizer.json, or vocab.json + merges.txt)")
    from tokenizers import Tokenizer
    if file.is_file():
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file}: not a tokenizers tokenizer.json ({type(e).__name__}: "
                             f"{str(e)[:200]})") from e
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = _byte_level_bpe(folder / "vocab.json", folder / "merges.txt")
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer (expected tokenizer.json, or "
                                f"vocab.json + merges.txt)")
    ids = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        if (folder / name).is_file():
            cfg = _read_json(folder / name)
            for key in ("bos", "eos", "pad"):
                tid = _token_id(tok, cfg.get(f"{key}_token"))
                if tid is not None:
                    ids[key] = tid
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        for key in ("bos", "eos", "pad"):
            if key not in ids and isinstance(cfg.get(f"{key}_token_id"), int):
                ids[key] = cfg[f"{key}_token_id"]
    return HFTokenizer(tok, file if file.is_file() else folder, ids.get("bos"), ids.get("eos"),
                       ids.get("pad"))


__all__ = ["HFTokenizer", "load_tokenizer"]
