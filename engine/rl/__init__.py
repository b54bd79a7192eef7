"""RL rollouts (docs/rl.md): what a trainer asks of the engine beside generation. Weight updates while serving live
here (`weights.py`: the new values checked on the driver, written in place on every rank); prompt logprobs and
routed experts are the ranks' (engine/rank/prompt_logprobs.py, routed_experts.py)."""
