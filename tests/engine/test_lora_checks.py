"""Issue 76, the LoRA items: an adapter is checked whole before it is admitted, and one adapter's values never reach
another request's rows. Unit tests of engine/lora/ (adapter.py, patterns.py, checker.py) and the kernels' reference
LoRA path, over a hand-made checkpoint of two linears and adapters written with safetensors (no engine, no peft
but as the oracle of the pattern rules).

- item 3: one NaN / inf in a lora_B made every other user's base-model row NaN (the CPU path read slot 0's B for a
  row of no adapter, then scaled it by 0: 0 * inf = NaN); such an adapter is now refused, and the rows never mix.
- item 4: lora_alpha 1e308 loaded, then killed the engine loop at its first step (a float32 slot scale): refused.
- item 6: rank_pattern keys compiled by Python's backtracking `re` (24 s under the GIL for `(.|.){0,22}#`): matched
  by RE2 (google-re2, linear time), as peft matches them; without google-re2 a regex key is refused, saying so.
- item 12: each malformed adapter (a bad regex, rank_pattern 0, a list as config, JSON nested past the parser, a
  safetensors file cut short, a header of a million keys, a 10 MB path) is one ValueError naming the field, through
  the load route a 400; a missing, unreadable or file-less directory are one and the same error.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from moelink.engine.config.lora import LoRAConfig
from moelink.engine.contract.lora import LoRARequest
from moelink.engine.lora.adapter import ModelTargets, read_adapter
from moelink.engine.lora.adapter_config import AdapterConfig

Q, O = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
D = 8  # the linears are [D, D]
MODEL = ModelTargets({Q: (D, D), O: (D, D)}, {})
LIMITS = LoRAConfig(max_loras=2, max_lora_rank=8)


def _adapter(path, r=2, alpha=4.0, tensors=None, **cfg) -> str:
    """An adapter directory: adapter_config.json from `cfg` over the defaults, A / B on q_proj and o_proj."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {}
        for m in (Q, O):
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, D, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(D, r, generator=g)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "o_proj"], **cfg}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def _read(path, load=True, name="a"):
    return read_adapter(LoRARequest(name, 1, str(path)), LIMITS, MODEL, load=load)


def test_a_clean_adapter_reads_with_its_scales(tmp_path):
    a = _read(_adapter(tmp_path / "a", rank_pattern={"o_proj": 4}, alpha_pattern={"o_proj": 2.0},
                       tensors={f"base_model.model.{Q}.lora_A.weight": torch.ones(2, D),
                                f"base_model.model.{Q}.lora_B.weight": torch.ones(D, 2),
                                f"base_model.model.{O}.lora_A.weight": torch.ones(4, D),
                                f"base_model.model.{O}.lora_B.weight": torch.ones(D, 4)}))
    assert a.scales == {Q: 2.0, O: 0.5} and a.weights[O][0].shape == (4, D)
    meta = _read(tmp_path / "a", load=False)
    assert meta.weights[Q][0].device.type == "meta" and meta.scales == a.scales


# -- --lora-target-modules (issue 79 item 10) -----------------------------------------------------------------------
def test_lora_target_modules_skip_an_adapters_other_targets_as_vllm(tmp_path):
    """vLLM's --lora-target-modules wraps only the listed modules (a name or a suffix; vLLM's packed qkv_proj for
    q / k / v): an adapter's targets outside them are skipped, one left with none is refused, and an entry naming
    no module of the model is refused at the start (a typo)."""
    from moelink.engine.lora.adapter import check_target_modules, in_target_modules

    path = _adapter(tmp_path / "a")
    for targets, kept in ((("o_proj",), {O}), (("qkv_proj",), {Q}), ((Q, "o_proj"), {Q, O}), (None, {Q, O})):
        limits = LoRAConfig(max_loras=2, max_lora_rank=8, target_modules=targets)
        a = read_adapter(LoRARequest("a", 1, path), limits, MODEL)
        assert set(a.weights) == set(a.scales) == kept, targets
    with pytest.raises(ValueError, match="none of its targets"):
        read_adapter(LoRARequest("a", 1, path), LoRAConfig(target_modules=("v_proj",)), MODEL)
    assert in_target_modules("model.layers.0.mlp.gate_up_proj", ("up_proj",))  # a piece names its packed module
    assert in_target_modules("model.layers.1.mlp.experts", ("experts",))
    assert not in_target_modules("model.layers.1.mlp.experts", ("gate_up_proj",))  # vLLM's experts are `experts`
    check_target_modules(("o_proj", "qkv_proj"), MODEL)
    with pytest.raises(ValueError, match="o_prj"):
        check_target_modules(("o_prj",), MODEL)
    with pytest.raises(ValueError, match="lora_target_modules"):
        LoRAConfig(target_modules=())


