"""The OpenAI completions API: request validation and response bodies, as plain data.

Validation is strict and total: every way a body can be wrong ends in an `APIError` carrying
an HTTP status and an OpenAI-style error body that names the field (`param`), never in an
exception the server would turn into a 500. Unknown fields are refused with a did-you-mean
hint, as OpenAI does ("Unrecognized request argument"), so a typo is not silently ignored.

Tokens are bytes (orchestrator/training/data.py): a prompt's token count is its UTF-8 length.
"""
from __future__ import annotations

import difflib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.validation import is_int, is_number

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 64
VOCAB_SIZE = 256  # byte-level tokens
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """A request the server refuses, with the OpenAI error body to send back."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code = type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def __reduce__(self):  # crosses Ray actor boundaries with all its fields
        return (APIError, (self.status, self.message, self.param, self.type, self.code))


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions request; prompts are token ids, one tuple per prompt."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    model: str | None = None


# Fields accepted only at their "off" value: sent by clients with defaults filled in, refused
# (naming the field) as soon as they ask for something this server does not do.
_ONLY_DEFAULT = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False),
                 "logprobs": (None,), "suffix": (None, ""), "frequency_penalty": (None, 0),
                 "presence_penalty": (None, 0), "logit_bias": (None, {})}
_KNOWN = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "user", *_ONLY_DEFAULT)


def check_content_type(header: str | None) -> None:
    """JSON only: `application/json` (any parameters), or no Content-Type at all. Anything
    else - `curl -d` sends a form type, a browser form multipart - is a 415 that says what to
    send, rather than a body read as something it is not."""
    media_type = ("application/json" if header is None else header).split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {header!r} (with "
                       "curl: -H 'Content-Type: application/json')", param="Content-Type",
                       code="unsupported_media_type")


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8: byte {e.start} "
                          f"(0x{body[e.start]:02x}) cannot start or continue a character")
    if not text.strip():
        raise bad_request("request body is empty; send a JSON object such as "
                          '{"model": "...", "prompt": "Hello"}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}")
    except RecursionError:
        raise bad_request("request body is not valid JSON: nested too deeply")
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {_json_type(data)}")
    return data


def parse_completion_request(data: dict[str, Any], *, block_size: int, model_name: str,
                             max_prompts: int = 32) -> CompletionRequest:
    """Validate a decoded /v1/completions body against the served model's context."""
    _refuse_unknown_fields(data)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {_json_type(model)}", "model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                            f"'{model_name}'", "model", code="model_not_found")
    for name, allowed in _ONLY_DEFAULT.items():
        if name in data and not any(_same(data[name], a) for a in allowed):
            raise bad_request(f"{name}={json.dumps(data[name])} is not supported by this "
                              f"server; leave it out", name)
    prompts = _prompts(data, max_prompts)
    longest = max(len(p) for p in prompts)
    max_tokens = _max_tokens(data.get("max_tokens"), longest, block_size)
    stream = _bool(data, "stream", False)
    return CompletionRequest(
        prompts=prompts, max_tokens=max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(data), stop=_stop(data.get("stop")), seed=_seed(data.get("seed")),
        stream=stream, include_usage=_include_usage(data.get("stream_options"), stream),
        model=model)


