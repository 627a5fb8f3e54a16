"""Hostile request bodies, generated: every one is either a valid request or a 4xx APIError —
never another exception (which the ingress would turn into a 500)."""
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.serving.protocol import (APIError, CompletionRequest, parse_completion_request,
                                           parse_json_body)
from tests.fuzz_requests import bodies

BLOCK = 64


def outcome(call):
    try:
        return call()
    except APIError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        assert e.message and e.body()["error"]["message"] == e.message
        return e


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_any_json_object_is_a_request_or_a_4xx(body):
    result = outcome(lambda: parse_completion_request(body, block_size=BLOCK,
                                                      model_name="gpt"))
    if isinstance(result, CompletionRequest):
        assert all(len(p) + result.max_tokens <= BLOCK for p in result.prompts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_json_object_or_a_4xx(raw):
    result = outcome(lambda: parse_json_body(raw))
    assert isinstance(result, (dict, APIError))


def test_deeply_nested_json_is_a_4xx_not_a_crash():
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    assert outcome(lambda: parse_json_body(deep)).status == 400
    nested_prompt = json.dumps({"prompt": [[[[["x"]]]]]}).encode()
    data = parse_json_body(nested_prompt)
    error = outcome(lambda: parse_completion_request(data, block_size=BLOCK, model_name="gpt"))
    assert isinstance(error, APIError) and error.param == "prompt"
