"""Fine-tune a pretrained GPT for text classification (GPT-1's other use of the model).

    cfg = FinetuneConfig(ckpt="runs/demo", data="reviews.csv", out_dir="runs/demo-cls")
    summary = finetune(cfg)          # held-out accuracy per epoch, best and final, in the summary
    model, tok = gptfast.load("runs/demo-cls")   # a GPTForSequenceClassification, .labels

Data: a CSV file (with a header row) or a JSONL file (one JSON object a line), with a text
column and a label column (names configurable). Labels are class names (any strings, or
numbers, which are names too); the classes are the sorted distinct labels. A fixed fraction
of the examples (shuffled with the seed) is held out for evaluation.

Model: the checkpoint's GPT, every weight trained, with `GPTForSequenceClassification` on top:
the final hidden states of the real tokens (BOS + the text's bytes, right-padded with PAD and
masked out of the attention) pooled by `last` (the last real token, which has seen them all),
`mean` or `max`, then a linear head. Texts longer than the context keep their beginning.

Outputs in out_dir: ckpt.pt (the classifier: atomic, like every gptfast checkpoint) and
finetune.json (configuration, labels, per-epoch accuracy, summary).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["FinetuneConfig", "finetune", "read_examples", "classifier_from_checkpoint",
           "DataError"]

CKPT_NAME = "ckpt.pt"


class DataError(ValueError):
    """The classification data cannot be used; the message names the file and the column."""


@dataclass
class FinetuneConfig:
    ckpt: str = "runs/demo"             # pretrained checkpoint file or run folder
    data: str = "data.csv"              # .csv or .jsonl
    out_dir: str = "runs/finetune"
    text_column: str = "text"
    label_column: str = "label"
    data_format: str = "auto"           # auto (by extension), csv or jsonl
    pooling: str = "last"               # last | mean | max
    val_fraction: float = 0.2
    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0              # 0: off
    max_length: Optional[int] = None    # tokens per example incl. BOS; None: the context length
    device: str = "auto"
    seed: int = 1337
    verbose: bool = True

    def validate(self) -> None:
        from .model import GPTForSequenceClassification

        if self.pooling not in GPTForSequenceClassification.POOLINGS:
            raise ValueError(f"pooling must be one of {GPTForSequenceClassification.POOLINGS}, "
                             f"got {self.pooling!r}")
        if self.data_format not in ("auto", "csv", "jsonl"):
            raise ValueError(f"data_format must be auto, csv or jsonl, got {self.data_format!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        for name in ("lr", "weight_decay", "grad_clip", "val_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


# ----------------------------------------------------------------------------- data

def read_examples(path, text_column: str = "text", label_column: str = "label",
                  data_format: str = "auto") -> List[Tuple[str, str]]:
    """(text, label) pairs from a CSV (header row) or JSONL file; labels as strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    fmt = data_format
    if fmt == "auto":
        suffix = path.suffix.lower()
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix)
        if fmt is None:
            raise DataError(f"{path}: cannot tell the format from the extension {suffix!r} "
                            f"(.csv or .jsonl; or say --format csv|jsonl)")
    rows: List[Tuple[str, str]] = []
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for name, what in ((text_column, "text"), (label_column, "label")):
                if name not in columns:
                    raise DataError(f"{path}: no {what} column {name!r} (columns: "
                                    f"{', '.join(columns) or 'none'})")
            for line, rec in enumerate(reader, start=2):
                text, label = rec[text_column], rec[label_column]
                if text is None or label is None or label == "":
                    raise DataError(f"{path}:{line}: missing {text_column!r} or "
                                    f"{label_column!r} value")
                rows.append((text, label))
    else:
        with open(path, encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{line}: expected a JSON object per line")
                for name, what in ((text_column, "text"), (label_column, "label")):
                    if name not in rec:
                        raise DataError(f"{path}:{line}: no {what} field {name!r} (fields: "
                                        f"{', '.join(rec) or 'none'})")
                if not isinstance(rec[text_column], str):
                    raise DataError(f"{path}:{line}: {text_column!r} must be a string")
                rows.append((rec[text_column], str(rec[label_column])))
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _split(n: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n * val_fraction))
    return order[n_val:], order[:n_val]


