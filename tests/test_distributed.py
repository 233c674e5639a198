"""Training on several processes (gptfast.distributed), on the CPU with gloo, loopback only.

Tests marked `distributed` launch PyTorch's torchrun (`python -m torch.distributed.run` of this
interpreter, rendezvous on 127.0.0.1 with a port the OS picks, gloo bound to `lo`), each launch
bounded in time and its whole process group killed if it overruns. Each launch costs a torch
import per process (~5 s here): the runs are tiny (2 layers of 32 wide, 6 steps). The others
run in this process: keyed randomness, the sampler's shards, sharded checkpoints on one
process, and the command line's refusals.

The one-process reference is `train()` in this process with the same global batch; a run on
2 processes must follow it step by step (the training loss of every step, the validation
losses) and end on the same weights, up to float rounding: gradients averaged over 2
half-batches differ from the whole batch's in the last bits.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptfast import cli
from gptfast.checkpoint import load_checkpoint
from gptfast.data import BatchSampler
from gptfast.model import GPT, get_config
from gptfast.randomness import (keyed_bits, keyed_dropout, keyed_uniform, layout_seed, mix32,
                                sample_keys)
from gptfast.train import TrainConfig, build_optimizer, load_full_checkpoint, train

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
LAUNCH_TIMEOUT = 120          # seconds per torchrun launch (they take ~10-20 s here)
STEPS, STOP = 6, 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text(TEXT)
    return p


def train_args(data, out, steps, *extra):
    """The run every test trains: embedding/residual dropout and scheduled sampling on (both
    keyed per sample), 2 micro-steps."""
    return ["--preset", "tiny", "--block-size", "32", "--data", str(data), "--out", str(out),
            "--steps", str(steps), "--decay-steps", str(STEPS), "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup", "2", "--eval-every", "3",
            "--eval-batches", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
            "--no-plot", "--seed", "0", "--threads", "1", "--dropout", "0.1",
            "--scheduled-sampling", "0.2", *extra]


def reference_config(data, out, steps=STEPS, **kw):
    return TrainConfig(preset="tiny", block_size=32, data=str(data), out_dir=str(out),
                       steps=steps, decay_steps=STEPS, batch_size=4, grad_accum=2, lr=3e-3,
                       warmup=2, eval_every=3, eval_batches=2, log_every=1, device="cpu",
                       progress=False, plot=False, verbose=False, seed=0, dropout=0.1,
                       scheduled_sampling=0.2, **kw)


def torchrun(nproc, argv, cwd, timeout=LAUNCH_TIMEOUT, env=None):
    """`torchrun --nproc_per_node=nproc <argv>` on loopback; the whole process group is killed
    when it overruns or the test fails to wait for it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
           "--max-restarts=0", *argv]
    full_env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                    PYTHONUNBUFFERED="1", **(env or {}))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        full_env.pop(name, None)
    p = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out


def gptfast_train(nproc, argv, cwd):
    rc, out = torchrun(nproc, ["-m", "gptfast", "train", *argv], cwd)
    assert rc == 0, out[-4000:]
    return out


# ---------------------------------------------------------------- judging a run

def history(run: Path):
    return json.loads((run / "log.json").read_text())["history"]


