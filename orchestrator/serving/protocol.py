"""The OpenAI completions and chat completions APIs: request validation and response bodies,
as plain data.

Validation is strict and total: every way a body can be wrong ends in an `APIError` carrying
an HTTP status and an OpenAI-style error body that names the field (`param`), never in an
exception the server would turn into a 500. Every field of OpenAI's request bodies is known
and takes one of three paths: honoured; accepted and ignored, as changing nothing this server
computes (`_NO_EFFECT`: `user`, `metadata`, `store`, `service_tier`, ...; type-checked); or
accepted only at its "off" value, and refused otherwise with a message saying why
(`_ONLY_DEFAULT`: `n`, `logprobs`, `tools`, `response_format` json_schema, ...). Fields that
are not OpenAI's are refused with a did-you-mean hint, as OpenAI does ("Unrecognized request
argument"), so a typo (`max_token`) is not silently ignored.

Text prompts are encoded with the served model's tokenizer (orchestrator/tokenizer.py; the
byte tokenizer by default, where a prompt's token count is its UTF-8 length); token-id prompts
are checked against the ids the model can read (`token_ids`: the smaller of the tokenizer's
vocabulary and the model's embedding). A completion without a prompt starts from the
end-of-text token, as OpenAI's default prompt `<|endoftext|>` does (`Encoder.document_start`).

Chat (`/v1/chat/completions`) turns the messages into one prompt with a plain-text template
(`chat_prompt`): one line block per message, "System: ", "User: " or "Assistant: " then its
content and a newline, and "Assistant:" last, for the model to continue. The completion stops
at "\nUser:" (the model starting the next turn itself). A tokenizer whose end-of-text token
the model can read (a trained tokenizer's) also gets that token after every message, and
generation stops when the model produces it, as the byte tokenizer's (id 256) is for the
257-id byte models runs train; a 256-id model of a run from before end-of-text was added gets
plain text only. The template's space after "Assistant:" is the model's to write: the reply's
content loses one leading space (`ChatReply`), so a reply sent back as history renders as the
model wrote it.
"""
from __future__ import annotations

import codecs
import difflib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.tokenizer import ByteTokenizer, Tokenizer
from orchestrator.validation import is_int, is_number, json_parse_problem, json_type

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# Prompts one /v1/completions request may hold (ServeSettings.max_prompts_per_request's default).
MAX_PROMPTS = 32
MAX_STOP_CHARS = 64
VOCAB_SIZE = 256  # the bytes without end-of-text: what Encoder assumes when not told
# int64: one range without aliases (2**64 - 1 would draw as -1 does); generation.Row seeds its
# generator with all 64 bits, so every seed in it draws its own numbers.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1
# Seconds a 503 (overloaded, no replica yet, a replica lost, a reload under way) tells the
# client to wait before retrying (Retry-After; openai-python waits that long, 0-60 s, before
# its retry instead of guessing).
RETRY_AFTER_S = 1


# The routes (also the route label of the serving metrics).
COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"


class APIError(Exception):
    """A request the server refuses, with the OpenAI error body to send back."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        # (a lone surrogate the client sent - a model name, a field's name - echoed here is
        # written as its escape: the body goes out as UTF-8, which cannot hold one, and the
        # answer was a plain-text 500)
        message, param = _sendable(message), _sendable(param)
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code = type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        """The response's headers: Retry-After on a 503, whose cause passes (RETRY_AFTER_S)."""
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}

    def __reduce__(self):  # crosses Ray actor boundaries with all its fields
        return (APIError, (self.status, self.message, self.param, self.type, self.code))


