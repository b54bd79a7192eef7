"""RL on one rank (docs/rl.md): the Worker's RL calls (`worker.RLWorker`, a mixin of engine/rank/worker.Worker, whose
methods are the rank calls engine/contract/worker_api.RankCall names), a trainer's broadcast received and written a
bucket at a time (`weight_sync.py`), sleep / wake-up of the weights and KV cache (`sleep_mode.py`), and the bytes an
update overwrote, kept to roll it back (`rollback.py`).

It is engine/rank's floor (tests/test_layering.py RL_RANK_PART): it writes through the rank's loader, so it imports
only what engine/rank may.
"""
