"""The `gptfast` command line: train -> generate smoke run, info, bench, bad inputs (exit code 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptfast
from gptfast import cli
from gptfast.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TEXT = "".join(f"class C{i}:\n    def m(self):\n        return {i}\n\n" for i in range(300))


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(argv):
    """cli.main(argv) -> exit code (argparse errors raise SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = d / "corpus.txt"
    data.write_text(TEXT)
    out = d / "run"
    rc = run_main([
        "train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "4",
        "--batch-size", "4", "--block-size", "32", "--eval-every", "2", "--eval-batches", "1",
        "--log-every", "2", "--warmup", "1", "--device", "cpu", "--no-progress", "--seed", "1",
    ])
    assert rc == 0
    return d, data, out


def test_train_then_generate(trained, capsys):
    d, data, out = trained
    assert (out / "ckpt.pt").is_file() and (out / "log.json").is_file() and (out / "loss.png").is_file()
    ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 4 and ck["model_config"]["block_size"] == 32
    capsys.readouterr()
    rc = run_main(["generate", "--ckpt", str(out / "ckpt.pt"), "--prompt", "class ",
                   "--max-new-tokens", "10", "--seed", "0", "--top-k", "5", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.startswith("class ")
    # greedy decoding is deterministic; a run folder works as --ckpt too
    rc = run_main(["generate", "--ckpt", str(out), "--prompt", "class ", "--max-new-tokens", "8", "--greedy"])
    a = capsys.readouterr().out
    rc2 = run_main(["generate", "--ckpt", str(out), "--prompt", "class ", "--max-new-tokens", "8", "--greedy",
                    "--no-cache"])
    b = capsys.readouterr().out
    assert rc == rc2 == 0 and a == b


def test_resume_via_cli(trained, capsys):
    d, data, out = trained
    rc = run_main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "6",
                   "--batch-size", "4", "--block-size", "32", "--eval-every", "0", "--eval-batches", "1",
                   "--device", "cpu", "--no-progress", "--no-plot", "--resume"])
    assert rc == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == 6
    assert "resumed from" in capsys.readouterr().out


def test_info(capsys):
    assert run_main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_bad_inputs(trained, tmp_path, capsys):
    d, data, out = trained
    rc = run_main(["train", "--preset", "no-such-preset", "--steps", "1"])
    _one_line_error(capsys, rc, "--preset", "no-such-preset")
    rc = run_main(["train", "--data", str(tmp_path / "missing.txt"), "--steps", "1"])
    _one_line_error(capsys, rc, "--data", "missing.txt")
    (tmp_path / "empty").mkdir()
    rc = run_main(["train", "--data", str(tmp_path / "empty"), "--steps", "1", "--out", str(tmp_path / "o")])
    _one_line_error(capsys, rc, "--data", "empty corpus")
    rc = run_main(["train", "--steps", "0"])
    _one_line_error(capsys, rc, "--steps")
    rc = run_main(["train", "--scheduled-sampling", "1.5"])
    _one_line_error(capsys, rc, "--scheduled-sampling")
    rc = run_main(["train", "--resume", str(tmp_path / "nothere.pt")])
    _one_line_error(capsys, rc, "--resume", "nothere.pt")
    rc = run_main(["generate", "--ckpt", str(tmp_path / "nothere.pt"), "--prompt", "x"])
    _one_line_error(capsys, rc, "--ckpt", "nothere.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes((out / "ckpt.pt").read_bytes()[:5000])
    rc = run_main(["generate", "--ckpt", str(bad), "--prompt", "x"])
    _one_line_error(capsys, rc, "--ckpt", "bad.pt", "corrupt")
    rc = run_main(["generate", "--prompt", "x"])
    _one_line_error(capsys, rc, "--ckpt")
    rc = run_main(["generate", "--ckpt", str(out), "--prompt", "x" * 100])
    _one_line_error(capsys, rc, "--prompt")
    rc = run_main(["train", "--device", "bogus-device"])
    _one_line_error(capsys, rc, "--device", "bogus-device")
    rc = run_main(["bench", "no-such-bench"])
    _one_line_error(capsys, rc, "no-such-bench")


def test_python_dash_m_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "gptfast", "train", "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"gptfast train: error: --data: path not found: {tmp_path / 'nope'}"]


# ---- through a subprocess, as a user runs it ----------------------------------------------------

def gptfast_cli(*args, cwd, module="gptfast", timeout=300, env=None):
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def _one_line(r, code, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_demo_takes_its_options_and_checks_them(tmp_path):
    r = gptfast_cli("--steps", "0", cwd=tmp_path, module="gptfast.demo")
    _one_line(r, 2, "--steps", "'0'")
    with pytest.raises(SystemExit):                       # gptfast demo --help lists them
        cli.main(["demo", "--help"])
    a = cli.build_parser().parse_args(["demo", "--steps", "20", "--out", "x", "--batch-size", "4"])
    assert (a.steps, a.out, a.batch_size) == (20, "x", 4)


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    # Resume the good 4-step run with an absurd learning rate: the loss turns NaN, the run
    # stops with exit status 3 and a message, and ckpt.pt is byte for byte the good one.
    d, data, out = trained
    run = tmp_path / "run"
    run.mkdir()
    good = (out / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(good)
    step = load_checkpoint(run / "ckpt.pt")["step"]
    r = gptfast_cli("train", "--preset", "tiny", "--data", data, "--out", run, "--steps", "12",
                    "--batch-size", "4", "--block-size", "32", "--eval-every", "2",
                    "--eval-batches", "1", "--lr", "1e6", "--warmup", "0", "--device", "cpu",
                    "--no-progress", "--no-plot", "--resume", cwd=tmp_path)
    line = _one_line(r, 3, "diverged", "NaN", f"still holds step {step}", "--lr")
    assert (run / "ckpt.pt").read_bytes() == good, line
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_generate_refuses_nonfinite_weights_and_settings(trained, tmp_path, capsys):
    d, data, out = trained
    ck = load_checkpoint(out / "ckpt.pt")
    ck["model"]["h.0.attn.c_attn.weight"][0, 0] = float("nan")
    from gptfast.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "nan" / "ckpt.pt", ck)
    r = gptfast_cli("generate", "--ckpt", tmp_path / "nan", "--prompt", "x", cwd=tmp_path)
    _one_line(r, 2, "--ckpt", "non-finite", "h.0.attn.c_attn.weight")
    for args, words in [
        (["--temperature", "nan"], ["--temperature", "nan"]),
        (["--temperature", "inf"], ["--temperature"]),
        (["--temperature", "-1"], ["--temperature"]),
        (["--top-p", "0"], ["--top-p"]),
        (["--top-p", "nan"], ["--top-p"]),
        (["--top-k", "0"], ["--top-k"]),
        (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
        (["--num-beams", "0"], ["--num-beams"]),
        (["--num-beams", "2", "--length-penalty", "nan"], ["--length-penalty"]),
        (["--length-penalty", "2"], ["--length-penalty", "--num-beams"]),
        (["--num-beams", "2", "--temperature", "0.5"], ["--num-beams", "--temperature"]),
        (["--num-beams", "2", "--num-samples", "3"], ["--num-beams", "--num-samples"]),
        (["--seed", "-1"], ["--seed"]),
    ]:
        rc = run_main(["generate", "--ckpt", str(out), "--prompt", "x", *args])
        _one_line_error(capsys, rc, *words)


@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], ["--lr"]), (["--lr", "0"], ["--lr"]), (["--lr", "inf"], ["--lr"]),
    (["--min-lr", "-1"], ["--min-lr"]), (["--weight-decay", "nan"], ["--weight-decay"]),
    (["--grad-clip", "-0.5"], ["--grad-clip"]), (["--dropout", "1"], ["--dropout"]),
    (["--attn-dropout", "nan"], ["--attn-dropout"]), (["--batch-size", "0"], ["--batch-size"]),
    (["--block-size", "-4"], ["--block-size"]), (["--grad-accum", "x"], ["--grad-accum"]),
    (["--warmup", "-1"], ["--warmup"]), (["--max-bytes", "0"], ["--max-bytes"]),
    (["--threads", "0"], ["--threads"]), (["--seed", "1.5"], ["--seed"]),
    (["--eval-batches", "0"], ["--eval-batches"]), (["--decay-steps", "0"], ["--decay-steps"]),
    (["--lr", "1e-3", "--min-lr", "1"], ["--min-lr"]),
])
def test_train_checks_every_number(args, words, capsys):
    rc = run_main(["train", "--steps", "1", *args])
    _one_line_error(capsys, rc, *words)


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["--epochs"]), (["--lr", "nan"], ["--lr"]),
    (["--val-fraction", "1"], ["--val-fraction"]), (["--max-length", "1"], ["--max-length"]),
    (["--pooling", "first"], ["--pooling"]), (["--batch-size", "-1"], ["--batch-size"]),
])
def test_finetune_checks_every_number(trained, args, words, capsys):
    d, data, out = trained
    rc = run_main(["finetune", "--ckpt", str(out), "--data", str(data), *args])
    _one_line_error(capsys, rc, *words)


