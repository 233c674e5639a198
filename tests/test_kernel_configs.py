"""The kernel configuration tables (kernels/*_configs.json) and their key (kernels/configs.py):
schema, unambiguous and complete matching, per-feature entries, length buckets, the launchers'
and the autotuner's use of the key. Nothing is compiled or run."""
import copy
import json
from pathlib import Path

import pytest
import torch

from gptfast.kernels import attention as A
from gptfast.kernels import configs as C
from gptfast.kernels import cross_entropy as CE

KERNELS = Path(A.__file__).resolve().parent
META = torch.device("meta")
H100 = C.Target((9, 0), 132)
A100 = C.Target((8, 0), 108)


def raw(name):
    return json.loads((KERNELS / f"{name}_configs.json").read_text())


@pytest.mark.parametrize("name", ["attention", "cross_entropy"])
def test_committed_tables_are_valid_and_canonical(name):
    table = C.load(name)
    assert table.validate() == []  # every key has exactly one best entry
    # The committed layout is the one dump_table writes (what a tuning run rewrites).
    assert C.dump_table(raw(name)) == (KERNELS / f"{name}_configs.json").read_text()
    for kind, spec in table.kinds.items():
        assert spec.kernel in vars(A if name == "attention" else CE), spec.kernel


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (8, 6), (8, 9), (7, 5)])
def test_attention_entries_are_kept(cap):
    """keep(): every config a GPU of `cap` can get fits its shared memory and registers."""
    table = C.load("attention")
    target = C.Target(cap, 100)
    for key in table.keys(["fwd", "bwd"]):
        if key.arch not in (target.arch, "default") or table.arch_of(key.kind, target.arch) != key.arch:
            continue
        cfg = table.lookup(key)
        elt = 4 if key.dtype == "fp32" else 2
        assert A.keep(cfg, key.kind, key.dim, elt, cap, key.features), (key.describe(), cfg)
    # d=256 with 128x128 tiles and 3 stages cannot fit shared memory: filtered out.
    assert not A.keep(A.Config(128, 128, 8, 3), "fwd", 256, 2, cap)


def test_keep_rules_for_hopper():
    """keep() on sm_90 with 16-bit inputs: chained products need 16 rows per warp (else two
    warpgroups compute the same tile), the atomic dQ needs 64 query rows... unless the head
    dim gives the product its rows; TMA and warp specialization only where they compile."""
    H, A100 = (9, 0), (8, 0)
    assert A.keep(A.Config(128, 128, 8, 2), "fwd", 128, 2, H)
    assert not A.keep(A.Config(64, 128, 8, 2), "fwd", 128, 2, H)      # 64 rows, 8 warps
    assert A.keep(A.Config(64, 128, 8, 2), "fwd", 128, 2, A100)       # mma.sync: fine
    assert A.keep(A.Config(64, 64, 4, 2), "fwd", 128, 4, H)           # fp32: no wgmma
    assert not A.keep(A.Config(32, 64, 8, 2), "bwd", 64, 2, H)        # BLOCK_N rows < 128
    assert A.keep(A.Config(32, 128, 8, 2), "bwd", 128, 2, H)
    assert A.keep(A.Config(128, 128, 4, 2, 1, 1), "fwd", 64, 2, H)    # TMA + WS, 4 warps
    assert not A.keep(A.Config(128, 128, 8, 2, 1, 1), "fwd", 64, 2, H)  # WS at 8 warps
    assert not A.keep(A.Config(128, 128, 4, 2, 0, 1), "fwd", 64, 2, H)  # WS without TMA
    assert not A.keep(A.Config(32, 128, 4, 2, 1, 1), "bwd", 64, 2, H)   # no WS backward
    assert not A.keep(A.Config(128, 128, 8, 2, 1), "fwd", 64, 2, A100)  # no TMA before sm_90
    # TMA with atomic dQ spills at d=128 (static table): deterministic only there.
    assert A.keep(A.Config(64, 128, 8, 2, 1), "bwd", 64, 2, H)
    assert not A.keep(A.Config(32, 128, 8, 2, 1), "bwd", 128, 2, H)
    assert A.keep(A.Config(32, 128, 8, 2, 1), "bwd", 128, 2, H, ("deterministic",))
    # d=256 backward: one 128x256 accumulator per program (dK and dV split), so 128 key rows
    # with 8 warps fit; 64 rows with 8 warps would duplicate the chained products.
    assert A.keep(A.Config(16, 128, 8, 2), "bwd", 256, 2, H)
    assert not A.keep(A.Config(32, 64, 8, 2), "bwd", 256, 2, H)
    cands = A.candidates("fwd", 128, torch.bfloat16, H, ("causal",))
    assert any(c.USE_TMA for c in cands) and any(c.WARP_SPECIALIZE for c in cands)
    assert all(A.keep(c, "fwd", 128, 2, H) for c in cands)


