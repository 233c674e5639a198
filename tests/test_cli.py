"""The `gptfast` command line: train -> generate smoke run, info, bench, bad inputs (exit code 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_bench_missing_script(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    rc = run_main(["bench", "attention", "--quick"])
    _one_line_error(capsys, rc, "bench_attention.py", "not found")


def test_bench_runs_script(monkeypatch, tmp_path, capsys):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "bench_cross_entropy.py").write_text(
        "import sys\nopen('args.txt', 'w').write(' '.join(sys.argv[1:]))\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "_repo_root", lambda: tmp_path)
    assert run_main(["bench", "cross-entropy", "--quick", "--foo", "1"]) == 3
    assert (tmp_path / "args.txt").read_text() == "--quick --foo 1"


def test_python_dash_m_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "gptfast", "train", "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"gptfast train: error: --data: path not found: {tmp_path / 'nope'}"]
