"""The OpenAI-compatible part of the HTTP API: request parsing and validation, the chat template, stop
sequences, incremental detokenization and the response shapes. No I/O here: ``http_app`` does that.

Every client error raises ``ApiError``, which the app answers in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``. A parameter the service cannot honour is refused
with 400 ``unsupported_parameter``, never dropped silently (OpenAI's own API refuses unknown arguments too).
"""
from __future__ import annotations

import dataclasses
import json
import time

DEFAULT_MAX_TOKENS = 16          # OpenAI's default for /v1/completions; used for chat too (see docs/SERVICE.md)
MAX_SEED = 2 ** 63               # seeds are 0 <= seed < 2**63 (torch.Generator.manual_seed takes int64)
MAX_STOPS = 4                    # OpenAI's bound on stop sequences
MAX_STOP_CHARS = 256             # each stop's length: bounds the text held back and the stop check's work
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"            # the template's next user turn ends the reply
# parameters accepted only at their default value: (default values, what the service does instead)
DEFAULT_ONLY = {"n": ((None, 1), "one choice per request"), "best_of": ((None, 1), "one choice per request"),
                "top_p": ((None, 1, 1.0), "temperature sampling among the top-k likeliest tokens"),
                "presence_penalty": ((None, 0, 0.0), "no penalties"),
                "frequency_penalty": ((None, 0, 0.0), "no penalties"), "suffix": ((None,), "no insertion"),
                "logit_bias": ((None, {}), "no logit bias"), "tools": ((None, []), "no tools"),
                "tool_choice": ((None, "none"), "no tools"), "top_logprobs": ((None,), "no log-probabilities"),
                "response_format": ((None, {"type": "text"}), "plain text")}