def _table(entries, features=("causal", "dropout", "alibi"), lengths=("seqlen_q",)):
    return C.Table("test", {
        "kinds": {"fwd": {"kernel": "k", "params": ["BLOCK_M", "num_warps"],
                          "features": list(features), "lengths": list(lengths), "dims": [64]}},
        "interpreter": {"fwd": {"BLOCK_M": 16, "num_warps": 4}},
        "entries": entries})


def _e(block, arch="sm_90", **kw):
    return {"kind": "fwd", "arch": arch, "dtype": ["fp16", "bf16", "fp32"], "dim": [64],
            "config": {"BLOCK_M": block, "num_warps": 4}, **kw}


def test_most_specific_entry_wins():
    t = _table([_e(128), _e(64, features=["dropout"]), _e(32, features=["alibi", "dropout"]),
                _e(16, lengths={"seqlen_q": 1}), _e(32, features=["alibi"]),
                _e(16, features=["dropout"], lengths={"seqlen_q": 1}),
                _e(16, features=["alibi"], lengths={"seqlen_q": 1}),
                _e(16, features=["alibi", "dropout"], lengths={"seqlen_q": 1}),
                _e(256, arch="default")])
    assert t.validate() == []

    def block(features, sq=4096):
        return t.lookup(t.key("fwd", H100, torch.bfloat16, 64, features, (sq,))).BLOCK_M
    assert block(()) == 128
    assert block(("causal",)) == 128
    assert block(("causal", "dropout")) == 64      # applies whenever dropout is on
    assert block(("alibi", "dropout")) == 32
    assert block(("causal",), sq=1) == 16          # decoding bucket
    assert block(("dropout",), sq=1) == 16
    # An arch without entries of its own uses the "default" ones.
    assert t.lookup(t.key("fwd", A100, torch.bfloat16, 64, ("dropout",), (1,))).BLOCK_M == 256


def test_ambiguous_and_missing_entries_are_reported():
    t = _table([_e(128), _e(64, features=["dropout"]), _e(32, features=["alibi"]),
                _e(256, arch="default")])
    problems = t.validate()
    assert any("[alibi+dropout" in p and "2 best entries" in p for p in problems), problems
    t = _table([_e(64, features=["dropout"]), _e(256, arch="default")])  # sm_90 lacks a base
    assert any("0 best entries" in p for p in t.validate())


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(features=["dropuot"]), "unknown features"),
    (lambda e: e["config"].update(BLOCK_M=96), "not a power of two"),
    (lambda e: e["config"].pop("num_warps"), "exactly"),
    (lambda e: e.update(dim=[48]), "dim must be among"),
    (lambda e: e.update(lengths={"seqlen_q": 100}), "not a power of two"),
    (lambda e: e.update(dtype=["fp8"]), "dtype"),
    (lambda e: e.update(colour="red"), "unknown fields"),
])
def test_schema_errors_name_the_entry(change, message):
    e = _e(128)
    change(e)
    with pytest.raises(C.ConfigError, match=message) as info:
        _table([_e(128), e])
    assert "entry 1" in str(info.value)


def test_length_buckets():
    assert [C.length_bucket(n) for n in (0, 1, 2, 3, 4096, 4097, 8192)] == [1, 1, 2, 4, 4096, 8192, 8192]
    t = C.load("attention")
    keys = {t.key("fwd", H100, torch.bfloat16, 64, ("causal",), (1, sk)) for sk in range(4097, 8193, 97)}
    assert len(keys) == 1  # every decoding step from 4097 to 8192 keys: one key, one tuning
    assert t.key("fwd", H100, torch.bfloat16, 96, (), (8, 8)).dim == 128  # padded head dim


def test_entry_for_round_trip():
    t = C.load("attention")
    key = t.key("bwd", H100, torch.bfloat16, 128, ("causal", "dropout"), (4096, 4096))
    data = raw("attention")
    data["entries"].append(C.entry_for(key, t, {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2,
                                                "num_stages": 1}, "tuned"))
    t2 = C.Table("tuned", data)
    assert t2.validate() == []
    assert t2.lookup(key).kwargs() == {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2,
                                       "num_stages": 1, "USE_TMA": 0}
    other = key._replace(lengths=(2048, 2048))
    assert t2.lookup(other) == t.lookup(other)  # other buckets keep the committed entry


def test_exact_entries_and_flags():
    """A tuned entry ("exact": true) applies to its own feature set only, never to a key with
    one more feature (which it was not measured with); flags are optional and 0 by default."""
    t = C.load("attention")
    key = t.key("fwd", H100, torch.bfloat16, 128, ("causal",), (4096, 4096))
    data = raw("attention")
    e = C.entry_for(key, t, {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2,
                             "USE_TMA": 1, "WARP_SPECIALIZE": 1}, "tuned", exact=True)
    assert e["exact"] is True and e["config"]["USE_TMA"] == 1
    data["entries"].append(e)
    t2 = C.Table("tuned", data)
    assert t2.validate() == []
    assert t2.lookup(key).USE_TMA == 1 and t2.lookup(key).WARP_SPECIALIZE == 1
    more = key._replace(features=("causal", "dropout"))
    assert t2.lookup(more) == t.lookup(more)
    # omitted flags default to 0; a flag must be 0 or 1
    assert t.lookup(key).USE_TMA == 0
    e2 = dict(e, config=dict(e["config"], USE_TMA=2))
    with pytest.raises(C.ConfigError, match="flag USE_TMA must be 0 or 1"):
        C.Table("bad", dict(data, entries=data["entries"][:-1] + [e2]))