def assert_same_run(run: Path, ref: Path):
    """Same losses at every step (train and validation) and the same final weights and AdamW
    moments as the one-process run, to float rounding."""
    got, want = history(run), history(ref)
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for a, b in zip(got, want):
        for key in ("train_loss", "val_loss"):
            if b[key] is None:
                assert a[key] is None
            else:
                assert a[key] == pytest.approx(b[key], rel=2e-5, abs=2e-5), (a, b)
    ca, cb = load_full_checkpoint(run / "ckpt.pt"), load_full_checkpoint(ref / "ckpt.pt")
    assert ca["step"] == cb["step"] == STEPS
    assert ca["model"].keys() == cb["model"].keys()
    for k in cb["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-4, atol=2e-5, msg=k)
    # the weights moved: the comparison is not between two initial states
    init = GPT(get_config("tiny", block_size=32, dropout=0.1))
    assert (cb["model"]["wte.weight"] - init.wte.weight).abs().max() > 1e-3
    assert ca["sampler"]["batches_drawn"] == cb["sampler"]["batches_drawn"] == STEPS * 2
    return ca


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    """The uninterrupted one-process run, in this process."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(reference_config(text_file, run))
    return run


# ================================================================ torchrun: the real command

@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(mode, text_file, reference, tmp_path):
    run = tmp_path / "run"
    out = gptfast_train(2, train_args(text_file, run, STEPS, "--parallel", mode), tmp_path)
    assert f"parallel: {mode} on 2 process(es) (gloo), 2 of the 4 rows" in out
    assert out.count("---- summary ----") == 1                  # rank 0 alone prints
    ck = assert_same_run(run, reference)
    assert ck["parallel"] == mode and ck["world_size"] == 2
    log = json.loads((run / "log.json").read_text())["summary"]
    assert log["world_size"] == 2 and log["tokens"] == STEPS * 4 * 2 * 32   # global tokens
    if mode == "fsdp":    # shards behind the checkpoint file, nothing left over
        assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000006.dcp", "ckpt.pt",
                                                         "log.json"]
        assert "model" not in load_checkpoint(run / "ckpt.pt")


@pytest.fixture(scope="module")
def stopped(text_file, tmp_path_factory):
    """Per mode: a 2-process run stopped after its checkpoint at step STOP (of STEPS)."""
    runs = {}

    def get(mode):
        if mode not in runs:
            run = tmp_path_factory.mktemp(f"stopped-{mode}") / "run"
            gptfast_train(2, train_args(text_file, run, STOP, "--parallel", mode), run.parent)
            assert load_checkpoint(run / "ckpt.pt")["step"] == STOP
            runs[mode] = run
        return runs[mode]
    return get


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("nproc", [2, 1], ids=["same-world-size", "other-world-size"])
def test_resume_matches_an_uninterrupted_run(mode, nproc, stopped, text_file, reference,
                                             tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped(mode), run)
    out = gptfast_train(nproc, train_args(text_file, run, STEPS, "--parallel", mode, "--resume"),
                        tmp_path)
    assert f"resumed from {run / 'ckpt.pt'} at step {STOP}" in out
    ck = assert_same_run(run, reference)
    assert ck["world_size"] == nproc
    if mode == "fsdp":   # the step-3 shards were replaced by step 6's
        assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-00000006.dcp"]


@pytest.mark.distributed
def test_gradients_and_divergence_inside_a_process_group(text_file, tmp_path):
    """DDP's and FSDP2's gradients, the tied embedding's included, against one process's on
    the whole batch; gradient accumulation communicates on the last micro-step only; a NaN on
    one process stops both at the same step, keeping the last good checkpoint."""
    worker = Path(__file__).with_name("_dist_worker.py")
    rc, out = torchrun(2, [str(worker), "grads", "accumulation", "divergence"], tmp_path,
                       env={"DIST_OUT": str(tmp_path), "DIST_DATA": str(text_file)})
    assert rc == 0, out[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        assert res["world_size"] == 2
        assert res["tied_has_both_parts"] > 1e-4
        for mode in ("ddp", "fsdp"):
            errs = res[f"{mode}_grad_rel_err"]
            assert "wte.weight" in errs and len(errs) == len(ranks[0]["ddp_grad_rel_err"])
            assert max(errs.values()) < 1e-5, (mode, errs)
            msg = res[f"{mode}_diverged_at"]
            assert msg is not None and "the loss became NaN or infinite by step 4" in msg, msg
            assert "still holds step 2" in msg
            assert res[f"{mode}_checkpoint_step"] == 2
        assert res["fsdp_param_types"] == ["DTensor"] and res["ddp_param_types"] == ["Parameter"]
        # gradient accumulation communicates on the last micro-step only
        ddp, fsdp = res["ddp_accumulation"], res["fsdp_accumulation"]
        assert ddp["first_grads_differ_across_processes"] is True
        assert fsdp["first_sharded_grads"] == 0
        assert ddp["final_grad_rel_err"] < 1e-5 and fsdp["final_grad_rel_err"] < 1e-5


@pytest.mark.distributed
def test_gpu_check_ddp_stage_dry_run(tmp_path):
    """`make gpu-check`'s train-ddp stage, as its CPU dry run runs it (gloo)."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(repo / "scripts" / "gpu_check.py"), "--dry-run",
                        "--out", str(out), "--only", "env,train-ddp"], capture_output=True,
                       text=True, timeout=LAUNCH_TIMEOUT, cwd=repo, start_new_session=True)
    res = json.loads((out / "results.json").read_text())
    assert res["stages"]["train-ddp"]["status"] == "ok", p.stdout[-3000:]
    assert res["train_ddp"]["parallel"] == "ddp" and res["train_ddp"]["world_size"] == 1


