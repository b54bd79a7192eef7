"""Hunyuan Hy4 (Tencent, transformers' hy_v4): DeepSeek Sparse Attention (MLA with a lightning indexer whose rope
covers each index head's last dims, "shared" layers reusing the previous selection) with a sink logit per head and an
element-wise output gate, independent hyper-connections (hc_mult streams, no mixing matrix), sigmoid-routed experts
with a clamped SwiGLU beside shared experts: its registry entry (config.py), config reader (reader.py), residual and
head kinds (kinds.py) and tiny model (tiny.py)."""
