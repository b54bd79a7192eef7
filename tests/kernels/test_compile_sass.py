"""benchmarks/compile_sass.py: loads in flight and resident programs read from SASS text (synthetic listings, so the
rule is checked without ptxas: a window closes at the first use of a loaded register, a barrier or a branch)."""
from __future__ import annotations

from moelink.benchmarks.compile_sass import count_ops, loads_in_flight, resident_programs


def _sass(*ins: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {x} ;" for i, x in enumerate(ins))


def test_back_to_back_loads_count_until_first_use():
    sass = _sass("LDG.E.128 R4, desc[UR8][R2.64]", "@!P0 LDG.E.128 R8, desc[UR8][R2.64+0x10]", "LDG.E R12, desc[UR8][R2.64]",
                 "FFMA R20, R4, R5, R20", "LDG.E.64 R14, desc[UR8][R2.64]", "FFMA R21, R14, R5, R21")
    assert loads_in_flight(sass) == (3, 36)  # 16 + 16 + 4 bytes before R4 is read


def test_a_barrier_or_a_dependent_address_closes_the_window():
    assert loads_in_flight(_sass("LDG.E.128 R4, desc[UR8][R2.64]", "BAR.SYNC.DEFER_BLOCKING 0x0",
                                 "LDG.E.128 R8, desc[UR8][R2.64]", "LDG.E.128 R12, desc[UR8][R2.64]")) == (2, 32)
    # the second load's address is the first one's value: two round trips, one load in flight each
    assert loads_in_flight(_sass("LDG.E.64 R4, desc[UR8][R2.64]", "LDG.E.128 R8, desc[UR8][R4.64]")) == (1, 16)


def test_cp_async_is_not_a_register_load():
    sass = _sass("LDGSTS.E.BYPASS.128 [R3], desc[UR8][R4.64]", "LDG.E R6, desc[UR8][R4.64]", "IADD3 R7, R6, 1, RZ")
    assert loads_in_flight(sass) == (1, 4) and count_ops(sass, "LDG") == 2 and count_ops(sass, "LDGSTS") == 1


def test_resident_programs_take_the_scarcest_resource():
    assert resident_programs(56, 4, 32) == 9  # registers: 65536 // (56 * 128)
    assert resident_programs(32, 1, 0) == 32  # the 32-CTA limit
    assert resident_programs(32, 4, 100 * 1024) == 2  # shared memory: 228 KB // 101 KB


def test_mma_loop_is_the_innermost_loop_holding_an_mma():
    from moelink.benchmarks.compile_sass import mma_loop

    sass = _sass("MOV R1, R2",  # 0x00
                 "LDG.E.U8 R4, desc[UR8][R2.64]",  # 0x10: the K loop's top: a scale read right away
                 "PRMT R5, R4, 0x7610, R5",
                 "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
                 "LDG.E.U8 R6, desc[UR8][R2.64]",  # 0x40: a scale read only at the step's end (one step ahead)
                 "IADD3 R7, R8, 1, RZ", "LOP3.LUT R9, R7, 0x3, RZ, 0xc0, !PT",
                 "PRMT R10, R6, 0x7610, R10",  # 0x70
                 "@P0 BRA 0x10",  # 0x80
                 "FADD R1, R1, 1", "@P1 BRA 0x90",  # a loop without an MMA (an epilogue's)
                 "EXIT")
    loop = mma_loop(sass)
    assert loop["instructions"] == 8 and loop["mma"] == 1 and loop["mix"]["LDG.E.U8"] == 2
    assert loop["ldg_distance"] == 1  # the first scale is read by the very next instruction
    assert mma_loop(_sass("FADD R1, R1, 1", "@P0 BRA 0x0")) is None