# -- item 3 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e5])
@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_an_adapter_holding_a_non_finite_or_huge_value_is_refused(tmp_path, bad, which):
    path = _adapter(tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    key = f"base_model.model.{O}.{which}.weight"
    tensors[key][1, 1] = bad
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    for load in (True, False):  # the rank's read and the driver's check (values scanned, not kept)
        with pytest.raises(ValueError, match=f"tensor '{key}' holds a (non-finite value|value over 65504)"):
            _read(path, load=load)


def test_a_row_of_another_adapter_never_reads_a_slots_values():
    """The kernels' reference LoRA path (the CPU path, and the rows the Triton kernels skip): a row of no adapter
    (slot -1) and a row of a clean adapter stay exact beside a slot whose A and B hold inf and NaN (defence in depth:
    the adapter check refuses such values first)."""
    from moelink.kernels.lora import reference_lora_expand, reference_lora_shrink
    from moelink.kernels.lora_moe import ExpertLoRA, reference_lora_fused_moe
    from moelink.kernels.moe import reference_fused_moe

    g = torch.Generator().manual_seed(1)
    T, K, N, R, L = 4, 6, 5, 3, 2
    x = torch.randn(T, K, generator=g)
    a = torch.randn(L, R, K, generator=g)
    b = torch.randn(L, N, R, generator=g)
    a[0, 0, 0], b[0, 1, 1], b[0, 2, 0] = float("inf"), float("nan"), float("inf")  # slot 0: a poisoned adapter
    scale = torch.tensor([2.0, 0.5])
    slots = torch.tensor([-1, 1, -1, 0])
    y0 = torch.randn(T, N, generator=g)
    t = reference_lora_shrink(x, a, slots)
    y = reference_lora_expand(y0.clone(), t, b, slots, scale)
    assert torch.equal(y[[0, 2]], y0[[0, 2]]), "a row of no adapter read slot 0's values"
    want1 = y0[1] + 0.5 * (b[1] @ (a[1] @ x[1]))
    assert torch.allclose(y[1], want1) and torch.isfinite(y[:3]).all()
    # Routed experts: the base rows' output equals the plain fused MoE's.
    E, Dm, I, top = 3, K, 4, 2
    w13, w2 = torch.randn(E, 2 * I, Dm, generator=g), torch.randn(E, Dm, I, generator=g)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]])
    w = torch.rand(T, top, generator=g)

    def stack(n_out, k_in):
        A, B = torch.randn(L * E, R, k_in, generator=g), torch.randn(L * E, n_out, R, generator=g)
        A[:E] = float("nan")  # slot 0's every expert
        B[:E] = float("inf")
        return ExpertLoRA(A, B, torch.ones(L * E))
    out = reference_lora_fused_moe(x, w13, w2, w, ids, slots, stack(2 * I, Dm), stack(Dm, I))
    base = reference_fused_moe(x, w13, w2, w, ids)
    assert torch.allclose(out[[0, 2]], base[[0, 2]]) and torch.isfinite(out[[0, 1, 2]]).all()


# -- item 4 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, says", [
    (dict(lora_alpha=1e308), "lora_alpha / r is"),
    (dict(lora_alpha=float("inf")), "lora_alpha=inf is invalid"),
    (dict(lora_alpha=float("nan")), "lora_alpha=nan is invalid"),
    (dict(lora_alpha=10 ** 400), "lora_alpha=.* is invalid"),
    (dict(lora_alpha=True), "lora_alpha=True is invalid"),
    (dict(r=0), "r=0 is invalid"),
    (dict(r=10 ** 400), "r=.* is invalid"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 is invalid"),
    (dict(rank_pattern={"q_proj": "4"}), r"rank_pattern\['q_proj'\]='4' is invalid"),
    (dict(alpha_pattern={"q_proj": float("inf")}), r"alpha_pattern\['q_proj'\]=inf is invalid"),
    (dict(alpha_pattern={"q_proj": 1e308}), r"the scale of 'model.layers.0.self_attn.q_proj'"),
    (dict(alpha_pattern={"q_proj": 4e4}), r"must be within \[-10000, 10000\]"),
])
def test_scalars_a_step_would_overflow_on_are_refused(tmp_path, cfg, says):
    """lora_alpha 1e308 loaded (200), then the slot write (`scale_X[rows] = 5e307`, float32) raised "value cannot be
    converted to type float without overflow" on the engine loop: dead until a restart. Every scalar is bounded now,
    every target's scale within [-1e4, 1e4]."""
    raw = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"], **cfg}
    with pytest.raises(ValueError, match=says):
        AdapterConfig.from_json(raw)
        _read(_adapter(tmp_path / "a", **{k: v for k, v in raw.items() if k != "r"}, r=2))


