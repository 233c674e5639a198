"""Launch configurations of the Triton kernels: JSON tables beside the kernels, and the one key
that the committed tables, the autotuner and the static table (scripts/static_table.py) share.

    attention_configs.json      kinds fwd, bwd_kv, bwd_q, bwd_pre                (attention.py)
    cross_entropy_configs.json  kinds ce_fwd, ce_bwd, lce_fwd, lce_bwd, gemm  (cross_entropy.py)

The key
-------
    ConfigKey(kind, arch, dtype, dim, features, lengths)
      kind      the kernel of the module the config is for ("fwd", "lce_bwd", ...)
      arch      "sm_90", "sm_80", ...: the compute capability of the GPU that runs the launch
      dtype     "fp16" | "bf16" | "fp32": the input dtype (tensor-core tiles or FMA tiles)
      dim       a power-of-two bucket of the kind's width: the padded head dim for attention
                (d=96 -> 128), the hidden size for the linear cross-entropy; None for kinds
                without one
      features  sorted names of the optional features that are on ("causal", "dropout", ...).
                Each is a constexpr of the kernel, so each changes the compiled code and its
                register pressure: a config that is right without a feature can spill with it.
      lengths   power-of-two buckets (next_power_of_2) of the lengths the kind declares
                (attention: Sq, Sk; linear CE: rows). A decoding step with one more key stays
                in its bucket: the autotuner keyed on this does not re-tune per step.

A table entry
-------------
    {"kind": "fwd", "arch": "sm_90", "dtype": ["fp16", "bf16"], "dim": [64],
     "features": ["dropout"], "lengths": {"seqlen_q": 1},
     "config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}, "why": "..."}
kind, arch, dtype, dim (null for kinds without a dim) and config are required; features,
lengths and exact are optional. An entry matches a key when kind, arch, dtype and dim match,
every feature it names is on (an entry for ["dropout"] applies whenever dropout is on, with or
without other features) and every length bucket it names is the key's; an entry with
"exact": true (what a tuning run writes: it measured one key) matches only keys whose features
are exactly its own. Among the matches the most specific wins: exact entries first, then more
features, then more length buckets. A key whose arch has no entries of its kind uses the
"default" arch's. `validate` proves that every key has exactly one best match (run by the unit
tests and by scripts/static_table.py); loading checks the schema.

A kind's "params" are required in every config; its "flags" (0 or 1, e.g. USE_TMA) are
optional and default to 0.

`interpreter` holds the small configs used under TRITON_INTERPRET=1 (CPU speed), per kind.
The environment variable GPTFAST_<NAME>_CONFIGS (e.g. GPTFAST_ATTENTION_CONFIGS) points a
process at another table file (a tuning run's output) instead of the committed one.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

_HERE = Path(__file__).resolve().parent
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")

# Largest shared memory a block may use (the opt-in limit, cudaDevAttrMaxSharedMemoryPerBlockOptin),
# per arch; Triton refuses to launch a kernel that needs more. sm_86/sm_89 parts have 99 KiB.
ARCH_SHARED_MEMORY = {"sm_90": 227 * 1024, "sm_80": 163 * 1024, "sm_86": 99 * 1024,
                      "sm_89": 99 * 1024}
DEFAULT_SHARED_MEMORY = 99 * 1024


def arch_name(capability: Tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def shared_memory_limit(arch: str) -> int:
    return ARCH_SHARED_MEMORY.get(arch, DEFAULT_SHARED_MEMORY)


def length_bucket(n: int) -> int:
    """The power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# ============================================================================================
# Where a launch runs
# ============================================================================================


class Target(NamedTuple):
    """The GPU a launch is compiled for: what the launchers need to pick configs and grids."""
    capability: Tuple[int, int]
    num_sms: int

    @property
    def arch(self) -> str:
        return arch_name(self.capability)


_COMPILE_TARGET: Optional[Target] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    p = torch.cuda.get_device_properties(index)
    return Target((p.major, p.minor), p.multi_processor_count)


def launch_target(device: torch.device) -> Optional[Target]:
    """The GPU a launch on `device` compiles for; None under the interpreter (small configs)."""
    if _COMPILE_TARGET is not None:
        return _COMPILE_TARGET
    if interpreting() or device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def compile_target(target: Target) -> Iterator[None]:
    """Within the block, every launcher picks the configs and grids of `target` whatever its
    tensors' device. For compiling without a GPU (scripts/static_table.py): the tensors are
    meta tensors and the kernels are compiled, never run."""
    global _COMPILE_TARGET
    before, _COMPILE_TARGET = _COMPILE_TARGET, target
    try:
        yield
    finally:
        _COMPILE_TARGET = before


