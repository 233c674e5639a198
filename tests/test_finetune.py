"""`gptfast finetune`: classification from CSV/JSONL on top of a checkpoint, each pooling.

The task is generated here: short texts of neutral words with one or two sentiment words
("good", "awful", ...); the label is the sentiment. A tiny GPT (untrained: the task needs no
pretraining) must learn it with each pooling well above chance on held-out examples.
"""
import csv
import dataclasses
import json
import random

import pytest
import torch

import gptfast
from gptfast import cli
from gptfast.checkpoint import load_checkpoint, save_checkpoint
from gptfast.finetune import DataError, FinetuneConfig, finetune, read_examples
from gptfast.model import GPT, GPTForSequenceClassification, get_config

pytestmark = pytest.mark.usefixtures("one_thread")

POS = ["good", "great", "nice", "fine", "happy"]
NEG = ["bad", "awful", "poor", "sad", "ugly"]
NEUTRAL = ["the", "a", "day", "food", "movie", "was", "and"]


def examples(n, seed=1):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(POS if label else NEG) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        rows.append((" ".join(words), "positive" if label else "negative"))
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(1)
    config = get_config("tiny", n_layer=1, n_embd=32, n_head=2, block_size=64)
    save_checkpoint(d / "pre" / "ckpt.pt", {"model": GPT(config).state_dict(),
                                            "model_config": dataclasses.asdict(config),
                                            "tokenizer": "byte"})
    rows = examples(240)
    with open(d / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    with open(d / "data.jsonl", "w") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return d


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_each_pooling_learns_the_task(files, tmp_path, pooling):
    s = finetune(FinetuneConfig(ckpt=str(files / "pre"), data=str(files / "data.csv"),
                                text_column="review", label_column="sentiment",
                                out_dir=str(tmp_path / "cls"), pooling=pooling, epochs=8,
                                lr=3e-3, device="cpu", verbose=False))
    assert s["held_out"] == 48 and s["labels"] == ["negative", "positive"]
    assert s["majority_baseline"] < 0.6
    assert s["val_accuracy"] >= 0.8, s                # chance is ~0.5
    # saved atomically, reloads as the same classifier, predicts the same
    model, tok = gptfast.load(tmp_path / "cls")
    assert isinstance(model, GPTForSequenceClassification) and model.pooling == pooling
    assert model.labels == ["negative", "positive"]
    ck = load_checkpoint(tmp_path / "cls" / "ckpt.pt")
    assert ck["kind"] == "classifier" and ck["history"][-1]["val_accuracy"] == s["val_accuracy"]
    fresh = examples(60, seed=99)                        # new texts, the reloaded model
    from gptfast.finetune import _encode
    x, _ = _encode(tok, [t for t, _ in fresh], 64)
    y = torch.tensor([model.labels.index(label) for _, label in fresh])
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean() >= 0.75
    assert not [p for p in (tmp_path / "cls").iterdir() if p.name.endswith(".tmp")]


def test_cli_finetune_jsonl(files, tmp_path, capsys):
    rc = cli.main(["finetune", "--ckpt", str(files / "pre"), "--data", str(files / "data.jsonl"),
                   "--pooling", "mean", "--epochs", "2", "--lr", "3e-3", "--out",
                   str(tmp_path / "o"), "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out accuracy" in out
    summary = json.loads((tmp_path / "o" / "finetune.json").read_text())["summary"]
    assert summary["pooling"] == "mean" and summary["examples"] == 240


def test_data_errors_name_the_file_and_column(files, tmp_path, capsys):
    with pytest.raises(DataError, match="no text column 'text'.*review, sentiment"):
        read_examples(files / "data.csv")
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(DataError, match="extension"):
        read_examples(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "one.csv").write_text("text,label\na,x\nb,x\nc,x\n")
    pre = str(files / "pre")
    for argv, words in [
        (["--data", str(files / "data.csv")], ["--text-column", "'text'"]),
        (["--data", str(files / "data.csv"), "--text-column", "review"], ["--label-column"]),
        (["--data", str(tmp_path / "one.csv")], ["--data", "two classes"]),
        (["--data", str(tmp_path / "missing.csv")], ["--data", "missing.csv"]),
    ]:
        rc = cli.main(["finetune", "--ckpt", pre, *argv, "--out", str(tmp_path / "o"),
                       "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        for w in words:
            assert w in err, err
    assert not (tmp_path / "o").exists()


def test_generate_refuses_a_classifier(files, tmp_path, capsys):
    finetune(FinetuneConfig(ckpt=str(files / "pre"), data=str(files / "data.jsonl"),
                            out_dir=str(tmp_path / "cls"), epochs=1, device="cpu",
                            verbose=False))
    rc = cli.main(["generate", "--ckpt", str(tmp_path / "cls"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "classifier" in err and "gptfast.load" in err
