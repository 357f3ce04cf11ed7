"""The HTTP service's pieces without a server: Host names, the allow-list, the exposure warning, stop strings,
incremental detokenization, the chat template and the request parser."""
import logging
import os
import time

import pytest

from llm_psi.service import openai_api as oa
from llm_psi.service import security


@pytest.mark.parametrize("header, name", [("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"),
                                          ("[::1]:8000", "::1"), ("[::1]", "::1"), ("Example.COM:80", "example.com")])
def test_host_name(header, name):
    assert security.host_name(header) == name


def test_allowed_hosts_defaults_and_option():
    assert security.allowed_hosts("127.0.0.1", None) == {"localhost", "127.0.0.1", "::1"}
    assert "127.0.0.2" in security.allowed_hosts("127.0.0.2", None)
    assert security.allowed_hosts("0.0.0.0", None) is None                      # bound beyond loopback: any
    assert security.allowed_hosts("127.0.0.1", "api.example, Other") == {"api.example", "other"}
    assert security.allowed_hosts("127.0.0.1", "*") is None


def test_exposure_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="http_api"):
        security.check_exposure("127.0.0.1", None)
        security.check_exposure("0.0.0.0", "key")
        assert not caplog.records
        security.check_exposure("0.0.0.0", None)
    assert len(caplog.records) == 1 and "without an API key" in caplog.records[0].getMessage()


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_the_first():
    st = oa.StopText(["\nUser:", "END"])
    sent = [st.feed(d) for d in ("Hello", " wor", "ld\nUs", "er: more")]
    assert sent == ["Hello", " wor", "ld", ""] and st.hit and st.flush() == ""
    st = oa.StopText(["END"])
    assert st.feed("xEN") == "x" and st.flush() == "EN" and not st.hit


def test_detokenizer_waits_for_a_whole_character():
    pieces = {(): "", (1,): "a", (2,): "\ufffd", (2, 3): "é", (1, 2): "a\ufffd", (1, 2, 3): "aé"}
    d = oa.Detokenizer(lambda ids: pieces[tuple(ids)])
    assert [d.add([1]), d.add([2]), d.add([3])] == ["a", "", "é"] and d.flush() == ""


def test_chat_template_and_parser():
    job = oa.parse_chat({"model": "gpt2", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                         "max_completion_tokens": 5, "stop": "x"}, 0.7)
    assert job.prompt == "System: Be brief.\nUser: Hi\nAssistant:" and job.max_tokens == 5
    assert job.stop == ["x", oa.CHAT_STOP] and job.chat and not job.stream
    job = oa.parse_completion({"prompt": [[1, 2]], "max_tokens": None, "n": 1, "stream": True}, 0.7)
    assert job.prompt == [1, 2] and job.max_tokens == oa.DEFAULT_MAX_TOKENS and job.stream


@pytest.mark.parametrize("body, param", [({"prompt": "Hi", "n": True}, "n"), ({"prompt": "Hi", "top_p": 0.5}, "top_p"),
                                         ({"prompt": "Hi", "temperature": 1.0}, "temperature"),
                                         ({"prompt": "Hi", "max_tokens": 1.5}, "max_tokens"),
                                         ({"prompt": "Hi", "stream": "yes"}, "stream")])
def test_parser_refuses(body, param):
    with pytest.raises(oa.ApiError) as e:
        oa.parse_completion(body, 0.7)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("header", ["127.0.0.1:evil", "localhost:1@evil.com", "localhost:80:80", "[::1", "::1:80",
                                    "evil.com/localhost", "local host", "localhost:123456", ""])
def test_host_name_refuses_what_is_no_host_and_port(header):
    assert security.host_name(header) is None
    assert security.Guard(None, hosts=frozenset(security.LOOPBACK_NAMES)).check(
        {"type": "http", "path": "/health", "headers": [(b"host", header.encode())]}).code == "invalid_host"