COMMON = {"model", "max_tokens", "temperature", "seed", "stream", "stream_options", "n", "stop", "user",
          "top_p", "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_KEYS = COMMON | {"prompt", "best_of", "echo", "logprobs", "suffix"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                      "response_format"}


class ApiError(Exception):
    """A client error (or a refusal) in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers, self.extra = headers, extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code,
                          **self.extra}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclasses.dataclass
class Job:
    """One validated request: what to generate and how to answer."""
    chat: bool
    prompt: str | list[int]          # text, or token ids as given
    max_tokens: int
    seed: int | None
    stream: bool
    stop: list[str]
    echo: bool = False
    model: str | None = None
    include_usage: bool = True


def parse_body(raw: bytes):
    """The JSON of a request body; 400 for anything that is not (deep nesting included)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _check_keys(body, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unrecognized request argument: {unknown[0]}", unknown[0], "unsupported_parameter")
    for key, (defaults, instead) in DEFAULT_ONLY.items():
        if key in body and (isinstance(body[key], bool) or body[key] not in defaults):
            raise invalid(f"{key}={json.dumps(body[key])[:100]} is not supported by this service "
                          f"({instead}); omit it or send its default", key, "unsupported_parameter")


def _integer(body, key: str, lo: int, hi: int | None, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value >= hi):
        bound = f">= {lo}" + (f" and < {hi}" if hi is not None else "")
        raise invalid(f"{key} must be an integer {bound}", key)
    return value


def _unicode(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
    return text


def _stops(body) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    longest = max(map(len, stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise invalid(f"each stop may be at most {MAX_STOP_CHARS} characters long; got one of {longest}", "stop")
    return [_unicode(s, "stop") for s in stops]


def _common(body, temperature: float, max_tokens_key: str = "max_tokens") -> dict:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", "model")
    t = body.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
        raise invalid(f"temperature must be a number, got {type(t).__name__} {json.dumps(t)[:40]}", "temperature")
    if t is not None and t != temperature:
        raise invalid(f"this service samples at temperature {temperature} (llm_server.py serve --temperature); "
                      f"got {t}", "temperature", "unsupported_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    options = options or {}
    if set(options) - {"include_usage"}:
        raise invalid("stream_options may hold include_usage only", "stream_options")
    return {"model": model, "stream": bool(stream), "include_usage": options.get("include_usage", True) is not False,
            "max_tokens": _integer(body, max_tokens_key, 1, None, DEFAULT_MAX_TOKENS),
            "seed": _integer(body, "seed", 0, MAX_SEED, None), "stop": _stops(body)}


def _prompt(value) -> str | list[int]:
    """A prompt: a string, token ids, or a list holding one of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise invalid("prompt must be a non-empty string", "prompt")
        return _unicode(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(x, (str, list)) for x in value):
        raise invalid("one prompt per request: this service does not batch prompts", "prompt",
                      "unsupported_parameter")
    raise invalid("prompt must be a non-empty string, a list of token ids, or a list of one of either", "prompt")


def parse_completion(body, temperature: float) -> Job:
    _check_keys(body, COMPLETION_KEYS)
    if body.get("logprobs") is not None:
        raise invalid("logprobs is not supported by this service", "logprobs", "unsupported_parameter")
    echo = body.get("echo", False)
    if echo is not None and not isinstance(echo, bool):
        raise invalid("echo must be true or false", "echo")
    return Job(chat=False, prompt=_prompt(body.get("prompt")), echo=bool(echo), **_common(body, temperature))


def parse_chat(body, temperature: float) -> Job:
    _check_keys(body, CHAT_KEYS)
    if body.get("logprobs") not in (None, False):
        raise invalid("logprobs is not supported by this service", "logprobs", "unsupported_parameter")
    common = _common(body, temperature, "max_completion_tokens" if body.get("max_completion_tokens") is not None
                     else "max_tokens")
    common["stop"] = common["stop"] + [CHAT_STOP]
    return Job(chat=True, prompt=chat_prompt(body.get("messages")), **common)


def chat_prompt(messages) -> str:
    """The plain-text chat template (GPT-2 has none of its own): one ``Role: content`` line per message
    (System, User, Assistant; developer counts as System), then ``Assistant:`` for the reply."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):       # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        lines.append(f"{CHAT_ROLES[m['role']]}: {_unicode(content, f'messages[{i}].content')}\n")
    return "".join(lines) + "Assistant:"


def check_model(job: Job, names: list[str]) -> None:
    if job.model is not None and job.model not in names:
        raise ApiError(404, f"the model {job.model!r} does not exist; this service serves {', '.join(names)}",
                       param="model", code="model_not_found")


def check_context(prompt_tokens: int, max_tokens: int, context: int) -> None:
    """400 context_length_exceeded where the prompt and the completion do not fit the model's positions."""
    if prompt_tokens == 0 and max_tokens > context:
        raise invalid(f"max_tokens {max_tokens} exceeds this model's maximum context length of {context} tokens",
                      "max_tokens", "context_length_exceeded")
    if prompt_tokens + max_tokens > context:
        raise invalid(f"this model's maximum context length is {context} tokens; you requested "
                      f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                      f"completion); shorten the prompt or lower max_tokens", "max_tokens" if prompt_tokens < context
                      else "prompt", "context_length_exceeded")


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((x for x in ids if not 0 <= x < vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")


class StopText:
    """Cuts a text stream at the first of its stop strings, holding back any tail that may begin one.

    Linear: each stop keeps the length of its longest prefix that ends the text so far (Knuth-Morris-Pratt),
    so a new character costs amortised O(1) per stop, however long the text or the stops."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.hit = stops, "", False
        self.fail = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)   # per stop: its longest prefix that the text ends with

    def _advance(self, i: int, c: str) -> int:
        s, fail, k = self.stops[i], self.fail[i], self.matched[i]
        while k and s[k] != c:
            k = fail[k - 1]
        if s[k] == c:
            k += 1
        self.matched[i] = k
        return k

    def feed(self, delta: str) -> str:
        """The text that is safe to send now."""
        if self.hit:
            return ""
        text = self.pending + delta
        start = len(self.pending)
        for pos in range(start, len(text)):
            ends = [len(s) for i, s in enumerate(self.stops) if self._advance(i, text[pos]) == len(s)]
            if ends:   # a stop ends at pos: cut where the earliest-starting one begins
                self.hit, self.pending = True, ""
                return text[:pos + 1 - max(ends)]
        hold = max(self.matched, default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


def _prefix_function(s: str) -> list[int]:
    """KMP's failure function: fail[i] = the length of the longest proper prefix of s[:i+1] that ends it."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class Detokenizer:
    """Text of a token stream, piece by piece: a character split over tokens is sent once it is whole."""

    def __init__(self, decode):
        self.decode, self.ids, self.prefix, self.read = decode, [], 0, 0

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        done = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd"):        # an incomplete character: wait for its next byte
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        if self.read == len(self.ids):
            return ""
        return self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]


def completion_body(job: Job, rid: int, model: str, text: str, finish: str | None, usage: dict | None = None,
                    extra: dict | None = None) -> dict:
    """A completion (or a streamed chunk of one: ``final`` False) in OpenAI's shape for the job's endpoint."""
    if job.chat:
        kind = "chat.completion.chunk" if job.stream else "chat.completion"
        part = {"delta": {"content": text} if text or finish is None else {}} if job.stream else \
            {"message": {"role": "assistant", "content": text}}
        choice = {"index": 0, **part, "logprobs": None, "finish_reason": finish}
    else:
        kind = "text_completion"
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{rid}", "object": kind, "created": int(time.time()),
            "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return {**body, **(extra or {})}


def role_chunk(job: Job, rid: int, model: str) -> dict:
    """A chat stream's first chunk: the assistant's role, no text yet."""
    body = completion_body(job, rid, model, "", None)
    body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return body


def models_body(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "llm_psi"}
                                       for n in names]}