def _sendable(text: str | None) -> str | None:
    """`text` as UTF-8 can carry it: a lone surrogate (JSON's "\\ud800") as its escape."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code=code)


# OpenAI's code for a prompt, or prompt + max_tokens, over what the model (here also: the
# replica's KV cache) holds: clients check it to trim the history or lower max_tokens.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
# The code of a request the model failed alone: its logits went NaN or infinite (a numeric
# overflow) at some position, and no token could be sampled (a 500; the others decode on).
NON_FINITE_LOGITS = "non_finite_logits"


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
    # Chat: the reply's content loses a leading space (ChatReply), never matched by a stop.
    skip_leading_space: bool = False


# Fields accepted only at their "off" value: sent by clients with defaults filled in, refused
# (naming the field and why) as soon as they ask for something this server does not do.
# field: (the values accepted, why another is refused)
_NO_LOGPROBS = "log probabilities are not returned"
_NO_PENALTIES = "sampling has no frequency or presence penalties"
_ONLY_DEFAULT = {
    "n": ((None, 1), "one completion is generated per prompt; for more, send the request "
                     "again, or the prompt several times in a list"),
    "best_of": ((None, 1), "one completion is generated per prompt, with none to pick from"),
    "echo": ((None, False), "the prompt is not sent back with the completion"),
    "logprobs": ((None,), _NO_LOGPROBS),
    "suffix": ((None, ""), "no insertion: the completion continues the prompt only"),
    "frequency_penalty": ((None, 0), _NO_PENALTIES),
    "presence_penalty": ((None, 0), _NO_PENALTIES),
    "logit_bias": ((None, {}), "sampling takes no per-token bias"),
}
# Fields that change nothing this server computes: accepted (of their OpenAI type; null is
# unset) and ignored. field: (the JSON types accepted, as _json_type names them)
_STRING, _OBJECT, _BOOLEAN = ("a string",), ("an object",), ("a boolean",)
_NO_EFFECT = {"user": _STRING}
_KNOWN = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", *_NO_EFFECT, *_ONLY_DEFAULT)


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
    # (a leading byte order mark dropped: RFC 8259 lets a parser ignore it; an invalid byte
    # is still named by its offset in the body as sent)
    mark = len(codecs.BOM_UTF8) if body.startswith(codecs.BOM_UTF8) else 0
    try:
        text = body[mark:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = mark + e.start
        raise bad_request(f"request body is not valid UTF-8: byte {at} "
                          f"(0x{body[at]:02x}) cannot start or continue a character")
    if not text.strip():
        raise bad_request("request body is empty; send a JSON object such as "
                          '{"model": "...", "prompt": "Hello"}')
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # (a body nested thousands deep, a long int)
        raise bad_request(f"request body is not valid JSON: {json_parse_problem(e)}")
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, got {_json_type(data)}")
    return data


class Encoder:
    """Text and token-id prompts to token ids, for one served model: its tokenizer, and the
    number of ids its embedding reads."""

    def __init__(self, tokenizer: Tokenizer | None = None, token_ids: int = VOCAB_SIZE) -> None:
        self.tokenizer = tokenizer or ByteTokenizer()
        self.token_ids = min(token_ids, self.tokenizer.vocab_size)

    def text(self, text: str, where: str) -> tuple[int, ...]:
        if not text:
            raise bad_request(f"{where} must not be empty", "prompt")
        refuse_lone_surrogates(text, where, where.split("[")[0])
        ids = tuple(self.tokenizer.encode(text))
        if not ids:  # a tokenizer may drop all of a text (WordPiece drops whitespace)
            raise bad_request(f"{where} encodes to no tokens with this model's tokenizer "
                              f"({self.tokenizer.name})", where.split("[")[0])
        return ids

    def document_start(self) -> tuple[int, ...]:
        """The prompt of a request without one: OpenAI's default, "<|endoftext|>", generates
        as from the start of a new document. Training puts the end-of-text token after every
        document, so the model starts from that token, where it reads one."""
        eos = self.tokenizer.eos_id
        if eos is None or eos >= self.token_ids:
            raise bad_request("you must provide a prompt (a string, a list of strings, or token "
                              "ids): left out, OpenAI's default starts from the end-of-text "
                              "token, and this model reads no end-of-text token "
                              f"({self.tokenizer.name} tokenizer)", "prompt")
        return (eos,)

    def ids(self, tokens: list[int], where: str) -> tuple[int, ...]:
        for i, t in enumerate(tokens):
            if not 0 <= t < self.token_ids:
                raise bad_request(f"{where}[{i}] = {t} is not a token id: this model reads ids "
                                  f"0-{self.token_ids - 1} ({self.tokenizer.name} tokenizer)",
                                  "prompt")
        return tuple(tokens)


@dataclass(frozen=True)
class CheckedFields:
    """What check_request_fields validated, for parse_* to use rather than read again: chat's
    messages or each prompt with its name, the token-limit field and value, the sampling and
    streaming fields."""

    items: Any
    token_limit: tuple[str, Any]
    sampling: dict[str, Any]


def check_request_fields(data: dict[str, Any], *, chat: bool, model_name: str,
                         max_prompts: int = MAX_PROMPTS) -> CheckedFields:
    """What can be refused without the served model: unknown fields, another model's name,
    fields this server takes only at their defaults, the prompts' shape and count (at most
    `max_prompts`) or chat's messages, the token limit's type and the sampling and streaming
    fields (all but the prompts' tokens and the token limit's room, which need the model's
    tokenizer and context). Asked before a replica is (none may
    be up for a minute: a typo, or a temperature of 5, waited for it, then was told 503,
    which clients retry, instead of its 400)."""
    _refuse_unknown_fields(data, chat)
    _model(data, model_name)
    _check_no_effect(data, _CHAT_NO_EFFECT if chat else _NO_EFFECT)
    _refuse_non_defaults(data, _CHAT_ONLY_DEFAULT if chat else _ONLY_DEFAULT)
    items = _messages(data.get("messages")) if chat else _prompt_items(data, max_prompts)
    return CheckedFields(items, _token_limit(data, chat), _sampling(data))


def _sampling(data: dict[str, Any]) -> dict[str, Any]:
    """The sampling and streaming fields, as CompletionRequest takes them."""
    stream = _bool(data, "stream", False)
    return {"temperature": _number(data, "temperature", 1.0, 0.0, 2.0), "top_p": _top_p(data),
            "stop": _stop(data.get("stop")), "seed": _seed(data.get("seed")),
            "stream": stream,
            "include_usage": _include_usage(data.get("stream_options"), stream)}


def _token_limit(data: dict[str, Any], chat: bool) -> tuple[str, Any]:
    """The token-limit field the client sent and its value (None: unset), an integer >= 1;
    chat takes max_completion_tokens or max_tokens, not both. Null is unset, as OpenAI
    reads it (clients send "max_tokens": null for None beside the other field)."""
    fields = ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",)
    given = [f for f in fields if data.get(f) is not None]
    if len(given) == 2:
        raise bad_request("give max_completion_tokens or max_tokens, not both",
                          "max_completion_tokens")
    field = given[0] if given else "max_tokens"
    value = data.get(field)
    if value is not None and (not is_int(value) or value < 1):
        raise bad_request(f"{field} must be an integer >= 1, got {json.dumps(value)}"
                          + (_WHY_NOT_0 if value == 0 and not chat else ""), field)
    return field, value


# (OpenAI's completions take max_tokens 0 only to score a prompt: with echo and logprobs,
# neither of which this server returns, 0 would answer an empty text)
_WHY_NOT_0 = (": 0 asks only to score the prompt, with echo and logprobs, and this server "
              "sends back neither the prompt (echo) nor log probabilities")


def parse_completion_request(data: dict[str, Any], *, block_size: int, model_name: str,
                             max_prompts: int = MAX_PROMPTS, encoder: Encoder | None = None,
                             kv_cache_tokens: int | None = None,
                             checked: CheckedFields | None = None) -> CompletionRequest:
    """Validate a decoded /v1/completions body against the served model's context, and with
    continuous batching the replica's KV cache (`kv_cache_tokens`): every prompt is checked
    against it here, and an unset max_tokens is cut to what it holds, as for chat.
    `checked`: check_request_fields's result for `data`, where the caller has it."""
    checked = checked or check_request_fields(data, chat=False, model_name=model_name,
                                              max_prompts=max_prompts)
    model = data.get("model")
    prompts = _prompts(checked.items, encoder or Encoder())
    longest, name = _longest_prompt(prompts)
    max_tokens = _max_tokens(checked.token_limit[1], longest, block_size,
                             _default_max_tokens(longest, block_size, kv_cache_tokens,
                                                 most=DEFAULT_MAX_TOKENS), name)
    _check_fits_cache(longest, max_tokens, kv_cache_tokens, name, "max_tokens")
    return CompletionRequest(prompts=prompts, max_tokens=max_tokens, model=model,
                             **checked.sampling)


