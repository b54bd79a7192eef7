"""moelink.moe: the MoE layer: router (top-k), expert placement (which physical expert lives on which rank,
redundant experts), dispatch → local experts → combine, and expert-load statistics.

It runs whichever all-to-all backend it is handed (comm/) and the expert kernels of kernels/; it never
chooses a backend itself and knows nothing of engines, schedulers or models.
Must not import: benchmarks, engine (every sub-package), planner, scheduler.
"""