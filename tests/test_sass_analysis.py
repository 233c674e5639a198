"""scripts/sass_analysis.py on hand-written nvdisasm listings: basic blocks, natural loops,
nesting, the main-loop choice and the per-element figure. No GPU, no compiler."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sass_analysis as S  # noqa: E402

K = "/k/attention.py"


def listing(lines):
    """nvdisasm-style text from (label | (line-info list, opcode text)) items."""
    out, off = [".text.kernel:"], 0
    for item in lines:
        if isinstance(item, str) and item.endswith(":"):
            out.append(item)
            continue
        info, text = item if isinstance(item, tuple) else ((), item)
        for (path, line, outer) in info:
            at = f' inlined at "{path}", line {outer}' if outer else ""
            out.append(f'\t//## File "{path}", line {line}{at}')
        out.append(f"        /*{off:04x}*/                   {text} ;")
        off += 16
    return "\n".join(out)


# entry; loop A (lean: 2 HGMMA + 2 others) inlined at line 20; loop B (2 HGMMA + 5 others,
# a masked copy) inlined at line 30; exit; then the trailing unreachable self-loop.
TWO_LOOPS = listing([
    "S2R R0, SR_CTAID.X",
    "ISETP.GE.AND P0, PT, R0, 0x1, PT",
    "@P0 BRA `(.L_x_1)",
    ".L_x_0:",
    (((K, 100, 20), (K, 20, None)), "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], RZ"),
    "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8",
    "LDGSTS.E.BYPASS.128 [R2], desc[UR6][R4.64]",
    "@!P1 BRA `(.L_x_0)",
    ".L_x_1:",
    (((K, 100, 30), (K, 30, None)), "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8"),
    "HGMMA.64x64x16.F32.BF16 R8, gdesc[UR4], R8",
    "FSEL R9, R9, -INF , P2",
    "FSEL R10, R10, -INF , P2",
    "ISETP.GT.AND P2, PT, R3, R4, PT",
    "MEMBAR.ALL.CTA",
    "@!P1 BRA `(.L_x_1)",
    "NOP",
    "EXIT",
    ".L_x_2:",
    "BRA `(.L_x_2)",
    "NOP",
])


def test_two_loops_and_main_loop_choice():
    instrs, labels = S.parse(TWO_LOOPS)
    lps = S.loops(instrs, labels)
    assert [len(lp.instrs) for lp in lps] == [4, 7]  # the unreachable self-loop is not a loop
    assert all(lp.innermost and lp.depth == 1 for lp in lps)
    main = S.main_loop(lps)
    assert main is lps[0]  # same tensor-core count: the leaner (unmasked) copy wins
    assert S.call_site(main) == (K, 20)
    assert S.call_site(lps[1]) == (K, 30)


def test_summary_counts_and_per_element():
    r = S.summarize(TWO_LOOPS, threads=128, tile=64 * 64)
    assert r["tensor_core_kind"] == "wgmma"
    assert r["tensor_core"] == {"HGMMA": 4}
    assert r["tensor_core_shapes"] == {"HGMMA.64x64x16.F32.BF16": 4}
    assert r["memory_barriers"] == {"MEMBAR": 1}
    ml = r["main_loop"]
    assert ml["instructions"] == 4 and ml["loads"] == {"LDGSTS": 1}
    assert ml["memory_barriers"] == {}
    assert ml["per_element"] == pytest.approx(4 * 128 / 4096, abs=0.01)
    assert r["instructions"] == 16  # NOPs left out; the unreachable BRA counted as code


NESTED = listing([
    "MOV R0, RZ",
    ".L_x_0:",              # outer loop header
    "IADD3 R0, R0, 0x1, RZ",
    ".L_x_1:",              # inner loop: the one with the dot
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",
    "@P0 BRA `(.L_x_3)",    # a conditional path inside the inner loop
    "FADD R5, R5, R6",
    ".L_x_3:",
    "@!P1 BRA `(.L_x_1)",
    "RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R4",
    "@!P2 BRA `(.L_x_0)",
    "EXIT",
])


def test_nested_loops_with_a_branch_inside():
    instrs, labels = S.parse(NESTED)
    lps = S.loops(instrs, labels)
    outer, inner = sorted(lps, key=lambda lp: len(lp.instrs), reverse=True)
    assert not outer.innermost and outer.depth == 1
    assert inner.innermost and inner.depth == 2
    assert len(inner.instrs) == 4  # both paths of the if counted once
    assert len(outer.instrs) == 7
    assert S.main_loop(lps) is inner
    r = S.summarize(NESTED, threads=32, tile=16)
    assert r["tensor_core_kind"] == "mma.sync"
    assert r["atomics"] == {"RED": 1} and r["main_loop"]["atomics"] == {}


def test_spills_inside_loops_are_counted_once():
    """local_memory_in_loops: STL/LDL inside any loop (nested loops share instructions: each
    counted once); the ones before and between loops are not."""
    text = listing([
        "STL [R1], R0",         # parked before the loops
        ".L_x_0:",              # outer loop
        "LDL R7, [R1+0x4]",     # in the outer loop only
        ".L_x_1:",              # inner loop
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",
        "LDL R9, [R1+0x8]",
        "@!P1 BRA `(.L_x_1)",
        "@!P2 BRA `(.L_x_0)",
        "LDL R0, [R1]",         # reloaded after them
        "EXIT",
    ])
    r = S.summarize(text, threads=32, tile=16)
    assert r["local_memory"] == {"STL": 1, "LDL": 3}
    assert r["local_memory_in_loops"] == 2
    assert r["main_loop"]["local_memory"] == {"LDL": 1}


def test_no_tensor_cores_picks_the_ffma_loop():
    text = listing([
        ".L_x_0:", "FADD R1, R1, R2", "@P0 BRA `(.L_x_0)",
        ".L_x_1:", "FFMA R1, R2, R3, R1", "FFMA R1, R2, R3, R1", "@P0 BRA `(.L_x_1)",
        "EXIT",
    ])
    r = S.summarize(text, threads=32, tile=32)
    assert r["tensor_core_kind"] == "none"
    assert r["main_loop"]["ffma"] == 2 and r["main_loop"]["instructions"] == 3


def test_straight_line_kernel_has_no_main_loop():
    r = S.summarize(listing(["LDG.E R0, desc[UR4][R2.64]", "STG.E desc[UR4][R2.64], R0", "EXIT"]),
                    threads=128, tile=64)
    assert r["loops"] == [] and r["main_loop"] is None
    assert r["loads"] == {"LDG": 1, "STG": 1}


def test_unconditional_branch_has_no_fallthrough():
    instrs, labels = S.parse(listing([
        "BRA `(.L_x_1)", "FADD R1, R1, R1",  # dead code after an unconditional branch
        ".L_x_1:", "EXIT"]))
    bbs = S.blocks(instrs, labels)
    assert bbs[0].succ == (2,)
