"""The README as a new user reads it: its Python blocks run as written, and every `gptfast`
command line in its shell blocks is accepted by the command line's parser."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gptfast import cli

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run_as_written(tmp_path):
    code = blocks("python")
    assert len(code) >= 2
    # The loading example follows `make demo`, which writes runs/demo/: a short run stands in.
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "runs" / "demo"),
                     "--steps", "2", "--batch-size", "2", "--block-size", "64", "--max-bytes",
                     "20000", "--eval-batches", "1", "--no-plot", "--no-progress",
                     "--threads", "1"]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for i, block in enumerate(code):
        (tmp_path / f"block{i}.py").write_text(block)
        r = subprocess.run([sys.executable, f"block{i}.py"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"README python block {i}:\n{block}\n{r.stderr[-3000:]}"


def command_lines():
    lines = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("gptfast "):
                lines.append(line)
    return lines


@pytest.mark.parametrize("line", command_lines())
def test_readme_commands_parse(line):
    args = cli.build_parser().parse_args(shlex.split(line)[1:])    # SystemExit on a bad one
    assert args.command in cli.HANDLERS


def test_readme_shows_the_newcomer_path():
    commands = " ".join(command_lines())
    for needed in ("gptfast train", "--num-beams", "gptfast finetune", "gptfast info"):
        assert needed in commands
    assert "make demo" in README and "make test" in README
    assert "gptfast bench" in README and "--out" in README
    gpu_results = [p for p in (REPO / "benchmarks" / "results").glob("*/*.json")
                   if "cuda" in json.loads(p.read_text()).get("device_type", "")]
    # Until GPU numbers are committed the README says so plainly; once they are, it must not.
    assert ("No GPU numbers of gptfast are committed yet" in README) == (not gpu_results)
