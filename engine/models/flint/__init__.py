"""Flint (RecursiveSI/flint): its architecture entry (config.py) and config reader (reader.py); its layers are the
built-in block kinds (GQA with per-head q/k norm and a learned sink per head, rotary and a sliding window on the
sliding layers only, NoPE full layers; routed experts by the top-k of sigmoid scores, renormalised, beside an
ungated shared expert; dense layers by mlp_only_layers). Imports nothing: engine/config reads the family's config
modules (engine/config/families.py).
Its tiny checkpoints (`moelink make-tiny-model --arch`): tiny.py."""
