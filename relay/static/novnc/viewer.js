// The vncgate viewer: noVNC's RFB on this target's WebSocket path, with the relay's close
// reasons shown in words, reconnects with back-off, clipboard, Ctrl-Alt-Del and full screen.
import RFB from './core/rfb.js';

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

function connect() {
  clearTimeout(retryTimer);
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
  window.vncgate = { rfb, socket: ws };
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
      setState('failed', `Disconnected: ${reason}`);
      $('reconnect').hidden = false;
      return;
    }
    const delay = Math.min(30, 2 ** attempt);
    attempt += 1;
    setState('disconnected', `Disconnected: ${reason}. Reconnecting in ${delay}s…`);
    $('reconnect').hidden = false;
    retryTimer = setTimeout(connect, delay * 1000);
  }, event.detail.clean ? 0 : 50);
}

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

// X keysyms (noVNC's RFB.sendKey takes a keysym and a KeyboardEvent.code).
const KEY = {
  ctrl: [0xffe3, 'ControlLeft'], alt: [0xffe9, 'AltLeft'], del: [0xffff, 'Delete'],
  super: [0xffeb, 'MetaLeft'], tab: [0xff09, 'Tab'],
};
for (let i = 1; i <= 12; i++) KEY[`f${i}`] = [0xffbe + i - 1, `F${i}`];

// Press the keys of a combination in order, release them in reverse.
function sendCombo(names) {
  if (!rfb || isViewOnly()) return;
  const keys = names.map((name) => KEY[name]);
  for (const [keysym, code] of keys) rfb.sendKey(keysym, code, true);
  for (const [keysym, code] of keys.reverse()) rfb.sendKey(keysym, code, false);
}

$('keys').addEventListener('change', (e) => {
  const value = e.target.value;
  e.target.value = '';
  if (value) sendCombo(value.split('-'));
  if (rfb) rfb.focus();
});

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
$('clipboard-toggle').addEventListener('click', () => {
  const panel = $('clipboard');
  panel.hidden = !panel.hidden;
  $('clipboard-toggle').setAttribute('aria-expanded', String(!panel.hidden));
});
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
