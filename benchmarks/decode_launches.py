"""Every launch of one batch-1 decode step of one decoder layer, and the bytes each must move, on the CPU.

    TRITON_INTERPRET=1 python -m moelink.benchmarks.decode_launches [--model qwen3-30b-a3b|deepseek-v2-lite|all]
        [--context 1024] [--small] [--fp8] [--out PATH]

`--fp8`: the model as its published FP8 checkpoint holds it (Qwen3-30B-A3B-FP8: `quantization_config` fp8 e4m3,
dynamic activations, 128 x 128 blocks: the projections, the dense MLPs and the experts e4m3 with block scales).

Why: at batch 1 a decode step is a few hundred small kernels, each waiting for the one before; the step's
memory floor (weights + KV) is ~43 us per Qwen3-30B-A3B layer on an H100, so every launch that moves no floor
byte costs a visible share. This tool lists them without a GPU.

How: it builds one MoE decoder layer of the model's real shape (random bf16 weights; `--small` the CPU smoke
shapes of benchmarks/engine_decode.py) through the engine's own classes and kernel selector (the Triton kernels,
run by the Triton interpreter), and runs one decode step of one sequence with `--context` cached tokens as the
decode graphs run it (engine/rank/cuda_graph.py: valid-row mask set, expert counters on). Two hooks record:
- each Triton launch (the interpreter's GridExecutor): the kernel, its grid, and the bytes its programs load and
  store (masked lanes excluded), as unique addresses (what DRAM must deliver at least) and as requested (with
  re-reads of the same address by other programs: L2 traffic);
- each torch op that would be a CUDA kernel (a TorchDispatchMode; views, allocations and the interpreter's own
  copies excluded): its input and output bytes (a gather reads its output's size, not the whole table). A
  host sync (`_local_scalar_dense`) is listed too.
Each launch is tagged with the model code that issued it (the innermost moelink frame) and the module.

The floor is what one step of the layer must read at least: every parameter but the routed experts, the
top_k experts one token routes to (gate, up and down rows), and the K/V of the `context + 1` tokens attention
reads; the launch bytes above it are what fusion can remove (activations written and read back).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .engine_decode import BLOCK, FP8_QUANT, MODELS, decode_inputs, layer_bytes, one_expert_bytes, random_weights

RESULTS = Path(__file__).parent / "results"
_REPO = str(Path(__file__).resolve().parent.parent)
_HERE = str(Path(__file__).resolve())
aten = torch.ops.aten
# Ops that launch nothing on a GPU: allocations and metadata.
_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
         aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default, aten.set_.source_Storage,
         aten.set_.source_Storage_storage_offset, aten.resize_.default}
# Gathers read the rows they return (and the indices), not the whole table.
_GATHERS = ("index_select", "embedding", "gather", "index")
# In-place scatters write the rows their source gives.
_SCATTERS = ("index_add_", "index_put_", "scatter_", "scatter_add_", "index_copy_")


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view covers (an expanded dim, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _site() -> str:
    """The innermost frame of moelink's own code (not this tool), as 'path:function'."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        # (a virtual environment inside the checkout, .venv/, is not moelink's code)
        if name.startswith(_REPO) and name != _HERE and "site-packages" not in name:
            return f"{os.path.relpath(name, _REPO)}:{f.f_code.co_name}"
        f = f.f_back
    return "?"


class LaunchLog:
    """The launches of the step, in order: dicts with kind, name, site, module and byte counts."""

    def __init__(self):
        self.launches: list[dict] = []
        self.modules: list[str] = [""]
        self.in_triton = 0
        self.loads: list[tuple[np.ndarray, int]] = []
        self.stores: list[tuple[np.ndarray, int]] = []
        self.requested = Counter()

    def module_hooks(self, root: torch.nn.Module, prefix: str) -> list:
        hooks = []
        for name, m in root.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            hooks.append(m.register_forward_pre_hook(lambda _m, _a, full=full: self.modules.append(full)))
            hooks.append(m.register_forward_hook(lambda _m, _a, _o: self.modules.pop() and None))
        return hooks

    def torch_op(self, func, args, kwargs, out) -> None:
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        op = func.overloadpacket.__name__
        if op == "_local_scalar_dense":
            self.launches.append(dict(kind="sync", name=name, site=_site(), module=self.modules[-1], read=0, write=0))
            return
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if op in _GATHERS:
            read = sum(_span_bytes(t) for t in outs) + sum(_span_bytes(t) for t in ins[1:] if not t.is_floating_point())
        elif op in _SCATTERS:
            read = sum(_span_bytes(t) for t in ins[1:])
        else:
            seen, read = set(), 0
            for t in ins:
                key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
                if key not in seen:
                    seen.add(key)
                    read += _span_bytes(t)
        write = sum(_span_bytes(t) for t in ins[1:2]) if op in _SCATTERS else sum(_span_bytes(t) for t in outs)
        self.launches.append(dict(kind="torch", name=name, site=_site(), module=self.modules[-1], read=read,
                                  write=write))

    def begin_triton(self) -> None:
        self.in_triton += 1
        self.loads, self.stores, self.requested = [], [], Counter()

    def end_triton(self, name: str, grid: tuple, site: str) -> None:
        self.in_triton -= 1
        unique = {}
        for what, parts in (("read", self.loads), ("write", self.stores)):
            total = 0
            for size in {s for _, s in parts}:
                addrs = [a for a, s in parts if s == size]
                total += int(np.unique(np.concatenate(addrs)).size) * size if addrs else 0
            unique[what] = total
        self.launches.append(dict(kind="triton", name=name, site=site, module=self.modules[-1], grid=list(grid),
                                  read=unique["read"], write=unique["write"],
                                  read_requested=self.requested["read"], write_requested=self.requested["write"]))


