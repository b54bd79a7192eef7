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