def _model(data: dict[str, Any], model_name: str) -> str | None:
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {_json_type(model)}", "model")
    if model is not None:
        check_model_name(model, model_name)
    return model


def check_model_name(asked: str, model_name: str) -> None:
    """The 404 OpenAI gives for a model this server does not serve."""
    if asked != model_name:
        raise APIError(404, f"The model '{asked}' does not exist; this server serves "
                            f"'{model_name}'", "model", code="model_not_found")


def _refuse_non_defaults(data: dict[str, Any], only_default: dict[str, tuple]) -> None:
    for name, (allowed, why) in only_default.items():
        if name in data and not any(_same(data[name], a) for a in allowed):
            raise bad_request(f"{name}={_shown(data[name])} is not supported by this server "
                              f"({why}); leave it out", name)


def _shown(value: Any) -> str:
    """A value as JSON for a message, cut at 80 characters (a list of tools can be long)."""
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _check_no_effect(data: dict[str, Any], no_effect: dict[str, tuple[str, ...]]) -> None:
    """The fields accepted and ignored are still of their OpenAI type (null: unset), as
    OpenAI checks them; `metadata` an object of strings."""
    for name, types in no_effect.items():
        value = data.get(name)
        if value is not None and _json_type(value) not in types:
            raise bad_request(f"{name} must be {' or '.join(types)}, got {_json_type(value)}",
                              name)
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and not all(isinstance(v, str) for v in metadata.values()):
        raise bad_request("metadata must be an object of strings (key-value pairs)",
                          "metadata")