def test_block_size_beyond_memory_is_a_clear_error(tmp_path):
    # The literal `--block-size 100000` fits a big machine (about 20 GiB at batch 16 on the
    # fused SDPA path); at batch 2048 no machine has the ~2.5 TiB of activations.
    r = gptfast_cli("train", "--block-size", "100000", "--batch-size", "2048", "--out", tmp_path,
                    cwd=tmp_path)
    _one_line(r, 2, "--batch-size", "--block-size", "TiB", "available", "--grad-accum")
    assert not (tmp_path / "ckpt.pt").exists()


def test_preflight_counts_materialized_attention_scores():
    from gptfast.model import get_config
    from gptfast.train import MemoryPreflightError, estimate_step_memory, memory_preflight
    cpu = torch.device("cpu")
    # attention dropout on a CPU: the plain reference keeps (B, nh, T, T) scores per layer
    cfg = get_config("tiny", block_size=4096, attn_dropout=0.1)
    need = estimate_step_memory(cfg, 8, cpu, False)
    assert need["attention"] == 2 * 5 * 8 * 4 * 4096 * 4096 * 4
    with pytest.raises(MemoryPreflightError, match="--attn-dropout 0"):
        memory_preflight(cfg, 8, cpu, False, available=8 << 30)
    # without dropout the fused SDPA kernel runs: no T x T memory, and it fits
    free = get_config("tiny", block_size=4096)
    assert estimate_step_memory(free, 8, cpu, False)["attention"] == 0
    memory_preflight(free, 8, cpu, False, available=8 << 30)
    with pytest.raises(MemoryPreflightError, match="smaller --preset"):
        memory_preflight(get_config("gpt3-175b"), 1, cpu, False, available=64 << 30)


