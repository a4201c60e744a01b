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
  const LATENCY_SAMPLES = 200;      // the running median covers the last N messages
  const NICK_KEY = 'chat.nick';          // localStorage: the nick last joined with
  const TAB_NICK_KEY = 'chat.tab-nick';  // sessionStorage: this tab's nick (kept on reload)

  // ---- DOM --------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const els = {
    joinForm: $('join-form'), nick: $('nick'), transportSelect: $('transport-select'),
    transport: $('transport'), status: $('status'), statusDot: $('status-dot'),
    latency: $('latency'), latencyOthers: $('latency-others'), count: $('message-count'),
    notice: $('notice'), noticeText: $('notice-text'), noticeClose: $('notice-close'),
    messages: $('messages'), presence: $('presence'), presenceCount: $('presence-count'),
    typing: $('typing'), composer: $('composer'), input: $('message-input'), send: $('send'),
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
    lastId: 0,             // cursor: newest message id shown
    before: 0,             // older messages exist below this id (the `history` marker); 0: none
    loadingOlder: false,   // a page of older messages is on its way
    shown: new Set(),      // ids on screen, so redeliveries are ignored
    own: new Map(),        // client_id -> own message not shown yet: {text, user, t0, el, state}
    inFlight: null,        // the own message on its way (one at a time, in order)
    holdTimer: null,       // a pause before sending again (429, 5xx, network)
    latencies: { own: [], others: [] }, // the last LATENCY_SAMPLES of each, in ms
    maxText: 0,            // the server's longest text (GET api/limits); 0: not known
    typers: new Map(),     // user -> time (ms) at which to stop showing "typing"
    typingTimer: null,
    lastTypingSent: 0,
  };

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

  // Called by every transport for every message it receives.
  function handleMessage(m) {
    if (!isMessage(m) || state.shown.has(m.id)) return; // duplicate (e.g. replay after reconnect)
    state.shown.add(m.id);
    if (m.id > state.lastId) state.lastId = m.id;
    const latency = measureLatency(m);
    const own = ownMessage(m);
    if (own) { // ours is stored: its pending line gives way to the real one
      state.own.delete(m.client_id);
      own.el.remove();
      settled(own); // (its echo may come before its ack)
    }
    renderMessage(m, latency);
    // Someone who just sent a message has stopped typing.
    if (state.typers.delete(m.user)) renderTyping();
  }

  // The server replaced its log (restart of an in-memory server): our ids mean
  // nothing any more. Clear the screen and the cursor; the replay follows.
  function resetLog() {
    // Own messages not acknowledged yet stay (and are sent to the new log); acknowledged
    // ones went with the old log, like everyone else's.
    for (const [cid, own] of state.own) if (own.state === 'sent') state.own.delete(cid);
    els.messages.replaceChildren(...[...state.own.values()].map((own) => own.el));
    state.shown.clear();
    state.lastId = 0;
    state.before = 0; // the fresh join that follows says again whether older ones exist
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

  function setBefore(before) {
    state.before = Number.isInteger(before) && before > 1 ? before : 0;
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
        conn.sendFrame({ type: 'older', before: state.before });
        return;
      }
      showOlder(await getJson(`api/messages?before=${state.before}`, 10000));
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

  // A page of older messages (`{"messages", "first_id", "before"?}`): above, in place.
  function showOlder(body) {
    olderDone();
    const list = els.messages;
    const fromBottom = list.scrollHeight - list.scrollTop;
    const wasPinned = pinned;
    pinned = false; // no jump to the bottom while rows go in above
    (Array.isArray(body.messages) ? body.messages : []).forEach(handleMessage);
    pinned = wasPinned;
    setBefore(body.before);
    list.scrollTop = list.scrollHeight - fromBottom;
    lastTop = list.scrollTop;
  }

  olderButton.addEventListener('click', loadOlder);

  function renderMessage(m, latencyMs) {
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
    insertInOrder(li, m.id);
  }

  // Where a row goes in the list: by id. A gap notice sits between the last id before the
  // gap and its first_id; pending lines (no id yet) stay below every stored message.
  const rowOrder = (el) => (el.dataset.id ? Number(el.dataset.id)
    : el.dataset.gap ? Number(el.dataset.gap) - 0.5
      : el.classList.contains('load-older') ? -Infinity : Infinity);

  function insertInOrder(li, order) {
    // Walk back from the end: almost always zero steps, since ids normally arrive in order.
    const list = els.messages;
    let before = null;
    for (let el = list.lastElementChild; el && rowOrder(el) > order; el = el.previousElementSibling) {
      before = el;
    }
    list.insertBefore(li, before);
    if (pinned) list.scrollTop = list.scrollHeight;
  }

  // The server no longer has the messages between our cursor and `first_id` (retention,
  // README "Resuming"): say so in the list, where they would have been. One notice per gap.
  function handleGap(data) {
    const first = data && data.first_id;
    if (!Number.isInteger(first)) return;
    if (els.messages.querySelector(`li.gap[data-gap="${first}"]`)) return;
    const li = document.createElement('li');
    li.className = 'gap';
    li.dataset.gap = String(first);
    li.setAttribute('role', 'note');
    li.textContent = 'Some older messages are no longer available';
    insertInOrder(li, first - 0.5);
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
  function renderPresence(users, count) {
    if (!Array.isArray(users)) return;
    const names = [...new Set(users.filter((u) => typeof u === 'string'))]
      .sort((a, b) => a.localeCompare(b));
    els.presence.replaceChildren(...names.map((name) => {
      const li = document.createElement('li');
      li.textContent = name;
      if (name === state.nick) li.className = 'me'; // "(you)" is added by CSS
      return li;
    }));
    const total = Number.isInteger(count) && count > names.length ? count : names.length;
    els.presenceCount.textContent = `(${total})`;
  }

  function onTyping(user) {
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
  const joinPresence = () => postJson('api/presence', { user: state.nick });

  async function refreshPresence(conn) {
    try {
      const data = await joinPresence();
      if (!conn.closed) renderPresence(data.users, data.count);
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
      closed: false,
      everOpened: false,
      sendFrame: null, // set by ws and webtransport while their connection is open
      sendTyping: null, // set by webtransport: typing notices as datagrams
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
      conn.sendFrame = null;
      ws.close(1000);
      if (state.loadingOlder) olderDone(); // its answer is lost with the socket: ask again
    };

    ws.onopen = () => {
      clearTimeout(openTimer);
      // hello must be the first frame; `after` makes the server replay what we missed.
      ws.send(JSON.stringify({ type: 'hello', user: state.nick, after: state.lastId }));
      conn.sendFrame = (frame) => ws.send(JSON.stringify(frame));
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

  // One event of a push transport that speaks the WebSocket's frames (ws, webtransport).
  function onFrame(frame) {
    switch (frame && frame.type) {
      case 'message': handleMessage(frame); break;
      case 'presence': renderPresence(frame.users, frame.count); break;
      case 'typing': onTyping(frame.user); break;
      case 'reset': resetLog(); break;
      case 'gap': handleGap(frame); break;
      case 'history': setBefore(frame.before); break;
      case 'older': showOlder(frame); break;
      case 'ack': acknowledged(frame); break;
      case 'error':
        if (typeof frame.client_id !== 'string') showNotice(`Server: ${frame.error}`);
        else {
          const own = state.own.get(frame.client_id);
          if (own) refusedFor(own, frame.status, frame.error, frame.retry_after);
        }
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
      conn.sendFrame = conn.sendTyping = null;
      if (wt) wt.close({ closeCode: 1000, reason: '' });
      if (state.loadingOlder) olderDone();
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
      sendLine({ type: 'hello', user: state.nick, after: state.lastId });
      conn.sendFrame = sendLine;
      const datagrams = wt.datagrams.writable.getWriter();
      conn.sendTyping = () => datagrams.write(encoder.encode('{"type":"typing"}')).catch(() => {});
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
    joinPresence().then(() => {
      if (!conn.closed) openEventSource(conn);
    }, (err) => {
      if (conn.closed) return;
      if (err instanceof HttpError && err.status === 503) { // busy: come back when told
        serverAsked(err.retryAfter);
        conn.failed();
      } else openEventSource(conn); // presence is decoration: stream anyway
    });
  }

  function openEventSource(conn) {
    const url = `api/events?after=${state.lastId}&user=${enc(state.nick)}`;
    const es = new EventSource(url);
    const openTimer = setTimeout(() => conn.failed(), CONNECT_TIMEOUT_MS);
    let stopWatchdog = () => {};
    conn.stop = () => {
      clearTimeout(openTimer);
      stopWatchdog();
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
    on('message', handleMessage);
    on('presence', (data) => renderPresence(data.users, data.count));
    on('typing', (data) => onTyping(data.user));
    on('gap', handleGap);
    on('history', (data) => setBefore(data.before));
    es.addEventListener('reset', () => { if (!conn.closed) resetLog(); });
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

  // ---- transports: long polling and short polling ------------------------------
  function connectPolling(conn) {
    const long = conn.transport === 'longpoll';
    const abort = new AbortController();
    let timer = null;
    let presenceTimer = null;
    conn.stop = () => {
      abort.abort();
      clearTimeout(timer);
      clearInterval(presenceTimer);
    };

    // One request. The first request of a connection never waits, so history
    // shows at once (and "connected" is known at once) even in long-poll mode.
    async function step(first) {
      const wait = long && !first ? LONG_POLL_WAIT_S : 0;
      const url = `api/messages?after=${state.lastId}&user=${enc(state.nick)}`
        + (wait ? `&wait=${wait}` : '');
      const started = Date.now();
      let data;
      try {
        data = await getJson(url, (wait + 10) * 1000, abort.signal);
      } catch (err) {
        if (conn.closed) return;
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
      }
      const messages = Array.isArray(data.messages) ? data.messages : [];
      if (data.reset) resetLog(); // the messages in this answer are the replay from the start
      if (data.gap) handleGap(data.gap);
      if (data.history) setBefore(data.history.before);
      messages.forEach(handleMessage);

      // If the server sent only part of what it has, ask again at once.
      // Otherwise a short poll waits its interval; a long poll asks again at
      // once, unless it came back empty suspiciously fast (never spin).
      const more = messages.length > 0 && Number.isInteger(data.last_id) && state.lastId < data.last_id;
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
    const own = { cid, text, user: state.nick, t0: performance.now(), state: 'queued' };
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
      conn.sendFrame({ type: 'message', text: own.text, client_id: own.cid });
      // The ack (or an error frame) comes on the socket; without one, the queue must not
      // stall behind this message (the client_id makes sending it again harmless).
      setTimeout(() => {
        if (state.inFlight === own) refusedFor(own, 504, 'no answer from the server', null);
      }, ACK_TIMEOUT_MS);
      return;
    }
    postJson('api/messages', { user: own.user, text: own.text, client_id: own.cid })
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
    if (conn && conn.sendTyping) conn.sendTyping(); // a datagram (webtransport)
    else if (conn && conn.sendFrame) conn.sendFrame({ type: 'typing' });
    else postJson('api/typing', { user: state.nick }).catch(() => {});
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
  loadLimits();
  if (userParam) join();
  else {
    els.nick.focus();
    els.nick.select(); // a suggestion: the first key typed replaces it
    if (!tabNick) suggestFreeNick();
  }
})();
