"""The benchmark scripts and `make gpu-check` (scripts/gpu_check.py), on the CPU.

The four scripts run in-process with tiny shapes (they are smoke tests here, never timed
tests); their JSON must carry the keys the README and gpu-check read. The goal logic is tested
on synthetic numbers. gpu_check.py runs its CPU dry run with a few stages.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

import bench_attention  # noqa: E402
import bench_cross_entropy  # noqa: E402
import bench_generate  # noqa: E402
import bench_train  # noqa: E402
import gpu_check  # noqa: E402
import harness  # noqa: E402

BENCH_MODULES = {"attention": bench_attention, "cross_entropy": bench_cross_entropy,
                 "train": bench_train, "generate": bench_generate}
RECORD_KEYS = {"benchmark", "device", "device_type", "device_slug", "versions", "git",
               "kernel_hash", "ceilings", "config", "rows", "goals", "missing_peers", "skipped",
               "plots", "timer", "quick", "tiny"}
GOAL_KEYS = {"name", "measured_ratio", "target", "met", "direction", "stretch"}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """Each script once, tiny, into one folder (the harness sets one CPU thread: restored)."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        for mod in BENCH_MODULES.values():
            assert mod.main(["--tiny", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("name", list(BENCH_MODULES))
def test_script_writes_json_table_and_plot(bench_dir, name):
    rec = json.loads((bench_dir / f"{name}.json").read_text())
    assert RECORD_KEYS <= set(rec)
    assert rec["benchmark"] == name and rec["device_slug"] == "cpu" and rec["tiny"]
    assert len(rec["kernel_hash"]) == 12 and "commit" in rec["git"]
    assert rec["ceilings"]["matmul_tflops"] > 0 and rec["ceilings"]["copy_TBps"] > 0
    assert rec["rows"], "no measurements"
    assert not [r for r in rec["rows"] if r.get("error")], "a peer failed on the CPU"
    for g in rec["goals"]:
        assert GOAL_KEYS <= set(g)
        assert g["met"] is None, "a CPU run never judges the GPU goals"
    for m in rec["missing_peers"]:
        assert m["peer"] and m["reason"]
    assert rec["plots"] and all((bench_dir / p).is_file() for p in rec["plots"])
    assert (bench_dir / f"{name}.md").read_text().count("|") > 10


def test_cpu_runs_record_gpu_peers_as_missing(bench_dir):
    att = json.loads((bench_dir / "attention.json").read_text())
    missing = {m["peer"] for m in att["missing_peers"]}
    assert {"sdpa-cudnn", "sdpa-efficient", "flex-compiled", "gptfast-cuda"} <= missing
    ce = json.loads((bench_dir / "cross_entropy.json").read_text())
    assert {"liger-fused-linear-ce", "cut-cross-entropy"} <= {m["peer"] for m in ce["missing_peers"]}
    peers = {r["peer"] for r in ce["rows"]}
    assert {"gptfast-lean", "gptfast-budget-384MiB", "eager-fp32-logits"} <= peers
    losses = [r["loss"] for r in ce["rows"]]
    assert max(losses) - min(losses) < 1e-3, "the peers compute different losses"


def test_train_baseline_matches_gptfast_size(bench_dir):
    rows = json.loads((bench_dir / "train.json").read_text())["rows"]
    assert len({r["params"] for r in rows}) == 1


# ---- goal logic on synthetic numbers ---------------------------------------------------------

def test_goal_directions_and_missing():
    assert harness.goal("a", 1.3, 1.2)["met"] is True
    assert harness.goal("a", 1.1, 1.2)["met"] is False
    assert harness.goal("m", 0.9, 1.0, direction="<=")["met"] is True
    assert harness.goal("m", 1.0, 1.0, direction="<")["met"] is False
    assert harness.goal("a", None, 1.2)["met"] is None
    assert harness.goal("a", 2.0, 1.2, judged=False)["met"] is None
    assert harness.worst([1.5, 1.1, 1.3]) == 1.1
    assert harness.worst([0.4, 0.7], "<=") == 0.7
    assert harness.worst([1.5, None]) is None        # never judged on part of its points
    assert harness.ratio(3.0, 0) is None and harness.ratio(None, 1.0) is None


def _att(peer, d, S, fwd, bwd):
    return dict(peer=peer, d=d, S=S, fwd_tflops=fwd, bwd_tflops=bwd)


def test_attention_goals():
    rows = []
    for S, ours, det, flash, cudnn in [(1024, (220, 180), (None, 150), (200, 150), (330, 250)),
                                       (4096, (400, 300), (None, 250), (300, 250), (420, 370))]:
        rows += [_att("gptfast", 128, S, *ours), _att("gptfast-deterministic", 128, S, *det),
                 _att("sdpa-flash", 128, S, *flash), _att("sdpa-cudnn", 128, S, *cudnn)]
    goals = {g["name"]: g for g in bench_attention.attention_goals(rows)}
    g = goals["attn fwd vs SDPA flash, S>=2k, d=128"]
    assert g["measured_ratio"] == pytest.approx(400 / 300) and g["met"] is True
    assert goals["attn fwd vs SDPA flash, S<2k, d=128"]["measured_ratio"] == pytest.approx(1.1)
    g = goals["attn bwd vs SDPA flash, d=128"]       # worst S: 1.2 at 1k, 1.2 at 4k
    assert g["measured_ratio"] == pytest.approx(1.2) and g["met"] is True
    g = goals["attn deterministic bwd vs SDPA flash, d=128"]
    assert g["measured_ratio"] == pytest.approx(1.0) and g["met"] is True
    g = goals["attn fwd vs SDPA cuDNN, d=128"]
    assert g["stretch"] and g["met"] is False and g["measured_ratio"] == pytest.approx(220 / 330)
    # the CUDA C++ kernels against FA2 at S >= 2k only; unjudged without their rows
    assert goals["attn CUDA C++ fwd vs SDPA flash, S>=2k, d=128"]["met"] is None
    cuda = rows + [_att("gptfast-cuda", 128, 1024, 10, 10), _att("gptfast-cuda", 128, 4096, 310, 240)]
    g = {g["name"]: g for g in bench_attention.attention_goals(cuda)}
    assert g["attn CUDA C++ fwd vs SDPA flash, S>=2k, d=128"]["met"] is True
    g = g["attn CUDA C++ bwd vs SDPA flash, S>=2k, d=128"]
    assert g["measured_ratio"] == pytest.approx(240 / 250) and g["met"] is False
    # a missing peer leaves the goal unjudged, never met
    no_flash = [r for r in rows if r["peer"] != "sdpa-flash"]
    g = {g["name"]: g for g in bench_attention.attention_goals(no_flash)}
    assert g["attn bwd vs SDPA flash, d=128"]["met"] is None


def _ce(peer, shape, ms, mem, grad=100 * harness.MiB):
    return dict(peer=peer, shape=shape, ms=ms, peak_mem_bytes=mem, grad_bytes=grad)


def test_cross_entropy_goals():
    M = harness.MiB
    rows = [_ce("gptfast-lean", "a", 10.0, 150 * M), _ce("cut-cross-entropy", "a", 11.0, 100 * M),
            _ce("gptfast-budget-384MiB", "a", 8.0, 1000 * M), _ce("torch.compile", "a", 9.0, 3000 * M),
            _ce("gptfast-lean", "b", 40.0, 180 * M), _ce("cut-cross-entropy", "b", 50.0, 100 * M),
            _ce("gptfast-budget-384MiB", "b", 41.0, 1600 * M), _ce("torch.compile", "b", 40.0, 3000 * M)]
    g = {g["name"]: g for g in bench_cross_entropy.cross_entropy_goals(rows)}
    mem = g["lce lean peak memory / (gradients + 64 MiB)"]
    assert mem["measured_ratio"] == pytest.approx(180 / 164) and mem["met"] is False
    speed = g["lce lean speed vs Cut CE (time ratio)"]
    assert speed["measured_ratio"] == pytest.approx(1.1) and speed["met"] is True
    vs_compile = g["lce budget(384 MiB) speed vs torch.compile"]
    assert vs_compile["measured_ratio"] == pytest.approx(40 / 41) and vs_compile["met"] is False
    half = g["lce budget(384 MiB) memory / torch.compile memory"]
    assert half["measured_ratio"] == pytest.approx(1600 / 3000) and half["met"] is False


def test_train_goals():
    rows = [dict(peer="gptfast compiled", tokens_per_s=700e3, peak_mem_bytes=6e9),
            dict(peer="sdpa-full-logits compiled", tokens_per_s=520e3, peak_mem_bytes=8e9)]
    speed, mem = bench_train.train_goals(rows)
    assert speed["measured_ratio"] == pytest.approx(700 / 520) and speed["met"] is True
    assert mem["measured_ratio"] == pytest.approx(0.75) and mem["met"] is True


# ---- gpu_check --------------------------------------------------------------------------------

def test_gpu_check_final_report_exit_status(capsys):
    goal = harness.goal("x", 0.5, 1.0)
    base = dict(dry_run=False, goals=[goal], missing_required=[],
                stages={"env": {"status": "ok"}})
    assert gpu_check.final_report(base) == 0                      # a goal miss is reported
    assert "MISS: x" in capsys.readouterr().out
    missing = dict(base, missing_required=[{"benchmark": "attention", "peer": "sdpa-cudnn",
                                            "reason": "no successful row"}])
    assert gpu_check.final_report(missing) == 1                   # a missing peer fails
    failed = dict(base, stages={"pytest": {"status": "failed", "note": "2 failed"}})
    assert gpu_check.final_report(failed) == 1


def test_gpu_check_dry_run(bench_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out),
         "--only", "env,install,train,tune,bench-generate", "--bench-results", str(bench_dir)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] and res["kernel_hash"] and res["git"]["commit"]
    assert res["stages"]["train"]["status"] == "ok" and res["train"]["explain"]
    assert res["stages"]["pytest"]["status"] == "skipped"
    assert res["stages"]["tune"]["status"] == "ok", res["stages"]["tune"]
    assert res["tune"]["dry_run"] and res["tune"]["keys"][0]["best"]["BLOCK_M"] >= 16
    assert set(res["benchmarks"]) == set(BENCH_MODULES)       # 3 loaded, generate run now
    assert any(g["benchmark"] == "cross_entropy" for g in res["goals"])
    assert res["missing_required"] == []                        # not required on the CPU
    last = proc.stdout[proc.stdout.rindex("== gpu-check"):]           # the table comes last
    assert last.index("stages:") < last.index("| goal |")


# ---- the CPU path benchmark (bench_cpu.py) ------------------------------------------------------

def test_bench_cpu_tiny_run(tmp_path):
    import bench_cpu
    threads = torch.get_num_threads()
    try:
        assert bench_cpu.main(["--tiny", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rec = json.loads((tmp_path / "cpu.json").read_text())
    assert RECORD_KEYS <= set(rec) and rec["benchmark"] == "cpu" and rec["device_slug"] == "cpu"
    assert "thread CPU time" in rec["timer"]
    assert not [r for r in rec["rows"] if r["error"]]
    cases = {r["case"] for r in rec["rows"]}
    assert len(cases) == 5 and all(r["cpu_ms"] > 0 for r in rec["rows"])
    lce = [r for r in rec["rows"] if r["case"].startswith("linear CE")]
    assert all(r["peak_mem_bytes"] > 0 for r in lce)
    assert [g["met"] for g in rec["goals"]] == [None] * 3      # tiny shapes judge nothing
    assert (tmp_path / "cpu_path.png").is_file()


def test_bench_cpu_goals():
    import bench_cpu
    G, S, E = bench_cpu.GPTFAST, bench_cpu.SDPA, bench_cpu.EAGER
    rows = [dict(case="a", peer=G, cpu_ms=105.0, peak_mem_bytes=None),
            dict(case="a", peer=S, cpu_ms=100.0, peak_mem_bytes=None),
            dict(case="l", peer=G, cpu_ms=130.0, peak_mem_bytes=30),
            dict(case="l", peer=E, cpu_ms=100.0, peak_mem_bytes=100)]
    att, t, mem = bench_cpu.cpu_goals(rows, "a", "l")
    assert att["measured_ratio"] == pytest.approx(1.05) and att["met"] is True
    assert t["measured_ratio"] == pytest.approx(1.3) and t["met"] is False
    assert mem["measured_ratio"] == pytest.approx(0.3) and mem["met"] is True
    assert bench_cpu.cpu_goals(rows[:1], "a", "l")[0]["met"] is None   # a missing peer


def test_default_output_folder(monkeypatch, tmp_path):
    assert harness.default_out_dir("cpu") == REPO / "benchmarks" / "results" / "cpu"
    monkeypatch.setattr(harness, "REPO", tmp_path / "site-packages" / "gptfast")  # installed
    monkeypatch.chdir(tmp_path)
    assert harness.default_out_dir("nvidia-h200") == tmp_path / "gptfast-bench" / "nvidia-h200"


def test_dw_accumulation_microbenchmark_rows(monkeypatch):
    """The GPU-only microbenchmark, run here on a tiny shape under the Triton interpreter:
    one row per dW accumulation, each with a time, a memory peak and dW's difference from the
    fp32 accumulation (bf16 rounding, not a wrong sum)."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")

    class Run:  # the harness calls the function makes
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ceilings = {"matmul_tflops": 1.0}
        rows = []

        def time_ms(self, fn):
            return harness.time_ms(fn, self.device, quick=True)

        def peak_bytes(self, fn):
            return 0

        def add_row(self, **row):
            self.rows.append(row)
            return row

        def empty_cache(self):
            pass
    rows = bench_cross_entropy.dw_accumulation_rows(Run(), torch.bfloat16,
                                                    shapes=[("tiny", 96, 32, 160)])
    assert [r["peer"].split(": ")[1] for r in rows] == list(bench_cross_entropy.DW_MODES.values())
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["kind"] == "dw_accumulation"
    assert rows[0]["dw_max_diff_vs_fp32"] is None
    for r in rows[1:]:
        assert 0 <= r["dw_max_diff_vs_fp32"] < 2.0 ** -6
    text = bench_cross_entropy.table(rows)
    assert "dW accumulation of the lean backward" in text


# ---- the attention tuning command (tune_attention.py) -----------------------------------------

def test_tune_attention_candidates():
    """The list a GPU run times per key: the committed config first, only kept configs, at most
    `limit`, the TMA form of the committed tiles (where kept) and a warp-specialized forward
    among them."""
    from gptfast.kernels import attention as A
    from gptfast.kernels import configs as C
    table = C.load("attention")
    H100 = C.Target((9, 0), 132)
    for kind, feats in (("fwd", ("causal",)), ("bwd", ("causal",)),
                        ("bwd", ("causal", "deterministic"))):
        committed = table.lookup(table.key(kind, H100, torch.bfloat16, 128, feats, (4096, 4096)))
        cands = A.tuning_candidates(kind, 128, torch.bfloat16, (9, 0), feats, committed, limit=5)
        assert 2 <= len(cands) <= 5 and len(set(cands)) == len(cands)
        assert cands[0] == A.Config(**{f: int(committed.kwargs().get(f, 0))
                                       for f in A.Config._fields})
        # The TMA form of the committed tiles next, except for the atomic backward at d=128
        # (it spills there in every config tried: keep() drops it).
        tma = cands[0]._replace(USE_TMA=1)
        if kind == "bwd" and "deterministic" not in feats:
            assert not any(c.USE_TMA for c in cands)
        else:
            assert cands[1] == tma
        assert all(A.keep(c, kind, 128, 2, (9, 0), feats) for c in cands[1:])
        assert any(c.WARP_SPECIALIZE for c in cands) == (kind == "fwd")


def test_tune_attention_dry_run(tmp_path):
    """The whole pipeline on the CPU (Triton interpreter, tiny shape, sm_90 candidates): every
    key gets an exact entry from a candidate that matched the committed config's results, the
    written table validates and keeps every committed entry, the committed file is untouched."""
    from gptfast.kernels import configs as C
    committed = (REPO / "kernels" / "attention_configs.json").read_text()
    out, report = tmp_path / "tuned.json", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tune_attention.py"), "--dry-run", "--dims", "16",
         "--modes", "fwd", "bwd-det", "--max-candidates", "2", "--out", str(out),
         "--report", str(report)], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (REPO / "kernels" / "attention_configs.json").read_text() == committed
    rep = json.loads(report.read_text())
    assert rep["dry_run"] and len(rep["keys"]) == 2
    for rec in rep["keys"]:
        assert len(rec["candidates"]) == 2 and rec["best"]["ms"] > 0
        assert all(c["ms"] is not None for c in rec["candidates"]), rec["candidates"]
    data = json.loads(out.read_text())
    assert C.Table("tuned", data).validate() == []
    old = json.loads(committed)["entries"]
    assert all(e in data["entries"] for e in old)
    new = [e for e in data["entries"] if e not in old]
    assert len(new) == 2 and all(e["exact"] and e["arch"] == "sm_90" and e["dim"] == [16]
                                 for e in new)
    assert sorted(e["kind"] for e in new) == ["bwd", "fwd"]
    det = next(e for e in new if e["kind"] == "bwd")
    assert det["features"] == ["causal", "deterministic"]


def test_tune_attention_rejects_wrong_results_and_merges():
    import tune_attention as T
    a = torch.randn(3, 5, dtype=torch.float64)
    assert T._close((a, a, a), (a, a, a), torch.float32) is None
    assert "max |diff|" in T._close((a, a + 1e-2, a), (a, a, a), torch.float32)
    bad = a.clone()
    bad[1, 2] = float("nan")
    assert "non-finite" in T._close((bad, a), (a, a), torch.bfloat16)
    data = {"entries": [{"kind": "fwd", "arch": "default", "dim": [64], "why": "d"},
                        {"kind": "fwd", "arch": "sm_90", "dim": [64], "exact": True, "why": "old"}]}
    e = {"kind": "fwd", "arch": "sm_90", "dim": [64], "exact": True, "why": "new"}
    got = T.merge(data, [e])
    assert got["entries"] == [data["entries"][0], e]          # the old exact entry replaced
    got = T.merge(data, [dict(e, arch="sm_100")])              # a new arch: defaults copied first
    assert [x["arch"] for x in got["entries"]] == ["default", "sm_90", "sm_100", "sm_100"]
    assert data["entries"][1]["why"] == "old"                  # the input is not modified