class _TorchOps(TorchDispatchMode):
    def __init__(self, log: LaunchLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.log.in_triton and func not in _FREE and _launches(func, args, kwargs or {}, out):
            self.log.torch_op(func, args, kwargs or {}, out)
        return out


def _launches(func, args, kwargs, out) -> bool:
    """Whether the op runs a kernel: it returns a tensor, and a view op (`to`, `contiguous`, `reshape` may
    alias) only when its output is a new storage (a copy)."""
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not outs:
        return False
    if not func.is_view:
        return True
    ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    return any(t.untyped_storage().data_ptr() not in ins for t in outs)


@contextmanager
def record(log: LaunchLog):
    """Record every launch while the block runs (needs TRITON_INTERPRET=1 before the kernels are imported)."""
    from triton.runtime import interpreter as interp

    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    saved = dict(call=executor.__call__, load=builder.create_masked_load, store=builder.create_masked_store,
                 grid=builder.set_grid_dim)
    grid_box = [()]

    def call(self, *args, **kwargs):
        site = _site()
        log.begin_triton()
        try:
            saved["call"](self, *args, **kwargs)
        finally:
            log.end_triton(self.fn.__name__, grid_box[0], site)

    def set_grid(self, x, y, z):
        grid_box[0] = (x, y, z)
        return saved["grid"](self, x, y, z)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        a = ptrs.data[mask.data].astype(np.uint64).ravel()
        log.loads.append((a, size))
        log.requested["read"] += a.size * size
        return saved["load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        a = ptrs.data[mask.data].astype(np.uint64).ravel()
        log.stores.append((a, size))
        log.requested["write"] += a.size * size
        return saved["store"](self, ptrs, value, mask, cache_policy)

    executor.__call__, builder.create_masked_load, builder.create_masked_store = call, load, store
    builder.set_grid_dim = set_grid
    try:
        with _TorchOps(log):
            yield log
    finally:
        executor.__call__, builder.create_masked_load = saved["call"], saved["load"]
        builder.create_masked_store, builder.set_grid_dim = saved["store"], saved["grid"]


def build_layer(hf: dict, layer_idx: int, max_len: int):
    """One decoder layer of `hf`'s model at index `layer_idx`, random weights (engine_decode.random_weights: norm
    weights 1, float ones fan-in scaled, FP8 ones e4m3 with block scales), through the Triton kernel selector."""
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.models.registry import ARCHITECTURES
    from moelink.engine.models.moe_decoder import lone_layer
    from moelink.engine.models.rope import RotaryEmbedding
    from moelink.kernels.ops import select_kernels
    from moelink.moe.stats import MoEStats

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=layer_idx + 1)))
        cfg = ModelConfig.from_pretrained(d, dtype="bfloat16", max_model_len=max_len)
    dev = torch.device("cpu")
    kernels = select_kernels(dev, "triton")
    rope = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, cfg.max_model_len, kernels, dev)
    stats = MoEStats(len(cfg.sparse_layers), cfg.num_experts, dev)
    layer = lone_layer(cfg, layer_idx, rope, kernels, dev, None, stats, ARCHITECTURES[cfg.architecture])
    torch.manual_seed(0)
    random_weights(layer)
    return cfg, layer.eval()


def floor_bytes(cfg, layer, context: int) -> dict:
    """What one batch-1 step of `layer` must read: its weights but the routed experts, top_k routed experts,
    and the K/V of the context + 1 tokens attention reads."""
    dense = layer_bytes(layer)
    experts = 0
    if layer.moe is not None:  # (an FP8 expert's block scales with it)
        experts = cfg.moe.router.top_k * one_expert_bytes(layer.moe)
    kv = (context + 1) * cfg.attention.kv_bytes_per_token(cfg.cache_dtype)
    return dict(weights_but_experts=dense, routed_experts=experts, kv=kv, total=dense + experts + kv)


