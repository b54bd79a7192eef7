"""moelink.engine.kv_transfer: the KV data plane between engines (prefill/decode disaggregation): the worker half that
copies a request's block rows (engine/contract/kv_blocks.py), the connectors (in-host reference `inhost.py`; remote `remote.py` over a
bounded saved-KV store `store.py`), the transports chosen by name (`transport.py`: tcp, shm, collective, nixl, whose
in-place reads of a cache registered once are `nixl_inplace.py`), the wire
format (`wire.py`), the side channel's handshake, trusted peers and settings (`auth.py`, `peers.py`, `config.py`),
and the decode side's layer-pipelined arrival (`arrival.py`).

Below the runner: `engine/rank` calls its worker half, `engine/api` builds a connector from flags. Imports without Ray.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
