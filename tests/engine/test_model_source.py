"""`model` as a Hugging Face repo id: resolved from a cache this test builds on disk, with the hub offline.

The cache is laid out as huggingface_hub writes it (its own `repo_folder_name` names the repo folder):
    <cache>/models--org--name/refs/main        → "<commit A>"
    <cache>/models--org--name/refs/v1          → "<commit B>"   (a tag)
    <cache>/models--org--name/snapshots/<A>/   config.json, *.safetensors, tokenizer files
    <cache>/models--org--name/snapshots/<B>/   the same checkpoint but max_position_embeddings 256
so which snapshot was picked is visible in ModelConfig.max_position_embeddings.
"""
from __future__ import annotations

import argparse
import types
from pathlib import Path

import pytest

from moelink.engine import LLM, EngineArgs, SamplingParams
from moelink.engine.api.cli_args import add_engine_args, engine_args_from
from moelink.engine.config.model_source import is_repo_id, resolve_model_dir

from tests.helpers.hf_cache import add_snapshot

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
REPO = "org/name"


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch):
    """An offline hub whose default cache (HF_HUB_CACHE) holds org/name at two commits."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    src = tiny_model("qwen3_e6k3")
    add_snapshot(cache, REPO, COMMIT_A, src)
    add_snapshot(cache, REPO, COMMIT_B, src, refs=("v1",), max_position_embeddings=256)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read these at import: its module constants are what snapshot_download uses.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_generates_as_the_local_directory(hub_cache, tiny_model):
    kw = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=128)
    sp = SamplingParams(max_tokens=8, temperature=0)
    prompts = ["Hello world", "The quick brown fox"]
    with LLM(tiny_model("qwen3_e6k3"), **kw) as local:
        want = [o.outputs[0].token_ids for o in local.generate(prompts, sp, use_tqdm=False)]
    with LLM(REPO, **kw) as hub:
        got = [o.outputs[0].token_ids for o in hub.generate(prompts, sp, use_tqdm=False)]
        cfg = hub.engine.config.model
    assert got == want
    assert Path(cfg.model) == hub_cache / "models--org--name" / "snapshots" / COMMIT_A
    assert (cfg.model_id, cfg.name) == (REPO, REPO)  # the served name defaults to the id, not the hash


def test_revision_picks_a_snapshot_by_commit_or_ref(hub_cache):
    snaps = hub_cache / "models--org--name" / "snapshots"
    assert Path(resolve_model_dir(REPO)) == snaps / COMMIT_A
    assert Path(resolve_model_dir(REPO, revision="main")) == snaps / COMMIT_A
    assert Path(resolve_model_dir(REPO, revision="v1")) == snaps / COMMIT_B
    assert Path(resolve_model_dir(REPO, revision=COMMIT_B)) == snaps / COMMIT_B
    cfg = EngineArgs(REPO, revision="v1", dtype="float32", num_kv_blocks=8).create_engine_config().model
    assert cfg.max_position_embeddings == 256
    with pytest.raises(ValueError, match=r"model='org/name' \(revision='v2'\).*not in the Hugging Face cache"):
        resolve_model_dir(REPO, revision="v2")


def test_missing_id_offline_says_what_to_do(hub_cache):
    with pytest.raises(ValueError) as e:
        LLM("org/missing")
    msg = str(e.value)
    assert "model='org/missing'" in msg and str(hub_cache) in msg
    for hint in ("HF_HUB_OFFLINE=1", "huggingface-cli download org/missing", "HF_HUB_OFFLINE=0",
                 "local checkpoint directory"):
        assert hint in msg, hint


def test_incomplete_snapshot_offline(hub_cache, tmp_path):
    snap = hub_cache / "models--org--name" / "snapshots" / COMMIT_A
    for f in snap.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"model='org/name'.*without its config.json or \*.safetensors.*offline"):
        resolve_model_dir(REPO)


@pytest.mark.parametrize("model", ["not a/valid id", "a/b/c", "org/name--x", "./no-such-dir", "/no/such/dir"])
def test_neither_directory_nor_id(model, hub_cache):
    with pytest.raises(ValueError, match=r"model=.*neither a local directory nor a Hugging Face repo id"):
        resolve_model_dir(model)
    assert not is_repo_id(model)


def test_download_dir_points_the_cache(hub_cache, tmp_path, monkeypatch, tiny_model):
    from huggingface_hub import constants

    other = tmp_path / "other"
    add_snapshot(other, "org/only-here", COMMIT_A, tiny_model("qwen3_e6k3"))
    with pytest.raises(ValueError, match="org/only-here"):
        resolve_model_dir("org/only-here")
    path = resolve_model_dir("org/only-here", download_dir=str(other))
    assert Path(path) == other / "models--org--only-here" / "snapshots" / COMMIT_A
    # ...and only it: the default cache's org/name is not found there.
    with pytest.raises(ValueError, match=str(other)):
        resolve_model_dir(REPO, download_dir=str(other))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        resolve_model_dir(REPO)


def test_local_directory_is_itself_and_refuses_a_revision(tiny_model, hub_cache):
    src = tiny_model("qwen3_e6k3")
    assert resolve_model_dir(src) == src
    with pytest.raises(ValueError, match=r"revision='main' is invalid for model=.*local directory"):
        resolve_model_dir(src, revision="main")
    cfg = EngineArgs(src, dtype="float32", num_kv_blocks=8).create_engine_config().model
    assert (cfg.model_id, cfg.name) == (None, Path(src).name)


def _hub_error(cls, status):
    # What the error reads of a response (huggingface_hub's HTTP client is its own fork of httpx).
    response = types.SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize("error, expected", [
    ("RepositoryNotFoundError", r"model='org/x' is not a local directory and no Hugging Face repo of that id"),
    ("GatedRepoError", r"model='org/x' is a gated Hugging Face repo: accept its terms"),
    ("RevisionNotFoundError", r"revision='dev' is invalid for model='org/x'"),
])
def test_hub_errors_online_are_mapped(error, expected, monkeypatch, tmp_path):
    """Online, a repo missing from the cache is downloaded; the hub's refusals become one sentence."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_snapshot_download(repo_id, *, local_files_only, **kw):
        calls.append(local_files_only)
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        raise _hub_error(getattr(errors, error), 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ValueError, match=expected):
        resolve_model_dir("org/x", revision="dev", download_dir=str(tmp_path))
    assert calls == [True, False]  # the cache first, then the hub


