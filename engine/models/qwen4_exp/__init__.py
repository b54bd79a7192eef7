"""Qwen3.8-Flash-Next (transformers' qwen4_exp): gated DeltaNet beside QSA attention (gated GQA over the blocks a
token indexer picks), gated hyper-connections over hc_count residual streams, PLE n-gram tables before some gated
DeltaNet layers, Qwen3-Next's MoE block. Its registry entry (config.py), config reader and layer configs
(reader.py), block kinds (kinds.py: blocks.py, ple.py, qsa.py) and tiny model (tiny.py)."""
