"""ChatPanel: a chat window in the notebook that is a real participant in the chat.

It is an ipywidgets ``VBox`` driven by one of chatlib's clients (WebSocket by default) in
a task on the kernel's event loop. Browser users see what you send from it, and it shows
what they send, live. It reconnects with backoff when the connection drops (a server
restart, say) and resumes after the last message it showed: no gaps, no duplicates.

Everything users type is escaped before it is shown: text is data, never markup.
"""

from __future__ import annotations

import asyncio
import html
import random
import time
import warnings

import ipywidgets as widgets

from .clients import LongPollClient, PollingClient, SSEClient, WebSocketClient
from .store import Message

CLIENTS = {"ws": WebSocketClient, "sse": SSEClient, "longpoll": LongPollClient,
           "poll": PollingClient}
STATE_COLOURS = {"connecting": "#a60", "connected": "#080", "reconnecting": "#a60",
                 "closed": "#888"}
SETTLE_S = 0.3
"""Enter sends what the box holds once no edit of it has arrived for this long (see _submit)."""


class ChatPanel(widgets.VBox):
    """A chat window for the notebook.

    ``target`` is a :class:`~chatlib.ChatServer` or any chat server's URL (a classmate's,
    an instructor's). ``transport`` is one of ``ws``, ``sse``, ``longpoll``, ``poll``.
    """

    def __init__(self, target, user: str = "notebook", *, transport: str = "ws",
                 shown: int = 200, max_reconnects: int = 10_000) -> None:
        self.url = target if isinstance(target, str) else target.url
        self.user = user
        self.transport = transport
        self.shown = shown
        self.max_reconnects = max_reconnects
        self.messages: dict[int, Message] = {}
        self.last_id = 0
        self.state = "connecting"
        self.connections = 0  # successful (re)connections so far
        self.presence: list[str] = []
        self.typing: str | None = None  # who is typing right now (not us), if anyone
        self._client = None
        self._changed = asyncio.Event()
        self._last_typing_sent = 0.0
        self._typing_timer: asyncio.TimerHandle | None = None
        self._last_edit = 0.0  # time.monotonic() of the input box's latest value change
        self._submits: set[asyncio.Task] = set()  # referenced until done

        self._status = widgets.HTML()
        # ipywidgets 8 has no ``overflow_y`` (it was silently ignored: the log spilled out of
        # its box over the input row). ``column-reverse`` starts the scroll at the bottom and
        # keeps it there, so the newest message is in view, as in any chat window.
        self._log = widgets.HTML(layout=widgets.Layout(
            height="260px", overflow="auto", flex_flow="column-reverse",
            border="1px solid #ddd", padding="4px 8px"))
        self._who = widgets.HTML()
        self._typing = widgets.HTML(layout=widgets.Layout(height="1.6em"))
        self._input = widgets.Text(placeholder="Type a message, press Enter",
                                   layout=widgets.Layout(flex="1"))
        self._send_button = widgets.Button(description="Send", button_style="primary")
        self._input.add_class("chatlib-input")
        self._send_button.add_class("chatlib-send")
        self._log.add_class("chatlib-log")
        with warnings.catch_warnings():
            # ipywidgets 8 calls on_submit deprecated, yet it is the only way to get Enter
            # without also sending when the box merely loses focus.
            warnings.simplefilter("ignore", DeprecationWarning)
            self._input.on_submit(lambda _: self._submit())
        self._send_button.on_click(lambda _: self._submit())
        self._input.observe(self._on_keystroke, "value")
        super().__init__([self._status, self._who, self._log, self._typing,
                          widgets.HBox([self._input, self._send_button])],
                         layout=widgets.Layout(max_width="640px"))
        self.add_class("chatlib-panel")
        self._render_status()
        self._render_log()
        self._task = asyncio.get_event_loop().create_task(self._run())

    # -- the connection ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.2
        for _ in range(self.max_reconnects):
            client = CLIENTS[self.transport](self.url, self.user, after=self.last_id)
            client.on_event = self._on_event
            try:
                await client.connect()
                self._client = client
                self.connections += 1
                self._set_state("connected")
                delay = 0.2
                while True:  # ends when the connection does
                    self._add(await client.receive())
            except asyncio.CancelledError:
                raise
            except Exception:  # the server went away or restarted: reconnect below
                self._set_state("reconnecting")
            finally:
                self._client = None
                self.last_id = max(self.last_id, client.last_id)
                try:
                    await client.close()
                except Exception:
                    pass
            # Exponential backoff with jitter, so a restarted server isn't hit by everyone
            # at the same instant.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)
        self._set_state("closed")

    def _on_event(self, kind: str, data: dict) -> None:
        if kind == "presence":
            self.presence = data["users"]
            self._who.value = "<small>here: " + ", ".join(
                f"<b>{html.escape(u)}</b>" for u in self.presence) + "</small>"
        elif kind == "typing" and data["user"] != self.user:
            self.typing = data["user"]
            self._typing.value = f"<i><small>{html.escape(data['user'])} is typing…</small></i>"
            if self._typing_timer:
                self._typing_timer.cancel()
            self._typing_timer = asyncio.get_event_loop().call_later(3.0, self._clear_typing)
        elif kind == "reset":  # the server's history was replaced: start over
            self.messages.clear()
            self.last_id = 0
            self._render_log()
        elif kind == "error":
            self._status.value = self._status_html() + (
                f' <span style="color:#b00">{html.escape(data["error"])}</span>')

        self._notify()

    def _notify(self) -> None:
        """Wake everyone in :meth:`wait_for`, then arm a fresh event for the next change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _clear_typing(self) -> None:
        self.typing = None
        self._typing.value = ""

    def _add(self, message: Message) -> None:
        if message.id in self.messages:
            return
        self.messages[message.id] = message
        self.last_id = max(self.last_id, message.id)
        if message.user != self.user:
            self._clear_typing()
        self._render_log()
        self._notify()

    def _set_state(self, state: str) -> None:
        self.state = state
        self._render_status()
        self._notify()

    # -- rendering (everything users typed goes through html.escape) ----------------------

    def _status_html(self) -> str:
        colour = STATE_COLOURS.get(self.state, "#888")
        return (f'<span class="chatlib-state" style="color:{colour}">● {self.state}</span>'
                f" <small>as <b>{html.escape(self.user)}</b> over {self.transport} to "
                f"{html.escape(self.url)}</small>")

    def _render_status(self) -> None:
        self._status.value = self._status_html()

    def _render_log(self) -> None:
        rows = []
        for message in sorted(self.messages.values(), key=lambda m: m.id)[-self.shown:]:
            mine = ' style="background:#eef6ff"' if message.user == self.user else ""
            clock = time.strftime("%H:%M:%S", time.localtime(message.ts))
            rows.append(
                f'<div class="chatlib-msg" data-id="{message.id}"{mine}>'
                f'<small style="color:#888">{clock}</small> '
                f'<b class="chatlib-user">{html.escape(message.user)}</b>: '
                f'<span class="chatlib-text">{html.escape(message.text)}</span></div>')
        self._log.value = "".join(rows) or "<i><small>no messages yet</small></i>"

    # -- sending -------------------------------------------------------------------------

    def _submit(self) -> None:
        # Enter (or Send) reaches the kernel at once, but ipywidgets holds the box's newest
        # value back in the browser until the kernel has acknowledged the previous keystroke's
        # update. Reading the box now could send a message without its last characters (seen
        # in tests: "...noteboo"). A held-back value arrives within a round trip of the
        # previous edit, so read the box once no edit has arrived for SETTLE_S.
        task = asyncio.get_event_loop().create_task(self._submit_when_settled())
        self._submits.add(task)
        task.add_done_callback(self._submits.discard)

    async def _submit_when_settled(self) -> None:
        give_up = time.monotonic() + 4 * SETTLE_S  # someone typing on and on: send anyway
        while (quiet := time.monotonic() - self._last_edit) < SETTLE_S \
                and time.monotonic() < give_up:
            await asyncio.sleep(SETTLE_S - quiet)
        text = self._input.value
        if text.strip():
            self._input.value = ""
            await self._send_or_restore(text)

    async def _send_or_restore(self, text: str) -> None:
        try:
            await self.send(text)
        except Exception as exc:
            self._input.value = text  # nothing typed is lost
            self._status.value = self._status_html() + (
                f' <span style="color:#b00">not sent: {html.escape(str(exc))}</span>')

    def _on_keystroke(self, change) -> None:
        now = time.monotonic()
        self._last_edit = now
        if change["new"] and self._client is not None and now - self._last_typing_sent > 2:
            self._last_typing_sent = now
            asyncio.get_event_loop().create_task(self._client.send_typing())

    async def send(self, text: str) -> None:
        """Send ``text`` as this panel's user (it shows up when the server echoes it)."""
        if self._client is None:
            raise ConnectionError(f"not connected ({self.state})")
        await self._client.send(text)

    # -- waiting (for notebooks and tests: wait on events, not sleeps) --------------------

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        """Wait until ``predicate(panel)`` is true; ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate(self):  # each round waits for a change
                await self._changed.wait()

    async def wait_for_text(self, text: str, timeout: float = 10.0) -> Message:
        """Wait until a message with exactly ``text`` is shown, and return it."""
        await self.wait_for(lambda p: any(m.text == text for m in p.messages.values()),
                            timeout)
        return next(m for m in self.messages.values() if m.text == text)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await self.wait_for(lambda p: p.state == "connected", timeout)

    async def aclose(self) -> None:
        """Disconnect and stop reconnecting."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._set_state("closed")
