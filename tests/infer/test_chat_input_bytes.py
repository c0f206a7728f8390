"""Bytes on chat's stdin that are not valid text do not end the session: they become U+FFFD,
a note says so, and the next turns are answered."""

import io
import sys

import pytest

from peftchat.infer import chat


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale; the C/POSIX locale
def test_invalid_bytes_on_stdin_are_replaced_and_the_session_goes_on(make_adapter, monkeypatch, capsys, errors):
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe bad \xc3\nagain\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    asked = []

    def reply(self, query, write=None):
        asked.append(query)
        return "ok"

    monkeypatch.setattr(chat.ChatSession, "reply", reply)
    assert chat.run_chat(str(make_adapter("chat_template")), [], stream=False) == 0
    assert asked == ["hello", "\ufffd\ufffd bad \ufffd", "again"]
    out, err = capsys.readouterr()
    assert out == "ok\nok\nok\n"
    assert "replaced by U+FFFD" in err and "Traceback" not in err
