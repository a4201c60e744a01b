"""What a client sends, checked: every check fails with a :class:`ChatError` and nothing else.

A handler turns a ChatError into ``{"error": ...}`` with its status code (HTTP) or an error
frame (WebSocket), for that client only. Anything else escaping from here would be a 500.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping

from .limits import MAX_CLIENT_ID, MAX_ID, Limits


class ChatError(Exception):
    """Bad input from one client: an HTTP status (or an error frame) and a message;
    ``retry_after`` (seconds: whole for a 429, fractions for a 503 of chatlib.admission)
    for a refusal that passes: ``Retry-After`` (rounded up) / the body's or error frame's
    ``retry_after``."""

    def __init__(self, status: int, error: str, retry_after: float | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.retry_after = retry_after


def json_object(raw: str | bytes) -> dict:
    """Parse a JSON object from UTF-8 bytes or text, or raise a 400 ChatError."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatError(400, "body is not valid UTF-8") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise ChatError(400, "invalid JSON") from None
    if not isinstance(data, dict):
        raise ChatError(400, "expected a JSON object")
    return data


def _string(data: dict, field: str, limit: int) -> str:
    value = data.get(field)
    if value is None:
        raise ChatError(400, f"missing field: {field}")
    if not isinstance(value, str):
        raise ChatError(400, f"{field} must be a string")
    try:
        value.encode("utf-8")  # JSON can smuggle lone surrogates ("\ud800") past decoding
    except UnicodeEncodeError:
        raise ChatError(400, f"{field} is not valid Unicode") from None
    if not value.strip():
        raise ChatError(400, f"{field} is empty")
    if len(value) > limit:
        raise ChatError(413, f"{field} is longer than {limit} characters")
    return value


# Unicode's Default_Ignorable_Code_Point property (DerivedCoreProperties.txt, Unicode 15.1):
# characters a renderer shows as nothing when it does not support them, and often when it
# does (variation selectors, joiners, Hangul fillers, Mongolian selectors, tags). Python's
# unicodedata has no accessor for the property, hence the table. A name containing one
# looks like the same name without it: "admin\u2800" or "ad\u034fmin" render as "admin".
DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# Not default-ignorable, yet blank in every font: the Braille pattern with no dots.
FILLERS = "\u2800"
INVISIBLE = frozenset(FILLERS).union(
    chr(code) for low, high in DEFAULT_IGNORABLE for code in range(low, high + 1))


def invisible(c: str) -> bool:
    """Does ``c`` draw nothing: a default-ignorable code point or a filler."""
    return c in INVISIBLE


# Categories refused anywhere in a nickname: Cc control (incl. C1, U+0085), Cf format
# (zero-width space/joiners, bidi overrides U+202A-202E and isolates U+2066-2069, tags
# U+E0000-E007F, soft hyphen U+00AD, BOM), Zl/Zp line and paragraph separators, Co
# private use, Cs surrogates, Cn unassigned: all can hide or disguise what a name says.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
# What draws nothing on its own: combining marks, spaces.
BLANK_CATEGORIES = frozenset({"Mn", "Me", "Zs"})


def nickname(data: dict, limits: Limits, field: str = "user") -> str:
    """A nickname, NFKC-normalised and stripped, that shows what it is.

    NFKC folds look-alike forms (fullwidth "ａｌｉｃｅ", ligatures, superscripts) into one
    spelling, so "ａｌｉｃｅ" *is* "alice". Refused (400), with the reason and the code
    point: control, format, separator and unassigned characters (see REFUSED_CATEGORIES),
    every default-ignorable code point and filler (:func:`invisible`: "admin" followed by
    U+2800 would be a second "admin" on screen), and names that would render empty.
    ``field`` is the field of ``data`` that holds it (and names it in errors).
    """
    too_long = ChatError(413, f"{field} is longer than {limits.max_user} characters")
    try:
        user = _string(data, field, 4 * limits.max_user)  # NFKC below may shrink it
    except ChatError as exc:
        raise too_long if exc.status == 413 else exc from None
    user = unicodedata.normalize("NFKC", user).strip()
    for c in user:
        category = unicodedata.category(c)
        if category in REFUSED_CATEGORIES or invisible(c):
            kind = "a control" if category == "Cc" else "an invisible or formatting"
            raise ChatError(400, f"{field} contains {kind} character (U+{ord(c):04X})")
    if all(unicodedata.category(c) in BLANK_CATEGORIES for c in user):
        raise ChatError(400, f"{field} would show as empty")
    if len(user) > limits.max_user:
        raise too_long
    return user


