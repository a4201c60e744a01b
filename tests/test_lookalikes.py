"""Look-alike nicknames and text that spoofs what is printed (issue 18, "Low").

"admin" followed by a character that draws nothing is a second "admin" on screen: every
default-ignorable code point and filler is refused in a name. A message is kept as sent,
except that control characters with no meaning in chat (ESC, backspace, NUL) and text that
would show as empty are refused; what stays (CR, bidi controls) is neutralised where text
is printed (``Message.__str__``, the panel's snapshot).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib.store import Message
from chatlib.validation import printable

T = 10.0

LOOK_ALIKES = {
    "Braille blank": "admin\u2800",
    "Hangul choseong filler": "admin\u115f",
    "Hangul jungseong filler": "admin\u1160",
    "variation selector 16": "admin\ufe0f",
    "variation selector 17": "admin\U000e0100",
    "Mongolian selector": "admin\u180b",
    "Khmer inherent vowel": "admin\u17b4",
    "combining grapheme joiner": "ad\u034fmin",
}


@pytest.mark.parametrize("name", LOOK_ALIKES.values(), ids=LOOK_ALIKES.keys())
async def test_a_name_that_renders_as_another_is_refused(server, http, name):
    response = await http.post(server.url + "api/messages", json={"user": name, "text": "hi"})
    assert response.status_code == 400, response.text
    odd = next(c for c in name if c not in "admin")
    assert f"(U+{ord(odd):04X})" in response.json()["error"]
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": name}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), T))
        assert frame["type"] == "error" and "invisible" in frame["error"]
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), T)
    assert ws.close_code == 1008
    stored = (await http.get(server.url + "api/messages")).json()["messages"]
    assert stored == []


async def test_names_with_visible_marks_and_scripts_still_join(server, http):
    for name in ("Zoë", "José", "李雷", "Ølaf", "admin"):
        response = await http.post(server.url + "api/messages",
                                   json={"user": name, "text": "hi"})
        assert response.status_code == 201, (name, response.text)


EMPTY_LOOKING = {
    "zero width spaces": "\u200b\u200b\u200b",
    "zero width joiner and space": "\u200d \u200c",
    "Braille blanks": "\u2800\u2800",
    "Hangul filler": "\u3164",
    "a lone combining mark": "\u0301",
    "word joiner and line break": "\u2060\n",
}


@pytest.mark.parametrize("text", EMPTY_LOOKING.values(), ids=EMPTY_LOOKING.keys())
async def test_text_that_would_show_as_empty_is_refused(server, http, text):
    response = await http.post(server.url + "api/messages",
                               json={"user": "eve", "text": text})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "text would show as empty"


@pytest.mark.parametrize("char", ["\x1b", "\x08", "\x00", "\x07", "\x7f", "\x9b"],
                         ids=["ESC", "backspace", "NUL", "bell", "DEL", "C1 CSI"])
async def test_control_characters_without_meaning_in_text_are_refused(server, http, char):
    response = await http.post(server.url + "api/messages",
                               json={"user": "eve", "text": f"hi{char}[2Jthere"})
    assert response.status_code == 400, response.text
    assert f"control character (U+{ord(char):04X})" in response.json()["error"]
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "eve"}))
        await ws.send(json.dumps({"type": "message", "text": f"x{char}", "client_id": "c1"}))
        for _ in range(20):  # history and presence frames may come first
            frame = json.loads(await asyncio.wait_for(ws.recv(), T))
            if frame["type"] == "error":
                break
        assert frame["client_id"] == "c1" and frame["status"] == 400


async def test_line_breaks_tabs_and_bidi_text_are_kept_as_sent(server, http):
    text = "first line\r\nsecond\tline \u202bשלום\u202c"
    response = await http.post(server.url + "api/messages", json={"user": "eve", "text": text})
    assert response.status_code == 201, response.text
    assert response.json()["text"] == text


def test_printing_a_message_neutralises_what_could_spoof_the_output():
    message = Message(7, 0.0, "mallory", "ok\rFAKE \u202eevil\u202c\u200b\n\tnext")
    shown = str(message)
    assert shown == ("#7 mallory: ok<U+000D>FAKE <U+202E>evil<U+202C><U+200B>\n\tnext")
    assert printable("plain text, émoji 👋") == "plain text, émoji 👋"