def _refuse_unknown_fields(data: dict[str, Any], chat: bool) -> None:
    """Unknown fields refused, with the closest known one, or the route that takes it (a chat
    body posted to /v1/completions). Every field of OpenAI's API is known (module doc)."""
    known, other = (_CHAT_KNOWN, _KNOWN) if chat else (_KNOWN, _CHAT_KNOWN)
    route, other_route = (CHAT_ROUTE, COMPLETIONS_ROUTE) if chat else (COMPLETIONS_ROUTE,
                                                                       CHAT_ROUTE)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if not close and key in other:
                takes = {"messages": "prompt", "prompt": "messages"}.get(key)
                hint = (f" (a field of POST {other_route}"
                        + (f"; POST {route} takes {takes})" if takes else ")"))
            raise bad_request(f"Unrecognized request argument supplied: {key}{hint}", key)


def _prompts(items: list[tuple[str, Any]], encoder: Encoder) -> tuple[tuple[int, ...], ...]:
    """The prompts _prompt_items checked, as token ids (None: none given, OpenAI's default)."""
    return tuple(encoder.document_start() if item is None
                 else encoder.text(item, where) if isinstance(item, str)
                 else encoder.ids(item, where) for where, item in items)


def _prompt_items(data: dict[str, Any], max_prompts: int) -> list[tuple[str, Any]]:
    """Each prompt with its name ("prompt", or "prompt[i]" among several): a non-empty string
    or list of token ids, at most `max_prompts` of them; all that needs no tokenizer. A
    prompt left out (or null) is None: OpenAI's default, which needs the tokenizer
    (Encoder.document_start)."""
    prompt = data.get("prompt")
    if prompt is None:
        return [("prompt", None)]
    if isinstance(prompt, str):
        items = [("prompt", prompt)]
    elif not isinstance(prompt, list):
        raise bad_request(f"prompt must be a string, a list of strings or a list of token ids, "
                          f"got {_json_type(prompt)}", "prompt")
    elif not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    elif all(is_int(t) for t in prompt):  # one prompt as token ids
        items = [("prompt", prompt)]
    elif len(prompt) > max_prompts:
        raise bad_request(f"prompt holds {len(prompt)} prompts; at most {max_prompts} per "
                          "request", "prompt")
    else:
        items = [(f"prompt[{i}]", item) for i, item in enumerate(prompt)]
    for where, item in items:
        if not (isinstance(item, str) or isinstance(item, list) and item
                and all(is_int(t) for t in item)):
            raise bad_request(f"{where} must be a string or a non-empty list of token ids, got "
                              f"{_json_type(item)}", "prompt")
        if item == "":
            raise bad_request(f"{where} must not be empty", "prompt")
    return items


