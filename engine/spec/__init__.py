"""Speculative decoding, one package: the proposers (`proposer/`: n-gram prompt lookup, the chain drafter over an MTP
layer or an EAGLE-3 head, and the factories that pick one per method), the verify step (`verify.py`: a verify
step's sampling, every processor per verified position) over the acceptance rule (`rejection.py`), the draft heads
(`heads/`, a floor of their own below the rank) and `api.py`, the one object the cluster hands each rank
(`SPEC_DECODING`). The rank calls the feature only through engine/contract/spec_decoding.py's protocols
(`SpecDecoding`: `HostDrafter`, `DeviceDrafter`, `VerifyStep`, `VerifyResult`, `DraftRollback`); the rollback of a
verify step's rejected drafts is the model's own (`replay_states`: gated DeltaNet's states,
engine/models/deepseek_v4/rollback.py's rings). Its other halves: the flag (engine/config/speculative.py) and the
scheduler's (scheduler/spec_decode.py, scheduler/draft_control.py). ARCHITECTURE.md: Speculative decoding.

This file imports nothing: the rank imports `engine.spec.heads`, and Python runs this file first.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.grammar, engine.lora.rank, engine.prompt_logprobs, engine.rl, engine.server, engine.tools.
"""