# ================================================================ in this process

def test_mix32_is_murmur3_fmix32():
    def fmix32(h):      # 32-bit wrapping arithmetic, as in MurmurHash3
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.int64),
                      torch.tensor([0, 1, 2**31, 2**32 - 1])])
    assert mix32(vals).tolist() == [fmix32(v) for v in vals.tolist()]
    assert mix32(123456789) == fmix32(123456789)


def test_keyed_dropout_statistics():
    keys = sample_keys(3, 0, 64)
    bits = keyed_bits(keys, site=5, n=4096)
    assert bits.min() >= 0 and bits.max() < 2**32
    x = torch.ones(64, 64, 64)
    y = keyed_dropout(x, 0.1, keys, site=5)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.005                       # 262k draws: std 6e-4
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    # rows, sites and seeds draw different masks
    assert not torch.equal(y[0] != 0, y[1] != 0)
    assert not torch.equal(y != 0, keyed_dropout(x, 0.1, keys, site=6) != 0)
    assert not torch.equal(y != 0, keyed_dropout(x, 0.1, sample_keys(4, 0, 64), site=5) != 0)
    u = keyed_uniform(keys, 9, (1000,))
    assert u.shape == (64, 1000) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005


def test_keyed_dropout_does_not_depend_on_the_batch_layout():
    """A row's embedding/residual dropout masks depend on its key only: 4 rows at once equal
    2 + 2 rows, or the rows in another order; the gradient too."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", block_size=16, n_layer=2, dropout=0.3)).train()
    x = torch.randint(0, 259, (4, 16))
    keys = sample_keys(11, 100, 4)
    whole = model.forward_hidden(x, sample_keys=keys)
    halves = torch.cat([model.forward_hidden(x[:2], sample_keys=keys[:2]),
                        model.forward_hidden(x[2:], sample_keys=keys[2:])])
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-6)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(model.forward_hidden(x[perm], sample_keys=keys[perm]),
                               whole[perm], rtol=1e-5, atol=1e-6)
    # dropout did act, and other keys drop other units
    model.eval()
    plain = model.forward_hidden(x)
    model.train()
    assert (whole - plain).abs().max() > 1e-2
    assert (model.forward_hidden(x, sample_keys=sample_keys(12, 100, 4)) - whole).abs().max() > 1e-2


def test_attention_dropout_is_reproducible_per_layout_only():
    """The documented limit: attention dropout takes no per-row key. Seeded per micro-batch
    from (seed, first global sample index) it repeats exactly for a given layout, but 2 + 2
    rows do not reproduce 4 rows."""
    torch.manual_seed(0)
    model = GPT(get_config("tiny", block_size=16, n_layer=1, attn_dropout=0.3)).train()
    x = torch.randint(0, 259, (4, 16))
    keys = sample_keys(0, 0, 4)

    def run(first, rows):
        torch.manual_seed(layout_seed(0, first))
        return model.forward_hidden(x[rows], sample_keys=keys[rows])

    whole = run(0, slice(0, 4))
    assert torch.equal(whole, run(0, slice(0, 4)))                      # same layout: exact
    halves = torch.cat([run(0, slice(0, 2)), run(2, slice(2, 4))])
    assert torch.equal(halves, torch.cat([run(0, slice(0, 2)), run(2, slice(2, 4))]))
    assert (whole - halves).abs().max() > 1e-3                          # other layout: not


def test_sampler_shards_are_the_one_process_batch():
    tokens = torch.arange(1000, dtype=torch.int16)
    one = BatchSampler(tokens, 6, 8, seed=3)
    three = [BatchSampler(tokens, 6, 8, seed=3, rank=r, world_size=3) for r in range(3)]
    for i in range(3):
        x, y = one.next()
        parts = [s.next() for s in three]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
        assert [s.first_index for s in three] == [6 * i, 6 * i + 2, 6 * i + 4]
    # a state saved by one layout continues the same sequence in another
    two = [BatchSampler(tokens, 6, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(three[0].state_dict())
    x, _ = one.next()
    assert torch.equal(x, torch.cat([s.next()[0] for s in two]))
    assert two[1].first_index == 6 * 3 + 3
    with pytest.raises(ValueError, match="cannot be split over 4"):
        BatchSampler(tokens, 6, 8, rank=0, world_size=4)


def _full_to_sharded(run: Path) -> None:
    """Rewrite a one-process run's checkpoint as an FSDP-style one (shards + pointer file)."""
    from gptfast.distributed import save_sharded, single
    ck = load_checkpoint(run / "ckpt.pt")
    model = GPT(get_config("tiny", **{k: ck["model_config"][k] for k in
                                      ("block_size", "dropout", "n_layer", "n_embd", "n_head")}))
    model.load_state_dict(ck["model"])
    opt = build_optimizer(model, TrainConfig(**{k: ck["train_config"][k] for k in
                                                ("lr", "weight_decay", "beta1", "beta2")}),
                          torch.device("cpu"))
    opt.load_state_dict(ck["optimizer"])
    meta = {k: v for k, v in ck.items() if k not in ("model", "optimizer", "format",
                                                       "format_version")}
    save_sharded(single(torch.device("cpu")), run / "ckpt.pt", ck["step"], model, opt, meta)


