"""DeepSeek-V4.1 (issue 81), one package: its registry entry (config.py), its config.json read by its own config class
while the locked transformers has none and mapped onto moelink's configs (reader.py), its block kinds (blocks.py: the
"shared_compressed" attention of attention.py over engine/models/shared_compressed_attention_config.py's cache layout,
the "lagged_hyper" residual with the Engram n-gram memory of engram.py, the "hc_lagged" ends and the "v41" checkpoint
kind), its ropes (rope.py), its fake-quantization points (fake_quant.py), its state after a verify step (rollback.py:
the rings rewritten from the accepted tokens), its DSpark draft layers (dspark.py) and its tiny checkpoint (tiny.py).
kinds.py imports blocks.py and dspark.py for the models side. Imports nothing: engine/config reads the family's config
modules."""
