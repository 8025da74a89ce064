// The vncgate viewer: noVNC's RFB on this target's WebSocket path, with the relay's close
// reasons shown in words, reconnects with back-off, clipboard, typed text, on-screen keys,
// Ctrl-Alt-Del and full screen.
import RFB from './core/rfb.js';
import keysyms from './core/input/keysymdef.js';

const config = JSON.parse(document.body.dataset.config);
const params = new URLSearchParams(location.search);
let linkViewOnly = false;
const isViewOnly = () => config.viewOnly || linkViewOnly || params.get('view_only') === '1';

const $ = (id) => document.getElementById(id);
const statusEl = $('status');
const screen = $('screen');

// Close codes after which reconnecting cannot help: show the reason and wait for the user.
const FINAL_CODES = new Set([1002, 1003, 1008, 1009, 4401, 4403, 4404, 4408, 4409, 4424, 4507]);
const UNAUTHENTICATED = 4401;
const CONFLICT = 4409;
const IDLE_WARNING = 60;  // seconds before the relay's idle timeout
const MAX_ATTEMPTS = 8;

let rfb = null;
let attempt = 0;
let retryTimer = null;
let lastClose = null;
let takeover = params.get('takeover') === '1';
let lastInput = Date.now();
let idleTimer = null;
let countdown = null;
// What the automatic reconnects did, for the page and its tests: {code, reason, delay}.
const retries = [];

function setState(state, text) {
  document.body.dataset.state = state;
  statusEl.textContent = text;  // textContent: server-provided strings are never parsed as HTML
}

// The WebSocket path relative to this page, so any Ingress prefix in front is kept.
function socketUrl() {
  const url = new URL('websockify', location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = '';
  url.hash = '';
  if (takeover) url.searchParams.set('takeover', '1');
  return url.href;
}

function describeClose(event) {
  if (!event) return 'the connection failed';
  if (event.reason) return event.reason;
  switch (event.code) {
    case 1000: return 'the session ended';
    case 1001: return 'the relay is restarting';
    case 1006: return 'the connection to the relay was lost';
    default: return `connection closed (code ${event.code})`;
  }
}

function stopRetrying() {
  clearTimeout(retryTimer);
  clearInterval(countdown);
  retryTimer = countdown = null;
  $('stop-retry').hidden = true;
}

function connect() {
  stopRetrying();
  $('reconnect').hidden = true;
  setState('connecting', attempt ? `Reconnecting (attempt ${attempt + 1})…` : 'Connecting…');
  // Our own WebSocket, handed to noVNC, so the page sees the relay's close code and reason.
  const ws = new WebSocket(socketUrl(), ['binary']);
  lastClose = null;
  ws.addEventListener('close', (event) => { lastClose = event; });
  rfb = new RFB(screen, ws, { shared: true });
  rfb.viewOnly = isViewOnly();
  $('cad').hidden = isViewOnly();
  $('keys').disabled = isViewOnly();
  for (const id of ['osk-toggle', 'type-toggle']) $(id).hidden = isViewOnly();
  applyView();
  rfb.background = '#000';
  rfb.addEventListener('connect', () => {
    attempt = 0;
    takeover = false;  // taking over is a deliberate click, never an automatic retry
    $('takeover').hidden = true;
    setState('connected', isViewOnly() ? 'Connected (view only)' : 'Connected');
    rfb.focus();
    lastInput = Date.now();
    watchIdle();
    watchOthers();
  });
  rfb.addEventListener('disconnect', onDisconnect);
  rfb.addEventListener('desktopname', (e) => { $('desktop-name').textContent = e.detail.name; });
  rfb.addEventListener('clipboard', (e) => { $('clipboard-text').value = e.detail.text; });
  rfb.addEventListener('credentialsrequired', (e) => {
    $('username-row').hidden = !(e.detail.types || []).includes('username');
    $('credentials').hidden = false;
    $('password').focus();
  });
  rfb.addEventListener('securityfailure', (e) => {
    setState('failed', `Authentication failed: ${e.detail.reason || 'the VNC server refused'}`);
  });
  window.vncgate = { rfb, socket: ws, retries };
}

function onDisconnect(event) {
  // The socket's close event may land just after noVNC's disconnect event.
  setTimeout(() => {
    const reason = describeClose(lastClose);
    const code = lastClose ? lastClose.code : 1006;
    window.vncgate.lastClose = { code, reason };
    rfb = null;
    if (code === UNAUTHENTICATED && config.login) {
      // Token mode: the login page brings the viewer back here after signing in.
      setState('failed', `Disconnected: ${reason}. Opening the sign-in page…`);
      location.assign(config.login);
      return;
    }
    if (code === CONFLICT && reason.endsWith('you may take it over')) {
      setState('failed', `This console is ${reason}.`);
      $('takeover').hidden = false;
      return;
    }
    if (FINAL_CODES.has(code) || attempt >= MAX_ATTEMPTS) {
      const tried = attempt >= MAX_ATTEMPTS ? ` (gave up after ${attempt} attempts)` : '';
      setState('failed', `Disconnected: ${reason}${tried}`);
      $('reconnect').textContent = 'Reconnect';
      $('reconnect').hidden = false;
      return;
    }
    // Not final (the server went away, refused, or did not answer; the connection dropped):
    // try again by itself, waiting 1, 2, 4 … 30 s, and say so while it waits.
    const delay = Math.min(30, 2 ** attempt);
    attempt += 1;
    retries.push({ code, reason, delay });
    const due = Date.now() + delay * 1000;
    const tell = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setState('disconnected', `Disconnected: ${reason}. Reconnecting in ${left} s ` +
               `(attempt ${attempt} of ${MAX_ATTEMPTS})…`);
    };
    tell();
    $('reconnect').textContent = 'Reconnect now';
    $('reconnect').hidden = false;
    $('stop-retry').hidden = false;
    countdown = setInterval(tell, 1000);
    retryTimer = setTimeout(connect, delay * 1000);
  }, event.detail.clean ? 0 : 50);
}