# ============================================================================================
# Key and config
# ============================================================================================


class ConfigKey(NamedTuple):
    kind: str
    arch: str
    dtype: str
    dim: Optional[int]
    features: Tuple[str, ...]
    lengths: Tuple[int, ...]

    def describe(self) -> str:
        lens = "x".join(str(n) for n in self.lengths) or "-"
        return (f"{self.kind} {self.arch} {self.dtype} dim={self.dim} "
                f"[{'+'.join(self.features) or '-'}] len={lens}")


class KernelConfig:
    """Block sizes (constexprs of the kernel) plus num_warps / num_stages. Read-only;
    `cfg.BLOCK_M`, `cfg.num_warps`, `cfg.blocks()` (constexprs only), `cfg.kwargs()` (all)."""
    __slots__ = ("_params",)

    def __init__(self, params: Mapping[str, int]):
        object.__setattr__(self, "_params", dict(params))

    def __getattr__(self, name: str) -> int:
        try:
            return self._params[name]
        except KeyError:
            raise AttributeError(f"config has no {name!r} (it has {sorted(self._params)})") from None

    def __setattr__(self, name, value):
        raise AttributeError("KernelConfig is read-only")

    def kwargs(self) -> Dict[str, int]:
        return dict(self._params)

    def blocks(self) -> Dict[str, int]:
        return {k: v for k, v in self._params.items() if k not in LAUNCH_OPTIONS}

    def __eq__(self, other):
        return isinstance(other, KernelConfig) and self._params == other._params

    def __hash__(self):
        return hash(tuple(sorted(self._params.items())))

    def __repr__(self):
        return "KernelConfig(" + ", ".join(f"{k}={v}" for k, v in self._params.items()) + ")"


class Entry(NamedTuple):
    kind: str
    arch: str
    dtypes: Tuple[str, ...]
    dims: Optional[Tuple[int, ...]]
    features: Tuple[str, ...]
    lengths: Tuple[Tuple[int, int], ...]  # (index into the kind's lengths, bucket)
    config: KernelConfig
    why: str
    exact: bool = False  # matches only keys with exactly these features (a tuned entry)

    def matches(self, key: ConfigKey) -> bool:
        features_match = (set(self.features) == set(key.features) if self.exact
                          else set(self.features) <= set(key.features))
        return (key.dtype in self.dtypes
                and (self.dims is None or key.dim in self.dims)
                and features_match
                and all(key.lengths[i] == b for i, b in self.lengths))

    def score(self) -> Tuple[int, int, int]:
        return int(self.exact), len(self.features), len(self.lengths)


class KindSpec(NamedTuple):
    kernel: str                 # the @triton.jit function the kind configures
    params: Tuple[str, ...]     # every config has exactly these (required ones, then flags)
    features: Tuple[str, ...]   # optional features the key may carry
    lengths: Tuple[str, ...]    # names of the length buckets in the key
    dims: Optional[Tuple[int, ...]]  # the dim buckets the kernels support (None: no dim)
    defaults: Dict[str, int] = {}    # the flags: optional in an entry, 0 when absent


class ConfigError(ValueError):
    pass


