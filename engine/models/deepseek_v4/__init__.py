"""DeepSeek-V4 (Flash, Pro; issue 45), one package: its registry entry (config.py) and config reader (reader.py: its
config.json into engine/config's compressed-attention and hyper-connection configs, and its published weight formats),
its block kinds for the one decoder (blocks.py registers the "compressed" attention, the "token_routed" FFN, the "hyper"
residual, the "hc_streams" / "hc_head" ends and the "published" checkpoint kind), its attention (attention.py,
decode.py), its state rollback (rollback.py), its hyper-connections (engine/models/hyper_connections.py, shared), its published FP8 weights
(weights.py) and its MTP draft head (mtp.py, registered as the "dsv4" MTP layout). kinds.py imports blocks.py and
mtp.py, and the models side imports kinds.py (engine/models/blocks/registry.py): the family's registration is its line
in engine/config/families.py. Imports nothing: engine/config reads the family's config modules."""
