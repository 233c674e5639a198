"""Read a kernel's SASS (nvdisasm output): instruction classes, control-flow graph, loops, and
the main loop whose cost per iteration the static table reports.

Input is `nvdisasm -c -gi kernel.cubin` text (one instruction per line, `.L_x_N:` labels,
`//## File "...", line N [inlined at "...", line M]` line info before the instructions it
covers). No GPU and no Triton needed: tests feed it small hand-written listings.

How the main loop is found (documented in DEVELOPERS.md, "Compiling the kernels without a GPU"):
1. basic blocks: a block starts at a label or after a branch/EXIT; edges go to a branch's
   target and, unless the branch is unconditional, to the next block. Blocks not reachable from
   the entry (the trailing `BRA` self-loop that pads every kernel) are dropped.
2. loops: natural loops, one per header h with back edges u -> h where h dominates u; the body
   is h plus every block that reaches a back-edge source without passing h. Loops nest by
   inclusion; an innermost loop contains no other.
3. main loop: among the innermost loops (innermost among loops that compute: a loop whose
   nested loops only wait, like the spin loops on a TMA copy's mbarrier, counts), the one with
   the most tensor-core instructions
   (HGMMA, HMMA) per iteration; without tensor cores (fp32 "ieee" dots, row kernels) the one
   with the most FFMA. Ties go to the loop with FEWER instructions: of several copies of the
   same loop body (attention's masked edge tiles and unmasked interior tiles compile to
   separate loops with the same products), the unmasked one is the leanest, and it is the one
   that runs for most tiles of a long sequence.
Each loop also carries its call site: the kernel-level source line that its instructions were
inlined from (e.g. the `_attn_fwd_inner(...)` call of the interior tiles), so a reader can
check which source loop the numbers belong to.
Counts per iteration are static: every instruction of every block of the loop body counted
once (an upper bound when the body has conditional branches), NOPs left out.
"""
from __future__ import annotations

import collections
import linecache
import re
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

# Instruction classes (by base opcode, the part before the first '.').
TENSOR_CORE = {"HGMMA": "wgmma", "HMMA": "mma.sync", "IMMA": "mma.sync", "DMMA": "mma.sync",
               "QGMMA": "wgmma", "IGMMA": "wgmma", "BGMMA": "wgmma"}
LOADS = {"LDG": "global load", "LDGSTS": "cp.async", "UTMALDG": "TMA", "UBLKCP": "TMA bulk",
         "LDS": "shared load", "LDSM": "ldmatrix", "STS": "shared store", "STG": "global store",
         "UTMASTG": "TMA store", "LDGDEPBAR": "cp.async commit", "DEPBAR": "cp.async/scoreboard wait"}
MEMORY_BARRIERS = {"MEMBAR", "FENCE", "CCTL", "ERRBAR", "CCTLL"}
SYNC = {"BAR", "SYNCS", "WARPSYNC", "BSYNC", "WARPGROUP"}
ATOMICS = {"RED", "REDG", "ATOM", "ATOMG", "ATOMS", "REDAS", "REDUX"}
SPILLS = {"STL", "LDL"}

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);?\s*$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):\s*$")
_TARGET = re.compile(r"`\((\.L_\w+)\)")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')


class Instr(NamedTuple):
    offset: int
    predicate: Optional[str]     # "@P0", "@!P2", ... or None
    opcode: str                  # full opcode with modifiers: "HGMMA.64x64x16.F32.BF16"
    operands: str
    site: Optional[Tuple[str, int]]  # (file, line) of the kernel-level source line

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse(text: str) -> Tuple[List[Instr], Dict[str, int]]:
    """Instructions in order and label -> index of the instruction it precedes."""
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    chain: List[Tuple[str, int]] = []   # line-info lines since the last instruction
    site: Optional[Tuple[str, int]] = None
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            chain.append((m.group(1), int(m.group(2))) if not m.group(3)
                         else (m.group(3), int(m.group(4))))
            continue
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if chain:
            # The last line-info line before an instruction is the outermost frame: the
            # kernel-level line (a call site, for code inlined from a helper).
            site = chain[-1]
            chain = []
        instrs.append(Instr(int(m.group(1), 16), m.group(2), m.group(3), m.group(4).strip(), site))
    return instrs, labels


def _always(pred: Optional[str]) -> bool:
    return pred is None or pred in ("@PT", "@UPT")


def _never(pred: Optional[str]) -> bool:
    return pred in ("@!PT", "@!UPT")


class Block(NamedTuple):
    start: int  # index of its first instruction
    end: int    # one past its last
    succ: Tuple[int, ...]  # indices of successor blocks


