"""Building gptfast._C never blocks an install: setup.py skips the CUDA extension with one line when
asked (GPTFAST_SKIP_CUDA_BUILD=1) or when there is no nvcc, and otherwise builds csrc/ for the
configured architectures. `make gpu-check` budgets its stages so that everything after the build
fits in five minutes."""
import ast
import os
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def setup_functions(**overrides):
    """setup.py's module-level definitions, without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                  for t in n.targets))]
    ns = {"__file__": str(REPO / "setup.py")}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    ns.update(overrides)
    return ns


def test_skip_on_request_prints_one_line():
    env = dict(os.environ, GPTFAST_SKIP_CUDA_BUILD="1")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("gptfast:")]
    assert lines == ["gptfast: GPTFAST_SKIP_CUDA_BUILD=1: not building the CUDA extension gptfast._C"]
    assert "0.1.0" in proc.stdout


def test_no_nvcc_skips_with_one_line(capsys, monkeypatch):
    for var in ("CUDA_HOME", "CUDA_PATH", "GPTFAST_SKIP_CUDA_BUILD"):
        monkeypatch.delenv(var, raising=False)
    ns = setup_functions(shutil=types.SimpleNamespace(which=lambda name: None),
                         CUDA_FALLBACKS=[])
    assert ns["cuda_extension"]() == ([], {})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "nvcc not found" in out[0]


def test_extension_lists_every_kernel_source_and_the_archs(monkeypatch):
    if setup_functions()["_cuda_home"]() is None:
        import pytest
        pytest.fail("nvcc is expected on this machine (see DEVELOPERS.md)")
    monkeypatch.setenv("GPTFAST_CUDA_ARCHS", "80;90a")
    monkeypatch.delenv("GPTFAST_SKIP_CUDA_BUILD", raising=False)
    (ext,), cmdclass = setup_functions()["cuda_extension"]()
    assert ext.name == "gptfast._C" and "build_ext" in cmdclass
    assert "csrc/binding.cpp" in ext.sources
    assert {"csrc/cross_entropy/cross_entropy.cu", "csrc/cross_entropy/linear_cross_entropy.cu"} \
        <= set(ext.sources)
    assert not any("/sim/" in s for s in ext.sources)   # the CPU layer's own kernels stay out
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc


def test_gpu_check_budgets_fit_a_build_and_five_minutes():
    import gpu_check
    names = [s[0] for s in gpu_check.STAGES]
    after_build = gpu_check.STAGES[names.index("build") + 1:]
    assert sum(own for _, own, _ in after_build) <= 300
    own = dict((n, t) for n, t, _ in gpu_check.STAGES)
    assert own["build"] >= 120
    assert gpu_check.parse_args([]).budget >= own["env"] + own["install"] + own["build"]


def test_cpu_layer_without_toolkit_headers_fails_loudly(monkeypatch, tmp_path):
    """No CUDA headers: the layer raises (and backend="cuda" says why); tests never skip."""
    import pytest
    import torch

    import gptfast
    from gptfast import cuda_sim
    from gptfast.ops import backends
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda_sim, "FALLBACK_INCLUDES", [])
    with pytest.raises(RuntimeError, match="needs the CUDA toolkit's headers"):
        cuda_sim.cuda_include_dir()

    def broken():
        raise RuntimeError("the CUDA sim layer needs the CUDA toolkit's headers (test)")
    monkeypatch.setattr(cuda_sim, "load", broken)
    monkeypatch.setattr(backends, "_cuda_sim_module", None)
    monkeypatch.setattr(backends, "_CUDA_SIM", True)
    monkeypatch.setattr(backends, "_DECISIONS", {})
    x, t = torch.randn(3, 10), torch.randint(0, 10, (3,))
    with pytest.raises(gptfast.BackendError, match="failed to build or load.*headers"):
        gptfast.cross_entropy(x, t, backend="cuda")