DEFAULT_ROOM = "lobby"
"""The room of everything that names none (chatlib.store's, defined here for the checks)."""


def room_name(value, limits: Limits) -> str:
    """A room's name: :data:`DEFAULT_ROOM` for None, else the nickname rules (NFKC, nothing
    invisible, at most ``max_user`` characters), and a name starting with ``@`` must be
    a direct-message room of two valid nicknames, ``@A+B`` (:func:`dm_room`); 400/413
    otherwise."""
    if value is None:
        return DEFAULT_ROOM
    if isinstance(value, str) and unicodedata.normalize("NFKC", value).strip()[:1] == "@":
        pair = dm_users(unicodedata.normalize("NFKC", value).strip())
        if pair is None:
            raise ChatError(400, "a room name starting with @ is a direct message: @A+B")
        return dm_room(nickname({"room": pair[0]}, limits, "room"),
                       nickname({"room": pair[1]}, limits, "room"))
    return nickname({"room": value}, limits, "room")


def dm_room(a: str, b: str) -> str:
    """The room of the direct messages between users ``a`` and ``b``: ``@A+B``, the two
    nicknames NFKC-normalised and in order, so that both name the same room. 400 if they
    are the same user or a name contains "+" (the separator)."""
    a, b = (unicodedata.normalize("NFKC", name).strip() for name in (a, b))
    if "+" in a or "+" in b:
        raise ChatError(400, "a nickname with + cannot have direct messages")
    if a == b or not a or not b:
        raise ChatError(400, "a direct message needs two different users")
    return f"@{min(a, b)}+{max(a, b)}"


def dm_users(room: str) -> tuple[str, str] | None:
    """``(A, B)`` of a direct-message room ``@A+B`` (:func:`dm_room`'s form), or None if
    ``room`` is not one."""
    if room[:1] != "@":
        return None
    a, plus, b = room[1:].partition("+")
    if not plus or not a or not b or "+" in b or a >= b:
        return None
    return a, b


# Control characters a message may carry: tab and the line breaks of str.splitlines (CR
# too: a pasted Windows line end; the transports carry each intact). Every other C0/C1
# control (ESC, backspace, NUL, bell, DEL, the 8-bit CSI U+009B ...) has no meaning in
# chat text and only rewrites what a terminal or a notebook's output shows.
TEXT_CONTROLS_ALLOWED = frozenset("\t\n\x0b\x0c\r\x1c\x1d\x1e\x85")
REFUSED_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
"""Every Cc character (U+0000-001F, U+007F-009F) but those of TEXT_CONTROLS_ALLOWED."""
REFUSED_C0 = bytes([*range(0x00, 0x09), *range(0x0E, 0x1C), 0x1F, 0x7F])
"""The one-byte (UTF-8) characters of REFUSED_CONTROL."""


