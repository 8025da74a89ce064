// The vncgate player: a recording (docs/RECORDING.md, formats 1 and 2) replayed by noVNC itself.
//
// The page fetches the recording file (gzip, as the relay wrote it), decompresses it with the
// browser's DecompressionStream and parses its records. noVNC's RFB gets a channel object in
// place of a WebSocket (FileChannel): it answers noVNC's handshake (RFB 3.8, security None) with
// the recording's ServerInit and then hands it the recorded server bytes, in time with a clock.
// What noVNC sends (update requests, encodings) goes nowhere: no VNC server takes part.
//
// Seeking starts a fresh RFB at the last keyframe before the wanted time (a full-screen update
// the relay marked, with the screen size then) with a ServerInit of that size, and feeds the
// records from there; it never replays from the start when a keyframe is nearer. Forward seeks
// with no keyframe in between just feed on. window.vncgatePlayback shows what was fed.
// The relay marks keyframes only while the stream is stateless: once Tight or ZRLE fed a zlib
// stream no update decodes on its own, so a seek past that point with no keyframe after it
// replays from the start (or the last keyframe before it), every chunk at once, without the
// clock: noVNC decodes as fast as it can (docs/RECORDING.md, "Seeking").
//
// A recording whose viewer asked for another pixel format than noVNC's (format 2 says which:
// `P` records; a native viewer through kubectl vnc proxy) is rewritten into noVNC's once, at
// load (pixelformat.js): otherwise noVNC would read its pixels with the colours swapped.
import RFB from './core/rfb.js';
import { convertStream, describe, novncFormat, samePixels } from './pixelformat.js';

const config = JSON.parse(document.body.dataset.config);
const $ = (id) => document.getElementById(id);
const statusEl = $('status');
const screen = $('screen');
const playButton = $('play');
const seekInput = $('seek');
const timeEl = $('time');
const speedSelect = $('speed');

const MAGIC = 'VNCGREC';
const FORMAT_VERSIONS = [1, 2];
const TICK_MS = 40;

// The recording, parsed: server chunks with their times and places in the server stream.
const rec = {
  header: {}, end: null, server: [], keyframes: [], formats: [], duration: 0, initLength: 0,
  cut: false,
};
// The player: which noVNC instance, how far it has been fed, the clock.
const player = {
  rfb: null, box: null, channel: null, next: 0, position: 0, playing: false, speed: 1,
  wallBase: 0, positionBase: 0, timer: null, generation: 0,
};
// What tests and curious people can read: records fed since the last (re)start and where from.
const stats = window.vncgatePlayback = {
  ready: false, fed: 0, fedBytes: 0, startedFrom: '', keyframe: -1, keyframes: 0, records: 0,
  restarts: 0, position: 0, duration: 0, pixelFormat: '', converted: false, conversion: '',
  seek: (ms) => seek(ms),
};

function setState(state, text) {
  document.body.dataset.state = state;
  statusEl.textContent = text;
}

function clock(ms) {
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const mm = String(Math.floor(s / 60) % 60);
  const ss = String(s % 60).padStart(2, '0');
  return h ? `${h}:${mm.padStart(2, '0')}:${ss}` : `${mm}:${ss}`;
}

function showTime() {
  timeEl.textContent = `${clock(player.position)} / ${clock(rec.duration)}`;
  if (document.activeElement !== seekInput) seekInput.value = String(Math.round(player.position));
  stats.position = player.position;
}

// --- the file ---------------------------------------------------------------------------------

async function load() {
  const response = await fetch(config.file, { credentials: 'same-origin', cache: 'no-store' });
  if (!response.ok) {
    throw new Error(`the relay answered ${response.status}: ${(await response.text()).trim()}`);
  }
  const reader = response.body.pipeThrough(new DecompressionStream('gzip')).getReader();
  const chunks = [];
  let size = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      size += value.length;
    }
  } catch (e) {
    // A file still being written, or cut by a crash: it ends without a gzip trailer. The
    // writer flushes whole records, so what came is readable.
    if (!size) throw new Error(`not a vncgate recording (${e.message})`);
    rec.cut = true;
  }
  const data = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) { data.set(chunk, at); at += chunk.length; }
  parse(data);
}