def test_every_scale_an_adapter_reaches_a_slot_with_is_a_finite_float32():
    """What the slot write needs (LoRASlots._write: a float32 scale per slot): the largest accepted scale fits."""
    cfg = AdapterConfig.from_json({"r": 1, "lora_alpha": 1e4, "target_modules": ["q_proj"]})
    scale = torch.zeros(1, dtype=torch.float32)
    scale[0] = cfg.target_scale(Q)
    assert math.isfinite(float(scale[0])) and float(scale[0]) == 1e4


# -- item 6 -------------------------------------------------------------------------------------------------------
KEYS = ["q_proj", "layers.0.self_attn.q_proj", r"model\.layers\.1\.mlp\.experts\.gate_up_proj", r".*\.gate_up_proj",
        r"layers\.[0-9]+\.self_attn\.(q|v)_proj", "(q|k)_proj", "^model.layers.0.self_attn.k_proj", "proj$",
        r"layers\.\d+\.mlp", "a|q_proj", "self_attn.o_proj|layers.1.self_attn.q_proj", ".*", "[^q]_proj",
        "layers.1?0.self_attn.v_proj", "q_p{1,2}roj", "(?P<n>o)_proj", r"self_attn\.[kq]_proj", "[a-z]+_proj",
        r"\w+", r"\Aq_proj", r"q_proj\Z", "(a|)q_proj", "(?:layers)\\.1\\..*", "x*",
        # Where RE2's dialect reads the same text otherwise (Python's reading is what runs): `{,2}` a literal in RE2,
        # `[[:alpha:]]` a POSIX class in RE2 (a set and a `]` in Python), `\Z` an error in RE2; flags; a key that
        # closes peft's group (`(.*\.)?(m)|(xq_proj)$`: every name starting with `m`); `q{` a literal in Python.
        "q_p{,2}roj", "[[:alpha:]]_proj", "(?i:Q_PROJ)", "(?i:[A-Z])_proj", "m)|(xq_proj", r"\bq_proj", "q{",
        "layersX1"]
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.10.self_attn.v_proj", "model.layers.1.mlp.experts.gate_up_proj",
           "model.layers.1.mlp.experts.down_proj", "model.layers.0.mlp.down_proj", "q_proj",
           "model.layers.1.self_attn.o_proj", "xq_proj", "model.layers.1.self_attnXo_proj", "q{", "layers.1"]


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # `[[:alpha:]]`: Python warns, as in peft
def test_pattern_keys_match_as_peft_matches_them():
    """Each key alone, and all of them in order (the first match wins), against peft's own get_pattern_key."""
    from peft.utils.other import get_pattern_key

    for key in KEYS:
        cfg = AdapterConfig(r=2, lora_alpha=4, target_modules=("q_proj",), rank_pattern=((key, 8),))
        for m in MODULES:
            want = 8 if get_pattern_key([key], m) == key else 2
            assert cfg.rank_alpha(m)[0] == want, (key, m)
    _assert_first_key_wins_as_in_peft(KEYS)


def _assert_first_key_wins_as_in_peft(keys: list[str]) -> None:
    """Every key of `keys` in one rank_pattern (values 3, 4, ...): each module gets the value of the key peft's own
    get_pattern_key picks (the first that matches, in the config's order), or r where none does."""
    from peft.utils.other import get_pattern_key

    cfg = AdapterConfig(r=2, lora_alpha=4, target_modules=("q_proj",),
                        rank_pattern=tuple((k, i + 3) for i, k in enumerate(keys)))
    for m in MODULES:
        key = get_pattern_key(keys, m)
        assert cfg.rank_alpha(m)[0] == (keys.index(key) + 3 if key in keys else 2), m


def test_a_catastrophic_pattern_key_is_matched_in_linear_time():
    """`(.|.){0,22}#` took 24 s to fail in Python's re (each +1 doubled it), holding the GIL. RE2's program, and so
    the steps counted, grow linearly with the repeat count, and a generous wall bound holds for keys Python's re
    would need 24 s and 2^66 times that for."""
    from moelink.engine.lora.patterns import MatchBudget, compile_key

    module = "model.layers.0.self_attn.q_proj" * 4
    steps = []
    t0 = time.monotonic()
    for n in (22, 44, 88):
        budget = MatchBudget()
        assert not compile_key(f"(.|.){{0,{n}}}#").matches(module, budget)
        steps.append(MatchBudget().left - budget.left)
    assert steps[2] < 4.5 * steps[0] and steps[1] < 2.5 * steps[0], steps  # linear, not 2^n
    cfg = AdapterConfig.from_json({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                   "rank_pattern": {"(.|.){0,22}#": 4}})
    assert cfg.rank_alpha(module) == (2, 4.0)
    assert time.monotonic() - t0 < 5.0  # 24 s in Python's re for n=22 alone


