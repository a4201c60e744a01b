// The ChatPanel's view: an anywidget ES module (plain JavaScript, no build step).
//
// The kernel (chatlib/panel.py) holds the chat client and all the state, in synced
// traitlets; this view draws that state and reports what the person does, each as ONE
// message to the kernel (model.send), so that nothing can arrive split or out of order:
//   {type: 'send', text, client_id}   the whole text, sent by Enter or the Send button
//   {type: 'typing'}                  at most every 2 s while the person types
//   {type: 'discard', client_id}      forget an own message the server refused
//   {type: 'hello'}                   is a kernel there? (it answers {type: 'hello'})
//   {type: 'switch', room}            show that room (joining it if need be)
//   {type: 'dm', user}                show the direct-message room with that person
// Rooms: the model's `room` is the room on screen (history, presence, gaps are its), `rooms`
// every room the panel is in ({room, label, unread}); the switcher shows once there are two.
// A view opened later (the notebook closed and reopened) draws the same chat from the
// model. Security: text users typed is data, never markup: textContent only, no innerHTML.

const TYPING_SEND_EVERY_MS = 2000;
const KERNEL_ANSWER_MS = 3000;  // no answer to hello by then: say so
const PINNED_SLACK_PX = 40;     // "at the bottom" within this many pixels
const COUNT_FROM = 0.8;         // the length counter shows from this share of max_text on
const DEFAULT_ROOM = 'lobby';   // chatlib.store.DEFAULT_ROOM: a panel only there says no room

// Times are formatted as the chat page formats them (static/app.js has the same function;
// tests/test_panel.py checks that the two stay identical).
const TIME_FORMAT = { hour: '2-digit', minute: '2-digit' };
function formatTime(date) { return date.toLocaleTimeString([], TIME_FORMAT); }

