"""Where numbers come from, without importing torch: the git commit and a hash of the kernel
sources. Used by the benchmark harness, scripts/gpu_check.py and benchmarks/render_readme.py,
so a results file can be matched against the kernels in a later tree."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_DIRS = ("kernels", "csrc")
_SKIP_SUFFIXES = (".pyc", ".so", ".o", ".pyd")


def kernel_hash(root: Path = REPO) -> str:
    """sha256 (12 hex digits) over the relative path and contents of every source file under
    kernels/ and csrc/ (build products and caches left out)."""
    h = hashlib.sha256()
    for top in KERNEL_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root).as_posix()
            parts = set(rel.split("/"))
            if (not path.is_file() or parts & {"__pycache__", "build"}
                    or path.suffix in _SKIP_SUFFIXES):
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_info(root: Path = REPO) -> dict:
    """Commit and whether tracked files differ from it (read-only git calls). Without git (a
    copied tree) the commit is GPTFAST_COMMIT or 'unknown'."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10)
    try:
        if not (root / ".git").exists():  # an installed copy (site-packages may sit in a repo)
            raise OSError("not a git checkout")
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            raise OSError(head.stderr.strip())
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("GPTFAST_COMMIT", "unknown"), "dirty": None}
