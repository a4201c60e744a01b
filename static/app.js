// Browser client for the chatlib chat server (see README.md, "The chat protocol").
//
// One page, five transports, one message log:
//   webtransport  WebTransport over HTTP/3 (UDP, same port; `api/webtransport` says where),
//                 one bidirectional stream of JSON lines both ways, typing as datagrams;
//                 only where the page is served by the chat server itself on loopback
//   ws        WebSocket at `ws`, JSON text frames both ways
//   sse       EventSource on `api/events`, sends with POST
//   longpoll  GET `api/messages?after=ID&wait=25`, sends with POST
//   poll      GET `api/messages?after=ID` once a second, sends with POST
//
// Whatever the transport, the client keeps a cursor (`lastId`, the newest id it
// has shown) and a set of shown ids, so any reconnect resumes "after lastId"
// without gaps, and a message delivered twice is drawn once.
//
// Sending is exactly-once in effect: each message gets a client_id. It is shown
// at once as pending, kept until the server acknowledges it (the
// WebSocket `ack` frame, the POST's answer, or the message itself coming back
// with our client_id), and sent again with the same client_id after every
// reconnect, on whatever transport that is; the server stores it once. Own
// messages go one at a time, in order; one refused for being too fast waits and
// goes again by itself, one refused for good stays as a failed row with its
// reason and Retry / Edit / Discard (see "sending"). Its line is li.outgoing
// (data-state "pending", then "sent", or "failed") until the stored message
// itself arrives and takes its place as an ordinary li.message.
//
// Rooms (the frames and parameters are chatlib/wire.py's): the page is in the default room (DEFAULT_ROOM, whose frames and
// URLs are exactly those of a chat without rooms) and in any room joined by name from the room
// list, or a DM room started by clicking a name under "Online" (or opened by the other person:
// a `dm` event). Each room keeps its own rows, cursor, older-page marker and shown ids
// (state.rooms); the one on screen is state.room. How each transport follows them:
//   webtransport, ws  one connection for every room: `hello` (the default room), then one
//                     `join {room, after}` per other room, each after its own cursor; other
//                     rooms' messages arrive live and count as unread.
//   sse, longpoll, poll  one stream (or poll) of the room on screen, `?room=`; switching
//                     rooms opens the other room's, resuming after its cursor. Unread counts
//                     of the other rooms come from `GET api/rooms` (each room's last id) every
//                     ROOMS_REFRESH_MS: ids are per room, so last_id - seen is exactly how
//                     many arrived since. One stream per room instead would hold one of the
//                     browser's 6 HTTP/1.1 connections per origin each: five rooms and the
//                     page could no longer POST.
// A room the server refuses (private, too many rooms) is dropped from the list with a
// notice saying why, never silently.
//
// Security: nicknames and texts are data, never markup. The DOM is built with
// createElement + textContent only; there is no innerHTML anywhere in this file.
'use strict';

