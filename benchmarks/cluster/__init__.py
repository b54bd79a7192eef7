"""Cluster model of MoE serving throughput per GPU (DP attention + EP), calibrated on published results.

Modules: `hardware` (GPU and fabric profiles), `models` (shapes from config.json), `efficiency` (the one
set of constants), `kernels` (roofline and measured MoE timings), `imbalance` (expert load), `step_model`
(decode step, prefill chunk, aggregated iteration), `calibration` (published rows), `plan` (best EP and
batch under an ITL target), `report`, `plots`. Entry point: `moelink plan` (benchmarks/cluster_model.py).
"""
