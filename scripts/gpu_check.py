#!/usr/bin/env python3
"""`make gpu-check`: everything a GPU machine should prove, in one command.

The GPU machines have PyTorch, Triton, nvcc, pybind11, ninja and pytest in the system python3
and no network: nothing here creates a venv or downloads anything. Stages, each a subprocess
with its own timeout (a slow stage costs only itself), each writing its results as it goes:

  env       facts: python, torch, triton, nvcc, the GPU, commit, hash of kernels/ and csrc/
  install   `pip install --no-deps --no-build-isolation -e .` without the CUDA build
            (GPTFAST_SKIP_CUDA_BUILD=1; fallback: PYTHONPATH + a shadow package with symlinks);
            peer wheels from .whl/ into a private --target folder
  build     csrc/ -> gptfast._C with `make build-cuda` (nvcc, sm_80 + sm_90a, MAX_JOBS = all
            cores), the same target `make test` uses; skipped when csrc/ has no sources
  pytest    `pytest -m gpu` -> pass/fail/skip counts from its junit xml
  train     a short training run of the demo model, counting kernel launches, Triton's and the
            CUDA module's (proof that the fused ops run inside the model) and recording
            gptfast.explain's decisions
  train-ddp the same trainer under torchrun, one process, --parallel ddp (NCCL): a few steps
  tune      benchmarks/tune_attention.py --quick: the attention configurations timed on this
            GPU (a few keys, <= 40 s); the tuned table (tune/attention_configs.json in the logs)
            is what the benchmarks after it use (GPTFAST_ATTENTION_CONFIGS); commit it as
            kernels/attention_configs.json to make it the default
  bench-*   the four benchmarks in quick mode

Outputs in $OUT (else gpu-check-out/): summary.md, results.json (every number, commit, kernel
hash) and logs.tar.gz (logs, plots, per-benchmark JSON), rewritten after every stage. The goal
table is printed last. Exit status 1 when a stage failed or a required peer row is missing
(SDPA flash and cuDNN, torch.compile; Liger and Cut CE only when their wheels were brought in
.whl/), so a benchmark can never quietly prove nothing.

Without CUDA (or with --dry-run) the same stages run on the CPU: no install, no build, tiny
benchmarks, the tiny model; GPU-only checks are reported as not judged.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from provenance import git_info, kernel_hash  # noqa: E402  (torch-free)

BENCHES = ("attention", "cross_entropy", "train", "generate")
# (stage, own timeout s, floor s). The whole check has a deadline (--budget, 420 s): env +
# install + the nvcc build of csrc/ take up to ~2.5 minutes, and everything after the build
# (tests, training smoke runs, the quick tuning, benchmarks) fits in 5 minutes, so two runs fit
# one 15-minute device session with the machine's start. A stage gets min(own, time left -
# floors of the stages after it), never less than its floor. Estimates (no GPU run yet): tune
# from results.json (stages.<name>.seconds).
STAGES = [("env", 20, 10), ("install", 40, 15), ("build", 120, 60), ("pytest", 70, 30),
          ("train", 25, 15), ("train-ddp", 20, 10), ("tune", 40, 15), ("bench-attention", 40, 20),
          ("bench-cross_entropy", 45, 20), ("bench-train", 45, 25), ("bench-generate", 15, 10)]
# Rows a GPU run must have, per benchmark: (peer, required only when its wheel was brought).
REQUIRED = {
    "attention": [("sdpa-flash", None), ("sdpa-cudnn", None), ("gptfast-cuda", None)],
    "cross_entropy": [("torch.compile", None), ("gptfast-cuda-lean", None),
                      ("gptfast-cuda-logits", None), ("liger-fused-linear-ce", "liger_kernel"),
                      ("cut-cross-entropy", "cut_cross_entropy")],
    "train": [("gptfast compiled", None), ("sdpa-full-logits compiled", None)],
    "generate": [],
}
SOURCE_SUFFIXES = (".cu", ".cpp", ".cc", ".cxx")


# ---- running one stage -----------------------------------------------------------------------

def run_cmd(cmd: List[str], log: Path, timeout: float, env: dict, cwd: Path = REPO) -> dict:
    """Run cmd with its output appended to log; kill its whole process group on timeout
    (compile workers included). Returns rc, seconds and timed_out."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, timed_out = None, True
            f.write(f"\n[gpu-check] killed after {timeout:.0f} s\n")
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out}


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out or os.environ.get("OUT") or REPO / "gpu-check-out").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.bench_dir = self.work / "bench"
        self.py = sys.executable
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        self.deadline = time.monotonic() + args.budget
        self.dry_run = args.dry_run
        self.results: dict = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "git": git_info(), "kernel_hash": kernel_hash(), "dry_run": args.dry_run,
            "budget_s": args.budget, "stages": {}, "benchmarks": {}, "goals": [],
            "missing_required": [], "peers_brought": {},
        }

    # -- helpers
    def add_pythonpath(self, path: Path) -> None:
        parts = [str(path)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join(parts)

    def timeout_for(self, name: str) -> float:
        idx = [s[0] for s in STAGES].index(name)
        own, floor = STAGES[idx][1], STAGES[idx][2]
        later = sum(s[2] for s in STAGES[idx + 1:] if self.selected(s[0]))
        left = self.deadline - time.monotonic() - later
        return max(floor, min(own * self.args.timeout_scale, left))

    def selected(self, name: str) -> bool:
        only = self.args.only
        return not only or name in only or (name.startswith("bench-") and "bench" in only)

    def python(self, name: str, code_or_args: List[str], timeout: float) -> dict:
        return run_cmd([self.py] + code_or_args, self.logs / f"{name}.log", timeout, self.env)

    def stage(self, name: str, fn: Callable[[float], dict]) -> None:
        if not self.selected(name):
            self.results["stages"][name] = {"status": "skipped", "note": "not in --only"}
            return
        timeout = self.timeout_for(name)
        print(f"[gpu-check] {name} (timeout {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            res = fn(timeout)
        except Exception as e:  # noqa: BLE001 - a broken stage is reported, the rest go on
            res = {"status": "failed", "note": f"{type(e).__name__}: {e}"}
        res.setdefault("seconds", round(time.monotonic() - t0, 1))
        res["timeout_s"] = round(timeout)
        self.results["stages"][name] = res
        print(f"[gpu-check] {name}: {res['status']} in {res['seconds']} s"
              + (f" — {res['note']}" if res.get("note") else ""), flush=True)
        if res["status"] in ("failed", "timeout"):
            print(tail(self.logs / f"{name}.log"), flush=True)
        self.save()

    @staticmethod
    def status_of(r: dict, ok: bool = True) -> str:
        if r.get("timed_out"):
            return "timeout"
        return "ok" if r.get("rc") == 0 and ok else "failed"

    # -- stages
    def env_stage(self, timeout: float) -> dict:
        code = (
            "import json, os, platform, torch\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__,"
            " 'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(),"
            " 'cpus': os.cpu_count()}\n"
            "try:\n import triton; d['triton'] = triton.__version__\n"
            "except Exception as e: d['triton'] = 'unavailable: %s' % e\n"
            "if torch.cuda.is_available():\n"
            " p = torch.cuda.get_device_properties(0)\n"
            " d['gpu'] = {'name': p.name, 'capability': f'{p.major}.{p.minor}',"
            " 'sms': p.multi_processor_count, 'memory_gib': round(p.total_memory / 2**30, 1)}\n"
            "print('ENV_JSON ' + json.dumps(d))\n")
        r = self.python("env", ["-c", code], timeout)
        facts = {}
        for line in (self.logs / "env.log").read_text().splitlines():
            if line.startswith("ENV_JSON "):
                facts = json.loads(line[len("ENV_JSON "):])
        nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                        if Path("/usr/local/cuda/bin/nvcc").exists() else None)
        if nvcc:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            facts["nvcc"] = out.strip().splitlines()[-1] if out.strip() else "unknown"
        else:
            facts["nvcc"] = None
        self.results["env"] = facts
        if not facts.get("cuda_available") and not self.dry_run:
            self.dry_run = True
            self.results["dry_run"] = True
            print("[gpu-check] no CUDA device: running the CPU dry run", flush=True)
        return {"status": self.status_of(r, bool(facts)), **r,
                "note": facts.get("gpu", {}).get("name", "no GPU")}

    def install_stage(self, timeout: float) -> dict:
        notes = []
        if self.dry_run:
            notes.append("dry run: the interpreter's existing install is used")
        else:
            # The CUDA extension is the build stage's job (its own timeout and log).
            self.env["GPTFAST_SKIP_CUDA_BUILD"] = "1"
            r = self.python("install", ["-m", "pip", "install", "--no-deps",
                                        "--no-build-isolation", "-e", "."], timeout * 0.6)
            del self.env["GPTFAST_SKIP_CUDA_BUILD"]
            if r["rc"] != 0:
                notes.append("pip -e failed: PYTHONPATH + shadow package")
                self.shadow_package()
        wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
        if wheels:
            site = self.work / "site"
            r = self.python("install", ["-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--target", str(site)] + wheels, timeout * 0.3)
            if r["rc"] == 0:
                self.add_pythonpath(site)
                # Later stages, benchmarks included, see the peers through PYTHONPATH.
            notes.append(f"{len(wheels)} peer wheel(s) from .whl/: "
                         + ("installed" if r["rc"] == 0 else "install FAILED"))
        for mod in ("liger_kernel", "cut_cross_entropy"):
            brought = any(Path(w).name.startswith(mod) for w in wheels)
            self.results["peers_brought"][mod] = brought
        # Verify from another folder, so the source tree on sys.path cannot fake it.
        code = ("import gptfast, gptfast.kernels.attention, gptfast.kernels.cross_entropy;"
                "from gptfast.ops import backends; print(gptfast.__file__); "
                "print(backends.report())")
        r = run_cmd([self.py, "-c", code], self.logs / "install.log", 60, self.env,
                    cwd=Path(tempfile.gettempdir()))
        if r["rc"] != 0 and not self.dry_run and "shadow" not in " ".join(notes):
            notes.append("import failed after pip -e: PYTHONPATH + shadow package")
            self.shadow_package()
            r = run_cmd([self.py, "-c", code], self.logs / "install.log", 60, self.env,
                        cwd=Path(tempfile.gettempdir()))
        return {"status": self.status_of(r), **r, "note": "; ".join(notes)}

    def shadow_package(self) -> None:
        """gptfast without installing: setup.py maps kernels/ to gptfast.kernels, so a plain
        PYTHONPATH is not enough; a folder whose gptfast/ holds symlinks to every entry of the
        source package plus kernels/ is."""
        shadow = self.work / "shadow" / "gptfast"
        shutil.rmtree(shadow.parent, ignore_errors=True)
        shadow.mkdir(parents=True)
        for entry in (REPO / "gptfast").iterdir():
            (shadow / entry.name).symlink_to(entry)
        if not (shadow / "kernels").exists():
            (shadow / "kernels").symlink_to(REPO / "kernels")
        self.add_pythonpath(shadow.parent)

    def build_stage(self, timeout: float) -> dict:
        sources = [p for p in (REPO / "csrc").rglob("*") if p.suffix in SOURCE_SUFFIXES]
        if not sources:
            return {"status": "skipped", "note": "csrc/ has no sources"}
        if self.dry_run:
            return {"status": "skipped", "note": f"dry run: {len(sources)} sources not built"}
        jobs = str(os.cpu_count() or 8)
        env_jobs = dict(self.env, MAX_JOBS=jobs)
        # The GPU tests compare the hardware with the CPU execution layer: build that too (g++,
        # torch.utils.cpp_extension), at the same time as nvcc builds the extension.
        sim_log = open(self.logs / "build-cuda-sim.log", "w")
        sim = subprocess.Popen([self.py, "-c", "from gptfast import cuda_sim; print(cuda_sim.load())"],
                               cwd=REPO, env=env_jobs, stdout=sim_log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        t0 = time.monotonic()
        if shutil.which("make"):
            cmd = ["make", "--no-print-directory", "build-cuda", f"BUILD_PY={self.py}",
                   f"MAX_JOBS={jobs}"]
        else:
            cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        r = run_cmd(cmd, self.logs / "build.log", timeout - 10, env_jobs)
        try:
            sim_rc = sim.wait(timeout=max(1.0, timeout - 5 - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            os.killpg(sim.pid, signal.SIGKILL)
            sim.wait()
            sim_rc = None
        sim_log.close()
        if self.results["stages"].get("install", {}).get("note", "").count("shadow"):
            self.shadow_package()      # pick up the freshly built gptfast/_C*.so
        v = run_cmd([self.py, "-c", "import gptfast._C as m; print(m.__file__)"],
                    self.logs / "build.log", 30, self.env, cwd=Path(tempfile.gettempdir()))
        sim_note = {0: "ok", None: "TIMED OUT"}.get(sim_rc, "FAILED")
        return {"status": self.status_of(r, v["rc"] == 0 and sim_rc == 0), **r,
                "note": f"{len(sources)} sources; import gptfast._C "
                        + ("ok" if v["rc"] == 0 else "FAILED") + f"; CPU layer {sim_note}"}

    def pytest_stage(self, timeout: float) -> dict:
        junit = self.work / "junit.xml"
        # -v writes one line per test as it finishes: if the stage is killed at its timeout
        # (first-time Triton compiles are slow) the junit file is never written, and the
        # counts come from those lines instead.
        r = self.python("pytest", ["-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                                   f"--junitxml={junit}", "tests"], timeout)
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed: List[str] = []
        if not junit.exists():
            for line in (self.logs / "pytest.log").read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) >= 2 and "::" in words[0]:
                    outcome = words[1]
                    counts["tests"] += outcome in ("PASSED", "FAILED", "ERROR", "SKIPPED")
                    counts["failures"] += outcome == "FAILED"
                    counts["errors"] += outcome == "ERROR"
                    counts["skipped"] += outcome == "SKIPPED"
                    if outcome in ("FAILED", "ERROR"):
                        failed.append(words[0])
        else:
            root = ET.parse(junit).getroot()
            for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
                for k in counts:
                    counts[k] += int(suite.get(k, 0))
            for case in root.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        self.results["pytest"] = {**counts, "failed": failed[:30]}
        ok = r["rc"] in (0, 5)         # 5: no test carries the gpu marker yet
        note = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                f"{counts['skipped']} skipped")
        return {"status": self.status_of(dict(r, rc=0 if ok else r["rc"])), **r, "note": note}

    def train_stage(self, timeout: float) -> dict:
        probe = self.work / "train_probe.json"
        args = [str(Path(__file__).resolve()), "--train-probe", str(probe),
                "--probe-device", "cpu" if self.dry_run else "cuda"]
        r = self.python("train", args, timeout)
        info = json.loads(probe.read_text()) if probe.exists() else {}
        self.results["train"] = info
        fused = info.get("fused_ops_ran")
        note = {True: "fused kernels launched inside the model",
                False: "fused kernels did NOT launch", None: "not judged (CPU)"}[fused]
        if info.get("summary"):
            note += f"; {info['summary'].get('tokens_per_s') or 0:,.0f} tokens/s"
        return {"status": self.status_of(r, fused is not False and bool(info)), **r,
                "note": note}

    def train_ddp_stage(self, timeout: float) -> dict:
        """`torchrun --nproc_per_node=1 -m gptfast train --parallel ddp`: the launch is
        detected, the process group made (NCCL on the GPU, gloo in the dry run) and the model
        wrapped in DDP; a few steps, rank 0 writes the checkpoint and log.json."""
        run = self.work / "train-ddp"
        cuda = not self.dry_run
        args = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
                "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=0",
                "-m", "gptfast", "train", "--parallel", "ddp",
                "--preset", "demo" if cuda else "tiny", "--steps", "20" if cuda else "4",
                "--batch-size", "16" if cuda else "4",
                "--max-bytes", "2000000" if cuda else "200000",
                "--eval-every", "0", "--eval-batches", "2", "--log-every", "5", "--warmup", "2",
                "--out", str(run), "--device", "cuda" if cuda else "cpu", "--no-progress",
                "--no-plot"] + ([] if cuda else ["--block-size", "64", "--threads", "1"])
        env = dict(self.env, GLOO_SOCKET_IFNAME="lo")
        r = run_cmd([self.py] + args, self.logs / "train-ddp.log", timeout, env)
        summary = {}
        if (run / "log.json").exists():
            summary = json.loads((run / "log.json").read_text()).get("summary", {})
        self.results["train_ddp"] = summary
        ok = (summary.get("parallel") == "ddp" and summary.get("world_size") == 1
              and summary.get("train_loss") is not None and (run / "ckpt.pt").exists())
        note = (f"{summary.get('tokens_per_s') or 0:,.0f} tokens/s, loss "
                f"{summary.get('train_loss') or float('nan'):.3f}" if summary else "no log.json")
        return {"status": self.status_of(r, ok), **r, "note": note}

    def tune_stage(self, timeout: float) -> dict:
        """The quick tuning run; on success the benchmarks after it read its table."""
        folder = self.work / "tune"
        folder.mkdir(exist_ok=True)
        table, report = folder / "attention_configs.json", folder / "report.json"
        # The script starts no new key after --budget; a key started just before takes ~20 s.
        args = [str(REPO / "benchmarks" / "tune_attention.py"), "--quick", "--out", str(table),
                "--report", str(report), "--budget", f"{max(5.0, timeout - 25):.0f}"]
        if self.dry_run:
            args += ["--dry-run", "--dims", "16", "--modes", "fwd", "--max-candidates", "2"]
        r = self.python("tune", args, timeout)
        info = json.loads(report.read_text()) if report.exists() else {}
        keys = info.get("keys", [])
        self.results["tune"] = {
            "seconds": info.get("seconds"), "dry_run": info.get("dry_run"),
            "keys": [{"key": k["key"], "best": (k.get("best") or {}).get("config"),
                      "ms": (k.get("best") or {}).get("ms"), "skipped": k.get("skipped")}
                     for k in keys]}
        ok = r.get("rc") == 0 and table.exists()
        if ok:
            self.env["GPTFAST_ATTENTION_CONFIGS"] = str(table)
        tuned = sum(1 for k in keys if k.get("entry"))
        note = (f"{tuned}/{len(keys)} keys tuned" + ("; the benchmarks use the tuned table"
                                                     if ok else "; benchmarks use the committed table"))
        return {"status": self.status_of(r, ok), **r, "note": note}

    def bench_stage(self, name: str, timeout: float) -> dict:
        script = REPO / "benchmarks" / f"bench_{name}.py"
        args = [str(script), "--quick", "--out", str(self.bench_dir)]
        if self.dry_run:
            args.append("--tiny")
        r = self.python(f"bench-{name}", args, timeout)
        rec = self.load_bench(self.bench_dir / f"{name}.json")
        return {"status": self.status_of(r, rec is not None), **r}

    def load_bench(self, path: Path) -> Optional[dict]:
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        self.results["benchmarks"][rec["benchmark"]] = rec
        return rec

    # -- results
    def judge(self) -> None:
        goals, missing = [], []
        for name in BENCHES:
            rec = self.results["benchmarks"].get(name)
            for g in (rec or {}).get("goals", []):
                goals.append(dict(g, benchmark=name))
            if self.dry_run:
                continue      # the CPU run has no GPU peers to require
            ok_rows = {r["peer"] for r in (rec or {}).get("rows", []) if not r.get("error")}
            for peer, wheel in REQUIRED[name]:
                if wheel and not self.results["peers_brought"].get(wheel):
                    continue
                if peer not in ok_rows:
                    why = next((m["reason"] for m in (rec or {}).get("missing_peers", [])
                                if m["peer"] == peer), "benchmark did not produce results"
                               if rec is None else "no successful row")
                    missing.append({"benchmark": name, "peer": peer, "reason": why})
        self.results["goals"] = goals
        self.results["missing_required"] = missing

    def save(self) -> None:
        self.judge()
        self.results["seconds"] = round(self.args.budget - (self.deadline - time.monotonic()), 1)
        tmp = self.out / ".results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        (self.out / "summary.md").write_text(self.summary_md())
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            # The peer wheels' install folder and the shadow package are inputs, not results.
            tar.add(self.work, arcname="gpu-check",
                    filter=lambda ti: None if ti.name.split("/")[1:2] in (["site"], ["shadow"])
                    else ti)

    def summary_md(self) -> str:
        r = self.results
        env = r.get("env", {})
        gpu = env.get("gpu", {}).get("name", "no GPU (dry run)")
        lines = [f"# gpu-check: {gpu}", "",
                 f"commit {r['git']['commit'][:12]}{' (dirty)' if r['git']['dirty'] else ''}, "
                 f"kernels {r['kernel_hash']}, torch {env.get('torch')}, triton "
                 f"{env.get('triton')}, nvcc {env.get('nvcc')}, {r['seconds']} s", "",
                 "| stage | status | seconds | note |", "|---|---|---|---|"]
        for name, s in r["stages"].items():
            lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | "
                         f"{s.get('note', '')} |")
        for name in BENCHES:
            rec = r["benchmarks"].get(name)
            md = self.bench_dir / f"{name}.md"
            if rec and md.exists():
                lines += ["", md.read_text()]
        lines += ["", goal_table(r["goals"]), ""]
        return "\n".join(lines)


# ---- the final table -------------------------------------------------------------------------

def fmt_ratio(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def goal_table(goals: List[dict]) -> str:
    lines = ["| goal | measured | target | state |", "|---|---|---|---|"]
    for g in goals:
        state = {True: "met", False: "MISS", None: "not judged"}[g["met"]]
        lines.append(f"| {g['name']}{' (stretch)' if g.get('stretch') else ''} | "
                     f"{fmt_ratio(g['measured_ratio'])} | {g['direction']} {g['target']} | "
                     f"{state} |")
    return "\n".join(lines)


def final_report(results: dict) -> int:
    """Print the stage line, the goal table and every miss, last; return the exit status."""
    stages = results["stages"]
    bad = [n for n, s in stages.items() if s["status"] in ("failed", "timeout")]
    print("\n== gpu-check " + ("(CPU dry run) " if results["dry_run"] else "") + "==")
    print("stages: " + ", ".join(f"{n} {s['status']}" for n, s in stages.items()))
    if "pytest" in results:
        p = results["pytest"]
        print(f"pytest -m gpu: {p['passed']} passed, {p['failures'] + p['errors']} failed, "
              f"{p['skipped']} skipped" + (f" ({', '.join(p['failed'][:5])})" if p["failed"] else ""))
    print(goal_table(results["goals"]))
    misses = [g for g in results["goals"] if g["met"] is False]
    for g in misses:
        print(f"MISS{' (stretch)' if g.get('stretch') else ''}: {g['name']}: measured "
              f"{fmt_ratio(g['measured_ratio'])}, target {g['direction']} {g['target']}"
              + (f" [{g['detail']}]" if g.get("detail") else ""))
    for m in results["missing_required"]:
        print(f"MISSING REQUIRED PEER: {m['benchmark']}: {m['peer']} ({m['reason']})")
    for n in bad:
        print(f"STAGE {stages[n]['status'].upper()}: {n} ({stages[n].get('note', '')})")
    if results["dry_run"]:
        print("CPU dry run: the GPU goals and required peers are not judged")
    elif not misses and not results["missing_required"] and not bad:
        print("no misses")
    return 1 if (bad or results["missing_required"]) else 0


# ---- the training probe (runs in its own process) ---------------------------------------------

def train_probe(path: Path, device: str) -> int:
    """Train the demo model briefly and count the kernel launches it made."""
    import torch

    import gptfast
    from gptfast.train import TrainConfig, train

    counters = {}
    for mod in ("attention", "cross_entropy"):
        try:
            counters[mod] = __import__(f"gptfast.kernels.{mod}", fromlist=["LAUNCHES"]).LAUNCHES
        except Exception as e:  # noqa: BLE001
            print(f"no launch counter for {mod}: {e}")
    # The CUDA C++ kernels count their op calls (gptfast._C.launch_counts()); "auto" picks them
    # over Triton where they support the inputs (linear cross-entropy in bf16, for one).
    cuda_ext = gptfast.ops.backends.cuda_extension()
    if getattr(cuda_ext, "launch_counts", None) is not None:
        counters["cuda"] = cuda_ext.launch_counts
    before = {m: dict(c() if callable(c) else c) for m, c in counters.items()}
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(1)   # a shared CPU: multi-threaded barriers cost whole quanta
    preset = "demo" if cuda else "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(preset=preset, steps=40 if cuda else 5, batch_size=16 if cuda else 4,
                          block_size=None if cuda else 64, max_bytes=2_000_000 if cuda else 200_000,
                          eval_every=0, eval_batches=2, log_every=10, out_dir=tmp, device=device,
                          progress=False, plot=False, warmup=5)
        summary = train(cfg)
    launches = {f"{m}.{k}": v - before[m].get(k, 0) for m, c in counters.items()
                for k, v in (c() if callable(c) else c).items()}
    # What the model's own calls decide, on its shapes (bf16 as under autocast on a GPU).
    from gptfast.model import get_config
    c = get_config(preset)
    dt = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(cfg.batch_size, c.n_head, c.block_size, c.head_size, device=device,
                    dtype=dt, requires_grad=True)
    h = torch.randn(cfg.batch_size * c.block_size, c.n_embd, device=device, dtype=dt,
                    requires_grad=True)
    w = torch.randn(c.vocab_size, c.n_embd, device=device, dtype=dt, requires_grad=True)
    t = torch.randint(0, c.vocab_size, (h.shape[0],), device=device)
    explain = {"attention": str(gptfast.explain(gptfast.attention, q, q, q)),
               "linear_cross_entropy": str(gptfast.explain(gptfast.linear_cross_entropy, h, w, t))}
    fused = None
    if cuda:
        fused = (launches.get("attention.attention_fwd", 0) > 0
                 and launches.get("attention.attention_bwd", 0) > 0
                 and (launches.get("cross_entropy.lce_fwd", 0) > 0
                      or launches.get("cuda.cuda_linear_cross_entropy_fwd", 0) > 0))
    info = {"preset": preset, "device": device, "summary": summary, "launches": launches,
            "explain": explain, "fused_ops_ran": fused}
    path.write_text(json.dumps(info, indent=1, default=str))
    print(json.dumps({"launches": launches, "fused_ops_ran": fused}))
    print("\n".join(explain.values()))
    return 0


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default $OUT, else gpu-check-out/)")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU path: no install or build, tiny benchmarks (automatic without CUDA)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole check (stage timeouts shrink to fit)")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every stage's own timeout (slower machines)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated stages to run (env,install,build,pytest,train,train-ddp,tune,bench or "
                        "bench-<name>); the others are reported as skipped")
    p.add_argument("--bench-results", default=None,
                   help="folder with <name>.json of benchmarks not run now (e.g. from a previous run)")
    p.add_argument("--train-probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-device", default="cuda", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.train_probe:
        return train_probe(Path(args.train_probe), args.probe_device)
    check = Check(args)
    print(f"[gpu-check] writing {check.out} (work folder {check.work})", flush=True)
    check.stage("env", check.env_stage)
    check.stage("install", check.install_stage)
    check.stage("build", check.build_stage)
    check.stage("pytest", check.pytest_stage)
    check.stage("train", check.train_stage)
    check.stage("train-ddp", check.train_ddp_stage)
    check.stage("tune", check.tune_stage)
    for name in BENCHES:
        check.stage(f"bench-{name}", lambda t, n=name: check.bench_stage(n, t))
        if check.results["stages"][f"bench-{name}"]["status"] == "skipped" and args.bench_results:
            check.load_bench(Path(args.bench_results) / f"{name}.json")
    check.save()
    shutil.rmtree(check.work, ignore_errors=True)
    return final_report(check.results)


if __name__ == "__main__":
    sys.exit(main())