const DAY_FORMAT = { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' };
function formatDay(date) {
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (date.toDateString() === today.toDateString()) return 'Today';
  if (date.toDateString() === yesterday.toDateString()) return 'Yesterday';
  return date.toLocaleDateString([], DAY_FORMAT);
}

// crypto.randomUUID() exists only in secure contexts (https, localhost); JupyterLab is
// often reached over plain http by its host name, where getRandomValues still works.
function newClientId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

let viewCount = 0;  // unique element ids per view (a panel can be shown more than once)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render({ model, el: root }) {
  const uid = `chatlib-${++viewCount}-${Math.random().toString(36).slice(2, 8)}`;
  const cleanups = [];
  const on = (name, fn) => {
    model.on(name, fn);
    cleanups.push(() => model.off(name, fn));
  };

  // ---- DOM ------------------------------------------------------------------------
  const panel = el('div', 'chatlib-panel');
  panel.setAttribute('role', 'region');

  const header = el('div', 'chatlib-header');
  const status = el('div', 'chatlib-status');
  status.setAttribute('role', 'status');
  const dot = el('span', 'chatlib-dot');
  dot.setAttribute('aria-hidden', 'true');
  const stateText = el('span', 'chatlib-state');
  const who = el('span', 'chatlib-who');
  const countdown = el('span', 'chatlib-countdown');
  // The line is a live region (connection changes are announced); a countdown ticking in it
  // would be read out every second.
  countdown.setAttribute('aria-hidden', 'true');
  const problem = el('span', 'chatlib-error');
  status.append(dot, stateText, ' ', who, countdown, problem);
  const kernelNote = el('div', 'chatlib-kernel-note');
  kernelNote.hidden = true;
  const presence = el('div', 'chatlib-presence');
  // The room switcher: the rooms the panel is in (unread counts in their names), and a box
  // to join one more by name. Hidden while the panel is in one room only.
  const switcher = el('div', 'chatlib-rooms');
  const roomLabel = el('label', 'chatlib-label', 'Room ');
  const roomSelect = el('select', 'chatlib-room');
  roomSelect.id = `${uid}-room`;
  roomLabel.htmlFor = roomSelect.id;
  const roomInput = el('input', 'chatlib-room-name');
  roomInput.type = 'text';
  roomInput.placeholder = 'join a room';
  roomInput.setAttribute('aria-label', 'Join a room by name');
  roomInput.spellcheck = false;
  switcher.append(roomLabel, roomSelect, ' ', roomInput);
  header.append(status, switcher, presence, kernelNote);

  const scroller = el('div', 'chatlib-log');
  scroller.tabIndex = 0;  // scrollable with the keyboard
  scroller.setAttribute('aria-label', 'Chat messages');
  const list = el('ol', 'chatlib-history');
  // role=log + aria-live=polite: screen readers announce new messages without interrupting.
  list.setAttribute('role', 'log');
  list.setAttribute('aria-live', 'polite');
  list.setAttribute('aria-relevant', 'additions');
  const empty = el('p', 'chatlib-empty', 'No messages yet.');
  const outboxList = el('ol', 'chatlib-outbox');
  outboxList.setAttribute('aria-label', 'Your messages on their way');
  scroller.append(empty, list, outboxList);

  const unread = el('button', 'chatlib-unread');
  unread.type = 'button';
  unread.hidden = true;

  const typingLine = el('div', 'chatlib-typing');
  typingLine.setAttribute('aria-live', 'polite');

  const composer = el('div', 'chatlib-composer');
  const label = el('label', 'chatlib-visually-hidden');
  const input = el('input', 'chatlib-input');
  input.type = 'text';
  input.id = `${uid}-input`;
  input.autocomplete = 'off';
  input.spellcheck = true;
  input.placeholder = 'Type a message, press Enter';
  label.htmlFor = input.id;
  const send = el('button', 'chatlib-send', 'Send');
  send.type = 'button';
  // Characters used of the server's limit (the model's max_text), as the text nears it.
  const count = el('span', 'chatlib-count');
  count.id = `${uid}-count`;
  count.hidden = true;
  input.setAttribute('aria-describedby', count.id);
  composer.append(label, input, count, send);

  const logBox = el('div', 'chatlib-logbox');
  logBox.append(scroller, unread);
  panel.append(header, logBox, typingLine, composer);
  panel.setAttribute('aria-labelledby', `${uid}-title`);
  const title = el('span', 'chatlib-visually-hidden', 'Chat');
  title.id = `${uid}-title`;
  panel.prepend(title);
  root.replaceChildren(panel);

  // ---- scrolling: follow new messages only while the reader is at the bottom ----------
  let pinned = true;
  let unreadCount = 0;
  const atBottom = () =>
    scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < PINNED_SLACK_PX;
  const toBottom = () => { scroller.scrollTop = scroller.scrollHeight; };
  const showUnread = () => {
    unread.hidden = unreadCount === 0;
    unread.textContent = `${unreadCount} new message${unreadCount === 1 ? '' : 's'} ↓`;
  };
  scroller.addEventListener('scroll', () => {
    pinned = atBottom();
    if (pinned && unreadCount) { unreadCount = 0; showUnread(); }
  });
  // The newest message of the history, unless it is out of view (a scroll up, or a tall
  // own message still below it in the outbox).
  const newestHidden = () => {
    const newest = list.lastElementChild;
    if (!newest) return false;
    const r = newest.getBoundingClientRect();
    const box = scroller.getBoundingClientRect();
    return r.bottom > box.bottom + 1 || r.top < box.top - 1;
  };
  unread.addEventListener('click', () => {
    pinned = true;
    toBottom();
    const newest = list.lastElementChild;
    if (newest && newestHidden()) {  // below it, a tall failed message: bring the newest up
      scroller.scrollTop += newest.getBoundingClientRect().bottom
        - scroller.getBoundingClientRect().bottom;
    }
    unreadCount = 0;
    showUnread();
    input.focus();
  });
  // The box appears after render (an output area attaches it later) and resizes with the
  // notebook: stay at the bottom through that too.
  const resizes = new ResizeObserver(() => { if (pinned) toBottom(); });
  resizes.observe(scroller);
  resizes.observe(list);
  cleanups.push(() => resizes.disconnect());

  // ---- status line --------------------------------------------------------------------
  let countdownTimer = null;
  function drawStatus() {
    const state = model.get('state');
    stateText.textContent = state;
    panel.dataset.state = state;
    const room = model.get('room');
    const where = room && ((model.get('rooms') || []).length > 1 || room !== DEFAULT_ROOM)
      ? ` in ${roomName(room)}` : '';
    who.textContent = `as ${model.get('user')}${where} over ${model.get('transport')} to ${model.get('url')}`;
    const error = model.get('error');
    problem.textContent = error ? ` · ${error}` : '';
    clearInterval(countdownTimer);
    countdownTimer = null;
    countdown.textContent = '';
    if (state === 'reconnecting' && model.get('retry_at') > 0) {
      const tick = () => {
        const left = Math.max(0, Math.ceil(model.get('retry_at') - Date.now() / 1000));
        countdown.textContent = left > 0 ? ` · retrying in ${left} s` : ' · retrying now';
      };
      tick();
      countdownTimer = setInterval(tick, 250);
    }
  }
  cleanups.push(() => clearInterval(countdownTimer));

  // A room as the switcher says it: a DM room by the other person's name.
  function roomName(name) {
    const entry = (model.get('rooms') || []).find((r) => r.room === name);
    const label = entry && entry.label !== name ? entry.label : '';
    return label ? `@${label}` : name && name.startsWith('@') ? name : `#${name}`;
  }

  function drawRooms() {
    const rooms = model.get('rooms') || [];
    switcher.hidden = rooms.length < 2;
    roomSelect.replaceChildren(...rooms.map((r) => {
      const unread = r.unread > 0 ? ` (${r.unread} unread)` : '';
      const option = el('option', '', `${roomName(r.room)}${unread}`);
      option.value = r.room;
      return option;
    }));
    roomSelect.value = model.get('room');
  }
  roomSelect.addEventListener('change', () => model.send({ type: 'switch', room: roomSelect.value }));
  roomInput.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' || event.isComposing) return;
    event.preventDefault();
    event.stopPropagation();  // Shift+Enter would run the cell in JupyterLab
    const name = roomInput.value.trim();
    if (name) model.send({ type: 'switch', room: name });
    roomInput.value = '';
  });

  // Each name but ours opens the DM room with that person (a button that reads as the name).
  function drawPresence() {
    const me = model.get('user');
    const names = [...new Set(model.get('presence'))].sort((a, b) => a.localeCompare(b));
    const items = names.map((name) => {
      if (name === me) return el('span', 'chatlib-person chatlib-me', name);
      const item = el('button', 'chatlib-person chatlib-dm', name);
      item.type = 'button';
      item.title = `Write to ${name} directly (a room of the two of you)`;
      item.addEventListener('click', () => model.send({ type: 'dm', user: name }));
      return item;
    });
    if (model.get('state') !== 'connected' && !names.length) {  // unknown until back
      presence.replaceChildren(el('span', 'chatlib-label', 'Here: not known while disconnected'));
      return;
    }
    presence.replaceChildren(el('span', 'chatlib-label', `Here (${names.length}): `));
    items.forEach((item, i) => presence.append(...(i ? [', ', item] : [item])));
  }

  function drawTyping() {
    const typing = model.get('typing');
    typingLine.textContent = typing ? `${typing} is typing…` : '';
  }

  // ---- messages -----------------------------------------------------------------------
  // room:id -> <li>, in the history list (ids are per room: a switch replaces every row)
  const rows = new Map();
  const rowKey = (m) => `${m.room || ''}:${m.id}`;

  function messageRow(m, mine) {
    const li = el('li', mine ? 'chatlib-msg chatlib-mine' : 'chatlib-msg');
    const when = new Date(m.ts * 1000);
    const meta = el('div', 'chatlib-meta');
    const user = el('span', 'chatlib-user', m.user);
    const time = el('time', 'chatlib-time', formatTime(when));
    time.dateTime = when.toISOString();
    time.title = when.toLocaleString();
    meta.append(user, ' ', time);
    const text = el('div', 'chatlib-text', m.text);  // literal text, even if it looks like <b>
    text.dir = 'auto';  // Hebrew and Arabic right to left
    li.append(meta, text);
    li.dataset.day = when.toDateString();
    li.dataset.ts = String(m.ts);
    return li;
  }

  function mark(li, state, error) {
    let badge = li.querySelector('.chatlib-mark');
    if (!badge) {
      badge = el('span', 'chatlib-mark');
      li.querySelector('.chatlib-meta').append(' ', badge);
    }
    li.dataset.status = state;
    badge.textContent = { pending: 'sending…', sent: 'sent ✓', failed: `not sent: ${error}` }[state];
  }

  // Day separators: one before the first message of each day.
  function drawSeparators() {
    let lastDay = null;
    for (let node = list.firstElementChild; node; node = node.nextElementSibling) {
      if (node.classList.contains('chatlib-day') || node.classList.contains('chatlib-gap')) continue;
      const prev = node.previousElementSibling;
      const hasSeparator = prev && prev.classList.contains('chatlib-day');
      if (node.dataset.day !== lastDay) {
        if (!hasSeparator || prev.dataset.day !== node.dataset.day) {
          if (hasSeparator) prev.remove();
          const sep = el('li', 'chatlib-day', formatDay(new Date(Number(node.dataset.ts) * 1000)));
          sep.setAttribute('role', 'separator');
          sep.dataset.day = node.dataset.day;
          list.insertBefore(sep, node);
        }
      } else if (hasSeparator) {
        prev.remove();
      }
      lastDay = node.dataset.day;
    }
    const last = list.lastElementChild;
    if (last && last.classList.contains('chatlib-day')) last.remove();
  }

  function drawHistory() {
    const me = model.get('user');
    const history = model.get('history');
    const keys = new Set(history.map(rowKey));
    for (const [key, li] of rows) {  // trimmed from the top, the log was reset, another room
      if (!keys.has(key)) { li.remove(); rows.delete(key); }
    }
    let previous = null;
    let added = 0;
    for (const m of history) {
      let li = rows.get(rowKey(m));
      if (!li) {
        li = messageRow(m, m.user === me);
        li.dataset.id = String(m.id);
        if (m.user === me) mark(li, 'sent');
        list.insertBefore(li, previous ? previous.nextSibling : list.firstChild);
        rows.set(rowKey(m), li);
        if (m.user !== me) added += 1;
      }
      previous = li;
    }
    drawSeparators();
    drawGaps();
    return added;
  }

  // Where the server's retention cut messages out (the model's `gaps`: first ids kept):
  // a notice before the first message from there (and its day separator), or at the end
  // while that message has not arrived. Redrawn with the history, after the separators.
  function drawGaps() {
    for (const old of list.querySelectorAll(':scope > .chatlib-gap')) old.remove();
    for (const first of model.get('gaps') || []) {
      const note = el('li', 'chatlib-gap', 'Some older messages are no longer available');
      note.setAttribute('role', 'note');
      note.dataset.gap = String(first);
      let at = null;
      for (const li of rows.values()) {
        const id = Number(li.dataset.id);
        if (id >= first && (!at || id < Number(at.dataset.id))) at = li;
      }
      if (at && at.previousElementSibling?.classList.contains('chatlib-day')) {
        at = at.previousElementSibling;
      }
      list.insertBefore(note, at);
    }
  }

  // Own messages on their way: local ones (sent to the kernel, not yet in its outbox) and
  // the kernel's outbox (pending, sent, failed).
  const local = new Map();     // client_id -> {text, ts}
  const outRows = new Map();   // client_id -> <li>
  function drawOutbox() {
    const entries = [];
    const kernel = new Map(model.get('outbox').map((e) => [e.client_id, e]));
    const stored = new Set(model.get('history').map((m) => m.client_id).filter(Boolean));
    for (const [cid] of local) if (kernel.has(cid) || stored.has(cid)) local.delete(cid);
    for (const [cid, e] of local) entries.push({ ...e, client_id: cid, state: 'pending' });
    entries.push(...kernel.values());
    entries.sort((a, b) => a.ts - b.ts);
    const keep = new Set(entries.map((e) => e.client_id));
    for (const [cid, li] of outRows) if (!keep.has(cid)) { li.remove(); outRows.delete(cid); }
    for (const e of entries) {
      let li = outRows.get(e.client_id);
      if (!li) {
        li = messageRow({ user: model.get('user'), text: e.text, ts: e.ts }, true);
        li.dataset.clientId = e.client_id;
        outRows.set(e.client_id, li);
      }
      outboxList.append(li);  // (re)appending keeps them in order
      mark(li, e.state, e.error);
      li.querySelector('.chatlib-actions')?.remove();
      li.querySelector('.chatlib-expand')?.remove();
      if (e.state === 'failed') {
        const actions = el('div', 'chatlib-actions');
        const edit = el('button', 'chatlib-edit', 'Edit');
        edit.type = 'button';
        edit.addEventListener('click', () => {
          if (!input.value) input.value = e.text;
          drawCount();
          model.send({ type: 'discard', client_id: e.client_id });
          input.focus();
        });
        const drop = el('button', 'chatlib-discard', 'Discard');
        drop.type = 'button';
        drop.addEventListener('click', () => model.send({ type: 'discard', client_id: e.client_id }));
        actions.append(edit, drop);
        li.append(actions);
        // A refused long paste is cut to a few lines (CSS), expandable: it must not push its
        // reason (above the text) and the newest messages out of view.
        const text = li.querySelector('.chatlib-text');
        if (text.scrollHeight > text.clientHeight + 2) {
          const more = el('button', 'chatlib-expand', 'Show all');
          more.type = 'button';
          more.setAttribute('aria-expanded', 'false');
          more.addEventListener('click', () => {
            const open = li.classList.toggle('chatlib-expanded');
            more.textContent = open ? 'Show less' : 'Show all';
            more.setAttribute('aria-expanded', String(open));
          });
          text.after(more);
        }
      }
    }
    empty.hidden = model.get('history').length > 0 || entries.length > 0;
  }

  function drawMessages() {
    const wasPinned = pinned;
    const added = drawHistory();
    drawOutbox();
    if (wasPinned) toBottom();
    // New messages the reader cannot see (scrolled up, or above a tall own message at the
    // bottom): say so, never silently.
    if (added && (!wasPinned || newestHidden())) { unreadCount += added; showUnread(); }
  }

  // ---- sending ------------------------------------------------------------------------
  let lastTypingSent = 0;
  function submit() {
    const text = input.value;
    if (!text.trim()) return;
    const clientId = newClientId();
    local.set(clientId, { text, ts: Date.now() / 1000 });
    // The text and the "send" in one message: the kernel never sees one without the other.
    model.send({ type: 'send', text, client_id: clientId });
    input.value = '';
    drawCount();
    lastTypingSent = 0;  // the next keystroke starts a new typing burst
    pinned = true;
    drawMessages();
  }
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.isComposing) {
      event.preventDefault();
      event.stopPropagation();  // Shift+Enter would run the cell in JupyterLab
      submit();
    }
  });
  function drawCount() {
    const used = input.value.length;
    const max = model.get('max_text');
    count.hidden = !max || used < COUNT_FROM * max;
    if (count.hidden) return;
    count.textContent = used > max ? `${used} / ${max}: ${used - max} too many` : `${used} / ${max}`;
    count.classList.toggle('chatlib-over', used > max);
  }
  input.addEventListener('input', () => {
    drawCount();
    const now = Date.now();
    if (input.value && now - lastTypingSent >= TYPING_SEND_EVERY_MS) {
      lastTypingSent = now;
      model.send({ type: 'typing' });
    }
  });
  send.addEventListener('click', () => { submit(); input.focus(); });

  // ---- is a kernel there? -------------------------------------------------------------
  // A view drawn from a saved notebook has no kernel behind it; nor does a kernel that is
  // busy running a cell read what we send until the cell ends. Say so instead of
  // silently showing a chat that looks alive.
  const noAnswer = setTimeout(() => {
    kernelNote.textContent = 'The kernel does not answer: it is busy running a cell, or '
      + 'this is a saved copy of the chat (run the notebook\'s cells to join the chat).';
    kernelNote.hidden = false;
  }, KERNEL_ANSWER_MS);
  cleanups.push(() => clearTimeout(noAnswer));
  on('msg:custom', (content) => {
    if (content && content.type === 'hello') {
      clearTimeout(noAnswer);
      kernelNote.hidden = true;
    }
  });
  model.send({ type: 'hello' });

  // ---- wiring -------------------------------------------------------------------------
  on('change:state', () => { drawStatus(); drawPresence(); });
  on('change:error', drawStatus);
  on('change:retry_at', drawStatus);
  on('change:presence', drawPresence);
  on('change:typing', drawTyping);
  on('change:history', drawMessages);
  on('change:outbox', drawMessages);
  on('change:gaps', drawMessages);
  on('change:max_text', drawCount);
  on('change:rooms', () => { drawRooms(); drawStatus(); });
  on('change:room', () => {  // another room's rows follow: show them from the bottom
    pinned = true;
    unreadCount = 0;
    showUnread();
    drawRooms();
    drawStatus();
  });
  drawRooms();
  drawStatus();
  drawPresence();
  drawTyping();
  drawMessages();
  label.textContent = `Message to the chat, as ${model.get('user')}`;
  title.textContent = `Chat as ${model.get('user')}`;

  return () => cleanups.forEach((fn) => fn());
}

export default { render };