def _encode(tok, texts: Sequence[str], max_length: int) -> Tuple[torch.Tensor, int]:
    """(len(texts), L) token ids: BOS + bytes, right-padded with PAD; L = the longest, capped
    at max_length. Returns the ids and how many texts were cut."""
    ids = [tok.encode(t, bos=True) for t in texts]
    cut = sum(len(x) > max_length for x in ids)
    ids = [x[:max_length] for x in ids]
    L = max(len(x) for x in ids)
    out = torch.full((len(ids), L), tok.PAD, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out, cut


# ----------------------------------------------------------------------------- model

def classifier_from_checkpoint(ckpt: Dict[str, Any], path):
    """The GPTForSequenceClassification stored by `finetune` (weights checked finite)."""
    from .checkpoint import CheckpointError
    from .model import GPT, GPTForSequenceClassification
    from .train import _model_config, check_finite_weights

    try:
        gpt = GPT(_model_config(ckpt["model_config"]))
        model = GPTForSequenceClassification(gpt, len(ckpt["labels"]), pooling=ckpt["pooling"],
                                             pad_id=ckpt["pad_id"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint does not hold a loadable gptfast classifier "
                              f"({type(e).__name__}: {e})") from e
    check_finite_weights(ckpt["model"], path)
    model.labels = list(ckpt["labels"])
    return model


@torch.no_grad()
def _accuracy(model, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(ids), batch_size):
        x = _trim(ids[s:s + batch_size], model.pad_id)
        correct += int((model(x).argmax(-1) == labels[s:s + batch_size]).sum())
    model.train()
    return correct / len(ids)


def _trim(x: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the columns that are padding in every row (batches of short texts run short)."""
    real = (x != pad_id).any(0).nonzero()
    return x[:, : int(real[-1]) + 1] if len(real) else x[:, :1]


# ----------------------------------------------------------------------------- the loop

def finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune per `cfg`; returns the summary (also in out_dir/finetune.json)."""
    from .checkpoint import save_checkpoint
    from .model import GPTForSequenceClassification, param_groups
    from .train import (TrainingDiverged, _write_json_atomic, load_model, resolve_device)

    cfg.validate()
    say = print if cfg.verbose else (lambda *a, **k: None)
    device = resolve_device(cfg.device)
    gpt, tok, base = load_model(cfg.ckpt, device)
    if tok.kind != "byte":  # padding and pooling masks are defined on the byte tokenizer's PAD
        from .checkpoint import CheckpointError
        raise CheckpointError(f"{cfg.ckpt}: trained with a Hugging Face tokenizer ({tok.path}); "
                              f"fine-tuning takes checkpoints trained on bytes")
    examples = read_examples(cfg.data, cfg.text_column, cfg.label_column, cfg.data_format)
    labels = sorted({label for _, label in examples})
    if len(labels) < 2:
        raise DataError(f"{cfg.data}: every example has the label {labels[0]!r}; "
                        f"classification needs at least two classes")
    train_idx, val_idx = _split(len(examples), cfg.val_fraction, cfg.seed)
    if len(train_idx) < 1:
        raise DataError(f"{cfg.data}: {len(examples)} examples leave none to train on with "
                        f"val_fraction {cfg.val_fraction}")
    max_len = min(cfg.max_length or gpt.config.block_size, gpt.config.block_size)
    ids, cut = _encode(tok, [t for t, _ in examples], max_len)
    y = torch.tensor([labels.index(label) for _, label in examples], dtype=torch.long)
    tr_x, tr_y = ids[train_idx].to(device), y[train_idx].to(device)
    va_x, va_y = ids[val_idx].to(device), y[val_idx].to(device)
    majority = max(int((va_y == c).sum()) for c in range(len(labels))) / len(val_idx)

    torch.manual_seed(cfg.seed)
    model = GPTForSequenceClassification(gpt, len(labels), pooling=cfg.pooling,
                                         pad_id=tok.PAD).to(device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, total // 10)
    say(f"gptfast finetune: {len(examples)} examples ({len(train_idx)} train, {len(val_idx)} "
        f"held out), {len(labels)} classes, pooling={cfg.pooling}, {total} steps on {device}"
        + (f"; {cut} texts cut to {max_len} tokens" if cut else ""))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: List[dict] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train_idx), generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(0, len(order), cfg.batch_size):
            sel = order[s:s + cfg.batch_size]
            # linear warmup, then linear decay to 0
            lr = cfg.lr * min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(_trim(tr_x[sel], tok.PAD)), tr_y[sel])
            if not bool(torch.isfinite(loss)):
                raise TrainingDiverged(
                    f"fine-tuning diverged: the loss is {float(loss)} at step {step + 1} "
                    f"(lr {lr:.3g}); stopped, nothing was saved. Lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach() * len(sel)
            step += 1
        acc = _accuracy(model, va_x, va_y, cfg.batch_size)
        rec = {"epoch": epoch, "step": step, "train_loss": float(loss_sum) / len(train_idx),
               "val_accuracy": acc}
        history.append(rec)
        say(f"epoch {epoch}: train loss {rec['train_loss']:.4f}, held-out accuracy {acc:.3f} "
            f"(majority class {majority:.3f})")

    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not bool(finite):
        raise TrainingDiverged("fine-tuning diverged: the weights are not finite; nothing was "
                               "saved. Lower --lr")
    out = Path(cfg.out_dir)
    ckpt_path = out / CKPT_NAME
    save_checkpoint(ckpt_path, {
        "kind": "classifier",
        "model": model.state_dict(),
        "model_config": base["model_config"],
        "tokenizer": tok.kind,
        "labels": labels,
        "pooling": cfg.pooling,
        "pad_id": tok.PAD,
        "finetune_config": dataclasses.asdict(cfg),
        "pretrained_from": str(cfg.ckpt),
        "history": history,
    })
    summary = {"examples": len(examples), "train": len(train_idx), "held_out": len(val_idx),
               "labels": labels, "pooling": cfg.pooling, "steps": step,
               "val_accuracy": history[-1]["val_accuracy"],
               "best_val_accuracy": max(h["val_accuracy"] for h in history),
               "majority_baseline": majority, "truncated": cut, "checkpoint": str(ckpt_path)}
    _write_json_atomic(out / "finetune.json", {"summary": summary, "history": history,
                                               "config": dataclasses.asdict(cfg)})
    say(f"held-out accuracy {summary['val_accuracy']:.3f} (majority class {majority:.3f}); "
        f"wrote {ckpt_path}")
    return summary


if __name__ == "__main__":  # pragma: no cover - `gptfast finetune` is the command line
    from .cli import main
    sys.exit(main(["finetune", *sys.argv[1:]]))