def test_sharded_checkpoint_on_one_process(text_file, reference, tmp_path):
    """A sharded (DCP) checkpoint resumes on one process like the uninterrupted run, and
    gptfast.load / generate read its weights."""
    import gptfast

    run = tmp_path / "run"
    train(reference_config(text_file, run, steps=STOP))
    before = load_checkpoint(run / "ckpt.pt")["model"]
    _full_to_sharded(run)
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt-00000003.dcp", "ckpt.pt"]
    assert "model" not in load_checkpoint(run / "ckpt.pt")
    model, _ = gptfast.load(run)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    train(reference_config(text_file, run, resume=True))
    assert_same_run(run, reference)
    assert not list(run.glob("ckpt-*.dcp"))     # a full checkpoint replaced the shards


def test_sharded_save_is_atomic(text_file, tmp_path, monkeypatch):
    """A save that dies while writing shards leaves ckpt.pt pointing at the previous, complete
    folder; the next save clears the unfinished one."""
    import torch.distributed.checkpoint as dcp

    from gptfast.distributed import save_sharded, single

    run = tmp_path / "run"
    train(reference_config(text_file, run, steps=1))
    _full_to_sharded(run)
    pointer = (run / "ckpt.pt").read_bytes()
    ck = load_full_checkpoint(run / "ckpt.pt")
    model = GPT(get_config("tiny", block_size=32, dropout=0.1))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    real = dcp.save

    def dying(state, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        (Path(checkpoint_id) / ".metadata").unlink()          # half written
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", dying)
    with pytest.raises(OSError, match="disk full"):
        save_sharded(single(torch.device("cpu")), run / "ckpt.pt", 2, model, opt, {"step": 2})
    assert (run / "ckpt.pt").read_bytes() == pointer
    assert (run / ".ckpt-00000002.dcp.tmp").is_dir()
    again = load_full_checkpoint(run / "ckpt.pt")
    assert again["step"] == 1 and all(torch.equal(again["model"][k], v)
                                      for k, v in ck["model"].items())
    monkeypatch.setattr(dcp, "save", real)
    save_sharded(single(torch.device("cpu")), run / "ckpt.pt", 2, model, opt, {"step": 2})
    assert sorted(p.name for p in run.iterdir() if "ckpt" in p.name) == ["ckpt-00000002.dcp",
                                                                       "ckpt.pt"]
    assert torch.equal(load_full_checkpoint(run / "ckpt.pt")["model"]["wte.weight"],
                       model.wte.weight.detach())


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_parallel_needs_torchrun(capsys, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for mode in ("fsdp", "ddp"):
        rc = cli.main(["train", "--parallel", mode, "--out", str(tmp_path / "run"), "--steps", "1"])
        _one_line_error(capsys, rc, f"--parallel {mode}", "torchrun --nproc_per_node")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="needs a torchrun launch"):
        train(TrainConfig(parallel="fsdp", out_dir=str(tmp_path / "run")))


def test_world_size_must_divide_the_batch(capsys, tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    run = tmp_path / "run"
    rc = cli.main(["train", "--data", str(text_file), "--batch-size", "4", "--out", str(run),
                   "--parallel", "ddp", "--device", "cpu"])
    _one_line_error(capsys, rc, "--batch-size", "4 rows", "3 processes")
    assert not run.exists()
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        train(TrainConfig(batch_size=4, out_dir=str(run)))
    monkeypatch.setenv("RANK", "1")             # every process meets it; rank 0 alone says so
    rc = cli.main(["train", "--batch-size", "4", "--out", str(run), "--device", "cpu"])
    assert rc == 2 and capsys.readouterr().err == ""


def test_finetune_and_demo_refuse_several_processes(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = cli.main(["finetune", "--ckpt", str(tmp_path), "--data", str(tmp_path / "x.csv")])
    _one_line_error(capsys, rc, "finetune runs on one process", "WORLD_SIZE=2")
    rc = cli.main(["demo", "--out", str(tmp_path / "demo")])
    _one_line_error(capsys, rc, "demo runs on one process")
    assert not (tmp_path / "demo").exists()


def test_resume_refuses_another_model(capsys, text_file, tmp_path):
    """A checkpoint from another model: refused with the option named, nothing written."""
    run = tmp_path / "run"
    train(reference_config(text_file, run, steps=2))
    good = (run / "ckpt.pt").read_bytes()
    base = train_args(text_file, run, 4, "--resume")
    for args, flag in ((["--preset", "demo"], "--preset"), (["--block-size", "64"], "--block-size"),
                       (["--dropout", "0.2"], "--dropout")):
        argv = list(base)
        for opt, value in zip(args[::2], args[1::2]):
            i = argv.index(opt) if opt in argv else None
            if i is None:
                argv += [opt, value]
            else:
                argv[i + 1] = value
        rc = cli.main(["train", *argv])
        _one_line_error(capsys, rc, flag, "a resumed run keeps its checkpoint's model")
        assert (run / "ckpt.pt").read_bytes() == good
    # shards of another model behind the checkpoint file
    other = tmp_path / "other"
    cfg = reference_config(text_file, other, steps=1)
    cfg.model_overrides = {"n_embd": 32, "n_head": 2}
    train(cfg)
    _full_to_sharded(other)
    _full_to_sharded(run)
    pointer = (run / "ckpt.pt").read_bytes()
    shutil.rmtree(run / "ckpt-00000002.dcp")
    shutil.copytree(other / "ckpt-00000001.dcp", run / "ckpt-00000002.dcp")
    rc = cli.main(["train", *base])
    _one_line_error(capsys, rc, "--resume", "holds a different model", "there, (192,) here")
    assert (run / "ckpt.pt").read_bytes() == pointer
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt-00000002.dcp", "ckpt.pt"]