def _longest_prompt(prompts: tuple[tuple[int, ...], ...]) -> tuple[int, str]:
    """The longest prompt's length and its name ("prompt", or "prompt[i]" among several): it
    needs the most room, so it is the one a refusal names."""
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    return len(prompts[i]), "prompt" if len(prompts) == 1 else f"prompt[{i}]"


# -- chat completions ------------------------------------------------------------------------
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User",
              "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # the model starting the next user turn ends the answer
_NO_TOOLS = "the model answers with text only, never a tool call"
_NO_FUNCTIONS = "the model answers with text only, never a function call"
_CHAT_ONLY_DEFAULT = {
    **{k: v for k, v in _ONLY_DEFAULT.items() if k not in ("best_of", "echo", "suffix")},
    "n": ((None, 1), "one choice is generated per request; send it again for more"),
    "logprobs": ((None, False), _NO_LOGPROBS),
    "top_logprobs": ((None, 0), _NO_LOGPROBS),
    "tools": ((None, []), _NO_TOOLS),
    "tool_choice": ((None, "none"), _NO_TOOLS),
    "functions": ((None, []), _NO_FUNCTIONS),  # (deprecated by OpenAI for tools)
    "function_call": ((None, "none"), _NO_FUNCTIONS),
    "response_format": ((None, {"type": "text"}), "no structured output: the model's text "
                        "is not constrained to JSON or a schema"),
    "modalities": ((None, ["text"]), "only text is generated"),
    "audio": ((None,), "only text is generated"),
    "web_search_options": ((None,), "the model cannot search the web"),
    "verbosity": ((None, "medium"), "the answer's length cannot be steered; only the "
                  "default, medium, is taken"),
}
# (`parallel_tool_calls`: without tools, which are refused, either value asks for nothing;
# `reasoning_effort`: the model spends no tokens reasoning before it answers, at any effort;
# `prediction`: a predicted output only speeds up OpenAI's answer, never changes it.)
_CHAT_NO_EFFECT = {**_NO_EFFECT, "metadata": _OBJECT, "store": _BOOLEAN,
                   "service_tier": _STRING, "prompt_cache_key": _STRING,
                   "prompt_cache_retention": _STRING, "safety_identifier": _STRING,
                   "parallel_tool_calls": _BOOLEAN, "reasoning_effort": _STRING,
                   "prediction": _OBJECT}
_CHAT_KNOWN = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "stop", "seed", "stream", "stream_options", *_CHAT_NO_EFFECT,
               *_CHAT_ONLY_DEFAULT)


def chat_prompt(messages: tuple[tuple[str, str], ...], tokenizer: Tokenizer,
                token_ids: int) -> tuple[int, ...]:
    """The prompt of a conversation (the template of the module doc): each message as
    "<Role>: <content>\n", then "Assistant:"; with the tokenizer's end-of-text token after
    each message when the model can read it."""
    separator = ([tokenizer.eos_id] if tokenizer.eos_id is not None
                 and tokenizer.eos_id < token_ids else [])
    tokens: list[int] = []
    for role, content in messages:
        # (as text: a message spelling "<|endoftext|>" must not end itself and start a
        # forged turn)
        tokens += tokenizer.encode_as_text(f"{CHAT_ROLES[role]}: {content}\n") + separator
    return tuple(tokens + tokenizer.encode("Assistant:"))