def message_text(data: dict, limits: Limits) -> str:
    """A message's text, kept exactly as sent, unless it cannot be shown honestly (400).

    Refused: C0/C1 control characters other than tab and line breaks (see
    TEXT_CONTROLS_ALLOWED), and text that would render empty (only spaces, line breaks,
    marks and invisible characters: "\u200b\u200b" is a message nobody can see). Bidi
    controls and CR stay: right-to-left text and pasted line ends need them; they are
    neutralised where text is printed (:func:`printable`), as the page neutralises markup.
    """
    text = _string(data, "text", limits.max_text)
    # Look with the regex only when the UTF-8 bytes may hold a refused control: a C0 byte
    # or DEL (bytes.translate deletes in C, ~0.5 us for 2,000 bytes), or 0xC2, the lead
    # byte of U+0080-00BF (C1 controls and Latin-1 signs). The regex alone: ~12 us.
    raw = text.encode("utf-8")
    if len(raw.translate(None, REFUSED_C0)) != len(raw) or b"\xc2" in raw:
        control = REFUSED_CONTROL.search(text)
        if control is not None:
            raise ChatError(400, f"text contains a control character (U+{ord(control[0]):04X})")
    for c in text:  # returns at the first visible character: usually the first one
        if not (c.isspace() or c in INVISIBLE
                or unicodedata.category(c) in SHOWS_NOTHING_IN_TEXT):
            return text
    raise ChatError(400, "text would show as empty")


# What draws nothing in a message: marks and spaces on their own, format characters
# (zero-width space, bidi controls) and line separators.
SHOWS_NOTHING_IN_TEXT = BLANK_CATEGORIES | {"Cf", "Zl", "Zp"}


def printable(text: str) -> str:
    """``text`` safe to print into a terminal or a notebook's output: LF and tab kept,
    every other control character (CR and the other line breaks too), bidi control and
    invisible character shown as ``<U+XXXX>``, so that CR cannot rewrite a line, ESC
    start a terminal sequence, U+202E reverse what follows it, or U+200B hide in a word."""
    return "".join(
        c if c == "\n" or c == "\t" or c.isprintable() and not invisible(c)
        else f"<U+{ord(c):04X}>" for c in text)


def valid_client_id(value) -> bool:
    """Whether ``value`` is a client's own id for a message: 1 to :data:`MAX_CLIENT_ID`
    printable ASCII characters (the one rule: the server's and the panel's).

    Printable ASCII (space to ``~``) fits an HTTP header (``Idempotency-Key``) unchanged
    and cannot hide anything in a log line; 64 holds a UUID with room to spare.
    """
    return (isinstance(value, str) and 0 < len(value) <= MAX_CLIENT_ID
            and all(" " <= c <= "~" for c in value))


def client_id(value, name: str = "client_id") -> str | None:
    """A client's own id for a message, or None; ChatError (400) unless it is valid."""
    if value is None:
        return None
    if not valid_client_id(value):
        raise ChatError(400, f"{name} must be 1 to {MAX_CLIENT_ID} printable ASCII characters")
    return value


def cursor(value, name: str = "after") -> int:
    """A message id from a client (``after``, ``Last-Event-ID``): 0 <= id <= MAX_ID.

    A negative one means "from the start" (0).
    """
    error = f"{name} must be an integer between 0 and 2**63-1"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ChatError(400, error)
    if isinstance(value, str):
        value = value.strip()
        # Bound the length first: int() of a 5,000-digit string raises (a 500 if unguarded).
        digits = value.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
            raise ChatError(400, error)
        value = int(value)
    if not 0 <= value <= MAX_ID:
        if value < 0:
            return 0
        raise ChatError(400, error)
    return value


def int_param(params: Mapping[str, str], name: str, default: int) -> int:
    """A cursor-like query parameter (``after``): see :func:`cursor`."""
    if name not in params:
        return default
    return cursor(params[name], name)


def float_param(params: Mapping[str, str], name: str, default: float) -> float:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw[:40])  # float() of a long string is slow; 40 is plenty for a number
    except ValueError:
        raise ChatError(400, f"{name} must be a number") from None
    if value != value or len(raw) > 40:  # NaN
        raise ChatError(400, f"{name} must be a number")
    return value


def optional_user(params: Mapping[str, str], limits: Limits) -> str:
    """The ``user`` query parameter, checked like any nickname, or "" without one."""
    if "user" not in params:
        return ""
    return nickname({"user": params["user"]}, limits)
