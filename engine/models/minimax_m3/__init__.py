"""MiniMax-M3 (MiniMaxAI/MiniMax-M3, transformers' minimax_m3_vl): its text model, block-sparse attention layers
(engine/models/block_sparse.py) beside full GQA ones, dense and routed MLP layers with a shared expert, all gated by
the clamped SwiGLU; the multimodal checkpoint's vision tower is not read (requests with images are refused)."""