def blocks(instrs: List[Instr], labels: Dict[str, int]) -> List[Block]:
    leaders = {0} | set(labels.values())
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET") and not _never(ins.predicate):
            leaders.add(i + 1)
    starts = sorted(x for x in leaders if x < len(instrs))
    index = {s: n for n, s in enumerate(starts)}
    out = []
    for n, s in enumerate(starts):
        e = starts[n + 1] if n + 1 < len(starts) else len(instrs)
        last = instrs[e - 1]
        succ: List[int] = []
        falls = True
        if last.base in ("BRA", "JMP") and not _never(last.predicate):
            t = _TARGET.search(last.operands)
            if t and t.group(1) in labels and labels[t.group(1)] in index:
                succ.append(index[labels[t.group(1)]])
            falls = not _always(last.predicate)
        elif last.base in ("EXIT", "RET", "BRX", "JMX") and _always(last.predicate):
            falls = False  # indirect branches: none in Triton kernels; no edge is known
        if falls and n + 1 < len(starts):
            succ.append(n + 1)
        out.append(Block(s, e, tuple(dict.fromkeys(succ))))
    return out


def _reachable(bbs: List[Block]) -> Set[int]:
    seen, todo = {0}, [0]
    while todo:
        for s in bbs[todo.pop()].succ:
            if s not in seen:
                seen.add(s)
                todo.append(s)
    return seen


def _dominators(bbs: List[Block], live: Set[int]) -> Dict[int, Set[int]]:
    preds = collections.defaultdict(set)
    for b in live:
        for s in bbs[b].succ:
            preds[s].add(b)
    dom = {b: set(live) for b in live}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(live - {0}):
            ps = [dom[p] for p in preds[b] if p in live]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom


class Loop(NamedTuple):
    header: int             # block index
    body: frozenset         # block indices
    instrs: List[Instr]     # every instruction of the body, in address order, NOPs excluded
    innermost: bool
    depth: int              # 1 = outermost


def loops(instrs: List[Instr], labels: Dict[str, int]) -> List[Loop]:
    bbs = blocks(instrs, labels)
    live = _reachable(bbs)
    dom = _dominators(bbs, live)
    preds = collections.defaultdict(set)
    for b in live:
        for s in bbs[b].succ:
            preds[s].add(b)
    bodies: Dict[int, Set[int]] = {}
    for u in live:
        for h in bbs[u].succ:
            if h in dom[u]:  # back edge u -> h
                body = bodies.setdefault(h, {h})
                todo = [u]
                while todo:
                    x = todo.pop()
                    if x not in body:
                        body.add(x)
                        todo.extend(p for p in preds[x] if p in live)
    out = []
    for h, body in bodies.items():
        inner = [o for o, ob in bodies.items() if o != h and ob < body]
        depth = 1 + sum(1 for o, ob in bodies.items() if o != h and body < ob)
        ins = [instrs[i] for b in sorted(body) for i in range(bbs[b].start, bbs[b].end)
               if instrs[i].base != "NOP"]
        out.append(Loop(h, frozenset(body), ins, not inner, depth))
    return sorted(out, key=lambda lp: bbs[lp.header].start)


def count(instrs: List[Instr], classes) -> Dict[str, int]:
    """Base opcode -> count, for the base opcodes in `classes`."""
    c = collections.Counter(i.base for i in instrs if i.base in classes)
    return dict(sorted(c.items()))


def tensor_core_kind(instrs: List[Instr]) -> str:
    kinds = sorted({TENSOR_CORE[i.base] for i in instrs if i.base in TENSOR_CORE})
    return "+".join(kinds) if kinds else "none"


def tensor_core_shapes(instrs: List[Instr]) -> Dict[str, int]:
    c = collections.Counter(i.opcode for i in instrs if i.base in TENSOR_CORE)
    return dict(sorted(c.items()))


_HMMA_SHAPE = re.compile(r"^(\d\d)(\d{1,2}?)(\d{1,2})$")


def tensor_core_macs_per_warp(instrs: List[Instr]) -> int:
    """Multiply-accumulates the tensor-core instructions of `instrs` do, per warp that runs
    them: HGMMA.64xNxK is one warpgroup's (4 warps') 64*N*K; HMMA.16816 is one warp's
    16*8*16. Multiplied by the warps that run the loop, it is the work issued, which the
    static table compares with the work the tile needs (a ratio above 1: products computed
    twice)."""
    total = 0
    for i in instrs:
        parts = i.opcode.split(".")
        if i.base in ("HGMMA", "QGMMA", "IGMMA", "BGMMA") and len(parts) > 1:
            m, n, k = (int(x) for x in parts[1].split("x"))
            total += m * n * k // 4
        elif i.base == "HMMA" and len(parts) > 1:
            mnk = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}.get(parts[1])
            if mnk:
                total += mnk[0] * mnk[1] * mnk[2]
    return total