def test_tuned_table_from_the_environment(tmp_path, monkeypatch):
    """GPTFAST_ATTENTION_CONFIGS points the kernels at another table (a tuning run's)."""
    data = raw("attention")
    data["interpreter"]["fwd"]["BLOCK_M"] = 64
    path = tmp_path / "tuned.json"
    path.write_text(C.dump_table(data))
    monkeypatch.setenv("GPTFAST_ATTENTION_CONFIGS", str(path))
    C.load.cache_clear()
    try:
        assert C.table_path("attention") == path
        assert C.load("attention").interpreter["fwd"].BLOCK_M == 64
    finally:
        monkeypatch.delenv("GPTFAST_ATTENTION_CONFIGS")
        C.load.cache_clear()
    assert C.load("attention").interpreter["fwd"].BLOCK_M == 32


def test_kernel_config_is_read_only():
    cfg = C.load("attention").interpreter["fwd"]
    assert cfg.BLOCK_M == 32 and cfg.blocks() == {"BLOCK_M": 32, "BLOCK_N": 16, "USE_TMA": 0,
                                                   "WARP_SPECIALIZE": 0}
    with pytest.raises(AttributeError):
        cfg.BLOCK_M = 64
    with pytest.raises(AttributeError, match="has no 'BLOCK_V'"):
        cfg.BLOCK_V


def test_launchers_look_up_their_key():
    """Under a compile target, the launchers' lookups use arch, dtype, head dim, features and
    buckets; without one (CPU, interpreter) they use the interpreter configs."""
    t = C.load("attention")
    flags = dict(IS_CAUSAL=True, HAS_WINDOW=False, HAS_ALIBI=False, HAS_KPM=False, HAS_DROPOUT=True)
    flags["HAS_SOFTCAP"] = False
    feats = A._features(flags, deterministic=True)
    assert feats == ("causal", "dropout", "deterministic")
    with C.compile_target(H100):
        got = A.get_config("bwd", META, torch.bfloat16, 64, feats, (4096, 4096))
        key = t.key("bwd", H100, torch.bfloat16, 64, feats, (4096, 4096))
        assert got == t.lookup(key) == t.best(key)[0].config
        assert CE._num_sms(META) == 132
        ce = CE._config("lce_bwd", META, torch.bfloat16, CE._on(bias=True, glse=False), (16384,))
        ct = C.load("cross_entropy")
        assert ce == ct.lookup(ct.key("lce_bwd", H100, torch.bfloat16, None, ("bias",), (16384,))).kwargs()
    assert C.launch_target(META) is None
    assert A.get_config("fwd", META, torch.bfloat16, 64, (), (8, 8)) == t.interpreter["fwd"]


def test_autotuner_is_keyed_like_the_tables():
    """One triton.autotune per configuration key: a new Sk in the same bucket reuses it, a new
    bucket or feature set gets its own; candidates are the kept configs (no TMA ones where the
    tensors cannot be descriptors)."""
    A._AUTOTUNED.clear()
    try:
        with C.compile_target(H100):
            def tuner(features, sk):
                return A._autotuned(A._attn_fwd, "fwd", META, torch.bfloat16, 128, features, (1, sk))
            a = tuner(("causal",), 4097)
            assert tuner(("causal",), 5000) is a
            assert tuner(("causal",), 9000) is not a
            assert tuner(("causal", "dropout"), 4097) is not a
            assert a.keys == []
            assert all(A.keep(A.Config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages, c.kwargs["USE_TMA"],
                                       c.kwargs["WARP_SPECIALIZE"]), "fwd", 128, 2, (9, 0))
                       for c in a.configs)
            assert len(a.configs) > 10
            assert any(c.kwargs["USE_TMA"] for c in a.configs)
            # Tensors TMA cannot describe: a tuner of its own, without the TMA candidates.
            no_tma = A._autotuned(A._attn_fwd, "fwd", META, torch.bfloat16, 128, ("causal",),
                                  (1, 4097), tma_ok=False)
            assert no_tma is not a and no_tma.configs
            assert not any(c.kwargs["USE_TMA"] or c.kwargs["WARP_SPECIALIZE"]
                           for c in no_tma.configs)
    finally:
        A._AUTOTUNED.clear()


def test_table_files_copy_cleanly():
    """A table entry can be edited as data: a copy with one config changed still validates."""
    data = copy.deepcopy(raw("cross_entropy"))
    data["entries"][0]["config"]["num_warps"] = 4
    assert C.Table("copy", data).validate() == []