@pytest.mark.parametrize("key, says", [
    ("(", r"missing \), unterminated subpattern at position 0"), ("(?=q)_proj", "a lookaround"),
    (r"(q)\1", "a backreference"), (r"(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)\12", "a backreference"),  # RE2: octal \012
    ("q++", "a possessive quantifier"), ("(?>q)", "an atomic group"), ("(?(1)a|b)", "a conditional group"),
    ("(?i)q", "global flags not at the start"), ("(?i:\u212a)_proj", "non-ASCII character .* under \\(\\?i\\)"),
    ("q{1001}", "a counted repeat over 1000"), ("(q{0,400}){0,400}", "RE2 cannot compile it .*repetition"),
    ("q" * 600, "over 512"),
])
def test_pattern_keys_that_are_not_run_are_refused_naming_the_field(key, says):
    with pytest.raises(ValueError, match=r"rank_pattern key .* is not supported: .*" + says):
        AdapterConfig.from_json({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "rank_pattern": {key: 4}})


def test_without_google_re2_a_regex_key_is_refused_and_module_names_still_match(monkeypatch):
    """The GPU image may lack google-re2: a key that is not a plain module name is refused, naming the field and the
    package; module-name keys (`.` a wildcard, as in peft) are matched without it, as peft matches them."""
    import sys

    monkeypatch.setitem(sys.modules, "re2", None)  # `import re2` raises ImportError
    with pytest.raises(ValueError, match=r"alpha_pattern key '\(q\|v\)_proj' needs the google-re2 package, which "
                                         r"is not installed: .*install google-re2"):
        AdapterConfig.from_json({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                                 "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"(q|v)_proj": 8}})
    _assert_first_key_wins_as_in_peft(["q_proj", "layers.0.self_attn.q_proj", "layersX1", "layers.1", "o_proj",
                                       "self_attn.v_proj", "proj"])


def test_matching_work_is_bounded_per_adapter():
    """Keys within their own bounds but costly together (many regex keys against every target) are refused, naming
    the field, once the adapter's match budget is spent: never minutes of matching. Compiling is bounded too."""
    from moelink.engine.lora.patterns import MAX_FIELD_PROGRAM, MatchBudget

    keys = {f"(.|x){{0,100}}{i}#": 4 for i in range(200)}
    cfg = AdapterConfig.from_json({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "alpha_pattern": keys})
    budget = MatchBudget()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="alpha_pattern: matching its keys .* costs over"):
        for i in range(1000):
            cfg.rank_alpha(f"model.layers.{i}.self_attn.q_proj", budget)
    assert time.monotonic() - t0 < 30  # about 0.3 s; a budget of keys x targets would be minutes
    keys = {f"(.|x){{0,100}}{i}#": 4 for i in range(2000)}
    with pytest.raises(ValueError, match=f"rank_pattern: its keys compile to over {MAX_FIELD_PROGRAM} RE2 instr"):
        AdapterConfig.from_json({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "rank_pattern": keys})


# -- item 12 ------------------------------------------------------------------------------------------------------
def _write(path, name, data: bytes) -> None:
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)


@pytest.mark.parametrize("case", ["list config", "nested config", "huge config", "target_modules of ints",
                                  "target_parameters a number", "truncated", "million keys", "many tensors",
                                  "int tensor", "long key"])