def _heavy(loop: Loop) -> Tuple[int, int]:
    tc = sum(1 for i in loop.instrs if i.base in TENSOR_CORE)
    fma = sum(1 for i in loop.instrs if i.base in ("FFMA", "HFMA2", "DFMA"))
    return tc, fma


def main_loop(lps: List[Loop]) -> Optional[Loop]:
    """The innermost loop with the most tensor-core instructions (else FFMAs); ties: fewest
    instructions (see the module docstring). Innermost among the loops that compute: a loop
    whose nested loops do no tensor-core or FFMA work (the spin loops that wait on a TMA
    copy's mbarrier) still counts as innermost, those waits counted once."""
    def computes(lp: Loop) -> bool:
        return _heavy(lp) != (0, 0)
    inner = [lp for lp in lps
             if not any(o is not lp and o.body < lp.body and computes(o) for o in lps)]
    if not inner:
        return None
    return max(inner, key=lambda lp: (_heavy(lp), -len(lp.instrs)))


def call_site(loop: Loop) -> Optional[Tuple[str, int]]:
    """The kernel-level source line most of the loop's instructions come from."""
    sites = collections.Counter(i.site for i in loop.instrs if i.site)
    return sites.most_common(1)[0][0] if sites else None


def site_text(site: Optional[Tuple[str, int]]) -> str:
    if site is None:
        return ""
    path, line = site
    text = linecache.getline(path, line).strip()
    return f"{path.rsplit('/', 1)[-1]}:{line} {text}"


def summarize(text: str, threads: int, tile: int) -> dict:
    """Everything the static table reports from one kernel's SASS. `threads`: threads per
    program (num_warps * 32); `tile`: elements of the tile one main-loop iteration computes."""
    instrs, labels = parse(text)
    lps = loops(instrs, labels)
    main = main_loop(lps)
    kernel = [i for i in instrs if i.base != "NOP"]

    def loop_info(lp: Loop) -> dict:
        tc, fma = _heavy(lp)
        site = call_site(lp)
        return {"first_offset": f"0x{lp.instrs[0].offset:x}" if lp.instrs else None,
                "instructions": len(lp.instrs), "innermost": lp.innermost, "depth": lp.depth,
                "tensor_core": tc, "ffma": fma, "call_site": site_text(site)}

    out = {
        "instructions": len(kernel),
        "tensor_core_kind": tensor_core_kind(kernel),
        "tensor_core": count(kernel, TENSOR_CORE),
        "tensor_core_shapes": tensor_core_shapes(kernel),
        "loads": count(kernel, LOADS),
        "memory_barriers": count(kernel, MEMORY_BARRIERS),
        "sync": count(kernel, SYNC),
        "atomics": count(kernel, ATOMICS),
        "local_memory": count(kernel, SPILLS),
        # spill traffic that every iteration pays (loops nest: count each instruction once)
        "local_memory_in_loops": len({i.offset for lp in lps for i in lp.instrs
                                      if i.base in SPILLS}),
        "loops": [loop_info(lp) for lp in lps],
        "main_loop": None,
    }
    if main is not None:
        info = loop_info(main)
        info.update({
            "tensor_core_kind": tensor_core_kind(main.instrs),
            "tensor_core_shapes": tensor_core_shapes(main.instrs),
            "loads": count(main.instrs, LOADS),
            "memory_barriers": count(main.instrs, MEMORY_BARRIERS),
            # full opcodes: MEMBAR.ALL.CTA (a shared-memory fence before wgmma reads what the
            # threads stored) is not MEMBAR.SC.GPU / .GPU (ordering against all of memory)
            "memory_barrier_opcodes": dict(sorted(collections.Counter(
                i.opcode for i in main.instrs if i.base in MEMORY_BARRIERS).items())),
            "atomic_opcodes": dict(sorted(collections.Counter(
                i.opcode for i in main.instrs if i.base in ATOMICS).items())),
            "tensor_core_macs_per_warp": tensor_core_macs_per_warp(main.instrs),
            "sync": count(main.instrs, SYNC),
            "atomics": count(main.instrs, ATOMICS),
            "local_memory": count(main.instrs, SPILLS),
            "mufu": sum(1 for i in main.instrs if i.base == "MUFU"),
            "threads": threads, "tile_elements": tile,
            "per_element": round(len(main.instrs) * threads / tile, 2) if tile else None,
        })
        out["main_loop"] = info
    return out
