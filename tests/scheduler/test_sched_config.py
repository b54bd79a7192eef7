"""Config validation and the Request / RequestStatus basics."""
import pytest

from moelink.scheduler import (
    CacheConfig,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerConfig,
    get_finish_reason,
    is_finished,
)

from tests.helpers.fakes import StopParams


def test_config_defaults():
    c = CacheConfig()
    assert (c.block_size, c.num_kv_blocks, c.enable_prefix_caching) == (16, None, True)
    assert c.num_kv_tokens is None and CacheConfig(num_kv_blocks=3).num_kv_tokens == 48
    s = SchedulerConfig()
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len) == (256, 8192, 4096)
    assert CacheConfig(block_size=1).block_size == 1 and CacheConfig(block_size=48).block_size == 48


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "CacheConfig.block_size=0 is invalid: must be a positive integer."),
    ({"block_size": -16}, "CacheConfig.block_size=-16 is invalid: must be a positive integer."),
    ({"block_size": 1.5}, "CacheConfig.block_size=1.5 is invalid"),
    ({"block_size": True}, "CacheConfig.block_size=True is invalid"),
    ({"num_kv_blocks": 0}, "CacheConfig.num_kv_blocks=0 is invalid: must be None (filled in by the engine) or an integer >= 1."),
    ({"num_kv_blocks": "8"}, "CacheConfig.num_kv_blocks='8' is invalid"),
    ({"enable_prefix_caching": 1}, "CacheConfig.enable_prefix_caching=1 is invalid: must be True or False."),
])
def test_cache_config_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        CacheConfig(**kwargs)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
@pytest.mark.parametrize("value", [0, -1, 2.0, None])
def test_scheduler_config_errors(field, value):
    with pytest.raises(ValueError, match=rf"^SchedulerConfig\.{field}={value!r} is invalid: must be a positive integer\.$"):
        SchedulerConfig(**{field: value})


def test_scheduler_needs_num_kv_blocks():
    with pytest.raises(ValueError, match=r"CacheConfig\.num_kv_blocks=None"):
        Scheduler(SchedulerConfig(), CacheConfig())


def test_status_helpers():
    finished = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}
    for s in RequestStatus:
        assert is_finished(s) == (s in finished) == s.is_finished
        assert get_finish_reason(s) == finished.get(s) == s.finish_reason


def test_request_basics():
    r = Request("a", [1, 2, 3], None, max_tokens=4, eos_token_ids=[2], stop_token_ids=[7, 8], arrival_time=5.0)
    assert r.status is RequestStatus.WAITING and not r.is_finished
    assert r.eos_token_ids == frozenset({2}) and r.stop_token_ids == frozenset({7, 8})
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (3, 3, 0)
    r.append_output_token(9)
    assert r.all_token_ids == [1, 2, 3, 9] and r.output_token_ids == [9] and r.prompt_token_ids == [1, 2, 3]
    assert r.num_tokens == 4 and r.arrival_time == 5.0
    assert Request("b", [1]).arrival_time > 0  # defaults to time.monotonic() per request


def test_request_from_sampling_params():
    sp = StopParams(max_tokens=5, min_tokens=2, stop_token_ids=[4], ignore_eos=True)
    r = Request.from_sampling_params("x", [1, 2], sp, eos_token_ids={0})
    assert (r.max_tokens, r.min_tokens, r.stop_token_ids, r.ignore_eos, r.eos_token_ids) == (
        5, 2, frozenset({4}), True, frozenset({0}))
    assert r.sampling_params is sp


@pytest.mark.parametrize("args, kwargs, match", [
    (("a", []), {}, r"Request\.prompt_token_ids of 'a' is invalid"),
    (("", [1]), {}, r"Request\.request_id=''"),
    (("a", [1]), {"max_tokens": 0}, r"Request\.max_tokens=0"),
    (("a", [1]), {"min_tokens": -1}, r"Request\.min_tokens=-1"),
])
def test_request_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Request(*args, **kwargs)
