"""moelink.planner: the cluster model of MoE serving throughput per GPU (DP attention + EP), calibrated on
published results; `moelink plan` (engine/api/plan_cli.py) is its command.

Modules: `hardware` (GPU and fabric profiles, assumed GPU-hour prices), `models` (shapes from config.json),
`efficiency` (the one set of constants), `kernels` (roofline and measured MoE timings), `imbalance` (expert
load), `step_model` (decode step, prefill chunk, aggregated iteration), `engines` (moelink vs published
engines: modes, measured kernels, feature status), `calibration` (published rows: calibration and
validation), `plan` (best EP and batch under an ITL target), `costs` ($/M tokens), `report`, `plots`,
`cost_report` (`--report`), `kv_handoff` (disaggregation's KV handoff), `offload_tier` (the KV
offload tiers: prefix tokens each holds, TTFT a hit saves). Links and all-to-all volumes come from `comm.link_model`.
A product feature, not a benchmark: it predicts, it never runs a model.
Must not import: benchmarks, engine (every sub-package), scheduler, moe, kernels.
"""
