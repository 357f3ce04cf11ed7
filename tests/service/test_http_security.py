"""The HTTP service's pieces without a server: Host names, the allow-list, the exposure warning, stop strings,
incremental detokenization, the chat template and the request parser."""
import logging

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