def test_a_missing_directory_is_named_before_the_hub_is_asked(monkeypatch, tmp_path, caplog):
    """`make serve TINY_MODEL=no-such-dir` (issue 27, item 10): a bare name that is no directory reads as a
    mistyped path: its absolute path is said before the hub is tried, and again in the error."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    said_first = []

    def fake_snapshot_download(repo_id, *, local_files_only, **kw):
        if local_files_only:  # the cache is read first, which costs no network
            raise errors.LocalEntryNotFoundError("not cached")
        said_first.append(f"no such directory ({tmp_path / repo_id})" in caplog.text)
        raise _hub_error(errors.RepositoryNotFoundError, 404)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with caplog.at_level("WARNING", logger="moelink.engine.config.model_source"):
        with pytest.raises(ValueError, match=rf"model='no-such-dir' is not a local directory \(no such directory: "
                                             rf"{tmp_path / 'no-such-dir'}\) and no Hugging Face repo"):
            resolve_model_dir("no-such-dir", download_dir=str(tmp_path / "hub"))
    assert said_first == [True]
    # An owner/name id whose owner is no folder here is just an id: nothing said about directories.
    caplog.clear()
    with caplog.at_level("WARNING", logger="moelink.engine.config.model_source"):
        with pytest.raises(ValueError, match=r"model='org/x' is not a local directory and no Hugging Face repo"):
            resolve_model_dir("org/x", download_dir=str(tmp_path / "hub"))
    assert "no such directory" not in caplog.text


def test_a_missing_directory_is_named_offline(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in ("no-such-dir", "models/qwen3"):  # a bare name; a path whose parent folder is here
        with pytest.raises(ValueError, match=rf"no such directory: {tmp_path / model}\) and not in the Hugging "
                                             rf"Face cache .* offline"):
            resolve_model_dir(model)


def test_download_uses_the_allow_patterns(monkeypatch, tmp_path, tiny_model):
    import huggingface_hub
    from huggingface_hub import constants, errors

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = {}

    def fake_snapshot_download(repo_id, *, local_files_only, allow_patterns, cache_dir, revision):
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns, cache_dir=cache_dir, revision=revision)
        return tiny_model("qwen3_e6k3")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_dir("org/x", download_dir=str(tmp_path)) == tiny_model("qwen3_e6k3")
    assert seen["cache_dir"] == str(tmp_path) and seen["revision"] is None
    assert {"config.json", "*.safetensors", "tokenizer.json"} <= set(seen["allow_patterns"])


def test_cli_flags_and_validation():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = engine_args_from(p.parse_args(["org/name", "--revision", "v1", "--download-dir", "/tmp/hf"]))
    assert (args.model, args.revision, args.download_dir) == ("org/name", "v1", "/tmp/hf")
    assert engine_args_from(p.parse_args(["org/name"])).revision is None
    with pytest.raises(ValueError, match=r"model='' is invalid: must be a local checkpoint directory or a Hugging"):
        EngineArgs("")
    with pytest.raises(ValueError, match=r"revision='' is invalid: must be a non-empty string"):
        EngineArgs("org/name", revision="")
    with pytest.raises(ValueError, match=r"download_dir=.* is invalid: must be a directory"):
        EngineArgs("org/name", download_dir=__file__)


def test_moelink_generate_with_an_id(hub_cache, capsys):
    from moelink.engine.api.cli import main

    flags = ["--prompt", "Hello", "--max-tokens", "3", "--dtype", "float32", "--num-kv-blocks", "32",
             "--max-model-len", "128", "--device", "cpu"]
    assert main(["generate", REPO, "--revision", "v1", *flags]) == 0
    assert "3 tokens" in capsys.readouterr().out
    assert main(["generate", "org/missing", *flags]) == 2
    err = capsys.readouterr().err
    assert "moelink: error: model='org/missing'" in err and "huggingface-cli download org/missing" in err