// Who else is on this console (every viewer, this one included), while connected.
const OTHERS_SECONDS = 15;
let othersTimer = null;

async function showOthers() {
  if (!rfb) { clearInterval(othersTimer); $('others').hidden = true; return; }
  try {
    const response = await fetch('viewers', { credentials: 'same-origin' });
    if (!response.ok) return;
    const { viewers } = await response.json();
    const others = $('others');
    others.replaceChildren(`${viewers.length} on this console: ` +
      viewers.map((v) => `${v.user} (${v.mode})`).join(', '));  // text, never HTML
    others.dataset.count = String(viewers.length);
    others.hidden = viewers.length === 0;
  } catch {
    // shown again at the next turn
  }
}

function watchOthers() {
  clearInterval(othersTimer);
  showOthers();
  othersTimer = setInterval(showOthers, OTHERS_SECONDS * 1000);
}

$('stop-retry').addEventListener('click', () => {
  stopRetrying();
  attempt = 0;
  setState('failed', 'Disconnected; not reconnecting. Press Reconnect to try again.');
  $('reconnect').textContent = 'Reconnect';
});
$('reconnect').addEventListener('click', () => { attempt = 0; connect(); });
$('takeover').addEventListener('click', () => { attempt = 0; takeover = true; connect(); });

// The relay frees a console after the target's idle timeout without input; warn a minute
// before, from the same input the relay counts (keys, pointer, clipboard).
function watchIdle() {
  clearInterval(idleTimer);
  const limit = config.idleTimeout;
  if (!limit || isViewOnly()) return;
  idleTimer = setInterval(() => {
    if (!rfb) { clearInterval(idleTimer); return; }
    const left = Math.round(limit - (Date.now() - lastInput) / 1000);
    if (left <= IDLE_WARNING && left > 0) {
      setState('connected', `No input for a while: this console will be freed in ${left} s. ` +
               'Move the mouse or press a key to keep it.');
    } else if (document.body.dataset.state === 'connected' && left > IDLE_WARNING) {
      setState('connected', 'Connected');
    }
  }, 1000);
}
for (const kind of ['keydown', 'pointermove', 'pointerdown', 'wheel']) {
  screen.addEventListener(kind, () => { lastInput = Date.now(); }, { capture: true });
}
$('cad').addEventListener('click', () => { if (rfb) rfb.sendCtrlAltDel(); });