function parse(data) {
  const magic = new TextDecoder().decode(data.subarray(0, 7));
  if (magic !== MAGIC) throw new Error('not a vncgate recording');
  if (!FORMAT_VERSIONS.includes(data[7])) {
    throw new Error(`recording format ${data[7]}; this player reads formats ${FORMAT_VERSIONS.join(', ')}`);
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const text = new TextDecoder();
  let at = 8;
  let offset = 0;
  let last = 0;
  while (at + 9 <= data.length) {
    const kind = String.fromCharCode(data[at]);
    const t = view.getUint32(at + 1);
    const length = view.getUint32(at + 5);
    if (at + 9 + length > data.length) { rec.cut = true; break; }
    const payload = data.subarray(at + 9, at + 9 + length);
    at += 9 + length;
    last = Math.max(last, t);
    if (kind === 'S') {
      rec.server.push({ t, offset, bytes: payload });
      offset += length;
    } else if (kind === 'K') {
      const k = JSON.parse(text.decode(payload));
      rec.keyframes.push({ t, offset: k.offset, width: k.width, height: k.height });
    } else if (kind === 'H') {
      rec.header = JSON.parse(text.decode(payload));
    } else if (kind === 'E') {
      rec.end = JSON.parse(text.decode(payload));
    } else if (kind === 'P') {
      const format = JSON.parse(text.decode(payload));
      rec.formats.push({ offset: format.offset, format });
    }
    // 'C' (the viewer's input) is not replayed: the screen shows its effect.
  }
  if (rec.server.length === 0) throw new Error('the recording holds no screen data');
  const init = serverBytes(0, 24);
  if (init.length < 24) throw new Error('the recording ends inside its ServerInit');
  const nameLength = new DataView(init.buffer, init.byteOffset, 24).getUint32(20);
  rec.initLength = 24 + nameLength;
  toNoVncFormat(offset);
  rec.duration = Math.max(last, rec.end && Number.isInteger(rec.end.durationMs) ? rec.end.durationMs : 0);
  stats.keyframes = rec.keyframes.length;
  stats.records = rec.server.length;
  stats.duration = rec.duration;
}

// Rewrite the pixels of a recording made in another format than the one noVNC will ask for
// (noVNC asks for 8 bits a pixel from a server named "Intel(r) AMT KVM", else for 24 in 32).
function toNoVncFormat(total) {
  if (rec.formats.length) stats.pixelFormat = describe(rec.formats[rec.formats.length - 1].format);
  const name = new TextDecoder().decode(serverBytes(24, rec.initLength - 24));
  const target = novncFormat(name === 'Intel(r) AMT KVM' ? 8 : 24);
  if (rec.formats.every(({ format }) => samePixels(format, target))) return;
  const converted = convertStream(serverBytes(0, total), rec.initLength, rec.formats, target);
  const ends = rec.server.map((chunk, k) => (k + 1 < rec.server.length ? rec.server[k + 1].offset : total));
  rec.server = rec.server.map((chunk, k) => {
    const from = converted.map(chunk.offset);
    const to = k + 1 < rec.server.length ? converted.map(ends[k]) : converted.stream.length;
    return { t: chunk.t, offset: from, bytes: converted.stream.subarray(from, Math.max(from, to)) };
  });
  rec.keyframes = rec.keyframes.map((k) => ({ ...k, offset: converted.map(k.offset) }));
  stats.converted = true;
  stats.conversion = converted.stoppedAt >= 0
    ? `colours from byte ${converted.stoppedAt} on are not converted: ${converted.why}` : '';
}

// The server chunk holding byte `offset` of the server stream (binary search).
function chunkAt(offset) {
  let lo = 0;
  let hi = rec.server.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (rec.server[mid].offset <= offset) lo = mid; else hi = mid - 1;
  }
  return lo;
}

function serverBytes(start, length) {
  const out = new Uint8Array(length);
  let filled = 0;
  for (let i = chunkAt(start); i < rec.server.length && filled < length; i++) {
    const chunk = rec.server[i];
    const from = Math.max(0, start + filled - chunk.offset);
    const part = chunk.bytes.subarray(from, from + length - filled);
    out.set(part, filled);
    filled += part.length;
  }
  return out.subarray(0, filled);
}

// --- noVNC on a file ---------------------------------------------------------------------------

// The parts of a WebSocket noVNC's Websock uses (core/websock.js: rawChannelProps).
class FileChannel {
  constructor(serverInit) {
    this.binaryType = 'arraybuffer';
    this.protocol = '';
    this.readyState = 'open';
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    // The server's side of the handshake, one answer per message from noVNC: its version
    // (RFB 003.008), then the choice of security type 1 (None), then ClientInit.
    this._answers = [Uint8Array.of(1, 1), Uint8Array.of(0, 0, 0, 0), serverInit];
  }

  send() {
    const answer = this._answers.shift();
    if (answer) queueMicrotask(() => this.deliver(answer));
  }

  close() {
    if (this.readyState === 'closed') return;
    this.readyState = 'closed';
    queueMicrotask(() => this.onclose && this.onclose({ code: 1000, reason: '', wasClean: true }));
  }

  deliver(bytes) {
    if (this.readyState !== 'open' || !this.onmessage) return;
    this.onmessage({ data: bytes.slice().buffer });
  }
}

function stopRfb() {
  if (player.rfb) {
    const box = player.box;
    try { player.rfb.disconnect(); } catch (e) { /* already gone */ }
    // noVNC takes its canvas out when the channel's close arrives; the box goes now.
    box.remove();
  }
  player.rfb = null;
  player.box = null;
  player.channel = null;
}

