"""Tensor parallelism (`-tp N`, docs/tensor-parallelism.md), one package: the group and its collectives
(`group.py`: one `TensorParallel` per rank, passed into the model, and `make_tp_group`), a rank's view of a model's
attention (`attention.py`: `shard_attention`, `tp_local_config`, `kv_head_start`), and the weight-sharding rules of
the sharded layers: how a `Linear` is split (`linear.py`: `Replicated`, `ColumnParallel`, `OwnRows`, `RowParallel`
behind the `LinearParallel` protocol, the seam engine/models/linear.py calls), the embedding and LM head by vocab
rows (`vocab.py`: `VocabShard`) and the MoE block (`experts.py`: `ExpertShard`, experts split by intermediate size,
and `token_sliced_stages`, each rank's token slice under EP). The layers that hold the shards are the models'
(engine/models/, engine/spec/heads/: `tp: TensorParallel | None`, None without TP). The feature's other halves: its
flags and their checks (engine/config/parallel.py, engine/config/tensor_parallel.py), the KV transfer's per-rank
heads (engine/kv_transfer/tp_shard.py, tp_join.py) and the executors' groups (engine/cluster/).

A floor of its own above the configuration: the contract (engine/contract/spec_decoding.py) and everything above it
name a `TensorParallel`. This file imports nothing.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.contract, engine.core, engine.grammar, engine.kv_transfer, engine.lora, engine.lora.rank, engine.models, engine.multimodal, engine.prompt_logprobs, engine.rank, engine.rl, engine.server, engine.spec, engine.spec.heads, engine.state, engine.tools.
"""