def test_a_malformed_adapter_is_one_value_error_naming_what(tmp_path, case):
    path = _adapter(tmp_path / "a")
    says = {
        "list config": "must be a JSON object",
        "nested config": "nested too deeply",
        "huge config": "adapter_config.json is over",
        "target_modules of ints": "target_modules=.* is invalid",
        "target_parameters a number": "target_parameters=5 is invalid",
        "truncated": "not a whole safetensors file",
        "million keys": "header is over",
        "many tensors": "holds 4000 tensors",
        "int tensor": "is 'I64': LoRA weights are floats",
        "long key": "a name over 512",
    }[case]
    if case == "list config":
        _write(path, "adapter_config.json", b"[1, 2]")
    elif case == "nested config":
        _write(path, "adapter_config.json", b"[" * 200_000 + b"]" * 200_000)
    elif case == "huge config":
        _write(path, "adapter_config.json", b'{"r": 2, "x": "' + b"y" * (5 << 20) + b'"}')
    elif case == "target_modules of ints":
        _adapter(path, target_modules=[1, 2])
    elif case == "target_parameters a number":
        _adapter(path, target_parameters=5)
    elif case == "truncated":
        f = os.path.join(path, "adapter_model.safetensors")
        data = open(f, "rb").read()
        _write(path, "adapter_model.safetensors", data[:-7])
    elif case == "million keys":  # the header's length alone refuses it: nothing of it is parsed
        with open(os.path.join(path, "adapter_model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", 80_000_000))
            f.truncate(8 + 80_000_000)  # sparse
    elif case == "many tensors":
        save_file({f"base_model.model.m{i}.lora_A.weight": torch.zeros(1) for i in range(4000)},
                  os.path.join(path, "adapter_model.safetensors"))
    elif case == "int tensor":
        save_file({f"base_model.model.{Q}.lora_A.weight": torch.zeros(2, D, dtype=torch.int64)},
                  os.path.join(path, "adapter_model.safetensors"))
    elif case == "long key":
        save_file({"base_model.model." + "m" * 600 + ".lora_A.weight": torch.zeros(1)},
                  os.path.join(path, "adapter_model.safetensors"))
    for load in (True, False):
        with pytest.raises(ValueError, match=says) as e:
            _read(path, load=load)
        assert len(str(e.value)) < 1200, "the error echoes the file"


def test_missing_unreadable_and_fileless_directories_are_one_error(tmp_path):
    """The error must not tell a client which directories exist on the server."""
    empty = tmp_path / "empty"
    empty.mkdir()
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    errors = set()
    for p in (tmp_path / "missing", empty, half, a_file, "/etc", "/proc/self", "x" * 10_000_000, "a\0b"):
        with pytest.raises(ValueError) as e:
            _read(p, name="n")
        errors.add(str(e.value).split(" is invalid: ", 1)[1])
        assert len(str(e.value)) < 600
    assert len(errors) == 1, errors


def test_every_malformed_load_is_a_400_through_the_route(tmp_path):
    """The load route (gateway/lora_routes.py) over ServedAdapters and the engine's AdapterChecker against a real
    checkpoint's headers: each case answers 400 naming the field (before: dropped connections with a traceback)."""
    from moelink.engine.lora.checker import AdapterChecker
    from moelink.engine.server.gateway.lora_routes import LOAD_PATH, LoraRoutes
    from moelink.engine.server.lora_names import ServedAdapters

    model = tmp_path / "model"
    model.mkdir()
    save_file({f"{Q}.weight": torch.zeros(D, D), f"{O}.weight": torch.zeros(D, D)},
              str(model / "model.safetensors"))

    class _Serving:
        served_model_names, model_aliases, served_model_name = ("base",), (), "base"
        adapters = ServedAdapters(AdapterChecker(LIMITS, str(model)), ("base",))

    routes = LoraRoutes(_Serving(), environ={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})

    def load(name, path):
        return asyncio.run(routes.answer(b"POST", LOAD_PATH, json.dumps({"lora_name": name,
                                                                        "lora_path": str(path)}).encode()))

    assert load("ok", _adapter(tmp_path / "ok"))[0] == 200
    bad = {"regex": dict(rank_pattern={"(": 4}), "rank0": dict(rank_pattern={"q_proj": 0}),
           "alpha": dict(lora_alpha=1e308)}
    for name, cfg in bad.items():
        status, out = load(name, _adapter(tmp_path / name, **cfg))
        assert status == 400 and out["error"]["param"] == "lora_path", (name, out)
    nan = _adapter(tmp_path / "nan")
    from safetensors.torch import load_file

    t = load_file(os.path.join(nan, "adapter_model.safetensors"))
    t[f"base_model.model.{Q}.lora_B.weight"][0, 0] = float("nan")
    save_file(t, os.path.join(nan, "adapter_model.safetensors"))
    status, out = load("nan", nan)
    assert status == 400 and "non-finite" in out["error"]["message"]
    _write(_adapter(tmp_path / "list"), "adapter_config.json", b"[]")
    assert load("list", tmp_path / "list")[0] == 400
    status, out = load("long", "/" + "x" * 10_000_000)
    assert status == 400 and out["error"]["param"] == "lora_path" and len(out["error"]["message"]) < 600
    status, out = asyncio.run(routes.answer(b"POST", LOAD_PATH, b"[" * 100_000 + b"]" * 100_000))
    assert status == 400 and out["error"]["param"] == "body"
    assert [a.lora_name for a in _Serving.adapters.served()] == ["ok"]
