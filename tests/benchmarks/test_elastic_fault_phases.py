"""benchmarks/elastic_fault.py: the before / during / after split of a step series."""
from moelink.benchmarks.elastic_fault import phases


def test_phases_split_at_the_kill_and_the_first_full_step_after_it():
    # (start s, duration s, tokens, unfinished requests before the step)
    steps = [(0.0, 0.1, 4, 4), (0.1, 0.1, 4, 4),  # before: 40 tok/s
             (0.2, 0.5, 0, 4), (0.7, 0.1, 2, 4), (0.8, 0.1, 4, 4),  # kill at 0.2: recovery, recompute, full again
             (0.9, 0.2, 4, 4)]  # after: 20 tok/s
    p = phases(dict(steps=steps, killed_at_s=0.2, recovery_s=0.45))
    assert p["before_tok_s"] == 40.0
    assert abs(p["during_tok_s"] - 6 / 0.7) < 1e-9 and abs(p["pause_s"] - 0.7) < 1e-9
    assert p["after_tok_s"] == 20.0 and p["time_to_recover_s"] == 0.45


def test_rejoin_phases_split_the_ep_n_minus_1_stretch_at_the_rejoin():
    from moelink.benchmarks.elastic_fault import rejoin_phases

    # (start s, duration s, tokens, unfinished requests before the step, world size)
    steps = [(0.0, 0.1, 4, 4, 4),  # before: 40 tok/s
             (0.1, 0.4, 0, 4, 3), (0.5, 0.1, 4, 4, 3),  # the loss and its recompute
             (0.6, 0.2, 4, 4, 3),  # after the loss, EP 3: 20 tok/s
             (0.8, 0.3, 2, 4, 4), (1.1, 0.1, 4, 4, 4),  # the admission (rejoined at 0.8) and the recompute
             (1.2, 0.05, 4, 4, 4), (1.25, 0.05, 2, 2, 4)]  # after the rejoin, EP 4: 60 tok/s
    p = rejoin_phases(dict(steps=steps, killed_at_s=0.1, recovery_s=0.3, rejoined_at_s=0.8, rejoin_s=0.25))
    assert p["before_tok_s"] == 40.0 and abs(p["during_tok_s"] - 4 / 0.5) < 1e-9
    assert abs(p["after_loss_tok_s"] - 20.0) < 1e-9 and "after_tok_s" not in p
    assert abs(p["during_rejoin_tok_s"] - 6 / 0.4) < 1e-9 and abs(p["rejoin_pause_s"] - 0.4) < 1e-9
    assert abs(p["after_rejoin_tok_s"] - 60.0) < 1e-9 and p["time_to_rejoin_s"] == 0.25