// X keysyms with the KeyboardEvent.code of the key (noVNC's RFB.sendKey takes both: servers
// with QEMU's extended key events get the scan code, others the keysym).
const KEY = {
  ctrl: [0xffe3, 'ControlLeft'], alt: [0xffe9, 'AltLeft'], shift: [0xffe1, 'ShiftLeft'],
  super: [0xffeb, 'MetaLeft'], tab: [0xff09, 'Tab'], escape: [0xff1b, 'Escape'],
  enter: [0xff0d, 'Enter'], backspace: [0xff08, 'Backspace'], del: [0xffff, 'Delete'],
  delete: [0xffff, 'Delete'], insert: [0xff63, 'Insert'], home: [0xff50, 'Home'],
  end: [0xff57, 'End'], pageup: [0xff55, 'PageUp'], pagedown: [0xff56, 'PageDown'],
  left: [0xff51, 'ArrowLeft'], up: [0xff52, 'ArrowUp'], right: [0xff53, 'ArrowRight'],
  down: [0xff54, 'ArrowDown'],
};
for (let i = 1; i <= 12; i++) KEY[`f${i}`] = [0xffbe + i - 1, `F${i}`];

// Press the keys of a combination in order, release them in reverse.
function sendCombo(names) {
  if (!rfb || isViewOnly()) return;
  const keys = names.map((name) => KEY[name]);
  for (const [keysym, code] of keys) rfb.sendKey(keysym, code, true);
  for (const [keysym, code] of keys.reverse()) rfb.sendKey(keysym, code, false);
  lastInput = Date.now();
}

$('keys').addEventListener('change', (e) => {
  const value = e.target.value;
  e.target.value = '';
  if (value) sendCombo(value.split('-'));
  if (rfb) rfb.focus();
});

function togglePanel(button, panel) {
  panel.hidden = !panel.hidden;
  button.setAttribute('aria-expanded', String(!panel.hidden));
}

// On-screen keys: buttons, so a tap works on a touch screen without its soft keyboard. The
// Ctrl/Alt/Shift buttons latch and apply to the next key, then let go.
const osk = $('osk');
$('osk-toggle').addEventListener('click', () => togglePanel($('osk-toggle'), osk));
osk.addEventListener('click', (e) => {
  const button = e.target.closest('button');
  if (!button) return;
  if (button.dataset.mod) {
    const on = button.getAttribute('aria-pressed') !== 'true';
    button.setAttribute('aria-pressed', String(on));
    return;
  }
  const latched = [...osk.querySelectorAll('button.mod[aria-pressed="true"]')];
  const names = button.dataset.combo ? button.dataset.combo.split('-')
    : [...latched.map((b) => b.dataset.mod), button.dataset.key];
  for (const mod of latched) mod.setAttribute('aria-pressed', 'false');
  sendCombo(names);
  if (rfb) rfb.focus({ preventScroll: true });  // the physical keyboard goes on working
});

// "Type text": a text as key presses, for screens that have no clipboard. Each character
// goes as its keysym (Latin-1 as itself, others from noVNC's table or as a Unicode keysym), so
// the server's keymap, not this browser's keyboard layout, decides the key. A text with a
// character that has no keysym (control characters, lone surrogates, non-characters) is
// refused whole, naming those characters, before anything is sent.
const TYPED_KEYS = { '\n': KEY.enter, '\t': KEY.tab };

function keysymOf(char) {
  if (TYPED_KEYS[char]) return TYPED_KEYS[char];
  const u = char.codePointAt(0);
  if (u < 0x20 || (u >= 0x7f && u <= 0x9f)) return null;  // control characters
  if (u >= 0xd800 && u <= 0xdfff) return null;  // half of a broken surrogate pair
  if ((u >= 0xfdd0 && u <= 0xfdef) || (u & 0xfffe) === 0xfffe) return null;  // non-characters
  return [keysyms.lookup(u), null];
}

function codePoint(char) {
  return `U+${char.codePointAt(0).toString(16).toUpperCase().padStart(4, '0')}`;
}

// The keys for `text`, or the names of the characters that have none.
function planTyping(text) {
  const keys = [];
  const missing = new Map();
  for (const char of text.replace(/\r\n?/g, '\n')) {
    const key = keysymOf(char);
    if (key) keys.push(key);
    else if (!missing.has(char)) missing.set(char, codePoint(char));
  }
  return { keys, missing: [...missing.values()] };
}

const MAX_TYPED = 10000;
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });
let typing = null;

function typeStatus(text, state) {
  $('type-status').textContent = text;
  $('type-status').dataset.state = state;
}