class Table:
    """One module's configurations (a parsed JSON file)."""

    def __init__(self, name: str, data: dict):
        self.name = name
        self.data = data
        self.kinds: Dict[str, KindSpec] = {}
        self.interpreter: Dict[str, KernelConfig] = {}
        self.entries: List[Entry] = []
        self._parse()

    # -- loading ----------------------------------------------------------------------------

    def _err(self, where: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.name}: {where}: {msg}")

    def _config(self, where: str, kind: str, raw) -> KernelConfig:
        spec = self.kinds[kind]
        required = [p for p in spec.params if p not in spec.defaults]
        if (not isinstance(raw, dict) or not set(required) <= set(raw)
                or not set(raw) <= set(spec.params)):
            flags = f" (optional flags: {list(spec.defaults)})" if spec.defaults else ""
            raise self._err(where, f"config must have exactly {required}{flags}, got {raw!r}")
        for k, v in raw.items():
            if k in spec.defaults:
                if v not in (0, 1) or isinstance(v, bool):
                    raise self._err(where, f"flag {k} must be 0 or 1, got {v!r}")
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise self._err(where, f"{k} must be a positive int, got {v!r}")
            if k.startswith("BLOCK_") and v & (v - 1):
                raise self._err(where, f"{k}={v} is not a power of two")
        return KernelConfig({p: raw.get(p, spec.defaults.get(p)) for p in spec.params})

    def _parse(self):
        d = self.data
        for k in ("kinds", "interpreter", "entries"):
            if k not in d:
                raise self._err("top level", f"missing {k!r}")
        for kind, s in d["kinds"].items():
            try:
                flags = tuple(s.get("flags", ()))
                self.kinds[kind] = KindSpec(
                    s["kernel"], tuple(s["params"]) + flags, tuple(s.get("features", ())),
                    tuple(s.get("lengths", ())),
                    tuple(s["dims"]) if s.get("dims") is not None else None,
                    {f: 0 for f in flags})
            except (KeyError, TypeError) as e:
                raise self._err(f"kind {kind}", f"bad spec ({e})") from None
        for kind, raw in d["interpreter"].items():
            if kind not in self.kinds:
                raise self._err("interpreter", f"unknown kind {kind!r}")
            self.interpreter[kind] = self._config(f"interpreter.{kind}", kind, raw)
        missing = set(self.kinds) - set(self.interpreter)
        if missing:
            raise self._err("interpreter", f"no config for {sorted(missing)}")
        known = {"kind", "arch", "dtype", "dim", "features", "lengths", "config", "why",
                 "exact"}
        for i, e in enumerate(d["entries"]):
            where = f"entry {i}"
            if not isinstance(e, dict) or set(e) - known:
                raise self._err(where, f"unknown fields {sorted(set(e) - known)}")
            kind = e.get("kind")
            if kind not in self.kinds:
                raise self._err(where, f"unknown kind {kind!r}")
            spec = self.kinds[kind]
            dtypes = e.get("dtype")
            dtypes = [dtypes] if isinstance(dtypes, str) else dtypes
            if not dtypes or not set(dtypes) <= set(DTYPE_NAMES.values()):
                raise self._err(where, f"dtype must name some of {sorted(DTYPE_NAMES.values())}")
            if "dim" not in e:
                raise self._err(where, "dim is required (null for kinds without a dim)")
            dims = e["dim"]
            dims = [dims] if isinstance(dims, int) else dims
            if spec.dims is None:
                if dims is not None:
                    raise self._err(where, f"kind {kind} has no dim")
            elif dims is not None and not set(dims) <= set(spec.dims):
                raise self._err(where, f"dim must be among {list(spec.dims)} (or null: all)")
            feats = tuple(sorted(e.get("features", ())))
            if not set(feats) <= set(spec.features):
                raise self._err(where, f"unknown features {sorted(set(feats) - set(spec.features))}"
                                f" for {kind} (known: {list(spec.features)})")
            lens = []
            for name, b in (e.get("lengths") or {}).items():
                if name not in spec.lengths:
                    raise self._err(where, f"{kind} has no length {name!r} ({list(spec.lengths)})")
                if not isinstance(b, int) or b < 1 or b & (b - 1):
                    raise self._err(where, f"length bucket {name}={b!r} is not a power of two")
                lens.append((spec.lengths.index(name), b))
            if not isinstance(e.get("arch"), str):
                raise self._err(where, "arch must be a string ('sm_90', 'default', ...)")
            if not isinstance(e.get("exact", False), bool):
                raise self._err(where, "exact must be true or false")
            self.entries.append(Entry(
                kind, e["arch"], tuple(dtypes), tuple(dims) if dims is not None else None, feats,
                tuple(sorted(lens)), self._config(where, kind, e.get("config")), e.get("why", ""),
                e.get("exact", False)))

    # -- lookup -----------------------------------------------------------------------------

    def key(self, kind: str, target: Target, dtype: torch.dtype, dim: Optional[int],
            features: Iterable[str], lengths: Sequence[int] = ()) -> ConfigKey:
        """The key of a launch. `features`: names of the optional features that are on;
        `lengths`: the kind's lengths in its declared order (bucketed here)."""
        spec = self.kinds[kind]
        feats = tuple(sorted(set(features)))
        unknown = set(feats) - set(spec.features)
        if unknown:
            raise ConfigError(f"{self.name}: {kind} has no features {sorted(unknown)}")
        if len(lengths) != len(spec.lengths):
            raise ConfigError(f"{self.name}: {kind} takes lengths {list(spec.lengths)}")
        return ConfigKey(kind, target.arch, DTYPE_NAMES[dtype],
                         None if spec.dims is None else max(16, length_bucket(dim)),
                         feats, tuple(length_bucket(n) for n in lengths))

    def arch_of(self, kind: str, arch: str) -> str:
        """The arch whose entries serve `arch` for this kind: itself, or "default"."""
        return arch if any(e.kind == kind and e.arch == arch for e in self.entries) else "default"

    def best(self, key: ConfigKey) -> List[Entry]:
        """The matching entries of the highest specificity (exactly one in a valid table)."""
        arch = self.arch_of(key.kind, key.arch)
        matches = [e for e in self.entries
                   if e.kind == key.kind and e.arch == arch and e.matches(key)]
        if not matches:
            return []
        top = max(e.score() for e in matches)
        return [e for e in matches if e.score() == top]

    def lookup(self, key: ConfigKey) -> KernelConfig:
        return self._lookup(key)

    @functools.lru_cache(maxsize=4096)
    def _lookup(self, key: ConfigKey) -> KernelConfig:
        best = self.best(key)
        if len(best) != 1:
            raise ConfigError(f"{self.name}: {len(best)} best entries for {key.describe()}")
        return best[0].config

    # -- validation -------------------------------------------------------------------------

    def keys(self, kinds: Optional[Iterable[str]] = None) -> Iterator[ConfigKey]:
        """Every key the table distinguishes: per kind, each arch it names plus one other
        ("default"), each dtype and dim, each feature subset, and each length bucket that an
        entry names plus one that none does."""
        archs = sorted({e.arch for e in self.entries} | {"default"})
        for kind in kinds or self.kinds:
            spec = self.kinds[kind]
            named = [sorted({b for e in self.entries if e.kind == kind
                             for i, b in e.lengths if i == j}) for j in range(len(spec.lengths))]
            # A bucket no entry names: 2x the largest named one (or 1024 if none is named).
            per_len = [vals + [2 * max(vals) if vals else 1024] for vals in named]
            for arch, dtype, dim in itertools.product(archs, DTYPE_NAMES.values(),
                                                      spec.dims or (None,)):
                for r in range(len(spec.features) + 1):
                    for feats in itertools.combinations(spec.features, r):
                        for lens in itertools.product(*per_len):
                            yield ConfigKey(kind, arch, dtype, dim, tuple(sorted(feats)),
                                            tuple(lens))

    def validate(self) -> List[str]:
        """Problems (empty when valid): keys with no entry or with two best entries."""
        problems = []
        for key in self.keys():
            best = self.best(key)
            if len(best) != 1:
                which = "; ".join(f"{e.features} {e.config}" for e in best)
                problems.append(f"{key.describe()}: {len(best)} best entries {which}")
        return problems


