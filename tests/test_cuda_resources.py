"""The committed resource table of the CUDA kernels (benchmarks/results/static/cuda_resources.*)
is current: every kernel of csrc/ compiled now for sm_80 and sm_90a appears in it with the same
dynamic shared memory (and, with the same nvcc, the same registers), and nothing spills."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "benchmarks" / "results" / "static" / "cuda_resources.json"

# In the cuda_sim suite: the launch table comes from the CPU layer (compiled on first use).
pytestmark = pytest.mark.cuda_sim


def key(r):
    return (r["source"], r["function"], r["dtype"], r["arch"])


def test_resource_table_is_current_and_nothing_spills(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "cuda_resources.py"), "--check",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    now = json.loads((tmp_path / "cuda_resources.json").read_text())
    committed = json.loads(COMMITTED.read_text())
    fresh = {key(r): r for r in now["kernels"]}
    old = {key(r): r for r in committed["kernels"]}
    assert set(fresh) == set(old), "regenerate: python scripts/cuda_resources.py"
    for k, r in fresh.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, k
        assert r["dynamic_smem"] == old[k]["dynamic_smem"], k
        if now["nvcc"] == committed["nvcc"]:
            assert r["registers"] == old[k]["registers"], (k, "regenerate the table")
    # every __global__ function of the GPU build is in the table
    globals_ = set()
    for cu in (REPO / "csrc").rglob("*.cu"):
        if "sim" in cu.relative_to(REPO / "csrc").parts:
            continue
        globals_ |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)",
                                   cu.read_text()))
    assert globals_ == {r["function"] for r in now["kernels"]}