async function typeText() {
  if (typing) return;
  if (!rfb || isViewOnly()) {
    typeStatus(isViewOnly() ? 'This console is view only: nothing can be typed.'
      : 'Not connected: nothing was typed.', 'refused');
    return;
  }
  const text = $('type-text').value;
  const delay = Number($('type-delay').value);
  if (!Number.isFinite(delay) || delay < 0 || delay > 2000) {
    typeStatus('The delay per character must be between 0 and 2000 ms.', 'refused');
    return;
  }
  const { keys, missing } = planTyping(text);
  if (missing.length) {
    typeStatus(`Nothing was typed: ${missing.join(', ')} ${missing.length > 1 ? 'have' : 'has'} ` +
               'no key to send (control or invalid characters); remove them and try again.',
               'refused');
    return;
  }
  if (!keys.length) {
    typeStatus('Nothing to type.', 'refused');
    return;
  }
  if (keys.length > MAX_TYPED) {
    typeStatus(`Nothing was typed: at most ${MAX_TYPED} characters at a time ` +
               `(this text has ${keys.length}).`, 'refused');
    return;
  }
  const job = typing = { cancelled: false };
  $('type-send').disabled = true;
  $('type-stop').hidden = false;
  const session = rfb;
  let sent = 0;
  try {
    for (const [keysym, code] of keys) {
      if (job.cancelled || rfb !== session) break;
      session.sendKey(keysym, code, true);
      session.sendKey(keysym, code, false);
      sent += 1;
      lastInput = Date.now();
      typeStatus(`Typing… ${sent} of ${keys.length}`, 'typing');
      if (delay && sent < keys.length) await sleep(delay);
    }
  } finally {
    typing = null;
    $('type-send').disabled = false;
    $('type-stop').hidden = true;
  }
  if (sent === keys.length) typeStatus(`Typed ${sent} characters.`, 'done');
  else if (job.cancelled) typeStatus(`Stopped after ${sent} of ${keys.length} characters.`, 'stopped');
  else typeStatus(`The connection ended after ${sent} of ${keys.length} characters.`, 'stopped');
  if (rfb) rfb.focus();
}

$('type-toggle').addEventListener('click', () => {
  togglePanel($('type-toggle'), $('typing'));
  if (!$('typing').hidden) $('type-text').focus();
});
$('type-send').addEventListener('click', typeText);
$('type-stop').addEventListener('click', () => { if (typing) typing.cancelled = true; });

// Scale to fit (the default), 1:1 with scroll bars, or ask the server to take the window's size.
function applyView() {
  const mode = $('scale').value;
  document.body.dataset.view = mode;
  if (!rfb) return;
  rfb.scaleViewport = mode === 'fit';
  rfb.clipViewport = false;
  rfb.resizeSession = mode === 'remote';
  rfb.qualityLevel = Number($('quality').value);
  rfb.compressionLevel = Number($('compression').value);
}
for (const id of ['scale', 'quality', 'compression']) {
  $(id).addEventListener('change', () => { applyView(); if (rfb) rfb.focus(); });
}
$('fullscreen').addEventListener('click', () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else document.documentElement.requestFullscreen();
});
$('clipboard-toggle').addEventListener('click', () => togglePanel($('clipboard-toggle'), $('clipboard')));
$('clipboard-send').addEventListener('click', () => {
  if (rfb && !isViewOnly()) rfb.clipboardPasteFrom($('clipboard-text').value);
});
$('credentials').addEventListener('submit', (e) => {
  e.preventDefault();
  if (rfb) rfb.sendCredentials({ username: $('username').value, password: $('password').value });
  $('password').value = '';
  $('credentials').hidden = true;
});

// A share link carries its token in the URL fragment, which never reaches a server log.
// Exchange it for a cookie scoped to this viewer, drop it from the address bar, then connect.
async function start() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get('link');
  if (token) {
    history.replaceState(null, '', location.pathname + location.search);
    setState('connecting', 'Checking the share link…');
    let reply;
    try {
      const response = await fetch('link', {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json', 'X-Requested-With': 'vncgate' },
        body: JSON.stringify({ token }),
      });
      reply = await response.json();
      if (!response.ok) {
        setState('failed', `This link cannot be used: ${reply.error}`);
        return;
      }
    } catch (err) {
      setState('failed', `This link cannot be used: ${err}`);
      return;
    }
    if (reply.viewOnly) linkViewOnly = true;
  }
  connect();
}

start();
