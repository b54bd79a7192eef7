"""Tiny model configs shared by the test suite."""

# Tiny configs used across the suite. Each arch has one with a number of
# experts that is not a power of two and top-k >= 3.
TINY_CONFIGS = {
    "qwen3_e6k3": dict(arch="qwen3_moe", num_layers=2, hidden_size=64, num_experts=6, top_k=3, num_heads=4,
                       num_kv_heads=2, head_dim=16, moe_intermediate_size=32, vocab_size=512),
    "qwen3_e8k2_dense1": dict(arch="qwen3_moe", num_layers=3, hidden_size=48, num_experts=8, top_k=2, num_heads=6,
                              num_kv_heads=3, head_dim=8, moe_intermediate_size=24, vocab_size=400,
                              mlp_only_layers=(1,), norm_topk_prob=False),
    "mixtral_e5k3": dict(arch="mixtral", num_layers=2, hidden_size=64, num_experts=5, top_k=3, num_heads=4,
                         num_kv_heads=1, moe_intermediate_size=40, vocab_size=512),
    "mixtral_e8k2": dict(arch="mixtral", num_layers=2, hidden_size=32, num_experts=8, top_k=2, num_heads=2,
                         num_kv_heads=2, moe_intermediate_size=48, vocab_size=320),
}
