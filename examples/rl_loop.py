"""A tiny RL loop on CPU (docs/rl.md): a trainer process and a moelink engine, the trainer's weights reaching the
engine through a process group, the engine's logprobs checked against the trainer's own forward at every step.

    python examples/rl_loop.py [--steps 3] [--model PATH] [--prompts 4] [--max-tokens 8]

The trainer (a spawned process) holds transformers' model of the checkpoint in float64 and is rank 0 of a gloo group
the engine joins (`LLM.init_weights_update_group`, engine rank r as rank 1 + r). Each step:
1. the engine samples rollouts (temperature 1, seeded) and scores each whole rollout again with prompt logprobs, the
   logprob of every token given those before it (what a trainer recomputes);
2. the trainer runs its own forward over the same rollouts and checks the engine's logprobs equal its own (float64
   on both sides; the engine scores in float32: within 1e-4);
3. the trainer takes an "optimizer step" (noise on every parameter), names its weights as the checkpoint does
   (transformers' save_pretrained undoes its own renaming), and broadcasts them; the engine receives them with
   `LLM.update_weights_from_distributed`, each rank keeping its own part, and serves them from the next request on.
Without --model a tiny random Qwen3-MoE checkpoint is made in a temporary folder. Exit status 0 when every step's
logprobs matched.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys
import tempfile
from pathlib import Path

TOLERANCE = 1e-4  # the engine scores prompt logprobs in float32 (engine/prompt_logprobs/scoring.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer(model_path: str, port: int, conn, seed: int) -> None:
    """Rank 0 of the weight-update group: checks the engine's logprobs, steps, broadcasts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moelink.engine.rl.trainer import TrainerGroup

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64, experts_implementation="eager").eval()
    group = TrainerGroup("127.0.0.1", port, 2, "rl", "gloo")
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, seqs, engine_lps = msg
            worst = 0.0
            with torch.no_grad():
                for seq, lps in zip(seqs, engine_lps):
                    logits = model(torch.tensor([seq])).logits[0]
                    own = torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
                    worst = max(worst, float((own - torch.tensor(lps, dtype=torch.float64)).abs().max()))
                for p in model.parameters():  # the "optimizer step"
                    p.add_(0.05 * p.std() * torch.randn_like(p))
            model.save_pretrained(tmp)  # the checkpoint's names (transformers undoes its own fusing of the experts)
            named = [(k, v) for f in sorted(Path(tmp).glob("*.safetensors")) for k, v in load_file(f).items()]
            conn.send((worst, TrainerGroup.specs(named)))
            group.broadcast(named)
    group.close()


def rollouts_and_logprobs(llm, prompts, max_tokens: int, seed: int):
    """Sampled rollouts (prompt + completion) and the engine's logprob of every rollout token after the first."""
    from moelink.engine import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=seed, ignore_eos=True),
                        use_tqdm=False)
    seqs = [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    scored = llm.generate(seqs, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    lps = [[entry[t].logprob for t, entry in zip(seq[1:], o.prompt_logprobs[1:])] for seq, o in zip(seqs, scored)]
    return seqs, lps, outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default=None, help="a Qwen3-MoE-like checkpoint (default: a tiny random one)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)

    from moelink.engine import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model = ns.model
        if model is None:
            from moelink.engine.tools.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny", "qwen3_moe", num_layers=2, hidden_size=64, num_experts=6,
                                        top_k=3, num_heads=4, num_kv_heads=2, head_dim=16, moe_intermediate_size=32,
                                        vocab_size=512))
        llm = LLM(model, dtype="float64", num_kv_blocks=128, block_size=8, enable_weight_updates=True)
        port = _free_port()
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=trainer, args=(model, port, theirs, ns.seed), daemon=True)
        proc.start()
        ok = True
        try:
            llm.init_weights_update_group("127.0.0.1", port, 1, 2, "rl", "gloo")
            prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + i)] for i in range(ns.prompts)]
            for step in range(ns.steps):
                seqs, lps, outs = rollouts_and_logprobs(llm, prompts, ns.max_tokens, ns.seed + step)
                ours.send(("check", seqs, lps))
                worst, specs = ours.recv()
                versions = {o.weight_version for o in outs}
                match = worst <= TOLERANCE
                ok &= match
                print(f"step {step}: weights {versions.pop()!s:>7}, {len(seqs)} rollouts, largest |engine - trainer| "
                      f"logprob {worst:.2e} {'ok' if match else 'MISMATCH'}", flush=True)
                info = llm.update_weights_from_distributed(**specs, group_name="rl", weight_version=f"step-{step + 1}")
                print(f"        synced {info['bytes_read'] / 2**20:.2f} MiB in {info['seconds'] * 1e3:.1f} ms", flush=True)
            llm.destroy_weights_update_group("rl")
            ours.send(("stop",))
            proc.join(60)
        finally:
            if proc.is_alive():
                proc.kill()
            llm.shutdown()
    print("all steps matched" if ok else "logprobs differed", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
