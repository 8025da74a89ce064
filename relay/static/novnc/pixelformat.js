// Recorded pixels into the pixel format noVNC decodes (docs/RECORDING.md, "Pixel formats").
//
// A recording holds the server's bytes as they were encoded for the viewer that watched: in
// the pixel format that viewer asked for with SetPixelFormat (format 2 records it: `P`). noVNC
// asks every server for its own format and its decoders read pixels only in that one, so the
// player rewrites every pixel of the stream from the recorded format into noVNC's, following
// the server's messages the way the relay's recorder does (relay/recording/capture.py: the
// encodings a recorded session may negotiate, each pixel-carrying field). A recording in
// noVNC's own format (a browser watched, or format 1) is played as it is.

// What noVNC asks for (core/rfb.js, RFB.messages.pixelFormat): depth 24 in 32 bits, or 8 for
// a server that is known to need it.
export function novncFormat(depth) {
  const bits = Math.floor(depth / 3);
  return {
    bitsPerPixel: depth > 16 ? 32 : depth > 8 ? 16 : 8, depth, bigEndian: false,
    trueColour: true, redMax: (1 << bits) - 1, greenMax: (1 << bits) - 1,
    blueMax: (1 << bits) - 1, redShift: 0, greenShift: bits, blueShift: 2 * bits,
  };
}

// The PIXEL_FORMAT of a ServerInit (RFC 6143 7.4), as `P` records write it.
export function parsePixelFormat(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 16);
  return {
    bitsPerPixel: bytes[0], depth: bytes[1], bigEndian: bytes[2] !== 0, trueColour: bytes[3] !== 0,
    redMax: view.getUint16(4), greenMax: view.getUint16(6), blueMax: view.getUint16(8),
    redShift: bytes[10], greenShift: bytes[11], blueShift: bytes[12],
  };
}

const FIELDS = ['bitsPerPixel', 'bigEndian', 'trueColour', 'redMax', 'greenMax', 'blueMax',
  'redShift', 'greenShift', 'blueShift'];

export function samePixels(a, b) {
  return FIELDS.every((f) => a[f] === b[f]);
}

export function describe(f) {
  return `${f.bitsPerPixel} bits, ${f.bigEndian ? 'big' : 'little'}-endian, red ${f.redMax}<<${f.redShift}, ` +
    `green ${f.greenMax}<<${f.greenShift}, blue ${f.blueMax}<<${f.blueShift}`;
}

function check(f, what) {
  if (![8, 16, 32].includes(f.bitsPerPixel)) {
    throw new Error(`${what}: ${f.bitsPerPixel} bits per pixel`);
  }
  if (!f.trueColour) throw new Error(`${what}: a colour map (not true colour)`);
  for (const max of [f.redMax, f.greenMax, f.blueMax]) {
    if (max === 0 || (max & (max + 1)) !== 0) throw new Error(`${what}: a channel maximum of ${max}`);
  }
}

// A function that converts `count` pixels at src[i...] (format `from`) into dst[o...] (format
// `to`); values are scaled from one channel maximum to the other.
function pixelCopier(from, to) {
  check(from, 'the recorded pixel format');
  check(to, 'the player\'s pixel format');
  const inBytes = from.bitsPerPixel / 8;
  const outBytes = to.bitsPerPixel / 8;
  const table = (max, outMax) => {
    const t = new Uint32Array(max + 1);
    for (let v = 0; v <= max; v++) t[v] = Math.round((v * outMax) / max);
    return t;
  };
  const red = table(from.redMax, to.redMax);
  const green = table(from.greenMax, to.greenMax);
  const blue = table(from.blueMax, to.blueMax);
  const { redShift, greenShift, blueShift, redMax, greenMax, blueMax, bigEndian } = from;
  return (src, i, count, dst, o) => {
    for (let k = 0; k < count; k++, i += inBytes, o += outBytes) {
      let v;
      if (inBytes === 4) {
        v = bigEndian ? ((src[i] << 24) | (src[i + 1] << 16) | (src[i + 2] << 8) | src[i + 3])
          : (src[i] | (src[i + 1] << 8) | (src[i + 2] << 16) | (src[i + 3] << 24));
        v >>>= 0;
      } else if (inBytes === 2) {
        v = bigEndian ? (src[i] << 8) | src[i + 1] : src[i] | (src[i + 1] << 8);
      } else {
        v = src[i];
      }
      const out = ((red[(v >>> redShift) & redMax] << to.redShift) |
        (green[(v >>> greenShift) & greenMax] << to.greenShift) |
        (blue[(v >>> blueShift) & blueMax] << to.blueShift)) >>> 0;
      for (let b = 0; b < outBytes; b++) dst[o + b] = (out >>> (8 * b)) & 0xff; // little-endian
    }
  };
}

class Truncated extends Error {}
class Unfollowable extends Error {}

// Encodings a recorded session may carry (relay/recording/capture.py, ALLOWED_ENCODINGS).
const RAW = 0, COPYRECT = 1, RRE = 2, HEXTILE = 5;
const DESKTOP_SIZE = -223, LAST_RECT = -224, CURSOR = -239;
const EXTENDED_DESKTOP_SIZE = -308, DESKTOP_NAME = -307, QEMU_EXTENDED_KEY = -258;