class ChatReply:
    """An assistant reply's content from the text released for it, streamed or whole alike:
    the first text loses one leading space. The prompt ends "Assistant:" and the model writes
    the template's space itself; kept, it started the content, and history renders an
    assistant message "Assistant: <content>", so a reply sent back got one space more every
    turn. Without it, history renders as the model wrote it."""

    def __init__(self) -> None:
        self._started = False

    def text(self, released: str) -> str:
        if self._started or not released:
            return released
        self._started = True
        return released.removeprefix(" ")


def chat_reply_content(text: str) -> str:
    """A whole reply's content (see ChatReply)."""
    return ChatReply().text(text)


def parse_chat_request(data: dict[str, Any], *, block_size: int, model_name: str,
                       encoder: Encoder | None = None,
                       kv_cache_tokens: int | None = None,
                       checked: CheckedFields | None = None) -> CompletionRequest:
    """Validate a decoded /v1/chat/completions body; the result holds the one templated
    prompt, with the template's stop sequence added to the client's. Unset, max_tokens is
    what the context has left, and what the replica's KV cache (`kv_cache_tokens`, with
    continuous batching) holds after the prompt."""
    encoder = encoder or Encoder()
    checked = checked or check_request_fields(data, chat=True, model_name=model_name)
    model = data.get("model")
    prompt = chat_prompt(checked.items, encoder.tokenizer, encoder.token_ids)
    field, value = checked.token_limit
    try:
        max_tokens = _max_tokens(value, len(prompt), block_size,
                                 _default_max_tokens(len(prompt), block_size, kv_cache_tokens))
    except APIError as e:
        raise bad_request(e.message.replace("max_tokens", field).replace(
            "prompt", "messages"), field if e.param == "max_tokens" else "messages",
            e.code) from None
    # (the replica knows only "max_tokens", which a chat client may not have sent)
    _check_fits_cache(len(prompt), max_tokens, kv_cache_tokens, "messages", field,
                      " with the template")
    sampling = checked.sampling
    return CompletionRequest(prompts=(prompt,), max_tokens=max_tokens, model=model,
                             skip_leading_space=True,
                             **{**sampling, "stop": sampling["stop"] + (CHAT_STOP,)})


def _check_fits_cache(prompt: int, max_tokens: int, kv_cache_tokens: int | None,
                      prompt_name: str, field: str, counted: str = "") -> None:
    """What the replica would refuse for its KV cache (`kv_cache_tokens`, with continuous
    batching), refused before any prompt starts: one refused by the replica after another
    prompt's text went out made a streamed answer a 200 ending in an error event."""
    if kv_cache_tokens is None or prompt + max_tokens - 1 <= kv_cache_tokens:
        return
    raise bad_request(*kv_cache_refusal(prompt, max_tokens, kv_cache_tokens, prompt_name,
                                        field, counted), CONTEXT_LENGTH_EXCEEDED)


def kv_cache_refusal(prompt: int, max_tokens: int, capacity: int, prompt_name: str,
                     field: str, counted: str = "") -> tuple[str, str]:
    """Why prompt + max_tokens does not fit a KV cache of `capacity` positions, and the
    request field at fault: the prompt when it alone is over (no `field` could fit, and the
    client may not have sent one: it is not named), else `field`, with the positions needed
    (every token fed: all but the last generated) and the largest `field` that fits."""
    if prompt > capacity:
        verb, it = ("are", "them") if prompt_name.endswith("s") else ("is", "it")
        return (f"the {prompt_name} ({prompt} tokens{counted}) {verb} over the KV cache alone: "
                f"this replica's cache holds {capacity} (setting kv_cache_tokens); shorten {it}",
                prompt_name.split("[")[0])
    return (f"the {prompt_name} ({prompt} tokens{counted}) and {field} ({max_tokens}) need "
            f"{prompt + max_tokens - 1} positions of KV cache; this replica's cache holds "
            f"{capacity} (setting kv_cache_tokens); at most {field} {capacity - prompt + 1} "
            "fits", field)