(() => {
  // ---- settings ---------------------------------------------------------------
  const AUTO_ORDER = ['webtransport', 'ws', 'sse', 'longpoll', 'poll']; // best first
  const TRANSPORTS = new Set(AUTO_ORDER);
  const POLL_INTERVAL_MS = 1000;    // short polling period
  const LONG_POLL_WAIT_S = 25;      // server caps wait at 25 s
  const CONNECT_TIMEOUT_MS = 5000;  // a transport that has not opened by then counts as failed
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;     // a server back on its port is found within ~5 s
  const SERVER_DELAY_MAX_MS = 300000; // the longest delay a server may ask for that is obeyed
  const GONE_AFTER_TRIES = 3;       // failed tries in a row before saying the server is gone
  const TYPING_SEND_EVERY_MS = 2000;
  const TYPING_SHOW_MS = 3000;
  const PRESENCE_REFRESH_MS = 5000; // HTTP polling transports get no presence push
  const RESEND_RETRY_MS = 2000;     // a send that failed (network, 5xx) is tried again
  const RATE_RETRY_MS = 1000;       // a send refused as too fast (429), without Retry-After
  const ACK_TIMEOUT_MS = 10000;     // a WebSocket send with no ack by then goes again
  const WT_MISSES_TO_SKIP = 2;      // webtransport not opening this often: use the next one
  // A quiet stream (WebSocket or SSE) may be idle or dead, and page code can't tell: it sees
  // neither SSE comments nor WebSocket PINGs. So the page checks: every WATCHDOG_EVERY_MS it
  // asks for presence, and no answer within WATCHDOG_DEADLINE_MS means the network is gone.
  // The connection is then replaced (resuming after lastId) instead of hanging until TCP
  // gives up, many minutes later. ?watchdog_ms= shortens the period (tests use it).
  const WATCHDOG_EVERY_MS = Number(new URLSearchParams(location.search).get('watchdog_ms')) || 15000;
  const WATCHDOG_DEADLINE_MS = Math.min(5000, WATCHDOG_EVERY_MS);
  const DEFAULT_ROOM = 'lobby';      // chatlib.store.DEFAULT_ROOM: no `room` on its frames
  const ROOMS_REFRESH_MS = 5000;    // HTTP transports: other rooms' last ids, for unread counts
  const LATENCY_SAMPLES = 200;      // the running median covers the last N messages
  const NICK_KEY = 'chat.nick';          // localStorage: the nick last joined with
  const TAB_NICK_KEY = 'chat.tab-nick';  // sessionStorage: this tab's nick (kept on reload)
  const TAB_ROOMS_KEY = 'chat.tab-rooms'; // sessionStorage: this tab's rooms, and the one shown

  // ---- DOM --------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const els = {
    joinForm: $('join-form'), nick: $('nick'), transportSelect: $('transport-select'),
    transport: $('transport'), status: $('status'), statusDot: $('status-dot'),
    latency: $('latency'), latencyOthers: $('latency-others'), count: $('message-count'),
    notice: $('notice'), noticeText: $('notice-text'), noticeClose: $('notice-close'),
    messages: $('messages'), presence: $('presence'), presenceCount: $('presence-count'),
    typing: $('typing'), composer: $('composer'), input: $('message-input'), send: $('send'),
    rooms: $('rooms'), roomForm: $('room-form'), roomName: $('room-name'), dmNote: $('dm-note'),
  };

  // ---- state ------------------------------------------------------------------
  const state = {
    nick: '',
    mode: 'auto',          // what the user asked for: 'auto' or one transport
    joined: false,
    joinedAt: 0,           // Date.now() at join; older messages are history
    conn: null,            // the live connection object (see connect())
    autoIndex: 0,          // auto mode: which entry of AUTO_ORDER we are trying
    autoLocked: false,     // auto mode: a transport worked, so stick with it
    attempt: 0,            // failed attempts since the last success (backoff exponent)
    serverDelayMs: null,   // the delay the server asked for before the next reconnect, if any
    failedTries: 0,        // connections since the last success that never opened
    wtMisses: 0,           // webtransport sessions in a row that did not open, server up
    reconnectTimer: null,
    rooms: new Map(),      // name -> room (newRoom): every room the page is in
    room: DEFAULT_ROOM,    // the room on screen
    previousRoom: DEFAULT_ROOM, // where to go back to if the room on screen is refused or left
    left: new Set(),       // rooms the person left
    own: new Map(),        // client_id -> own message not shown yet: {text, user, t0, el, state}
    inFlight: null,        // the own message on its way (one at a time, in order)
    holdTimer: null,       // a pause before sending again (429, 5xx, network)
    latencies: { own: [], others: [] }, // the last LATENCY_SAMPLES of each, in ms
    maxText: 0,            // the server's longest text (GET api/limits); 0: not known
    typers: new Map(),     // user -> time (ms) at which to stop showing "typing"
    typingTimer: null,
    lastTypingSent: 0,
  };

  // ---- rooms --------------------------------------------------------------------
  function newRoom(name, label = '') {
    return {
      name,
      label,                 // what the list says (a DM: the other person's name)
      lastId: 0,             // cursor: newest message id received in this room
      seen: 0,               // newest id the reader has had on screen; unread = newer ones
      serverLast: 0,         // the room's last id per GET api/rooms (HTTP transports)
      before: 0,             // older messages exist below this id (the `history` marker); 0: none
      loadingOlder: false,   // a page of older messages is on its way
      shown: new Set(),      // ids received, so redeliveries are ignored
      list: document.createElement('ol'), // its rows while another room is on screen
      presence: null,        // its last presence event {users, count}
    };
  }
  state.rooms.set(DEFAULT_ROOM, newRoom(DEFAULT_ROOM));
  const cur = () => state.rooms.get(state.room);
  // The code that handles one log reads the room on screen's cursor, marker and ids here.
  for (const key of ['lastId', 'before', 'loadingOlder', 'shown']) {
    Object.defineProperty(state, key, { get: () => cur()[key], set: (v) => { cur()[key] = v; } });
  }
  // Events of the default room carry no `room`; every other room's do.
  const roomOf = (event) => state.rooms.get(typeof event.room === 'string' ? event.room : DEFAULT_ROOM);
  const listOf = (r) => (r === cur() ? els.messages : r.list);
  const roomParam = (name, sep = '&') => (name === DEFAULT_ROOM ? '' : `${sep}room=${encodeURIComponent(name)}`);
  const withRoom = (frame, name) => (name === DEFAULT_ROOM ? frame : { ...frame, room: name });
  const unreadOf = (r) => (r === cur() ? 0 : Math.max(0, Math.max(r.lastId, r.serverLast) - r.seen));

  // The DM room of two users, as chatlib.wire.dm_room names it: "@A+B", A < B after NFKC,
  // compared by code point (Python's str order; JavaScript's < compares UTF-16 units).
  function dmRoom(a, b) {
    const points = (text) => Array.from(text.normalize('NFKC'), (c) => c.codePointAt(0));
    const order = (x, y) => {
      const [p, q] = [points(x), points(y)];
      for (let i = 0; i < Math.min(p.length, q.length); i += 1) if (p[i] !== q[i]) return p[i] - q[i];
      return p.length - q.length;
    };
    return `@${[a.normalize('NFKC'), b.normalize('NFKC')].sort(order).join('+')}`;
  }

  function roomLabel(r) {
    if (r.label) return `@${r.label}`;
    if (!r.name.startsWith('@')) return `#${r.name}`;
    const me = state.nick.normalize('NFKC');
    if (r.name.startsWith(`@${me}+`)) return `@${r.name.slice(me.length + 2)}`;
    if (r.name.endsWith(`+${me}`)) return `@${r.name.slice(1, -me.length - 1)}`;
    return r.name;
  }

  // The room list: one button per room, the one on screen marked, others with unread counts.
  // With a DM room on screen, a note says who can read it.
  function renderRooms() {
    const dm = state.room.startsWith('@');
    els.dmNote.hidden = !dm;
    if (dm) {
      els.dmNote.textContent = `Only you and ${roomLabel(cur()).slice(1)} can join this room. `
        + 'Without a token a nickname is no password: whoever chats as either of you can read it.';
    }
    els.rooms.replaceChildren(...[...state.rooms.values()].map((r) => {
      const li = document.createElement('li');
      li.dataset.room = r.name;
      const open = document.createElement('button');
      open.type = 'button';
      open.className = 'room';
      open.textContent = roomLabel(r);
      if (r === cur()) open.setAttribute('aria-current', 'true');
      const unread = unreadOf(r);
      li.dataset.unread = String(unread);
      if (unread) {
        const badge = document.createElement('span');
        badge.className = 'unread';
        badge.textContent = String(unread);
        badge.title = `${unread} unread`;
        open.append(' ', badge);
      }
      open.addEventListener('click', () => switchRoom(r.name));
      li.append(open);
      if (r.name !== DEFAULT_ROOM) {
        const leave = document.createElement('button');
        leave.type = 'button';
        leave.className = 'leave';
        leave.textContent = '×';
        leave.setAttribute('aria-label', `Leave ${roomLabel(r)}`);
        leave.addEventListener('click', () => leaveRoom(r));
        li.append(leave);
      }
      return li;
    }));
    saveRooms();
  }

  // A reload keeps the tab's rooms and the one on screen (their messages come again, each
  // room's newest page: a fresh join), but DMs of another nick; a new tab starts in the
  // default room.
  function saveRooms() {
    const rooms = [...state.rooms.values()].map((r) => [r.name, r.label]);
    try {
      sessionStorage.setItem(TAB_ROOMS_KEY, JSON.stringify({ rooms, room: state.room }));
    } catch { /* storage disabled: fine */ }
  }

  function restoreRooms(nick) {
    const me = nick.normalize('NFKC');
    const mine = (name) => !name.startsWith('@') || name.startsWith(`@${me}+`) || name.endsWith(`+${me}`);
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(TAB_ROOMS_KEY)); } catch { return; }
    if (!saved || !Array.isArray(saved.rooms)) return;
    for (const entry of saved.rooms) {
      const [name, label] = Array.isArray(entry) ? entry : [];
      if (typeof name === 'string' && !state.rooms.has(name) && mine(name)) {
        state.rooms.set(name, newRoom(name, typeof label === 'string' ? label : ''));
      }
    }
    if (typeof saved.room === 'string' && state.rooms.has(saved.room)) switchRoom(saved.room);
  }

  // Show room `name` (joining it first if the page is not in it yet). Its rows come back as
  // they were; on WebSocket/WebTransport a new room is joined on the open connection, on
  // the HTTP transports the stream is replaced by one of this room, after its own cursor.
  function switchRoom(name, label = '') {
    state.left.delete(name);
    let r = state.rooms.get(name);
    const isNew = !r;
    if (isNew) {
      r = newRoom(name, label);
      state.rooms.set(name, r);
    }
    if (r !== cur()) {
      const old = cur();
      olderRow.remove();
      old.list.replaceChildren(...els.messages.children);
      state.previousRoom = old.name;
      state.room = name;
      els.messages.replaceChildren(...r.list.children);
      r.seen = r.lastId;
      setBefore(r.before);
      if (!r.loadingOlder) olderDone();
      renderPresence(r.presence ? r.presence.users : [], r.presence ? r.presence.count : 0);
      state.typers.clear();
      renderTyping();
      pinned = true;
      els.messages.scrollTop = els.messages.scrollHeight;
      const conn = state.conn;
      if (state.joined && !(conn && conn.joinRoom)) connect();
    }
    if (isNew && state.conn && state.conn.joinRoom) state.conn.joinRoom(r);
    renderRooms();
  }

  // Out of room `r` (left, or refused by the server): back to the room before it.
  function dropRoom(r) {
    if (r.name === DEFAULT_ROOM) return;
    for (const own of [...state.own.values()]) if (own.room === r.name) forget(own);
    if (r === cur()) {
      switchRoom(state.rooms.has(state.previousRoom) && state.previousRoom !== r.name
        ? state.previousRoom : DEFAULT_ROOM);
    }
    state.rooms.delete(r.name);
    renderRooms();
  }

  function leaveRoom(r) {
    if (state.conn && state.conn.leaveRoom) state.conn.leaveRoom(r);
    state.left.add(r.name); // (GET api/rooms lists our DMs: a DM left stays left)
    dropRoom(r);
  }

  // The server would not let us in (a private room, too many rooms, a bad name): say so.
  function roomRefused(name, error) {
    const r = state.rooms.get(name);
    showNotice(`You cannot join ${r ? roomLabel(r) : name}: ${stripStatus(error)}`);
    if (r) dropRoom(r);
  }

  // Someone wrote to us in a DM room (`dm` {room, from}): it joins the list, with its unread.
  function onDm(data) {
    if (!data || typeof data.room !== 'string' || state.rooms.has(data.room)) return;
    state.left.delete(data.room);
    const r = newRoom(data.room, typeof data.from === 'string' ? data.from : '');
    state.rooms.set(r.name, r);
    if (state.conn && state.conn.joinRoom) state.conn.joinRoom(r);
    renderRooms();
  }

  // HTTP transports: every room's last id (GET api/rooms), for the unread counts of the
  // rooms not on screen, and our DM rooms (`dms`: how polling learns of a new one; an SSE
  // stream is told by a `dm` event, so it asks only while the page is in two rooms or more).
  async function refreshRooms(conn) {
    if (state.rooms.size < 2 && conn.transport === 'sse') return;
    let body;
    try {
      body = await getJson(`api/rooms?user=${enc(state.nick)}`, 5000);
    } catch { return; } // unread counts are a convenience: the next refresh tries again
    if (conn.closed || !body || !Array.isArray(body.rooms)) return;
    for (const entry of Array.isArray(body.dms) ? body.dms : []) {
      if (entry && typeof entry.room === 'string' && entry.last_id > 0 && !state.left.has(entry.room)) {
        onDm({ room: entry.room, from: entry.with });
      }
    }
    for (const entry of [...body.rooms, ...(Array.isArray(body.dms) ? body.dms : [])]) {
      const r = entry && state.rooms.get(entry.room);
      if (r && Number.isInteger(entry.last_id)) r.serverLast = entry.last_id;
    }
    renderRooms();
  }

  function startRoomsRefresh(conn) {
    refreshRooms(conn);
    const timer = setInterval(() => refreshRooms(conn), ROOMS_REFRESH_MS);
    return () => clearInterval(timer);
  }

  // ---- small helpers ----------------------------------------------------------
  const enc = encodeURIComponent;
  const randomGuest = () => `guest-${1000 + Math.floor(Math.random() * 9000)}`;

  // Times are formatted as the ChatPanel formats them (chatlib/panel.js has the same
  // function; tests/test_panel.py checks that the two stay identical).
  const TIME_FORMAT = { hour: '2-digit', minute: '2-digit' };
  function formatTime(date) { return date.toLocaleTimeString([], TIME_FORMAT); }

  function setStatus(text) {
    if (els.status.textContent === text) return; // (role=status: announce changes only)
    els.status.textContent = text;
    els.status.dataset.state = text; // CSS colours the badge from this
    els.statusDot.dataset.state = text;
  }

  function showNotice(text) {
    els.noticeText.textContent = text;
    els.notice.hidden = false;
  }

  function hideNotice() { els.notice.hidden = true; }

  // An error raised for a non-2xx HTTP answer; keeps the status so callers can
  // tell "retry later" (429, 5xx) from "retrying will not help" (400, 403, 413).
  class HttpError extends Error {
    constructor(status, message, retryAfter = null) {
      super(message);
      this.status = status;
      this.retryAfter = retryAfter; // seconds, from a Retry-After header (429, 503)
    }
  }

  // The server answers errors with {"error": "..."}; fall back to the status line.
  async function errorFrom(res) {
    let message = `${res.status} ${res.statusText}`;
    let body = null;
    try {
      body = await res.json();
      if (body && typeof body.error === 'string') message = `${res.status}: ${body.error}`;
    } catch { /* not JSON: keep the status line */ }
    // The body's retry_after is exact (a busy server's 503 spreads its clients by fractions
    // of a second); Retry-After has whole seconds only.
    let retryAfter = body && typeof body.retry_after === 'number' ? body.retry_after : null;
    const header = res.headers.get('Retry-After');
    if (retryAfter === null && header !== null && Number.isFinite(Number(header))) retryAfter = Number(header);
    return new HttpError(res.status, message, retryAfter);
  }

  // Why the server closed a WebSocket or ended an SSE stream, as chatlib/closecode.py's
  // CLOSES table writes it: the reason's first word is its kind ("behind", "busy",
  // "restart", "store"), and "retry after S s" the delay it asks for.
  function readCloseReason(reason) {
    const text = typeof reason === 'string' ? reason : '';
    const found = /\bretry after (\d{1,6}(?:\.\d{1,6})?) s\b/.exec(text);
    return { kind: (/^[a-z]*/.exec(text) || [''])[0], retryAfter: found ? Number(found[1]) : null };
  }

  // Remember a delay the server asked for (seconds); the next reconnect waits exactly that.
  function serverAsked(retryAfterS) {
    if (typeof retryAfterS === 'number' && retryAfterS >= 0) {
      state.serverDelayMs = Math.min(retryAfterS * 1000, SERVER_DELAY_MAX_MS);
    }
  }

  async function getJson(url, timeoutMs, signal) {
    // A request that hangs forever would freeze the transport, so every GET
    // has a deadline (AbortSignal.any lets stop() abort it early too).
    const timeout = AbortSignal.timeout(timeoutMs);
    const res = await fetch(url, {
      cache: 'no-store',
      signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
    });
    if (!res.ok) throw await errorFrom(res);
    return res.json();
  }

  async function postJson(url, body) {
    const headers = { 'Content-Type': 'application/json' };
    // Behind jupyter-server-proxy the Jupyter server may want its XSRF token on POSTs
    // (JupyterHub 4.1.0 did); send it back the way JupyterLab does, if there is one.
    const xsrf = document.cookie.match(/(?:^|;\s*)_xsrf=([^;]*)/);
    if (xsrf) headers['X-XSRFToken'] = decodeURIComponent(xsrf[1]);
    const res = await fetch(url, {
      method: 'POST',
      headers,
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(10000),
    });
    if (!res.ok) throw await errorFrom(res);
    return res.status === 204 ? null : res.json(); // api/typing answers 204, no body
  }

  // ---- messages ---------------------------------------------------------------
  const isMessage = (m) => m && Number.isInteger(m.id) && typeof m.user === 'string'
    && typeof m.text === 'string' && typeof m.ts === 'number';

  // Called by every transport for every message it receives, with its room (by default
  // the one its `room` field names).
  function handleMessage(m, r = m && roomOf(m)) {
    if (!isMessage(m) || !r || r.shown.has(m.id)) return; // duplicate (e.g. replay after reconnect)
    r.shown.add(m.id);
    if (m.id > r.lastId) r.lastId = m.id;
    const here = r === cur();
    const latency = here ? measureLatency(m) : null;
    const own = ownMessage(m);
    if (own) { // ours is stored: its pending line gives way to the real one
      state.own.delete(m.client_id);
      own.el.remove();
      settled(own); // (its echo may come before its ack)
    }
    renderMessage(m, latency, r);
    if (here) {
      r.seen = r.lastId;
      // Someone who just sent a message has stopped typing.
      if (state.typers.delete(m.user)) renderTyping();
    } else {
      if (m.user === state.nick && r.seen === m.id - 1) r.seen = m.id; // ours: read already
      renderRooms();
    }
  }

  // The server replaced a room's log (restart of an in-memory server): our ids mean
  // nothing any more. Clear its rows and its cursor; the replay follows.
  function resetLog(r = cur()) {
    // Own messages not acknowledged yet stay (and are sent to the new log); acknowledged
    // ones went with the old log, like everyone else's.
    for (const [cid, own] of state.own) {
      if (own.state === 'sent' && own.room === r.name) state.own.delete(cid);
    }
    listOf(r).replaceChildren(...[...state.own.values()].filter((own) => own.room === r.name)
      .map((own) => own.el));
    r.shown.clear();
    r.lastId = 0;
    r.seen = 0;
    r.before = 0; // the fresh join that follows says again whether older ones exist
  }

  // ---- older messages -----------------------------------------------------------
  // A fresh join shows the newest page; `history` {"before": ID} says that older messages
  // exist. A "Load older messages" button at the top of the list then fetches the page
  // below the oldest one known (a WebSocket `older` frame, else GET api/messages?before=),
  // shows it above, without moving what the reader looks at, and goes once nothing older is left.
  const olderRow = document.createElement('li');
  olderRow.className = 'load-older';
  const olderButton = document.createElement('button');
  olderButton.type = 'button';
  olderButton.textContent = 'Load older messages';
  olderRow.append(olderButton);

  function setBefore(before, r = cur()) {
    r.before = Number.isInteger(before) && before > 1 ? before : 0;
    if (r !== cur()) return; // its button appears when it is on screen
    if (!state.before) olderRow.remove();
    else if (els.messages.firstElementChild !== olderRow) els.messages.prepend(olderRow);
    olderButton.disabled = state.loadingOlder;
  }

  async function loadOlder() {
    if (!state.before || state.loadingOlder) return;
    state.loadingOlder = true;
    olderButton.disabled = true;
    olderButton.textContent = 'Loading…';
    try {
      const conn = state.conn;
      if (conn && conn.sendFrame) {
        // The answer comes as an `older` frame (showOlder); a dropped socket ends the wait.
        conn.sendFrame(withRoom({ type: 'older', before: state.before }, state.room));
        return;
      }
      const r = cur();
      showOlder(await getJson(`api/messages?before=${r.before}${roomParam(r.name)}`, 10000), r);
    } catch (err) {
      showNotice(err instanceof HttpError ? err.message : 'Could not load older messages.');
      olderDone();
    }
  }

  function olderDone() {
    state.loadingOlder = false;
    olderButton.textContent = 'Load older messages';
    olderButton.disabled = false;
  }

  // A page of older messages (`{"messages", "first_id", "before"?}`) of room `r`: above,
  // in place (if the reader switched rooms meanwhile, into that room's rows).
  function showOlder(body, r = cur()) {
    if (r !== cur()) {
      r.loadingOlder = false;
      (Array.isArray(body.messages) ? body.messages : []).forEach((m) => handleMessage(m, r));
      setBefore(body.before, r);
      return;
    }
    olderDone();
    const list = els.messages;
    const fromBottom = list.scrollHeight - list.scrollTop;
    const wasPinned = pinned;
    pinned = false; // no jump to the bottom while rows go in above
    (Array.isArray(body.messages) ? body.messages : []).forEach((m) => handleMessage(m, r));
    pinned = wasPinned;
    setBefore(body.before);
    list.scrollTop = list.scrollHeight - fromBottom;
    lastTop = list.scrollTop;
  }

  olderButton.addEventListener('click', loadOlder);

  function renderMessage(m, latencyMs, r = cur()) {
    const li = document.createElement('li');
    li.className = m.user === state.nick ? 'message mine' : 'message';
    li.dataset.id = String(m.id);

    const meta = document.createElement('div');
    meta.className = 'meta';
    const user = document.createElement('span');
    user.className = 'user';
    user.textContent = m.user;
    const when = new Date(m.ts * 1000);
    const time = document.createElement('time');
    time.className = 'time';
    time.dateTime = when.toISOString();
    time.textContent = formatTime(when);
    meta.append(user, ' ', time);
    if (latencyMs !== null) {
      const lat = document.createElement('span');
      lat.className = 'latency';
      lat.dataset.ms = String(latencyMs);
      lat.textContent = `${latencyMs} ms`;
      lat.title = m.user === state.nick ? 'round trip: from Send until back from the server'
        : 'delivery: from its sending until shown here';
      meta.append(' ', lat);
    }

    const text = document.createElement('div');
    text.className = 'text';
    text.dir = 'auto'; // Hebrew and Arabic right to left, whatever the page's direction
    text.textContent = m.text; // literal text, even if it looks like <script>

    li.append(meta, text);

    // Render strictly by id: walk back from the end (almost always zero steps,
    // since ids normally arrive in order) to find where this one belongs. Pending
    // lines (no id yet) stay below every stored message.
    insertInOrder(li, m.id, listOf(r));
  }

  // Where a row goes in the list: by id. A gap notice sits between the last id before the
  // gap and its first_id; pending lines (no id yet) stay below every stored message.
  const rowOrder = (el) => (el.dataset.id ? Number(el.dataset.id)
    : el.dataset.gap ? Number(el.dataset.gap) - 0.5
      : el.classList.contains('load-older') ? -Infinity : Infinity);

  function insertInOrder(li, order, list = els.messages) {
    // Walk back from the end: almost always zero steps, since ids normally arrive in order.
    let before = null;
    for (let el = list.lastElementChild; el && rowOrder(el) > order; el = el.previousElementSibling) {
      before = el;
    }
    list.insertBefore(li, before);
    if (pinned && list === els.messages) list.scrollTop = list.scrollHeight;
  }

  // The server no longer has the messages between our cursor and `first_id` (retention,
  // README "Resuming"): say so in the list, where they would have been. One notice per gap.
  function handleGap(data, r = cur()) {
    const first = data && data.first_id;
    if (!Number.isInteger(first)) return;
    if (listOf(r).querySelector(`li.gap[data-gap="${first}"]`)) return;
    const li = document.createElement('li');
    li.className = 'gap';
    li.dataset.gap = String(first);
    li.setAttribute('role', 'note');
    li.textContent = 'Some older messages are no longer available';
    insertInOrder(li, first - 0.5, listOf(r));
  }

  // Follow new messages only while the reader is at the bottom, so scrolling up
  // to read history is not yanked away. The list also shrinks (a notice, the
  // presence panel growing, a narrow side panel resized): stay pinned then too.
  // Only a scroll *up* unpins: our own scrollTop writes and layout changes can
  // fire scroll events that look "not at the bottom" for a moment.
  let pinned = true;
  let lastTop = 0;
  els.messages.addEventListener('scroll', () => {
    const log = els.messages;
    if (log.scrollHeight - log.scrollTop - log.clientHeight < 40) pinned = true;
    else if (log.scrollTop < lastTop) pinned = false;
    lastTop = log.scrollTop;
  });
  new ResizeObserver(() => {
    if (pinned) els.messages.scrollTop = els.messages.scrollHeight;
  }).observe(els.messages);

  // ---- latency ----------------------------------------------------------------
  // Own messages: time from pressing Send to seeing the message come back (a
  // monotonic clock, so it is exact). Others': now - ts, which assumes the
  // browser's and the server's clocks agree (true when both are this machine).
  function measureLatency(m) {
    const own = ownMessage(m);
    let ms = own ? performance.now() - own.t0 : null;
    if (ms === null) {
      // Messages written before we joined are history, not a delivery.
      if (m.ts * 1000 < state.joinedAt) return null;
      ms = Date.now() - m.ts * 1000;
    }
    ms = Math.max(0, Math.round(ms)); // clamp small clock skew
    recordLatency(own ? 'own' : 'others', ms);
    return ms;
  }

  // Two medians, never mixed: own messages' round trips and others' one-way deliveries.
  function recordLatency(kind, ms) {
    const samples = state.latencies[kind];
    samples.push(ms);
    if (samples.length > LATENCY_SAMPLES) samples.shift();
    const sorted = [...samples].sort((a, b) => a - b);
    const mid = sorted.length >> 1;
    const median = Math.round(sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2);
    const el = kind === 'own' ? els.latency : els.latencyOthers;
    el.textContent = `${median} ms`;
    el.dataset.ms = String(median);
    el.title = kind === 'own'
      ? `median round trip of your last ${sorted.length} messages (Send until the server's copy is back)`
      : `median one-way delivery of others' last ${sorted.length} messages (their send time until shown here; assumes synchronised clocks)`;
  }

  // ---- presence and typing ----------------------------------------------------
  // The server sends at most Limits.presence_names names, and `count`: how many there are.
  // Each name but ours is a button that opens the DM room with that person.
  function renderPresence(users, count) {
    if (!Array.isArray(users)) return;
    const names = [...new Set(users.filter((u) => typeof u === 'string'))]
      .sort((a, b) => a.localeCompare(b));
    els.presence.replaceChildren(...names.map((name) => {
      const li = document.createElement('li');
      li.dataset.user = name;
      if (name === state.nick) {
        li.textContent = name;
        li.className = 'me'; // "(you)" is added by CSS
        return li;
      }
      const dm = document.createElement('button');
      dm.type = 'button';
      dm.className = 'dm';
      dm.textContent = name;
      dm.title = `Write to ${name} directly (a room of the two of you)`;
      dm.addEventListener('click', () => {
        if (state.joined) switchRoom(dmRoom(state.nick, name), name);
      });
      li.append(dm);
      return li;
    }));
    const total = Number.isInteger(count) && count > names.length ? count : names.length;
    els.presenceCount.textContent = `(${total})`;
  }

  // A room's presence event: kept with the room, drawn if it is on screen.
  function onPresence(data, r) {
    if (!r) return;
    r.presence = { users: data.users, count: data.count };
    if (r === cur()) renderPresence(data.users, data.count);
  }

  function onTyping(user, r = cur()) {
    if (r !== cur()) return; // typing shows for the room on screen only
    if (typeof user !== 'string' || user === state.nick) return; // the server may echo ours
    state.typers.set(user, Date.now() + TYPING_SHOW_MS);
    renderTyping();
  }

  // Shows who typed in the last 3 s and schedules itself for the next expiry.
  function renderTyping() {
    const now = Date.now();
    for (const [user, until] of state.typers) if (until <= now) state.typers.delete(user);
    const names = [...state.typers.keys()];
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = `${names.length} people are typing…`;
    els.typing.textContent = text;
    els.typing.hidden = !text;
    clearTimeout(state.typingTimer);
    if (names.length) {
      state.typingTimer = setTimeout(renderTyping, Math.min(...state.typers.values()) - now + 50);
    }
  }

  // Joining the presence list is a POST (a GET names no one: any page could send one with
  // an <img>); it answers the list too. Polling joins with every refresh, SSE once per
  // connection (its open stream then holds the name).
  const joinPresence = (room) => postJson(`api/presence${roomParam(room, '?')}`, { user: state.nick });

  async function refreshPresence(conn) {
    try {
      const data = await joinPresence(conn.room);
      if (!conn.closed) onPresence(data, state.rooms.get(conn.room));
    } catch (err) {
      // Presence is decoration: the next refresh tries again. But a join refused as busy
      // (503, chatlib.admission) was handed a slot: come back for it when told, not later.
      if (err instanceof HttpError && err.status === 503 && err.retryAfter !== null) {
        setTimeout(() => { if (!conn.closed) refreshPresence(conn); },
          Math.min(err.retryAfter * 1000, SERVER_DELAY_MAX_MS));
      }
    }
  }

  // The silence watchdog of a streaming connection (see WATCHDOG_EVERY_MS); returns its stop.
  function startWatchdog(conn) {
    let asking = false;
    const timer = setInterval(async () => {
      if (asking || conn.closed) return;
      asking = true;
      try {
        await getJson('api/presence', WATCHDOG_DEADLINE_MS);
      } catch (err) {
        // An HTTP error is an answer (the server is there); a timeout or a network error is not.
        if (!(err instanceof HttpError)) conn.failed();
      } finally {
        asking = false;
      }
    }, WATCHDOG_EVERY_MS);
    return () => clearInterval(timer);
  }

  // ---- connection management --------------------------------------------------
  // A connection object is created per attempt. Transports call conn.opened()
  // once they work and conn.failed() when they break; after failed() or a
  // stop, `closed` is true and every late callback of that attempt is ignored
  // (so a slow fetch of an old connection cannot touch the page).
  function connect() {
    stopConnection();
    const transport = state.mode === 'auto' ? AUTO_ORDER[state.autoIndex] : state.mode;
    els.transport.textContent = transport;
    setStatus(state.attempt === 0 && !state.autoLocked ? 'connecting' : 'reconnecting');

    const conn = {
      transport,
      room: state.room, // the room an HTTP transport's stream or polls follow
      closed: false,
      everOpened: false,
      sendFrame: null, // set by ws and webtransport while their connection is open
      sendTyping: null, // set by webtransport: typing notices as datagrams
      joinRoom: null,  // set by ws and webtransport: join one more room on this connection
      leaveRoom: null, // ... and leave one
      stop() {},       // set by each transport: release sockets, timers, requests
      opened() {
        if (conn.closed) return;
        conn.everOpened = true;
        state.attempt = 0;
        if (state.failedTries >= GONE_AFTER_TRIES) hideNotice(); // the "gone" notice
        state.failedTries = 0;
        if (state.mode === 'auto') state.autoLocked = true;
        setStatus('connected');
        resendPending(); // whatever was not acknowledged, on this new connection
      },
      // skipped: the transport is not available here (no try: auto mode moves on).
      failed({ retry = true, skipped = false } = {}) {
        if (conn.closed) return;
        conn.closed = true;
        conn.stop();
        onConnectionFailed(conn, retry, skipped);
      },
    };
    state.conn = conn;
    const start = {
      webtransport: connectWt, ws: connectWs, sse: connectSse, longpoll: connectPolling,
      poll: connectPolling,
    };
    try {
      start[transport](conn);
    } catch (err) { // e.g. no WebSocket/EventSource in this browser, or a blocked URL
      console.warn(`${transport} unavailable:`, err);
      conn.failed();
    }
  }

  function stopConnection() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (state.conn && !state.conn.closed) {
      state.conn.closed = true;
      state.conn.stop();
    }
    state.conn = null;
  }

  function onConnectionFailed(conn, retry, skipped) {
    if (!retry) { // e.g. a nickname the server refuses: retrying cannot help
      setStatus('disconnected');
      return;
    }
    if (!conn.everOpened && !skipped) {
      state.failedTries += 1;
      if (state.failedTries === GONE_AFTER_TRIES) serverGone();
    }
    // A transport that is not available here (webtransport: the server answers but does
    // not offer it, or UDP does not get through) makes way for the next one at once, even
    // after auto mode settled on it (a server restarted without it).
    if (state.mode === 'auto' && skipped && state.autoIndex + 1 < AUTO_ORDER.length) {
      state.autoIndex += 1;
      connect();
      return;
    }
    // Auto mode, nothing has worked yet: fall back to the next transport at
    // once. After the last one, start over from the first, with backoff (the
    // server may simply be down, in which case every transport fails).
    if (state.mode === 'auto' && !state.autoLocked && !conn.everOpened) {
      state.autoIndex += 1;
      if (state.autoIndex < AUTO_ORDER.length) {
        connect();
        return;
      }
      state.autoIndex = 0;
    }
    scheduleReconnect();
  }

  // Nobody answers at this address: most likely the notebook's kernel was restarted and its
  // server came back on another port (it takes the old one when it is free, and then this
  // page is back by itself). Say so and where the new link is, instead of "reconnecting"
  // forever; who is here and typing is not known any more, and older notices are stale.
  // The page keeps trying in the background.
  function serverGone() {
    renderPresence([]);
    state.typers.clear();
    renderTyping();
    showNotice(`The chat server at ${location.host} does not answer (${GONE_AFTER_TRIES} tries). `
      + 'If its notebook\'s kernel was restarted, the server may have a new address: in the '
      + 'notebook, run the cell that starts the server and open the link it shows. This page '
      + 'keeps trying this address.');
  }

  // The delay the server asked for (a close reason's "retry after S s", a 503's
  // retry_after: it spreads its clients itself), else exponential backoff with full
  // jitter: a random time below 0.5 s, 1 s, 2 s ... capped at 5 s, so that many clients
  // of a restarted server do not all come back in the same millisecond (the same policy
  // as chatlib.clients.Backoff).
  function scheduleReconnect() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
    const delay = state.serverDelayMs !== null ? state.serverDelayMs : Math.random() * base;
    state.serverDelayMs = null;
    state.attempt += 1;
    setStatus(state.failedTries >= GONE_AFTER_TRIES ? 'disconnected' : 'reconnecting');
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, delay);
  }

  // ---- transport: WebSocket ---------------------------------------------------
  function connectWs(conn) {
    // Relative to the page, so a proxy path prefix is kept; only the scheme changes.
    const url = new URL('ws', location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(url);
    const openTimer = setTimeout(() => conn.failed(), CONNECT_TIMEOUT_MS);
    let stopWatchdog = () => {};
    conn.stop = () => {
      clearTimeout(openTimer);
      stopWatchdog();
      conn.sendFrame = conn.joinRoom = conn.leaveRoom = null;
      ws.close(1000);
      olderLost(); // its answer is lost with the socket: ask again
    };

    ws.onopen = () => {
      clearTimeout(openTimer);
      enterRooms(conn, (frame) => ws.send(JSON.stringify(frame)));
      stopWatchdog = startWatchdog(conn);
      conn.opened();
    };

    ws.onmessage = (event) => {
      if (conn.closed) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      onFrame(frame);
    };

    ws.onclose = (event) => {
      if (conn.closed) return;
      onClose(conn, event.code, event.reason);
    };
    // onerror is always followed by onclose, which does the work.
  }

  // A connection that speaks the WebSocket's frames (ws, webtransport) is in every room of
  // the list: `hello` must be the first frame, and puts it in the default room; then one
  // `join` per other room. Each `after` makes the server replay what that room missed.
  function enterRooms(conn, send) {
    send({ type: 'hello', user: state.nick, after: state.rooms.get(DEFAULT_ROOM).lastId });
    conn.sendFrame = send;
    conn.joinRoom = (r) => send({ type: 'join', room: r.name, after: r.lastId });
    conn.leaveRoom = (r) => send({ type: 'leave', room: r.name });
    for (const r of state.rooms.values()) if (r.name !== DEFAULT_ROOM) conn.joinRoom(r);
  }

  // A connection ended: the older pages it was bringing will not come (ask again).
  function olderLost() {
    for (const r of state.rooms.values()) r.loadingOlder = false;
    olderDone();
  }

  // One event of a push transport that speaks the WebSocket's frames (ws, webtransport).
  // Each is about the room it names (none: the default room); one of a room the page is no
  // longer in is dropped.
  function onFrame(frame) {
    const r = frame && roomOf(frame);
    switch (frame && frame.type) {
      case 'message': handleMessage(frame, r); break;
      case 'presence': onPresence(frame, r); break;
      case 'typing': onTyping(frame.user, r); break;
      case 'reset': if (r) resetLog(r); break;
      case 'gap': if (r) handleGap(frame, r); break;
      case 'history': if (r) setBefore(frame.before, r); break;
      case 'older': if (r) showOlder(frame, r); break;
      case 'ack': acknowledged(frame); break;
      case 'dm': onDm(frame); break;
      case 'error':
        if (typeof frame.client_id === 'string') {
          const own = state.own.get(frame.client_id);
          if (own) refusedFor(own, frame.status, frame.error, frame.retry_after);
        } else if (typeof frame.room === 'string' && frame.room !== DEFAULT_ROOM) {
          roomRefused(frame.room, frame.error); // a join refused: we are not in that room
        } else showNotice(`Server: ${frame.error}`);
        break;
      default: break; // unknown frame types are ignored, for forward compatibility
    }
  }

  // The end of a ws or webtransport connection, with its close code (the same table).
  function onClose(conn, code, reason) {
    serverAsked(readCloseReason(reason).retryAfter); // 1013 busy, 1012 restart: its delay
    switch (code) {
      case 1008: // foreign origin / policy: the same hello would be refused again
        showNotice(`Connection refused by the server (1008${reason ? `: ${reason}` : ''}).`);
        conn.failed({ retry: false });
        return;
      case 1009:
        showNotice('That message was too large for the server.');
        break;
      default: // 1001/1012 restarting, 1013 behind or busy, 1006 network: resume after lastId
        break;
    }
    conn.failed();
  }

  // ---- transport: WebTransport ------------------------------------------------
  // Tried first in auto mode, and only where it can work: the browser has WebTransport and
  // the page comes from the chat server itself on loopback (its own port: UDP does not go
  // through jupyter-server-proxy, Binder or a hub), and the server serves it
  // (`api/webtransport`). Anything else fails at once, and auto mode falls back to ws.
  function connectWt(conn) {
    const loopback = ['127.0.0.1', 'localhost', '[::1]'].includes(location.hostname);
    if (typeof WebTransport === 'undefined' || !loopback) {
      conn.failed({ skipped: true });
      return;
    }
    let wt = null;
    let stopWatchdog = () => {};
    // Once the server has answered `api/webtransport`, a session that does not open is
    // WebTransport's own failure (UDP refused or dropped), or a server stopping between
    // the two: twice in a row, and WebTransport is skipped (a restart misses only once).
    let serverAnswered = false;
    const notOpened = () => {
      if (serverAnswered && !conn.everOpened) state.wtMisses += 1;
      conn.failed({ skipped: state.wtMisses >= WT_MISSES_TO_SKIP });
    };
    const openTimer = setTimeout(notOpened, CONNECT_TIMEOUT_MS);
    conn.stop = () => {
      clearTimeout(openTimer);
      stopWatchdog();
      conn.sendFrame = conn.sendTyping = conn.joinRoom = conn.leaveRoom = null;
      if (wt) wt.close({ closeCode: 1000, reason: '' });
      olderLost();
    };
    const notHere = new Error('WebTransport is not available here');
    openWt().catch((err) => {
      if (err !== notHere) console.warn('webtransport:', err);
      if (err === notHere || err instanceof HttpError) conn.failed({ skipped: true });
      else notOpened();
    });

    async function openWt() {
      const info = await getJson('api/webtransport', CONNECT_TIMEOUT_MS);
      const port = location.port || (location.protocol === 'https:' ? '443' : '80');
      if (conn.closed) return;
      // Another port than the page's: a proxy serves the page, and UDP will not pass it.
      if (!info.available || new URL(info.url).port !== port) throw notHere;
      serverAnswered = true;
      const hash = Uint8Array.from(info.hash.match(/../g), (h) => parseInt(h, 16));
      wt = new WebTransport(info.url, {
        serverCertificateHashes: [{ algorithm: 'sha-256', value: hash }],
      });
      wt.closed.then(({ closeCode, reason }) => {
        if (!conn.closed) onClose(conn, closeCode, reason);
      }, () => { if (!conn.closed) notOpened(); });
      await wt.ready;
      const stream = await wt.createBidirectionalStream();
      if (conn.closed) return;
      clearTimeout(openTimer);
      const writer = stream.writable.getWriter();
      const encoder = new TextEncoder();
      // One JSON text per line (chatlib/webtransport.py): the hello first, as on a WebSocket.
      const sendLine = (frame) => writer.write(encoder.encode(`${JSON.stringify(frame)}\n`))
        .catch(() => {});
      enterRooms(conn, sendLine);
      const datagrams = wt.datagrams.writable.getWriter();
      conn.sendTyping = (room) => datagrams.write(encoder.encode(
        JSON.stringify(withRoom({ type: 'typing' }, room)))).catch(() => {});
      readDatagrams(wt.datagrams.readable);
      stopWatchdog = startWatchdog(conn);
      state.wtMisses = 0;
      conn.opened();
      await readLines(stream.readable);
    }

    async function readLines(readable) {
      const reader = readable.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done || conn.closed) return;
        const lines = (buffer + value).split('\n');
        buffer = lines.pop();
        for (const line of lines) {
          let frame;
          try { frame = JSON.parse(line); } catch { continue; }
          if (!conn.closed) onFrame(frame);
        }
      }
    }

    async function readDatagrams(readable) {
      const reader = readable.getReader();
      const decoder = new TextDecoder();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done || conn.closed) return;
          let frame;
          try { frame = JSON.parse(decoder.decode(value)); } catch { continue; }
          if (!conn.closed) onFrame(frame);
        }
      } catch { /* the session ended: wt.closed says how */ }
    }
  }

  // ---- transport: Server-Sent Events ------------------------------------------
  function connectSse(conn) {
    joinPresence(conn.room).then(() => {
      if (!conn.closed) openEventSource(conn);
    }, (err) => {
      if (conn.closed) return;
      // EventSource shows no status: a room we may not read is told here, by the presence join.
      if (refusedRoom(conn, err)) return;
      if (err instanceof HttpError && err.status === 503) { // busy: come back when told
        serverAsked(err.retryAfter);
        conn.failed();
      } else openEventSource(conn); // presence is decoration: stream anyway
    });
  }

  function openEventSource(conn) {
    const r = state.rooms.get(conn.room);
    const url = `api/events?after=${r.lastId}&user=${enc(state.nick)}${roomParam(r.name)}`;
    const es = new EventSource(url);
    const openTimer = setTimeout(() => conn.failed(), CONNECT_TIMEOUT_MS);
    let stopWatchdog = () => {};
    const stopRooms = startRoomsRefresh(conn);
    conn.stop = () => {
      clearTimeout(openTimer);
      stopWatchdog();
      stopRooms();
      es.close();
    };

    es.onopen = () => {
      clearTimeout(openTimer);
      stopWatchdog();               // onopen fires again after EventSource's own reconnect
      stopWatchdog = startWatchdog(conn);
      conn.opened();
    };
    const on = (name, handler) => es.addEventListener(name, (event) => {
      if (conn.closed) return;
      let data;
      try { data = JSON.parse(event.data); } catch { return; }
      handler(data);
    });
    on('message', (m) => handleMessage(m, r));
    on('presence', (data) => onPresence(data, r));
    on('typing', (data) => onTyping(data.user, r));
    on('gap', (data) => handleGap(data, r));
    on('history', (data) => setBefore(data.before, r));
    on('dm', onDm);
    es.addEventListener('reset', () => { if (!conn.closed) resetLog(r); });
    on('close', (data) => serverAsked(readCloseReason(data.reason).retryAfter)); // the last event

    // EventSource would retry on its own, but at a fixed interval and never
    // after an HTTP error; closing it and using our own backoff keeps one
    // reconnect policy for every transport and lets auto mode fall back.
    es.onerror = () => {
      if (conn.closed || conn.everOpened) { conn.failed(); return; }
      // Refused before it opened: a busy server's 503 hands out a slot and says when, but
      // EventSource shows neither the status nor Retry-After (WHATWG HTML fails the
      // connection). Ask again with fetch, which does, and come back when told.
      es.close();
      streamRefusal(url).then((retryAfterS) => {
        if (conn.closed) return;
        serverAsked(retryAfterS);
        conn.failed();
      });
    };
  }

  // The delay a 503 to GET `url` asks for (seconds), or null (another answer, or none).
  async function streamRefusal(url) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), CONNECT_TIMEOUT_MS);
    try {
      const res = await fetch(url, { cache: 'no-store', signal: abort.signal });
      if (res.status === 503) return (await errorFrom(res)).retryAfter;
      return null; // admitted this time (the stream is dropped): the next attempt backs off
    } catch {
      return null; // no answer: the server is away
    } finally {
      clearTimeout(timer);
      abort.abort();
    }
  }

  // An HTTP transport refused (403) in a room other than the default one: we may not read
  // that room. Say so and go back to the room before it (which replaces this connection).
  function refusedRoom(conn, err) {
    if (!(err instanceof HttpError) || err.status !== 403 || conn.room === DEFAULT_ROOM) return false;
    roomRefused(conn.room, err.message);
    return true;
  }

  // ---- transports: long polling and short polling ------------------------------
  function connectPolling(conn) {
    const long = conn.transport === 'longpoll';
    const abort = new AbortController();
    const r = state.rooms.get(conn.room);
    let timer = null;
    let presenceTimer = null;
    let stopRooms = () => {};
    conn.stop = () => {
      abort.abort();
      clearTimeout(timer);
      clearInterval(presenceTimer);
      stopRooms();
    };

    // One request. The first request of a connection never waits, so history
    // shows at once (and "connected" is known at once) even in long-poll mode.
    async function step(first) {
      const wait = long && !first ? LONG_POLL_WAIT_S : 0;
      const url = `api/messages?after=${r.lastId}&user=${enc(state.nick)}`
        + (wait ? `&wait=${wait}` : '') + roomParam(r.name);
      const started = Date.now();
      let data;
      try {
        data = await getJson(url, (wait + 10) * 1000, abort.signal);
      } catch (err) {
        if (conn.closed || refusedRoom(conn, err)) return;
        if (err instanceof HttpError && err.status !== 429 && err.status < 500) {
          showNotice(err.message);           // 400/403/413: asking again will not help
          conn.failed({ retry: false });
        } else {
          if (err instanceof HttpError) {
            showNotice(err.message);
            serverAsked(err.retryAfter);
          }
          conn.failed();                     // network error, 429 or 5xx: back off
        }
        return;
      }
      if (conn.closed) return;
      if (first) {
        conn.opened();
        refreshPresence(conn);
        presenceTimer = setInterval(() => refreshPresence(conn), PRESENCE_REFRESH_MS);
        stopRooms = startRoomsRefresh(conn);
      }
      const messages = Array.isArray(data.messages) ? data.messages : [];
      if (data.reset) resetLog(r); // the messages in this answer are the replay from the start
      if (data.gap) handleGap(data.gap, r);
      if (data.history) setBefore(data.history.before, r);
      messages.forEach((m) => handleMessage(m, r));

      // If the server sent only part of what it has, ask again at once.
      // Otherwise a short poll waits its interval; a long poll asks again at
      // once, unless it came back empty suspiciously fast (never spin).
      const more = messages.length > 0 && Number.isInteger(data.last_id) && r.lastId < data.last_id;
      let delay = POLL_INTERVAL_MS;
      if (more) delay = 0;
      else if (long) delay = messages.length || Date.now() - started > 1000 ? 0 : POLL_INTERVAL_MS;
      timer = setTimeout(() => step(false), delay);
    }
    step(true);
  }

  // ---- sending ----------------------------------------------------------------
  // Own messages go out one at a time, oldest first (state.own keeps sending order): the
  // next leaves once the server has stored the previous one. So a burst can neither
  // overtake itself nor be refused in the middle and arrive with holes. The server's
  // budget is per connection (rate, burst: chatlib.limits); past it, a message is refused
  // with 429 / an error frame with status 429, and it waits on screen, saying so, and
  // goes out on its own once the budget allows (Retry-After when the server gives one).
  // A refusal that sending again cannot fix (400, 413) leaves the message on screen as
  // failed, with the reason and Retry / Edit / Discard: nothing typed vanishes.
  const newClientId = () => (crypto.randomUUID ? crypto.randomUUID()
    : Array.from(crypto.getRandomValues(new Uint8Array(16)),
      (b) => b.toString(16).padStart(2, '0')).join(''));

  // The entry of state.own that `m` (a message or an ack) is, if it is ours.
  function ownMessage(m) {
    const own = typeof m.client_id === 'string' ? state.own.get(m.client_id) : undefined;
    return own && own.user === m.user ? own : null;
  }

  function sendMessage() {
    const text = els.input.value;
    if (!state.joined || !text.trim()) return;
    els.input.value = '';
    showCount();
    state.lastTypingSent = 0; // the next keystroke is a new "typing" burst
    const cid = newClientId();
    // state: queued (waiting its turn, or for the rate budget) -> sent (acknowledged);
    // or failed (refused for good: the person decides).
    const own = { cid, text, user: state.nick, room: state.room, t0: performance.now(), state: 'queued' };
    own.el = renderPending(own);
    drawOwn(own, 'sending…');
    state.own.set(cid, own);
    pump();
  }

  // Shown at once, below the stored messages, until the real one arrives.
  function renderPending(own) {
    const li = document.createElement('li');
    li.className = 'outgoing mine pending';
    li.dataset.clientId = own.cid;
    const meta = document.createElement('div');
    meta.className = 'meta';
    const user = document.createElement('span');
    user.className = 'user';
    user.textContent = own.user;
    const status = document.createElement('span');
    status.className = 'send-state';
    meta.append(user, ' ', status);
    const text = document.createElement('div');
    text.className = 'text';
    text.dir = 'auto';
    text.textContent = own.text;
    li.append(meta, text);
    els.messages.append(li);
    return li;
  }

  // The row of an own message, for its state: `note` says what is happening to it.
  function drawOwn(own, note) {
    const li = own.el;
    li.dataset.state = own.state === 'queued' ? 'pending' : own.state;
    li.classList.toggle('pending', own.state !== 'sent');
    li.classList.toggle('sent', own.state === 'sent');
    li.classList.toggle('failed', own.state === 'failed');
    li.querySelector('.send-state').textContent = note;
    li.querySelector('.actions')?.remove();
    li.querySelector('.expand')?.remove();
    if (own.state === 'failed') {
      const actions = document.createElement('div');
      actions.className = 'actions';
      const button = (label, onClick) => {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = label;
        b.addEventListener('click', onClick);
        actions.append(b);
      };
      button('Retry', () => { own.state = 'queued'; drawOwn(own, 'sending…'); pump(); });
      button('Edit', () => {
        forget(own);
        els.input.value = els.input.value ? `${own.text} ${els.input.value}` : own.text;
        showCount();
        els.input.focus();
      });
      button('Discard', () => forget(own));
      li.append(actions);
      // A long refused text (a paste over the limit) is cut to a few lines, expandable,
      // so that it cannot push its reason and the newest messages out of sight.
      const text = li.querySelector('.text');
      if (text.scrollHeight > text.clientHeight + 2) {
        const more = document.createElement('button');
        more.type = 'button';
        more.className = 'expand';
        more.textContent = 'Show all';
        more.setAttribute('aria-expanded', 'false');
        more.addEventListener('click', () => {
          const open = li.classList.toggle('expanded');
          more.textContent = open ? 'Show less' : 'Show all';
          more.setAttribute('aria-expanded', String(open));
        });
        text.after(more);
      }
    }
    if (pinned) els.messages.scrollTop = els.messages.scrollHeight;
  }

  function forget(own) {
    state.own.delete(own.cid);
    own.el.remove();
    if (state.inFlight === own) state.inFlight = null;
  }

  // Send the oldest queued message, if none is on its way and no rate pause is running.
  function pump() {
    if (state.inFlight || state.holdTimer) return;
    const own = [...state.own.values()].find((o) => o.state === 'queued');
    if (!own) return;
    state.inFlight = own;
    const conn = state.conn;
    if (conn && conn.sendFrame && own.user === state.nick) {
      // Over the WebSocket if one is open (and still has our nick), else with POST: every
      // transport writes the same log, and the client_id makes a repeat harmless.
      conn.sendFrame(withRoom({ type: 'message', text: own.text, client_id: own.cid }, own.room));
      // The ack (or an error frame) comes on the socket; without one, the queue must not
      // stall behind this message (the client_id makes sending it again harmless).
      setTimeout(() => {
        if (state.inFlight === own) refusedFor(own, 504, 'no answer from the server', null);
      }, ACK_TIMEOUT_MS);
      return;
    }
    postJson(`api/messages${roomParam(own.room, '?')}`, { user: own.user, text: own.text, client_id: own.cid })
      .then((m) => acknowledged(m))
      .catch((err) => {
        if (!(err instanceof HttpError)) refusedFor(own, 503, 'no answer', null);
        else refusedFor(own, err.status, err.message, err.retryAfter);
      });
  }

  // Whatever was on its way when a connection ended goes again on the next one.
  function resendPending() {
    state.inFlight = null;
    clearTimeout(state.holdTimer);
    state.holdTimer = null;
    pump();
  }

  // The server stored it (`m` is the stored message: an ack frame or a POST's answer).
  function acknowledged(m) {
    const own = ownMessage(m);
    if (!own) return;
    if (own.state !== 'sent') {
      own.state = 'sent';
      drawOwn(own, 'sent ✓');
    }
    settled(own);
    // The message itself comes on the transport's stream, in id order (not from here,
    // which could skip over an earlier message the stream has not brought yet).
  }

  // `own` is done with (stored, or refused for good): the next one may go.
  function settled(own) {
    if (state.inFlight !== own) return;
    state.inFlight = null;
    pump();
  }

  // The server did not store `own`: 429 and 5xx pass (it waits, then goes again on its
  // own); anything else will not (it stays, failed, with the reason and what to do).
  function refusedFor(own, status, error, retryAfterS) {
    if (state.own.get(own.cid) !== own || own.state !== 'queued') return;
    if (state.inFlight === own) state.inFlight = null;
    if (status === 429 || status >= 500 || status === 408) {
      const waitMs = retryAfterS > 0 ? retryAfterS * 1000
        : status === 429 ? RATE_RETRY_MS : RESEND_RETRY_MS;
      drawOwn(own, status === 429
        ? `waiting: ${stripStatus(error)}; sends by itself in ${Math.ceil(waitMs / 1000)} s`
        : `waiting: ${stripStatus(error)}; trying again`);
      clearTimeout(state.holdTimer);
      state.holdTimer = setTimeout(() => { state.holdTimer = null; pump(); }, waitMs);
      return;
    }
    own.state = 'failed';
    drawOwn(own, `not sent: ${stripStatus(error)}`);
    pump(); // a message refused for good does not hold up the ones after it
  }

  const stripStatus = (error) => String(error).replace(/^\d{3}: /, '');

  // Characters used of the server's limit, once 80 % of it is used (GET api/limits tells it;
  // chatlib.limits.Limits.max_text is its one home). Over it the server would refuse the text.
  function showCount() {
    const used = els.input.value.length;
    const max = state.maxText;
    els.count.hidden = !max || used < 0.8 * max;
    if (els.count.hidden) return;
    els.count.textContent = used > max ? `${used} / ${max}: ${used - max} too many`
      : `${used} / ${max}`;
    els.count.classList.toggle('over', used > max);
  }

  async function loadLimits() {
    try {
      const limits = await getJson('api/limits', 10000);
      if (Number.isInteger(limits.max_text) && limits.max_text > 0) state.maxText = limits.max_text;
    } catch { /* no counter: the server still says so if a text is too long */ }
    showCount();
  }

  // Tell the others we are typing, at most once every 2 s. Best effort: a lost
  // or rate-limited typing notice is not worth bothering the user about.
  function sendTyping() {
    if (!state.joined || !els.input.value) return;
    const now = Date.now();
    if (now - state.lastTypingSent < TYPING_SEND_EVERY_MS) return;
    if (state.holdTimer) return; // the send budget is spent: messages first
    state.lastTypingSent = now;
    const conn = state.conn;
    if (conn && conn.sendTyping) conn.sendTyping(state.room); // a datagram (webtransport)
    else if (conn && conn.sendFrame) conn.sendFrame(withRoom({ type: 'typing' }, state.room));
    else postJson(`api/typing${roomParam(state.room, '?')}`, { user: state.nick }).catch(() => {});
  }

  // ---- joining ----------------------------------------------------------------
  function join() {
    const nick = els.nick.value.trim() || randomGuest();
    els.nick.value = nick;
    state.nick = nick;
    state.mode = els.transportSelect.value;
    if (!state.joined) state.joinedAt = Date.now();
    state.joined = true;
    // A fresh start for the transport choice; the message cursor is kept, so
    // rejoining (new nick or transport) resumes without reloading history.
    state.autoIndex = 0;
    state.autoLocked = false;
    state.attempt = 0;
    els.input.disabled = false;
    els.send.disabled = false;
    els.input.placeholder = 'Write a message…';
    els.input.focus(); // joined: the next thing to type is a message
    // Repaint own-message highlighting and the "(you)" marker for the new nick.
    for (const li of els.messages.children) {
      li.classList.toggle('mine', li.querySelector('.user')?.textContent === nick);
    }
    for (const li of els.presence.children) li.classList.toggle('me', li.textContent === nick);
    connect();
  }

  // A nick is remembered for this tab (sessionStorage: a reload keeps it) and as the
  // suggestion for the next tab (localStorage). A second tab must not silently become a
  // second "alice": if the remembered nick is in the chat already, it suggests "alice-2".
  function saveNick(nick) {
    try {
      localStorage.setItem(NICK_KEY, nick);
      sessionStorage.setItem(TAB_NICK_KEY, nick);
    } catch { /* storage disabled: fine */ }
  }

  function loadNick(storage, key) { // storage: 'localStorage' or 'sessionStorage'
    try { return window[storage].getItem(key); } catch { return null; } // may be disabled
  }

  function freeVariant(nick, taken) {
    if (!taken.has(nick)) return nick;
    const base = nick.replace(/-\d+$/, '');
    for (let n = 2; n < 1000; n += 1) {
      if (!taken.has(`${base}-${n}`)) return `${base}-${n}`;
    }
    return randomGuest();
  }

  async function suggestFreeNick() {
    const suggested = els.nick.value;
    let users;
    try {
      users = (await getJson('api/presence', 5000)).users;
    } catch { return; } // no presence, no check: the suggestion stays
    // Only while the person has not started typing a nick of their own.
    if (!Array.isArray(users) || state.joined || els.nick.value !== suggested) return;
    els.nick.value = freeVariant(suggested, new Set(users));
    if (document.activeElement === els.nick) els.nick.select(); // still replaced by typing
  }

  // ---- wiring -----------------------------------------------------------------
  els.joinForm.addEventListener('submit', (event) => {
    event.preventDefault();
    join();
    saveNick(state.nick); // remembered only when a person joins, not from ?user=
  });

  // Switching transport while joined reconnects over the new one.
  els.transportSelect.addEventListener('change', () => {
    if (state.joined) join();
  });

  els.composer.addEventListener('submit', (event) => {
    event.preventDefault(); // Enter in the input or the Send button
    sendMessage();
    els.input.focus();
  });
  els.input.addEventListener('input', () => { showCount(); sendTyping(); });

  els.noticeClose.addEventListener('click', hideNotice);

  // Join or create a room by name (the server checks the name: nickname rules, no "@").
  els.roomForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const name = els.roomName.value.trim().normalize('NFKC');
    if (!name) return;
    if (name.startsWith('@')) {
      showNotice('Room names cannot start with "@": click a name under "Online" to write to that person.');
      return;
    }
    els.roomName.value = '';
    switchRoom(name);
  });

  // Back online: skip the rest of the backoff wait.
  window.addEventListener('online', () => {
    if (state.reconnectTimer) connect();
  });

  // Start-up: ?transport= and ?user= (tests use them), else the remembered nick.
  const params = new URLSearchParams(location.search);
  if (params.has('token')) {
    // Token mode: loading this page set the cookie that our requests carry from now on
    // (README, "Token mode"). Take the secret out of the address bar, history, bookmarks.
    params.delete('token');
    const query = params.toString();
    history.replaceState(null, '', location.pathname + (query ? `?${query}` : '') + location.hash);
  }
  const wanted = params.get('transport');
  if (TRANSPORTS.has(wanted)) els.transportSelect.value = wanted;
  const userParam = params.get('user');
  const tabNick = loadNick('sessionStorage', TAB_NICK_KEY);
  els.nick.value = userParam || tabNick || loadNick('localStorage', NICK_KEY) || randomGuest();
  restoreRooms(els.nick.value);
  const startRoom = (params.get('room') || '').trim().normalize('NFKC');
  if (startRoom && !startRoom.startsWith('@')) switchRoom(startRoom);
  renderRooms();
  loadLimits();
  if (userParam) join();
  else {
    els.nick.focus();
    els.nick.select(); // a suggestion: the first key typed replaces it
    if (!tabNick) suggestFreeNick();
  }
})();
