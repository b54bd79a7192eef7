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