def _default_max_tokens(prompt: int, block_size: int, kv_cache_tokens: int | None,
                        most: int | None = None) -> int:
    """An unset max_tokens: what the context has left after the prompt, and what the KV cache
    holds after it (every position fed: all but the last generated), at most `most`."""
    room = block_size - prompt
    if kv_cache_tokens is not None:
        room = min(room, kv_cache_tokens - prompt + 1)
    if most is not None:
        room = min(room, most)
    return max(room, 1)  # a prompt the cache cannot hold is refused, naming it


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        raise bad_request("you must provide messages (a list of {role, content} objects)",
                          "messages")
    if not isinstance(value, list) or not value:
        raise bad_request(f"messages must be a non-empty list of {{role, content}} objects, "
                          f"got {_json_type(value) if value != [] else 'an empty list'}",
                          "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object, got {_json_type(message)}",
                              "messages")
        _require_message_field(message, "role", where, f"one of {', '.join(CHAT_ROLES)}")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got "
                              f"{json.dumps(role)}", "messages")
        _refuse_message_extras(message, where)
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise bad_request(f"{where}.name must be a string, got "
                              f"{_json_type(message['name'])}", "messages")
        # (after the extras: an assistant turn with tool calls may leave content out, and is
        # refused for its tool calls)
        _require_message_field(message, "content", where, "a string or a list of text parts")
        out.append((role, _content(message.get("content"), where)))
    return tuple(out)


def _require_message_field(message: dict[str, Any], field: str, where: str, what: str) -> None:
    """A message without `field` is refused as missing it: its type check would say "got null",
    a value the client never sent."""
    if field not in message:
        raise bad_request(f"{where}.{field} is missing: {what}", "messages")


# What an assistant message read back from a response holds besides its text: clients send
# `choices[0].message.model_dump()` back as the next turn's history, with these null (or
# empty). Accepted so; set, they ask for what this server does not do.
_MESSAGE_ECHOED = ("refusal", "annotations", "audio", "function_call", "tool_calls")


def _refuse_message_extras(message: dict[str, Any], where: str) -> None:
    """A message's fields beyond role, content and name: refused naming them, unless they are
    a response's fields echoed back empty."""
    extras = set(message) - {"role", "content", "name"}
    set_ = sorted(k for k in extras
                  if not (k in _MESSAGE_ECHOED and message[k] in (None, [], {})))
    if not set_:
        return
    tools = [k for k in set_ if k in ("tool_calls", "function_call", "tool_call_id")]
    why = "tool calls are not supported" if tools else "not supported by this server"
    raise bad_request(f"{where}: unsupported field(s) {set_} ({why})", "messages")


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content[{j}] must be a text part "
                                  '({"type": "text", "text": "..."}); only text is supported',
                                  "messages")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of text parts, got "
                          f"{_json_type(content)}", "messages")
    refuse_lone_surrogates(content, f"{where}.content", "messages")
    return content