def test_api_key_compares_bytes_so_a_non_ascii_key_works():
    guard = security.Guard(None, api_key="clé-ключ")

    def check(token: bytes):
        return guard.check({"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Bearer " + token)]})
    assert check("clé-ключ".encode()) is None
    assert check(b"cl\xe9-key").status == 401 and check(b"").status == 401


def test_stop_text_is_linear_in_the_text_and_cuts_at_the_first_stop_to_end():
    st = oa.StopText(["aab", "ab"])                      # overlapping prefixes: KMP must fall back correctly
    assert st.feed("aaa") == "a" and st.pending == "aa"  # "aa" may begin aab: held back
    assert st.feed("ab") == "a" and st.hit               # aab and ab end together: cut where aab begins
    st = oa.StopText(["abcd", "bc"])
    assert st.feed("abcd") == "a" and st.hit             # bc completes before abcd does: as a stream would stop
    n = 4000        # stops longer than the parser allows: the work must not grow with their length
    st = oa.StopText(["a" * (n - 1) + c for c in "bcde"])   # the worst case for checking every prefix
    t0 = time.process_time()
    sent = "".join(st.feed("a") for _ in range(n + 1000))
    assert time.process_time() - t0 < 5      # every prefix on every token: minutes; linear: a fraction of a second
    assert sent == "a" * 1001 and st.flush() == "a" * (n - 1)


@pytest.mark.parametrize("body, param, message", [
    ({"stop": ["w" * 250000, "x"]}, "stop", f"at most {oa.MAX_STOP_CHARS} characters"),
    ({"stop": "s" * (oa.MAX_STOP_CHARS + 1)}, "stop", f"at most {oa.MAX_STOP_CHARS} characters"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"stream": True, "stream_options": [1]}, "stream_options", "must be an object"),
    ({"stream": True, "stream_options": []}, "stream_options", "must be an object"),
    ({"temperature": "0.7"}, "temperature", "temperature must be a number, got str"),
])
def test_parser_refuses_long_stops_stray_stream_options_and_wrong_types(body, param, message):
    with pytest.raises(oa.ApiError) as e:
        oa.parse_completion({"prompt": "Hi", **body}, 0.7)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message
    job = oa.parse_completion({"prompt": "Hi", "stop": ["s" * oa.MAX_STOP_CHARS] * 4, "stream": True,
                               "stream_options": None}, 0.7)
    assert len(job.stop) == 4


def test_retry_after_is_spread():
    from llm_psi.service import http_errors
    drawn = [http_errors.unavailable("x", "overloaded", 1.0).headers for _ in range(200)]
    ms = [int(h["retry-after-ms"]) for h in drawn]
    assert all(1000 <= m <= 2000 for m in ms) and len(set(ms)) > 50          # spread over [d, 2d]
    assert all(int(h["Retry-After"]) == -(-m // 1000) for h, m in zip(drawn, ms))   # whole seconds, rounded up
    assert min(int(h["retry-after-ms"]) for h in (http_errors.retry_headers(5.0) for _ in range(20))) >= 5000


def test_serve_help_names_no_missing_file_and_states_the_timeouts():
    from llm_psi.service import server
    text = server.build_serve_parser().format_help()
    assert "http_api.py" not in text
    assert "--header-timeout-s" in text and "--body-timeout-s" in text and "(default: 10.0)" in text


def test_docs_give_the_metrics_content_type_the_service_sends():
    from prometheus_client import CONTENT_TYPE_LATEST
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "SERVICE.md")).read()
    sent = CONTENT_TYPE_LATEST.split(";")[1].strip()     # version=...
    assert f"`{CONTENT_TYPE_LATEST}`" in docs and sent in docs
    assert "version=0.0.4" not in docs


def test_empty_api_key_is_an_error(monkeypatch):
    from llm_psi.cli import UsageError
    from llm_psi.service import server
    with pytest.raises(UsageError, match="--api-key is empty"):
        server.parse_serve(["--api-key", ""])
    monkeypatch.setenv("LLM_PSI_API_KEY", "")
    with pytest.raises(UsageError, match="--api-key is empty"):
        server.parse_serve([])