// A fresh noVNC at keyframe `k` (-1: the start of the recording), fed up to the keyframe.
async function restart(k) {
  stopRfb();
  player.generation += 1;
  const generation = player.generation;
  const init = serverBytes(0, rec.initLength);
  let start = rec.initLength;
  if (k >= 0) {
    const frame = rec.keyframes[k];
    const view = new DataView(init.buffer, init.byteOffset, 4);
    view.setUint16(0, frame.width);
    view.setUint16(2, frame.height);
    start = frame.offset;
  }
  const box = document.createElement('div');
  box.className = 'frame';
  screen.appendChild(box);
  const channel = new FileChannel(init);
  player.box = box;
  player.channel = channel;
  stats.fed = 0;
  stats.fedBytes = 0;
  stats.startedFrom = k >= 0 ? 'keyframe' : 'start';
  stats.keyframe = k;
  stats.restarts += 1;
  await new Promise((resolve, reject) => {
    const rfb = new RFB(box, channel, { shared: true });
    rfb.viewOnly = true;
    rfb.scaleViewport = true;
    rfb.focusOnClick = false;
    player.rfb = rfb;
    rfb.addEventListener('connect', () => resolve());
    rfb.addEventListener('disconnect', (e) => {
      if (generation === player.generation && !e.detail.clean) {
        reject(new Error('noVNC could not read the recording'));
      }
    });
    channel.deliver(new TextEncoder().encode('RFB 003.008\n'));
  });
  // Out of noVNC's handler now: the rest of the keyframe's chunk from its offset, then whole
  // chunks as the clock passes them.
  const i = chunkAt(start);
  const chunk = rec.server[i];
  const rest = chunk.bytes.subarray(Math.max(0, start - chunk.offset));
  if (rest.length) feedBytes(rest);
  player.next = i + 1;
}

function feedBytes(bytes) {
  if (!bytes.length) return;  // a converted chunk whose message is in the one before
  player.channel.deliver(bytes);
  stats.fed += 1;
  stats.fedBytes += bytes.length;
}

// Hand noVNC every chunk recorded up to `ms`.
function feedUntil(ms) {
  while (player.next < rec.server.length && rec.server[player.next].t <= ms) {
    feedBytes(rec.server[player.next].bytes);
    player.next += 1;
  }
}

function keyframeBefore(ms) {
  let found = -1;
  for (let k = 0; k < rec.keyframes.length && rec.keyframes[k].t <= ms; k++) {
    if (rec.keyframes[k].offset >= rec.initLength) found = k;
  }
  return found;
}

let seeking = Promise.resolve();

function seek(ms) {
  const target = Math.max(0, Math.min(rec.duration, ms));
  seeking = seeking.then(() => seekNow(target));
  return seeking;
}

async function seekNow(target) {
  const k = keyframeBefore(target);
  const fedTime = player.next > 0 ? rec.server[player.next - 1].t : -1;
  // Feed on when going forward with no keyframe between here and there; else start afresh.
  const forward = player.rfb && target >= player.position &&
      (k < 0 || rec.keyframes[k].t <= fedTime);
  if (!forward) await restart(k);
  feedUntil(target);
  player.position = target;
  player.positionBase = target;
  player.wallBase = performance.now();
  showTime();
  if (!player.playing) setState('paused', target >= rec.duration ? 'Ended' : 'Paused');
}

function tick() {
  if (!player.playing) return;
  const now = performance.now();
  player.position = Math.min(rec.duration,
    player.positionBase + (now - player.wallBase) * player.speed);
  feedUntil(player.position);
  showTime();
  if (player.position >= rec.duration) pause('Ended');
}

function play() {
  if (player.position >= rec.duration) {
    seek(0).then(play);
    return;
  }
  player.playing = true;
  player.positionBase = player.position;
  player.wallBase = performance.now();
  player.timer = setInterval(tick, TICK_MS);
  playButton.textContent = 'Pause';
  setState('playing', `Playing ×${player.speed}`);
}

function pause(text = 'Paused') {
  player.playing = false;
  clearInterval(player.timer);
  player.timer = null;
  playButton.textContent = 'Play';
  setState('paused', text);
}

playButton.addEventListener('click', () => (player.playing ? pause() : play()));
seekInput.addEventListener('input', () => {
  timeEl.textContent = `${clock(Number(seekInput.value))} / ${clock(rec.duration)}`;
});
seekInput.addEventListener('change', () => {
  const wasPlaying = player.playing;
  if (wasPlaying) pause();
  seek(Number(seekInput.value)).then(() => { if (wasPlaying) play(); });
});
speedSelect.addEventListener('change', () => {
  player.positionBase = player.position;
  player.wallBase = performance.now();
  player.speed = Number(speedSelect.value);
  if (player.playing) setState('playing', `Playing ×${player.speed}`);
});

(async () => {
  try {
    await load();
    seekInput.max = String(rec.duration);
    seekInput.disabled = false;
    playButton.disabled = false;
    await seek(0);
    stats.ready = true;
    const state = rec.end ? (rec.end.complete ? '' : ' (incomplete)') : (rec.cut ? ' (cut short or still recording)' : '');
    setState('paused', `Ready${state}`);
  } catch (e) {
    setState('failed', `Cannot play this recording: ${e.message}`);
  }
})();