def count(model: str, context: int, small: bool, gpu: str, fp8: bool = False) -> dict:
    """The launch list and floor of one batch-1 decode step of one MoE layer of `model` (its FP8 checkpoint's
    with `fp8`), the MoE launch config (tiny path or sorted) chosen as on GPU `gpu` (a kernels/configs file name's
    device_name)."""
    from moelink.kernels import moe_config
    full, smoke, title = MODELS[model]
    hf = smoke if small else full
    if fp8:
        hf, title = dict(hf, quantization_config=FP8_QUANT), title + "-FP8"
    layer_idx = min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"] - 1)  # the first MoE layer
    cfg, layer = build_layer(hf, layer_idx, context + BLOCK)
    shapes = cfg.attention.cache_shapes(-(-(context + 1) // BLOCK), BLOCK)
    cache = tuple(torch.randn(s, dtype=cfg.dtype) * 0.5 for s in shapes)
    caches = [cache] * (layer_idx + 1)  # only layer_idx's is read
    ids_T, pos_T, ctx = decode_inputs(cfg, 1, context, torch.device("cpu"), caches)
    x_TD = torch.randn(1, cfg.hidden_size, dtype=cfg.dtype)
    residual_TD = torch.randn(1, cfg.hidden_size, dtype=cfg.dtype)
    from moelink.moe.layer import run_stages

    layer.moe.valid_rows_T = torch.ones(1, dtype=torch.bool)  # as a decode graph runs (cuda_graph._forward)
    log = LaunchLog()
    hooks = log.module_hooks(layer, f"layers.{layer_idx}")
    cpu_name = moe_config.device_name
    moe_config.device_name = lambda device: gpu  # the GPU's MoE launch config (tiny path at decode sizes)
    try:
        with torch.inference_mode(), record(log):
            run_stages(layer.stages(pos_T, (x_TD, residual_TD), None, ctx))
    finally:
        moe_config.device_name = cpu_name
        for h in hooks:
            h.remove()
    floor = floor_bytes(cfg, layer, context)
    moved = sum(r["read"] + r["write"] for r in log.launches)
    kinds = Counter(r["kind"] for r in log.launches)
    return dict(model=title + (" (CPU smoke shape)" if small else " shape"), model_key=model, layer=layer_idx,
                moe_config_gpu=gpu, batch=1, context=context, launches=len(log.launches) - kinds["sync"], triton_launches=kinds["triton"],
                torch_launches=kinds["torch"], host_syncs=kinds["sync"], floor_bytes=floor,
                launch_bytes=moved, launch_bytes_over_floor=moved / floor["total"], per_launch=log.launches)


def _print(res: dict) -> None:
    f = res["floor_bytes"]
    print(f"{res['model']}, layer {res['layer']}, batch 1, context {res['context']}: {res['launches']} launches "
          f"({res['triton_launches']} Triton, {res['torch_launches']} torch), {res['host_syncs']} host syncs")
    for i, r in enumerate(res["per_launch"]):
        print(f"  {i:>2} {r['kind']:<6} {r['name'][:34]:<34} {r['read'] / 1e3:>10.1f} kB read {r['write'] / 1e3:>8.1f} kB "
              f"written  {r['site']}")
    print(f"  floor {f['total'] / 1e6:.2f} MB (weights but experts {f['weights_but_experts'] / 1e6:.2f}, top-k experts "
          f"{f['routed_experts'] / 1e6:.2f}, KV {f['kv'] / 1e6:.2f}); launches move {res['launch_bytes'] / 1e6:.2f} MB "
          f"({res['launch_bytes_over_floor']:.3f}x the floor)")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all", choices=sorted(MODELS) + ["all"], help="model shape")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens of the one sequence")
    ap.add_argument("--small", action="store_true", help="the CPU smoke shapes (seconds, not minutes)")
    ap.add_argument("--gpu", default="NVIDIA_H100_80GB_HBM3",
                    help="the GPU whose MoE launch configs (kernels/configs) pick the expert path")
    ap.add_argument("--fp8", action="store_true", help="the model's FP8 checkpoint (e4m3 weights, 128 x 128 blocks)")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("decode_launches runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1.")
    models = sorted(MODELS) if args.model == "all" else [args.model]
    from moelink.engine.api.provenance import git_commit

    result: dict[str, Any] = dict(benchmark="decode_launches", command="TRITON_INTERPRET=1 python -m moelink.benchmarks.decode_launches "
                  + " ".join(argv if argv is not None else sys.argv[1:]), commit=git_commit(),
                  date=time.strftime("%Y-%m-%d"), results=[])
    for m in models:
        res = count(m, args.context, args.small, args.gpu, args.fp8)
        _print(res)
        result["results"].append(res)
    if args.out:
        from moelink.engine.api.provenance import write_result

        print(f"wrote {write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