// The server stream `stream` (ServerInit first, `initLength` bytes of it) rewritten from the
// recorded formats into `to`. `formats`: [{offset, format}] in stream order; each applies to the
// messages that start at or after its offset (before the first: the server's own, from
// ServerInit). Returns the new stream and `map(offset)`: where a message start of the old stream
// is in the new one (any other offset: the next message start's place). Stops converting at
// what it cannot follow (`stoppedAt`), passing the rest as it is.
export function convertStream(stream, initLength, formats, to) {
  let out = new Uint8Array(stream.length + 1024);
  let o = 0;
  const grow = (n) => {
    if (o + n <= out.length) return;
    const bigger = new Uint8Array(Math.max(out.length * 2, o + n));
    bigger.set(out.subarray(0, o));
    out = bigger;
  };
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  let i = 0;
  const need = (n) => { if (i + n > stream.length) throw new Truncated(); };
  const copy = (n) => {
    need(n);
    grow(n);
    out.set(stream.subarray(i, i + n), o);
    i += n;
    o += n;
  };
  let format = parsePixelFormat(stream.subarray(4, 20));
  let copier = null;
  let inBytes = 0;
  const outBytes = to.bitsPerPixel / 8;
  const use = (f) => {
    format = f;
    copier = samePixels(f, to) ? null : pixelCopier(f, to);
    inBytes = f.bitsPerPixel / 8;
  };
  const pixels = (count) => {
    if (copier === null) { copy(count * inBytes); return; }
    need(count * inBytes);
    grow(count * outBytes);
    copier(stream, i, count, out, o);
    i += count * inBytes;
    o += count * outBytes;
  };
  const u8 = (at) => { need(at - i + 1); return stream[at]; };
  const u16 = (at) => { need(at - i + 2); return view.getUint16(at); };
  const u32 = (at) => { need(at - i + 4); return view.getUint32(at); };
  const i32 = (at) => { need(at - i + 4); return view.getInt32(at); };

  const update = () => {
    const count = u16(i + 2);
    copy(4);
    for (let r = 0; count === 0xffff || r < count; r++) {
      const w = u16(i + 4), h = u16(i + 6), encoding = i32(i + 8);
      copy(12);
      if (encoding === LAST_RECT) break;
      if (encoding === RAW) {
        pixels(w * h);
      } else if (encoding === COPYRECT) {
        copy(4);
      } else if (encoding === RRE) {
        const subrects = u32(i);
        copy(4);
        pixels(1);
        for (let s = 0; s < subrects; s++) { pixels(1); copy(8); }
      } else if (encoding === HEXTILE) {
        hextile(w, h);
      } else if (encoding === CURSOR) {
        pixels(w * h);
        copy(((w + 7) >> 3) * h);
      } else if (encoding === EXTENDED_DESKTOP_SIZE) {
        copy(4 + 16 * u8(i));
      } else if (encoding === DESKTOP_NAME) {
        copy(4 + u32(i));
      } else if (encoding !== DESKTOP_SIZE && encoding !== QEMU_EXTENDED_KEY) {
        throw new Unfollowable(`encoding ${encoding}`);
      }
    }
  };
  const hextile = (w, h) => {
    for (let ty = 0; ty < h; ty += 16) {
      const th = Math.min(16, h - ty);
      for (let tx = 0; tx < w; tx += 16) {
        const tw = Math.min(16, w - tx);
        const sub = u8(i);
        copy(1);
        if (sub & 1) { pixels(tw * th); continue; }
        if (sub & 2) pixels(1);
        if (sub & 4) pixels(1);
        if (sub & 8) {
          const n = u8(i);
          copy(1);
          if (sub & 16) { for (let s = 0; s < n; s++) { pixels(1); copy(2); } } else copy(2 * n);
        }
      }
    }
  };

  const starts = [];  // [old, new] of every message start
  let stoppedAt = -1;
  let why = '';
  copy(initLength);
  use(format);
  let next = 0;
  while (i < stream.length) {
    while (next < formats.length && formats[next].offset <= i) use(formats[next++].format);
    const start = i, startOut = o;
    starts.push([start, startOut]);
    try {
      const kind = u8(i);
      if (kind === 0) update();
      else if (kind === 1) copy(6 + 6 * u16(i + 4));  // SetColourMapEntries
      else if (kind === 2) copy(1);  // Bell
      else if (kind === 3) copy(8 + Math.abs(i32(i + 4)));  // ServerCutText
      else if (kind === 250) copy(4);  // XVP
      else throw new Unfollowable(`server message type ${kind}`);
    } catch (e) {
      if (!(e instanceof Truncated || e instanceof Unfollowable)) throw e;
      // A file cut inside a message, or a message the player cannot measure: the rest as it is.
      i = start;
      o = startOut;
      stoppedAt = start;
      why = e instanceof Truncated ? 'the recording ends inside a message' : e.message;
      starts.pop();
      grow(stream.length - i);
      out.set(stream.subarray(i), o);
      o += stream.length - i;
      i = stream.length;
    }
  }
  const tail = stoppedAt >= 0 ? o - (stream.length - stoppedAt) : o;  // where stoppedAt went
  const map = (offset) => {
    if (offset <= initLength) return offset;
    if (stoppedAt >= 0 && offset >= stoppedAt) return tail + (offset - stoppedAt);
    let lo = 0, hi = starts.length;  // the first start at or after `offset`
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (starts[mid][0] < offset) lo = mid + 1; else hi = mid;
    }
    return lo < starts.length ? starts[lo][1] : tail;
  };
  return { stream: out.subarray(0, o), map, stoppedAt, why };
}
