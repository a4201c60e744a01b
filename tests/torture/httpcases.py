"""Generated HTTP requests for the fuzzer: a valid request, then one to three mutations.

Every case is a *complete* request (the body is all there, chunked framing is closed): a
server must answer each one at once, and never with 5xx. Requests that are incomplete on
purpose (slowloris) are :func:`incomplete_cases`, tested against the header timeout.
``Case.family`` names what was mutated, for the figures and for reproducing a failure.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

ROUTES = ["/", "/static/app.js", "/static/style.css", "/static/index.html",
          "/api/messages", "/api/messages", "/api/messages", "/api/typing", "/api/events",
          "/api/presence", "/ws", "/nope", "/api", "/api/"]

TRAVERSAL = [
    "/static/../chatlib/app.py", "/static/%2e%2e/chatlib/app.py",
    "/static/..%2f..%2fetc%2fpasswd", "/static/%2e%2e%2f%2e%2e%2fetc/passwd",
    "/static/....//....//etc/passwd", "//etc/passwd", "/static//etc/passwd",
    "/static/%00", "/static/app.js%00.txt", "/static/..\\..\\etc\\passwd",
    "/static/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd", "/../../../../etc/passwd",
    "/static/./app.js", "/static/" + "a/" * 2000 + "x", "/%", "/%zz", "/static/%ff",
    "*", "http://127.0.0.1/api/presence", "http://evil.example/api/messages",
    "/static/../../../../../../../../proc/self/environ", "/static/%252e%252e/etc/passwd",
    "/static/..;/chatlib/app.py", "/static/.%2e/chatlib/app.py", "/static/~/.bashrc",
    "/static/.git/config", "/static/../pyproject.toml", "/./api/presence",
    "/api/../static/../chatlib/app.py", "/static/" + "%2e%2e%2f" * 30 + "etc/passwd",
]
LEAKS = (b"root:x:0:0", b"def create_app", b"[build-system]", b"PATH=", b"[core]")
"""Bytes that would mean a traversal served a file from outside static/."""

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT",
           "get", "post", "G ET", "", "PRI", "M" * 100, "GET\x00", "POST\t", "\xffGET"]
VERSIONS = ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", "HTTP/1.1 x", "",
            "HTTP/11", "HTTP/1.1\x00", "HTTP/9.9", "HTTP/1.", "HTTPS/1.1"]

WEIRD_TEXT = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\r", "\n", "\r\n",
              "\x00", "\u202e", "\u200b", "\u2066", "\U000e0041", "\xad", "\ufeff", "\ud800",
              "\udfff", "\U0001f600", "<script>alert(1)</script>", "%s%n", "' OR 1=1 --",
              "\\", '"', "a" * 2001, "\t", " ", "ｄ", "é", "\u0301"]
WEIRD_NUMBERS = ["-1", "0", "1e9", "9" * 5000, "abc", "1.5", "%00", "\u0661\u0662", "+5", " 5",
                 "", "0x10", "1e309", "nan", "inf", "-inf", "-0", "00000000000000000001",
                 "18446744073709551616", "%ff", "1_000", "１２", "2" * 4301]
WAITS = ["nan", "inf", "-inf", "-1", "1e309", "0.001", "0.05", "abc", "30", "1e9", "0",
         "", "25", "%00", "1" * 5000]

CONTENT_TYPES = ["application/json", "text/plain", "multipart/form-data; boundary=x",
                 "application/x-www-form-urlencoded", "application/json; charset=latin-1",
                 "application/json; charset=utf-8", "APPLICATION/JSON", "garbage", "",
                 "application/json\x00", "text/html", "application/jsonx",
                 "application/json;" + "a" * 2000]
HOSTS = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "evil.example",
         "evil.example:{port}", "", "a" * 300, "user@127.0.0.1:{port}", "127.0.0.1:99999",
         "127.0.0.1:{port}, evil.example", "\xff", "127.0.0.1:{port}:{port}", "0.0.0.0",
         "localhost.", "127.1:{port}", "[::1", "LOCALHOST:{port}"]
ORIGINS = ["http://127.0.0.1:{port}", "http://evil.example", "null", "", "garbage",
           "http://localhost:{port}", "http://evil.example:{port}", "file://", "\xff",
           "http://127.0.0.1:{port}/extra", "https://127.0.0.1:{port}"]
LAST_EVENT_IDS = WEIRD_NUMBERS + ["5\r\nX: y", "\u0665", "9" * 100_00]


@dataclass
class Case:
    family: str
    data: bytes


def _token(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(n))


def _bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def json_body(rng: random.Random) -> tuple[str, bytes]:
    """A JSON (or not quite JSON) body for POST /api/messages or /api/typing."""
    user = rng.choice(["fuzz", f"fuzz-{rng.randrange(50)}", rng.choice(WEIRD_TEXT)[:40]])
    kind = rng.randrange(22)
    if kind < 6:
        return "valid", json.dumps({"user": user, "text": f"fuzz {rng.random()}"}).encode()
    if kind == 6:
        return "missing", json.dumps(rng.choice([{"user": user}, {"text": "x"}, {}])).encode()
    if kind == 7:
        bad = rng.choice([1, 1.5, None, True, [], {}, ["x"], {"a": 1}, 10**30])
        field = rng.choice(["user", "text"])
        return "types", json.dumps({"user": user, "text": "x", field: bad}).encode()
    if kind == 8:
        text = "".join(rng.choice(WEIRD_TEXT) for _ in range(rng.randrange(1, 6)))
        return "weird-text", json.dumps({"user": user, "text": text}).encode()
    if kind == 9:
        name = "".join(rng.choice(WEIRD_TEXT) for _ in range(rng.randrange(1, 4)))
        return "weird-user", json.dumps({"user": name[:60], "text": "hi"}).encode()
    if kind == 10:
        depth = rng.choice([100, 1000, 5000, 60000])
        return "nested", b"[" * depth + b"]" * depth
    if kind == 11:
        return "nested-obj", b'{"user":' * 3000 + b"1" + b"}" * 3000
    if kind == 12:
        return "big-number", b'{"user":"fuzz","text":"x","n":' + b"9" * 6000 + b"}"
    if kind == 13:
        return "nan", rng.choice([b'{"user":"fuzz","text":NaN}', b'{"user":Infinity}',
                                  b'{"user":"fuzz","text":"x","n":-Infinity}'])
    if kind == 14:
        return "surrogate", rng.choice([b'{"user":"fuzz","text":"\\ud800"}',
                                        b'{"user":"\\udfff","text":"x"}',
                                        b'{"user":"fuzz","text":"\\ud83d"}'])
    if kind == 15:
        return "not-utf8", b'{"user":"fuzz","text":"' + _bytes(rng, 20) + b'"}'
    if kind == 16:
        return "bom", b"\xef\xbb\xbf" + json.dumps({"user": user, "text": "x"}).encode()
    if kind == 17:
        return "dup-keys", b'{"user":"a","user":"b","text":"x","text":"y"}'
    if kind == 18:
        body = json.dumps({"user": user, "text": "x"}).encode()
        return "trailing", body + rng.choice([b"garbage", b"}", b"\x00", b"{}", b" \n"])
    if kind == 19:
        return "non-object", rng.choice([b"", b" ", b"[]", b'"x"', b"1", b"null", b"true",
                                         b"{", b"}", b'{"user"}', b"\x00" * 10])
    if kind == 20:
        size = rng.choice([2001, 10_000, 70_000, 66_000])
        return "too-long", json.dumps({"user": user, "text": "x" * size}).encode()
    return "random-bytes", _bytes(rng, rng.randrange(1, 300))


def query(rng: random.Random) -> tuple[str, str]:
    parts = []
    family = "query"
    for _ in range(rng.randrange(0, 4)):
        name = rng.choice(["after", "wait", "user", "after", "token", _token(rng, 3)])
        if name == "after":
            value = rng.choice(WEIRD_NUMBERS)
        elif name == "wait":
            value = rng.choice(WAITS)
        elif name == "user":
            value = rng.choice(["fuzz", rng.choice(WEIRD_TEXT), "%e2%80%ae", "%00", "%ff",
                                "a" * 100, "+", "%20", "\u202ealice"])
        else:
            value = _token(rng)
        parts.append(f"{name}={value}")
    if rng.random() < 0.05:
        parts = [f"p{i}=1" for i in range(rng.choice([100, 2000]))]
        family = "many-params"
    return family, "&".join(parts)


def case(rng: random.Random, port: int, *, upgrade: bool = False) -> Case:
    """One complete request: valid, then mutated in one to three ways.

    ``upgrade``: a WebSocket handshake request (GET /ws with Upgrade headers), mutated.
    """
    route = "/ws" if upgrade else rng.choice([r for r in ROUTES if r != "/ws"])
    method = "POST" if route in ("/api/typing",) or (route == "/api/messages"
                                                     and rng.random() < 0.5) else "GET"
    families = []
    target = route
    version = "HTTP/1.1"
    body = b""
    headers = [("Host", f"127.0.0.1:{port}"), ("Connection", "close")]
    if method == "GET" and route == "/api/messages":
        # Kept alive, as a browser's long poll is: chatlib.pollpath takes the plain ones and
        # must leave every mutated one to h11 and the app.
        headers.remove(("Connection", "close"))
    if method == "POST":
        family, body = json_body(rng)
        families.append("json-" + family)
        headers.append(("Content-Type", "application/json"))
    elif route in ("/api/messages", "/api/events") and rng.random() < 0.7:
        family, q = query(rng)
        families.append(family)
        target = f"{route}?{q}" if q else route
    if upgrade:
        headers += [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("Sec-WebSocket-Version", rng.choice(["13", "8", "", "13, 8", "x"]))]
        headers.remove(("Connection", "close"))
    if route == "/api/events" and rng.random() < 0.5:
        headers.append(("Last-Event-ID", rng.choice(LAST_EVENT_IDS)))
        families.append("last-event-id")
    chunked = False
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        m = rng.randrange(16)
        if m == 0:
            method = rng.choice(METHODS)
            families.append("method")
        elif m == 1:
            target = rng.choice(TRAVERSAL)
            families.append("traversal")
        elif m == 2:
            version = rng.choice(VERSIONS)
            families.append("version")
        elif m == 3:
            headers = [h for h in headers if h[0] != "Host"]
            host = rng.choice(HOSTS).format(port=port)
            if host or rng.random() < 0.5:
                headers.append(("Host", host))
            families.append("host")
        elif m == 4:
            headers.append(("Origin", rng.choice(ORIGINS).format(port=port)))
            families.append("origin")
        elif m == 5:
            headers = [h for h in headers if h[0] != "Content-Type"]
            headers.append(("Content-Type", rng.choice(CONTENT_TYPES)))
            families.append("content-type")
        elif m == 6:
            headers.append((_token(rng, rng.randrange(1, 30)),
                            _bytes(rng, rng.randrange(0, 50)).decode("latin-1")))
            families.append("random-header")
        elif m == 7:
            headers.append(rng.choice([("Bad Name", "x"), ("Bad:Name", "x"), ("", "x"),
                                       ("X", "a\x00b"), ("X", "a\rb"), ("\xff", "x"),
                                       ("X-Long", "a" * rng.choice([8000, 20000, 70000])),
                                       (" Leading", "x"), ("X", "folded\r\n continued")]))
            families.append("bad-header")
        elif m == 8:
            headers += [(f"X-Many-{i}", "x") for i in range(rng.choice([100, 500, 1000]))]
            families.append("many-headers")
        elif m == 9:
            chunked = True
            families.append("chunked")
        elif m == 10:
            headers.append(rng.choice([("Content-Length", "5"), ("Content-Length", "-1"),
                                       ("Content-Length", "abc"), ("Content-Length", "0x10"),
                                       ("Content-Length", "1" * 30),
                                       ("Transfer-Encoding", "gzip"),
                                       ("Transfer-Encoding", "chunked, identity"),
                                       ("Transfer-Encoding", "identity")]))
            families.append("framing-headers")
        elif m == 11:
            families.append("query")
            _, q = query(rng)
            target = target + ("&" if "?" in target else "?") + q
        elif m == 12:
            target = target + rng.choice(["#frag", "?", "??", "?&&", "?a=%", "?%zz=1",
                                          " ", "\x00", "\xff", "?a=" + "b" * 8000])
            families.append("target-junk")
        elif m == 13:
            headers.append(("Expect", rng.choice(["100-continue", "garbage"])))
            families.append("expect")
        elif m == 14:
            headers.append(("Accept", rng.choice(["text/event-stream", "*/*", "\xff", ""])))
            families.append("accept")
        else:
            headers.append(rng.choice([("Authorization", "Bearer " + _token(rng, 40)),
                                       ("Cookie", "token=" + "x" * 5000),
                                       ("Cookie", _bytes(rng, 30).decode("latin-1")),
                                       ("Authorization", "\xff\x00")]))
            families.append("auth")
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        payload = bytearray()
        pos = 0
        tiny = rng.random() < 0.3
        while pos < len(body):  # bounded by len(body)
            n = 1 if tiny else rng.randrange(1, 200)
            chunk = body[pos:pos + n]
            ext = rng.choice(["", "", ";ext=1", ";" + "e" * 100])
            size = rng.choice(["%x", "%X", "%04x"]) % len(chunk)
            payload += f"{size}{ext}\r\n".encode() + chunk + b"\r\n"
            pos += n
        payload += b"0\r\n\r\n"
        body = bytes(payload)
    elif body or method in ("POST", "PUT", "PATCH"):
        if not any(h[0] == "Content-Length" for h in headers):
            headers.append(("Content-Length", str(len(body))))
    # A declared length larger than the body would make the server wait for the rest: that
    # is an incomplete request (incomplete_cases), not this kind.
    for name, value in list(headers):
        if name == "Content-Length" and value.isdigit() and int(value) > len(body) \
                and not chunked:
            headers.remove((name, value))
            headers.append(("Content-Length", str(len(body))))
    rng.shuffle(headers)
    line = f"{method} {target} {version}".rstrip() if version else f"{method} {target}"
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return Case("+".join(sorted(set(families))) or "valid", _encode_head(head) + body)


def _encode_head(head: str) -> bytes:
    try:
        return head.encode("latin-1")
    except UnicodeEncodeError:
        return head.encode("utf-8", "surrogatepass")


def incomplete_cases(port: int) -> list[Case]:
    """Requests that never complete: the server must close them itself (header timeout)."""
    host = f"Host: 127.0.0.1:{port}\r\n"
    post = "POST /api/messages HTTP/1.1\r\n" + host + "Content-Type: application/json\r\n"
    return [
        Case("nothing", b""),
        Case("half-request-line", b"GET /api/pres"),
        Case("request-line-only", b"GET /api/presence HTTP/1.1\r\n"),
        Case("headers-unfinished", ("GET / HTTP/1.1\r\n" + host).encode()),
        Case("body-short", (post + "Content-Length: 100\r\n\r\n").encode() + b'{"user":'),
        Case("chunk-unfinished", (post + "Transfer-Encoding: chunked\r\n\r\n").encode()
             + b"10\r\n{\"user\""),
        Case("chunk-huge-size", (post + "Transfer-Encoding: chunked\r\n\r\n").encode()
             + b"ffffffff\r\nab"),
        Case("no-final-chunk", (post + "Transfer-Encoding: chunked\r\n\r\n").encode()
             + b"2\r\n{}\r\n"),
    ]