def _refuse_unknown_fields(data: dict[str, Any]) -> None:
    for key in data:
        if key not in _KNOWN:
            close = difflib.get_close_matches(str(key), _KNOWN, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise bad_request(f"Unrecognized request argument supplied: {key}{hint}", key)


def _prompts(data: dict[str, Any], max_prompts: int) -> tuple[tuple[int, ...], ...]:
    if "prompt" not in data or data["prompt"] is None:
        raise bad_request("you must provide a prompt (a string, a list of strings, or token "
                          "ids)", "prompt")
    prompt = data["prompt"]
    if isinstance(prompt, str):
        return (_text_prompt(prompt, "prompt"),)
    if not isinstance(prompt, list):
        raise bad_request(f"prompt must be a string, a list of strings or a list of token ids, "
                          f"got {_json_type(prompt)}", "prompt")
    if not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    if all(is_int(t) for t in prompt):  # one prompt as token ids
        return (_token_prompt(prompt, "prompt"),)
    if len(prompt) > max_prompts:
        raise bad_request(f"prompt holds {len(prompt)} prompts; at most {max_prompts} per "
                          "request", "prompt")
    prompts = []
    for i, item in enumerate(prompt):
        where = f"prompt[{i}]"
        if isinstance(item, str):
            prompts.append(_text_prompt(item, where))
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            prompts.append(_token_prompt(item, where))
        else:
            raise bad_request(f"{where} must be a string or a non-empty list of token ids, got "
                              f"{_json_type(item)}", "prompt")
    return tuple(prompts)


def _text_prompt(text: str, where: str) -> tuple[int, ...]:
    if not text:
        raise bad_request(f"{where} must not be empty", "prompt")
    try:
        return tuple(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # a lone surrogate sent as \\ud800 in the JSON
        raise bad_request(f"{where} is not valid Unicode: character {e.start} is an unpaired "
                          "surrogate", "prompt")


def _token_prompt(tokens: list[int], where: str) -> tuple[int, ...]:
    for i, t in enumerate(tokens):
        if not 0 <= t < VOCAB_SIZE:
            raise bad_request(f"{where}[{i}] = {t} is not a token id: the vocabulary is bytes "
                              f"0-{VOCAB_SIZE - 1}", "prompt")
    return tuple(tokens)


def _max_tokens(value: Any, longest_prompt: int, block_size: int) -> int:
    if longest_prompt >= block_size:
        raise bad_request(f"prompt is {longest_prompt} tokens; this model's maximum context "
                          f"length is {block_size} tokens, which must hold the prompt and at "
                          "least one generated token", "prompt")
    room = block_size - longest_prompt
    if value is None:  # unset: OpenAI's default, shortened to what the context can hold
        return min(DEFAULT_MAX_TOKENS, room)
    if not is_int(value) or value < 1:
        raise bad_request(f"max_tokens must be an integer >= 1, got {json.dumps(value)}",
                          "max_tokens")
    if value > room:
        raise bad_request(f"This model's maximum context length is {block_size} tokens, "
                          f"however you requested {longest_prompt + value} tokens "
                          f"({longest_prompt} in your prompt; {value} for the completion). "
                          "Please reduce your prompt or max_tokens.", "max_tokens")
    return value


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not is_number(value) or not low <= value <= high:
        raise bad_request(f"{name} must be a number between {low:g} and {high:g}, got "
                          f"{json.dumps(value)}", name)
    return float(value)


def _top_p(data: dict[str, Any]) -> float:
    value = _number(data, "top_p", 1.0, 0.0, 1.0)
    if value <= 0:
        raise bad_request("top_p must be > 0 (it is the probability mass kept)", "top_p")
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"stop must be a string or a list of strings, got "
                          f"{_json_type(value)}", "stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop holds {len(stops)} sequences; at most {MAX_STOP_SEQUENCES}",
                          "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad_request(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters, got "
                              f"{json.dumps(s)}", "stop")
    return tuple(stops)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    if not is_int(value) or not SEED_MIN <= value <= SEED_MAX:
        raise bad_request(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got "
                          f"{json.dumps(value)}", "seed")
    return value


def _bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, got {_json_type(options)}",
                          "stream_options")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise bad_request(f"stream_options: unknown field(s) {sorted(unknown)}; only "
                          "include_usage is supported", "stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("stream_options.include_usage must be true or false",
                          "stream_options")
    return include


def _same(value: Any, allowed: Any) -> bool:
    # 0 == False in Python: compare types too, so "echo": 0 is not taken for false.
    return value == allowed and (type(value) is type(allowed)
                                 or (is_number(value) and is_number(allowed)))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- responses -----------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request_id: str, model: str, version: str,
                    choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    """A whole completion; `choices` is (text, finish_reason) per prompt, in prompt order.
    `system_fingerprint` carries the checkpoint version that produced it."""
    return {
        "id": request_id, "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model, "system_fingerprint": version,
        "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(request_id: str, model: str, version: str, created: int, index: int,
               text: str, finish_reason: str | None) -> dict[str, Any]:
    """One server-sent event of a streamed completion (same shape as a completion)."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": version,
            "choices": [{"text": text, "index": index, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk_body(request_id: str, model: str, version: str, created: int,
                     prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last event when stream_options.include_usage is set: no choices, the usage."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": version, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


def models_body(model_name: str, info: dict[str, Any]) -> dict[str, Any]:
    """GET /v1/models: the one served model, with the checkpoint it is serving now."""
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": int(info.get("loaded_at", 0)),
        "owned_by": "orchestrator", **info}]}
