"""moelink.kernels: Triton kernels, each with its plain-torch reference (the test oracle and the CPU path):
fused MoE grouped GEMM (token sort/align, SiLU·mul, routed-weight combine), paged attention, RMSNorm, rotary;
`ops.py` picks per device from the families each `ops_<family>.py` registers (`registry.py`); tuned launch
configs are JSON data in `configs/`.

The bottom layer: it depends on torch and Triton only.
Must not import: benchmarks, engine (every sub-package), planner, scheduler, moe, comm.
"""