"""The HTTP API as OpenAI's clients use it, and as a hostile client tries it: every client error is a 4xx in
OpenAI's error shape and the service goes on serving; the official ``openai`` client works unmodified."""
import json
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from helpers import Server

CONTEXT = 256          # the tiny model's positions
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def svc(shared_server):
    return shared_server


def post(s, body, **kw):
    return httpx.post(f"{s.url}/v1/completions", json=body, timeout=60, **kw)


def assert_still_serving(s):
    assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
    r = post(s, {"model": "gpt2", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def raw(s, method, path, content, content_type="application/json"):
    return httpx.request(method, f"{s.url}{path}", content=content, headers={"Content-Type": content_type},
                         timeout=60)


ACCEPTANCE = {  # case: (request, status, error code)
    "invalid JSON": (lambda s: raw(s, "POST", "/v1/completions", b'{"prompt": "Hi'), 400, "invalid_json"),
    "prompt over the context": (lambda s: post(s, {"prompt": "hello " * (CONTEXT + 10)}), 400,
                                "context_length_exceeded"),
    "max_tokens over the context": (lambda s: post(s, {"prompt": "Hi", "max_tokens": CONTEXT + 1}), 400,
                                    "context_length_exceeded"),
    "prompt + max_tokens over the context": (lambda s: post(s, {"prompt": "hello " * 200, "max_tokens": 100}),
                                             400, "context_length_exceeded"),
    "2 MB body": (lambda s: raw(s, "POST", "/v1/completions", json.dumps({"prompt": "a" * (2 << 20)}).encode()),
                  413, "request_too_large"),
    "2 MB body without Content-Length": (lambda s: raw(s, "POST", "/v1/completions", iter([b" " * (1 << 16)] * 32)),
                                         413, "request_too_large"),
    "text/plain": (lambda s: raw(s, "POST", "/v1/completions", b'{"prompt": "Hi"}', "text/plain"), 415,
                   "unsupported_media_type"),
    "form": (lambda s: raw(s, "POST", "/v1/completions", b'prompt=Hi', "application/x-www-form-urlencoded"), 415,
             "unsupported_media_type"),
    "unknown model": (lambda s: post(s, {"model": "gpt-4o", "prompt": "Hi"}), 404, "model_not_found"),
    "seed 2**64": (lambda s: post(s, {"prompt": "Hi", "seed": 2 ** 64}), 400, "invalid_value"),
    "seed 2**63": (lambda s: post(s, {"prompt": "Hi", "seed": 2 ** 63}), 400, "invalid_value"),
    "GET on a POST route": (lambda s: httpx.get(f"{s.url}/v1/completions", timeout=30), 405, "method_not_allowed"),
    "no such route": (lambda s: httpx.get(f"{s.url}/v2/nothing", timeout=30), 404, "unknown_url"),
    "lone surrogate": (lambda s: raw(s, "POST", "/v1/completions", b'{"prompt": "\\ud800"}'), 400, "invalid_value"),
    "deep nesting": (lambda s: raw(s, "POST", "/v1/completions", b"[" * 100000 + b"]" * 100000), 400,
                     "invalid_json"),
    "invalid UTF-8": (lambda s: raw(s, "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400, "invalid_json"),
    "n=2": (lambda s: post(s, {"prompt": "Hi", "n": 2}), 400, "unsupported_parameter"),
    "best_of=3": (lambda s: post(s, {"prompt": "Hi", "best_of": 3}), 400, "unsupported_parameter"),
    "logprobs": (lambda s: post(s, {"prompt": "Hi", "logprobs": 1}), 400, "unsupported_parameter"),
    "unknown argument": (lambda s: post(s, {"prompt": "Hi", "frobnicate": 1}), 400, "unsupported_parameter"),
    "two prompts": (lambda s: post(s, {"prompt": ["Hi", "Ho"]}), 400, "unsupported_parameter"),
    "token id outside the vocabulary": (lambda s: post(s, {"prompt": [1, 10 ** 6]}), 400, "invalid_value"),
    "five stops": (lambda s: post(s, {"prompt": "Hi", "stop": list("abcde")}), 400, "invalid_value"),
    "chat without messages": (lambda s: httpx.post(f"{s.url}/v1/chat/completions", json={"messages": []},
                                                   timeout=30), 400, "invalid_value"),
    "chat with a tool role": (lambda s: httpx.post(f"{s.url}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "tool", "content": "x"}]}), 400, "invalid_value"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ACCEPTANCE)
def test_client_errors_in_openai_shape_and_the_service_goes_on(svc, case):
    send, status, code = ACCEPTANCE[case]
    r = send(svc)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= ERROR_KEYS and error["code"] == code and error["message"]
    assert "Traceback" not in error["message"]
    assert_still_serving(svc)


def test_openai_parameters_are_honoured(svc):
    r = post(svc, {"model": "gpt2", "prompt": ["Hello"], "max_tokens": None, "n": 1, "best_of": 1, "seed": 2 ** 63 - 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16   # null: the default
    ids = post(svc, {"prompt": [[15496, 995]], "max_tokens": 3, "seed": 7}).json()
    text = post(svc, {"prompt": "Hello world", "max_tokens": 3, "seed": 7}).json()
    assert ids["usage"]["prompt_tokens"] == 2 and ids["choices"][0]["text"] == text["choices"][0]["text"]
    echo = post(svc, {"prompt": "Hello world", "max_tokens": 3, "seed": 7, "echo": True}).json()
    assert echo["choices"][0]["text"] == "Hello world" + text["choices"][0]["text"]
    full = text["choices"][0]["text"]
    stop = full.strip()[:2]                        # a stop string that the seeded completion contains
    cut = post(svc, {"prompt": "Hello world", "max_tokens": 3, "seed": 7, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]


def test_stop_in_a_stream_matches_the_plain_answer(svc):
    full = post(svc, {"prompt": "Hello", "max_tokens": 12, "seed": 3}).json()["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    with httpx.stream("POST", f"{svc.url}/v1/completions", timeout=60,
                      json={"prompt": "Hello", "max_tokens": 12, "seed": 3, "stop": stop, "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_health_answers_while_a_900kb_prompt_is_tokenized(svc):
    big = {"prompt": "hello world " * 75000}      # 900 KB: about 150k tokens to count
    box = {}
    t = threading.Thread(target=lambda: box.update(r=post(svc, big)))
    t.start()
    answered_during = 0
    while t.is_alive():
        r = httpx.get(f"{svc.url}/health", timeout=1)   # raises past 1 s
        if r.status_code == 200 and t.is_alive():
            answered_during += 1
    t.join()
    assert box["r"].status_code == 400 and box["r"].json()["error"]["code"] == "context_length_exceeded"
    assert answered_during >= 3


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=f"{svc.url}/v1", api_key="unused", max_retries=0)


def test_official_client_completions_stream_chat_models(svc, client):
    models = [m.id for m in client.models.list()]
    assert models[0] == "gpt2-tiny-random" and "gpt2" in models
    c = client.completions.create(model="gpt2", prompt="Hello", max_tokens=4)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 4
    parts = list(client.completions.create(model=models[0], prompt="Hello", max_tokens=4, stream=True))
    assert parts[-1].choices[0].finish_reason == "length" and sum(1 for p in parts if p.choices[0].text) >= 1
    chat = client.chat.completions.create(model="gpt2", max_tokens=4, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    assert chat.usage.prompt_tokens > 4   # the template's text: "System: ...\nUser: Hi\nAssistant:"
    deltas = list(client.chat.completions.create(model="gpt2", max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "Hi"}]))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason in ("length", "stop")


def test_official_client_sees_errors_as_api_status_errors(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="gpt2", prompt="Hi", max_tokens=CONTEXT + 1)
    assert e.value.status_code == 400 and "maximum context length" in e.value.message
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert "does not exist" in e.value.message


def test_host_header_allow_list(svc):
    ok = httpx.get(f"{svc.url}/health", headers={"Host": f"localhost:{svc.port}"}, timeout=30)
    evil = httpx.post(f"{svc.url}/v1/completions", json={"prompt": "Hi"}, timeout=30,
                      headers={"Host": f"attacker.example:{svc.port}"})
    assert ok.status_code == 200
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"


@pytest.mark.slow
def test_api_key(tmp_path):
    s = Server("--api-key", "K1", env={"LLM_PSI_API_KEY": "ignored-when-the-option-is-given"})
    try:
        s.wait_ready()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "K1"}):
            r = post(s, {"prompt": "Hi", "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/v1/models", timeout=30).status_code == 401
        assert post(s, {"prompt": "Hi", "max_tokens": 2}, headers={"Authorization": "Bearer K1"}).status_code == 200
        assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{s.url}/metrics", timeout=30).status_code == 200
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="K1", max_retries=0)
        assert good.completions.create(model="gpt2", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="K2", max_retries=0).models.list()
    finally:
        s.stop()


@pytest.mark.slow
def test_api_key_from_the_environment():
    s = Server(env={"LLM_PSI_API_KEY": "E1"})
    try:
        s.wait_ready()
        assert post(s, {"prompt": "Hi", "max_tokens": 2}).status_code == 401
        assert post(s, {"prompt": "Hi", "max_tokens": 2}, headers={"Authorization": "Bearer E1"}).status_code == 200
    finally:
        s.stop()


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        proc.kill()
        raise AssertionError(f"the server did not exit within {timeout} s")


def hold_a_half_sent_body(s) -> socket.socket:
    """A client that sends a request's headers and half its body, then waits."""
    held = socket.create_connection(("127.0.0.1", s.port))
    held.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    time.sleep(0.5)       # the request reaches the app, which waits for the rest of its body
    return held


@pytest.mark.slow
def test_sigterm_with_a_half_sent_body_exits_by_the_deadline():
    drain = 2
    s = Server("--drain-timeout-s", drain)
    try:
        s.wait_ready()
        held = hold_a_half_sent_body(s)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert wait_exit(s.proc, drain + 5) == 0
        assert time.monotonic() - t0 >= drain   # it waited for the held request until the deadline
        held.settimeout(5)
        answer = held.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 503") and "drain deadline" in answer
        log = s.proc.stdout.read()
        assert "cancelled at the drain deadline" in log and "Traceback" not in log
    finally:
        s.stop()


@pytest.mark.slow
def test_second_signal_exits_at_once_and_draining_refuses_connections():
    s = Server()              # the default drain deadline: 30 s
    try:
        s.wait_ready()
        held = hold_a_half_sent_body(s)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert s.proc.poll() is None                 # draining: the held request keeps it up
        with pytest.raises(httpx.ConnectError):      # while draining, the listener is closed
            httpx.get(f"{s.url}/health", timeout=5)
        s.proc.send_signal(signal.SIGTERM)
        assert wait_exit(s.proc, 5) == 128 + signal.SIGTERM
        assert "exiting now, without draining" in s.proc.stdout.read()
        held.close()
    finally:
        s.stop()
