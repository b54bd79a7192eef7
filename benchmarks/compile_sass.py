"""What a memory-bound kernel's SASS says about its bandwidth, read offline (no GPU): how many global loads a thread
issues before it first waits on one, and how many programs an SM holds at once.

A GEMV streams its weights once: it reaches HBM bandwidth only if enough bytes are in flight per SM to cover the
memory latency (Little's law: an H100 SM at 3.35 TB/s / 132 SMs and ~0.8 us needs ~20 KB, an H200 SM at 4.8 TB/s
~35-40 KB). Triton software-pipelines only the loads that feed a dot (cp.async, LDGSTS); a dot-less K loop waits a
full round trip per step unless its loads are issued back to back before their first use, which this module
counts from the SASS (`loads_in_flight`), and `resident_programs` bounds how many programs share an SM.
"""
from __future__ import annotations

import re
from collections import Counter

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_REG = re.compile(r"\bR(\d+)\b")
# Instructions after which a thread has stopped issuing: a barrier or a branch ends the straight-line window.
_STOPS = ("BAR", "BRA", "EXIT", "RET", "WARPSYNC")


def _width(op: str) -> int:
    """32-bit registers an LDG fills: .128 four, .64 two, else one."""
    return 4 if ".128" in op else 2 if ".64" in op else 1


def loads_in_flight(sass: str) -> tuple[int, int]:
    """(loads, bytes per thread): the most global loads (LDG) a thread issues in straight-line SASS before an
    instruction reads a register one of them fills (or a barrier / branch), and the bytes those loads fetch. LDGSTS
    (cp.async) is not counted: its wait is a separate instruction, so a pipelined GEMM is measured by its stages."""
    best, pending, count, nbytes = (0, 0), set(), 0, 0
    for line in sass.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        ins = _PRED.sub("", m.group(1))
        op = ins.split()[0] if ins.split() else ""
        regs = [int(r) for r in _REG.findall(ins)]
        if op.startswith("LDG") and not op.startswith("LDGSTS") and regs:
            if any(r in pending for r in regs[1:]):  # (an address computed from an earlier load's value)
                best, pending, count, nbytes = max(best, (count, nbytes)), set(), 0, 0
            pending.update(range(regs[0], regs[0] + _width(op)))
            count, nbytes = count + 1, nbytes + 4 * _width(op)
            continue
        sources = regs if op.startswith(("ST", "RED", "ATOM")) else regs[1:]
        if op.startswith(_STOPS) or any(r in pending for r in sources):
            best, pending, count, nbytes = max(best, (count, nbytes)), set(), 0, 0
    return max(best, (count, nbytes))


def resident_programs(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs (CTAs) one sm_90 / sm_100 SM holds at once: 64K registers, 2,048 threads, 32 CTAs and 228 KB of
    shared memory (1 KB of it reserved per CTA), whichever runs out first."""
    threads = 32 * num_warps
    by_regs = 65536 // max(1, registers * threads)
    return max(0, min(by_regs, 2048 // threads, 32, (228 * 1024) // (shared_bytes + 1024)))


def count_ops(sass: str, prefix: str) -> int:
    """Instructions whose opcode starts with `prefix` (predicates skipped): e.g. 'LDG', 'BAR'."""
    n = 0
    for line in sass.splitlines():
        m = _INSTR.search(line)
        if m and _PRED.sub("", m.group(1)).startswith(prefix):
            n += 1
    return n


# Tensor-core MMA opcodes: sm_90 wgmma (HGMMA bf16/fp16, QGMMA fp8), sm_100 tcgen05 (UTC*MMA), mma.sync (HMMA).
_MMA_OPS = ("HGMMA", "QGMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA", "HMMA")


def _listing(sass: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of every SASS instruction, in order."""
    out = []
    for line in sass.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m[1], 16), _PRED.sub("", m[2])))
    return out


def mma_loop(sass: str) -> dict | None:
    """What one step of a GEMM's K loop issues: the innermost loop (a backward branch's span) that holds a
    tensor-core MMA, as `instructions` (per thread, one step), `mix` (opcode -> count) and `ldg_distance` (the
    fewest instructions between a plain global load (LDG, not cp.async) in the step and the first instruction
    that reads what it loaded, in the same step; None when the step has no plain load: a load read only at the
    step's end waited behind the whole step, one read right after it waits a memory round trip). None when no
    loop holds an MMA."""
    ins = _listing(sass)
    spans = []
    for addr, s in ins:
        m = re.search(r"0x([0-9a-f]+)", s) if s.split() and s.split()[0].startswith("BRA") else None
        if m and int(m[1], 16) < addr:
            spans.append((int(m[1], 16), addr))
    holding = [(lo, hi) for lo, hi in spans
               if any(lo <= a <= hi and s.split()[0].startswith(_MMA_OPS) for a, s in ins if s.split())]
    if not holding:
        return None
    lo, hi = min(holding, key=lambda sp: sp[1] - sp[0])
    body = [s for a, s in ins if lo <= a <= hi and s.split()]
    mix = Counter(s.split()[0] for s in body)
    dist = None
    for i, s in enumerate(body):
        op = s.split()[0]
        if op.startswith("LDG") and not op.startswith(("LDGSTS", "LDGDEPBAR")):
            dst = int(_REG.findall(s)[0])
            for j, t in enumerate(body[i + 1:], 1):
                regs = [int(r) for r in _REG.findall(t)]
                srcs = regs if t.split()[0].startswith(("ST", "RED", "ATOM")) else regs[1:]
                if dst in srcs:
                    dist = j if dist is None else min(dist, j)
                    break
    return dict(instructions=len(body), mix=dict(mix.most_common()), ldg_distance=dist,
                mma=sum(n for op, n in mix.items() if op.startswith(_MMA_OPS)))