def _max_tokens(value: Any, longest_prompt: int, block_size: int, default: int,
                prompt_name: str = "prompt") -> int:
    if longest_prompt >= block_size:
        raise bad_request(f"{prompt_name} is {longest_prompt} tokens; this model's maximum "
                          f"context length is {block_size} tokens, which must hold the prompt "
                          "and at least one generated token", "prompt",
                          CONTEXT_LENGTH_EXCEEDED)
    room = block_size - longest_prompt
    if value is None:  # unset: the default, already cut to the room (_default_max_tokens)
        return default
    # (an integer >= 1: _token_limit checked it)
    if value > room:
        raise bad_request(f"This model's maximum context length is {block_size} tokens, "
                          f"however you requested {longest_prompt + value} tokens "
                          f"({longest_prompt} in your prompt; {value} for the completion). "
                          "Please reduce your prompt or max_tokens.", "max_tokens",
                          CONTEXT_LENGTH_EXCEEDED)
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
    # 0, as OpenAI takes it: sampling keeps the most likely token always, so greedy.
    return _number(data, "top_p", 1.0, 0.0, 1.0)


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
    for i, s in enumerate(stops):
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad_request(f"each stop sequence must be 1-{MAX_STOP_CHARS} characters, got "
                              f"{json.dumps(s)}", "stop")
        refuse_lone_surrogates(s, f"stop[{i}]" if isinstance(value, list) else "stop", "stop")
    return tuple(stops)


def refuse_lone_surrogates(text: str, where: str, param: str) -> None:
    """A 400 naming `where` when `text` holds a lone surrogate (JSON's "\\ud800"), which no
    UTF-8 carries: a prompt, a message's content, a stop sequence (taken before 2026-12-07,
    while the same in a prompt was refused)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{where} is not valid Unicode: character {e.start} is an unpaired "
                          "surrogate", param) from None


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


# OpenAI's stream_options. include_obfuscation pads streamed events with random characters
# (against reading the text from payload sizes): it changes no text, and none is sent here, so
# it is accepted and has no effect; a key that would change what is sent is refused.
STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, got {_json_type(options)}",
                          "stream_options")
    unknown = set(options) - set(STREAM_OPTIONS)
    if unknown:
        raise bad_request(f"stream_options: unknown field(s) {sorted(unknown)}; OpenAI's are "
                          "include_usage and include_obfuscation (accepted, no effect here)",
                          "stream_options")
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    for name in STREAM_OPTIONS:  # null is unset, as elsewhere
        if options.get(name) is not None and not isinstance(options[name], bool):
            raise bad_request(f"stream_options.{name} must be true or false",
                              "stream_options")
    return options.get("include_usage") is True


def _same(value: Any, allowed: Any) -> bool:
    # 0 == False in Python: compare types too, so "echo": 0 is not taken for false.
    return value == allowed and (type(value) is type(allowed)
                                 or (is_number(value) and is_number(allowed)))


def _json_type(value: Any) -> str:
    """json_type with its article, as the messages read ("got a string", "got null")."""
    kind = json_type(value)
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


# -- responses -----------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def version_header(version: str) -> str:
    """The model version as an HTTP header value: percent-encoded past printable ASCII. It
    names the checkpoint's directories, which users name (`прогон-1/checkpoint_...`), and
    header values are Latin-1: a whole answer became a plain-text 500 once generated."""
    from urllib.parse import quote

    return quote(version, safe="".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%"))


def version_headers(version: str) -> dict[str, str]:
    """The headers of an answer produced by model `version` (none when it is not known)."""
    return {"x-model-version": version_header(version)} if version else {}


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
    return {"object": "list", "data": [model_body(model_name, info)]}


def model_body(model_name: str, info: dict[str, Any]) -> dict[str, Any]:
    """The served model as /v1/models lists it (and GET /v1/models/{id} answers it)."""
    return {"id": model_name, "object": "model", "created": int(info.get("loaded_at", 0)),
            "owned_by": "orchestrator", **info}


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion_body(request_id: str, model: str, version: str, text: str,
                         finish_reason: str, prompt_tokens: int, completion_tokens: int,
                         created: int | None = None) -> dict[str, Any]:
    """A whole chat completion: one assistant message."""
    return {
        "id": request_id, "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model, "system_fingerprint": version,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk_body(request_id: str, model: str, version: str, created: int, index: int,
                    delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    """One server-sent event of a streamed chat completion: the first carries the role, the
    next the content as it comes, the last the finish_reason (empty delta)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": version,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat_usage_chunk_body(request_id: str, model: str, version: str, created: int,
                          prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": version, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