def _json_line(obj) -> str:
    return json.dumps(obj, separators=(", ", ": "))


def dump_table(data: dict) -> str:
    """A table as JSON text, one kind / entry per line (the committed layout, diff-friendly)."""
    parts = []
    for name, value in data.items():
        if isinstance(value, dict) and value:
            inner = ",\n".join(f"    {json.dumps(k)}: {_json_line(v)}" for k, v in value.items())
            parts.append(f"  {json.dumps(name)}: {{\n{inner}\n  }}")
        elif isinstance(value, list) and value:
            inner = ",\n".join(f"    {_json_line(v)}" for v in value)
            parts.append(f"  {json.dumps(name)}: [\n{inner}\n  ]")
        else:
            parts.append(f"  {json.dumps(name)}: {_json_line(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def entry_for(key: ConfigKey, table: Table, config: Mapping[str, int], why: str,
              exact: bool = False) -> dict:
    """A JSON entry for `key`'s dtype, dim, features and buckets (the form a tuning run
    writes, with exact=True: then it matches no key with more features). Flags that are 0
    are left out."""
    spec = table.kinds[key.kind]
    e = {"kind": key.kind, "arch": key.arch, "dtype": [key.dtype],
         "dim": None if key.dim is None else [key.dim]}
    if key.features:
        e["features"] = list(key.features)
    if key.lengths:
        e["lengths"] = dict(zip(spec.lengths, key.lengths))
    if exact:
        e["exact"] = True
    e["config"] = {p: int(config.get(p, spec.defaults.get(p, 0))) for p in spec.params
                   if p not in spec.defaults or int(config.get(p, 0))}
    e["why"] = why
    return e


def table_path(name: str) -> Path:
    """The file `load(name)` reads: $GPTFAST_<NAME>_CONFIGS when set (a tuned table), else the
    committed `<name>_configs.json` beside this file."""
    override = os.environ.get(f"GPTFAST_{name.upper()}_CONFIGS")
    return Path(override) if override else _HERE / f"{name}_configs.json"


@functools.lru_cache(maxsize=None)
def load(name: str) -> Table:
    """The table `name` ("attention", "cross_entropy"): see `table_path`."""
    path = table_path(name)
    with open(path) as f:
        return Table(path.name, json.load(f))
