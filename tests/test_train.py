"""Training loop: LR schedule, weight-decay groups, bit-for-bit resume, outputs."""
import json
import math
from pathlib import Path

import pytest
import torch

from gptfast.checkpoint import load_checkpoint
from gptfast.train import TrainConfig, build_optimizer, flops_per_token, get_lr, peak_flops, train

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(TEXT)
    return p


def small_cfg(text_file, out_dir, **kw):
    base = dict(
        preset="tiny",
        block_size=32,
        model_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2},
        data=str(text_file),
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup=2,
        eval_every=3,
        eval_batches=2,
        log_every=2,
        out_dir=str(out_dir),
        device="cpu",
        progress=False,
        verbose=False,
        plot=False,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- schedule
def test_lr_schedule_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, decay_steps=110)
    assert get_lr(0, **kw) == pytest.approx(0.1)
    assert get_lr(4, **kw) == pytest.approx(0.5)
    assert get_lr(9, **kw) == pytest.approx(1.0)
    assert get_lr(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert get_lr(60, **kw) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert get_lr(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert get_lr(110, **kw) == pytest.approx(0.1)
    assert get_lr(500, **kw) == pytest.approx(0.1)
    lrs = [get_lr(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    assert get_lr(0, lr=1.0, min_lr=0.0, warmup=0, decay_steps=10) == pytest.approx(1.0)


def test_weight_decay_groups():
    from gptfast.model import GPT, get_config

    model = GPT(get_config("tiny"))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay = [g for g in opt.param_groups if g["weight_decay"] > 0]
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert len(decay) == 1 and decay[0]["weight_decay"] == 0.1
    assert all(p.dim() == 2 for p in decay[0]["params"])
    assert all(p.dim() < 2 for g in no_decay for p in g["params"])
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}  # every parameter once (tied ones too)
    n_2d = sum(1 for p in model.parameters() if p.dim() == 2)
    assert len(decay[0]["params"]) == n_2d


def test_mfu_helpers():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some Unknown GPU") is None
    assert flops_per_token(1000, 2, 16, 8) == 6 * 1000 + 12 * 2 * 16 * 8


# ---------------------------------------------------------------- loop
def test_resume_is_bit_for_bit(text_file, tmp_path):
    # dropout, gradient accumulation and scheduled sampling all consume RNG: all must resume exactly
    common = dict(dropout=0.1, grad_accum=2, scheduled_sampling=0.25)
    full = small_cfg(text_file, tmp_path / "full", steps=6, **common)
    s_full = train(full)
    first = small_cfg(text_file, tmp_path / "split", steps=4, decay_steps=6, **common)
    train(first)
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["step"] == 4
    second = small_cfg(text_file, tmp_path / "split", steps=6, resume=True, **common)
    s_split = train(second)
    a = load_checkpoint(tmp_path / "full" / "ckpt.pt")
    b = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert s_full["val_loss"] == s_split["val_loss"]
    assert s_split["start_step"] == 4


def test_outputs_and_summary(text_file, tmp_path):
    cfg = small_cfg(text_file, tmp_path / "run", steps=4, plot=True)
    s = train(cfg)
    for key in ("tokens_per_s", "mfu", "peak_memory_bytes", "train_loss", "val_loss", "unigram_baseline"):
        assert key in s
    assert s["mfu"] is None  # CPU
    assert s["tokens"] == 4 * 4 * 32 and s["tokens_per_s"] > 0
    assert math.isfinite(s["train_loss"]) and math.isfinite(s["val_loss"])
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    steps = [h["step"] for h in log["history"]]
    assert steps == [2, 3, 4]
    assert log["history"][-1]["val_loss"] == pytest.approx(s["val_loss"])
    assert all(h["lr"] > 0 for h in log["history"])
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ck = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ck["tokenizer"] == "byte" and ck["model_config"]["n_layer"] == 1
    assert {"torch", "scheduled_sampling"} <= set(ck["rng"]) and "rng_state" in ck["sampler"]


def test_training_reduces_loss(text_file, tmp_path):
    cfg = small_cfg(text_file, tmp_path / "learn", steps=40, eval_every=0, log_every=5,
                    batch_size=8, lr=1e-2, warmup=5)
    s = train(cfg)
    assert s["val_loss"] < 0.75 * s["unigram_baseline"]


# ---------------------------------------------------------------- a run that diverges
def test_divergence_stops_without_writing(text_file, tmp_path):
    from gptfast.train import TrainingDiverged
    cfg = small_cfg(text_file, tmp_path / "nan", steps=8, lr=1e6, warmup=0, eval_every=2)
    with pytest.raises(TrainingDiverged, match="no checkpoint of this run was written"):
        train(cfg)
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


def test_divergence_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch):
    # Good steps 1-4 (saved at 2 and 4), then every loss from step 5 on is NaN: the run stops
    # at the next check, ckpt.pt still holds step 4, byte for byte.
    from gptfast import model as model_mod
    from gptfast.train import TrainingDiverged
    cfg = small_cfg(text_file, tmp_path / "run", steps=8, eval_every=2)
    calls = {"n": 0}
    real = model_mod.GPT.forward

    def forward(self, idx, targets=None, **kw):
        logits, loss = real(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 4:
                loss = loss * float("nan")
        return logits, loss
    saved = {}
    from gptfast import train as train_mod
    real_save = train_mod.save_checkpoint

    def save(path, state):
        real_save(path, state)
        saved[state["step"]] = path.read_bytes()
    monkeypatch.setattr(model_mod.GPT, "forward", forward)
    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    with pytest.raises(TrainingDiverged, match=r"by step 5 .*still holds step 4"):
        train(cfg)
    assert sorted(saved) == [2, 4]
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == saved[4]


def test_nonfinite_weights_are_never_saved():
    from gptfast.model import GPT, get_config
    from gptfast.train import TrainingDiverged, stop_if_diverged
    model = GPT(get_config("tiny", n_layer=1))
    ok = torch.zeros((), dtype=torch.bool)
    stop_if_diverged(ok, 3, 1e-3, model, check_weights=True, last_saved=None,
                     ckpt_path=Path("x/ckpt.pt"))
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[0, 0] = float("inf")
    stop_if_diverged(ok, 3, 1e-3, model, check_weights=False, last_saved=None,
                     ckpt_path=Path("x/ckpt.pt"))               # only checked before a save
    with pytest.raises(TrainingDiverged, match="weights"):
        stop_if_diverged(ok, 3, 1e-3, model, check_weights=True, last_saved=2,
                         ckpt_path=Path("x/ckpt.pt"))
    with pytest.raises(TrainingDiverged, match="loss"):
        stop_if_diverged(torch.ones((), dtype=torch.bool), 3, 1e-3, model, check_weights=False,
                         last_saved=2, ckpt_path=Path("x/ckpt.pt"))


def test_config_rejects_nonfinite_numbers():
    for kw in (dict(lr=float("nan")), dict(weight_decay=float("inf")), dict(grad_clip=-1.0),
               dict(min_lr=float("nan")), dict(dropout=1.0), dict(attn_dropout=float("nan")),
               dict(val_fraction=0.0), dict(beta2=1.0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            TrainConfig(**kw).validate()