def test_generate_with_beams(trained, capsys):
    d, data, out = trained
    rc = run_main(["generate", "--ckpt", str(out), "--prompt", "class ", "--max-new-tokens", "12",
                   "--num-beams", "3", "--length-penalty", "0.8"])
    res = capsys.readouterr()
    assert rc == 0 and res.out.startswith("class ") and "beam search, 3 beams" in res.err
    # the printed text is beam_search's best hypothesis
    from gptfast.generate import beam_search
    model, tok = gptfast.load(out)
    ids = tok.encode("class ", bos=True)
    best, _ = beam_search(model, torch.tensor([ids]), 12, 3, eos_id=tok.EOS, length_penalty=0.8)
    new = best[0, len(ids):].tolist()
    new = new[: new.index(tok.EOS)] if tok.EOS in new else new
    assert res.out == "class " + tok.decode(new) + "\n"


def test_load_takes_a_file_or_a_run_folder(trained):
    d, data, out = trained
    from gptfast.train import load_model
    for path in (out, out / "ckpt.pt", str(out)):
        model, tok = gptfast.load(path)
        assert not model.training and model.config.block_size == 32
        m2, tok2, ck = load_model(path)
        assert ck["step"] >= 4
        for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="without a ckpt.pt"):
        gptfast.load(d)


def test_info_explains_each_preset(capsys):
    assert run_main(["info"]) == 0
    text = capsys.readouterr().out
    for preset in ("tiny", "gpt2", "gpt3-2.7b"):
        assert f"\n  {preset} " in text
    assert "fused SDPA CPU kernel" in text and "reference, S x S scores" in text  # gpt2: dropout
    assert run_main(["info", "--preset", "gpt3-2.7b"]) == 0
    text = capsys.readouterr().out
    assert "a training step" in text and "decoding" in text and "linear_cross_entropy" in text
    rc = run_main(["info", "--preset", "nope"])
    _one_line_error(capsys, rc, "--preset", "nope")


def test_explain_a_preset_or_model():
    rep = gptfast.explain("gpt3-2.7b", device="cpu")
    assert set(rep) == {"attention", "linear_cross_entropy"}
    assert rep["attention"].backend == "torch" and "SDPA" in rep["attention"].torch_path
    assert not rep.attention_materializes_scores
    assert "chunks of" in str(rep)
    from gptfast.model import GPT, get_config
    rep = gptfast.explain(GPT(get_config("tiny", attn_dropout=0.1)), device="cpu")
    assert rep.attention_materializes_scores and "dropout" in rep["attention"].torch_path
    assert "S x S" in str(gptfast.explain(get_config("tiny", attn_dropout=0.1), device="cpu"))


def test_bench_from_an_installed_package(tmp_path):
    # Installed (not editable) into a folder, run from elsewhere: the benchmark is found in the
    # package and writes where --out says; nothing is written into the source tree.
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "gptfast" / "benchmarks" / "bench_cpu.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import gptfast; print(gptfast.__file__)"],
                           capture_output=True, text=True, env=env, cwd=work)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    before = set(REPO.rglob("cpu.json"))
    r = subprocess.run([sys.executable, "-m", "gptfast", "bench", "cpu", "--tiny", "--out",
                        "results"], capture_output=True, text=True, env=env, cwd=work,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rec = json.loads((work / "results" / "cpu.json").read_text())
    assert rec["benchmark"] == "cpu" and rec["rows"]
    assert set(REPO.rglob("cpu.json")) == before


def test_bench_runs_the_source_script_when_not_installed(monkeypatch, tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_cross_entropy.py").write_text(
        "import sys\nopen('args.txt', 'w').write(' '.join(sys.argv[1:]))\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    monkeypatch.chdir(tmp_path)
    assert run_main(["bench", "cross-entropy", "--quick", "--out", "o"]) == 3
    assert (tmp_path / "args.txt").read_text() == f"--quick --out {tmp_path / 'o'} --device auto"
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path / "nowhere")
    with pytest.raises(cli.UsageError, match="not found"):
        cli._bench_command("attention")
