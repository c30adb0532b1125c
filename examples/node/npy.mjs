// NumPy .npy files in JavaScript, for Node.js and the browser alike: it works on bytes (ArrayBuffer or
// Uint8Array) and imports nothing, so the web page imports this very file.
//
// Reads format versions 1.0 and 2.0, writes 1.0; little-endian, C order; dtypes <f4, <f2, <i4, <i8.
// An array is {dtype, shape, data} with onnxruntime-js's tensor type names, so that
// `new ort.Tensor(a.dtype, a.data, a.shape)` takes it as it is and `fromTensor(t)` gives one back:
//   float32 <f4 Float32Array | float16 <f2 Uint16Array (raw IEEE half bits; a Float16Array is written
//   as it is) | int32 <i4 Int32Array | int64 <i8 BigInt64Array.

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // "\x93NUMPY"

const DTYPES = {
  "<f4": { dtype: "float32", size: 4, make: (buffer) => new Float32Array(buffer) },
  "<f2": { dtype: "float16", size: 2, make: (buffer) => new Uint16Array(buffer) },
  "<i4": { dtype: "int32", size: 4, make: (buffer) => new Int32Array(buffer) },
  "<i8": { dtype: "int64", size: 8, make: (buffer) => new BigInt64Array(buffer) },
};
const DESCR_OF = Object.fromEntries(Object.entries(DTYPES).map(([descr, t]) => [t.dtype, descr]));

export const SUPPORTED = Object.keys(DTYPES).join(" ");

// a plain Uint8Array view (a Node.js Buffer is a Uint8Array whose slice() does not copy)
function asBytes(input) {
  if (input instanceof ArrayBuffer) return new Uint8Array(input);
  if (ArrayBuffer.isView(input)) return new Uint8Array(input.buffer, input.byteOffset, input.byteLength);
  throw new TypeError(`expected the bytes of an .npy file (ArrayBuffer or Uint8Array), got ${typeof input}`);
}

export function elementCount(shape) {
  return shape.reduce((n, d) => n * d, 1);
}

/** Parse the bytes of an .npy file into {dtype, shape, data}; the data are copied (aligned). */
export function parseNpy(input) {
  const bytes = asBytes(input);
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new Error("not an .npy file: it does not start with \\x93NUMPY");
  }
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let headerLength, headerStart;
  if (major === 1) {
    [headerLength, headerStart] = [view.getUint16(8, true), 10];
  } else if (major === 2) {
    [headerLength, headerStart] = [view.getUint32(8, true), 12];
  } else {
    throw new Error(`.npy format version ${major}.${bytes[7]} is not supported (1.0 and 2.0 are)`);
  }
  const dataStart = headerStart + headerLength;
  if (dataStart > bytes.length) throw new Error("truncated .npy file: the header runs past the end");
  const header = new TextDecoder("latin1").decode(bytes.subarray(headerStart, dataStart));
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    throw new Error(`malformed .npy header: ${header.trim()}`);
  }
  const type = DTYPES[descr];
  if (!type) throw new Error(`.npy dtype '${descr}' is not supported (supported: ${SUPPORTED})`);
  if (fortran === "True") throw new Error(".npy file in Fortran order: only C order is supported");
  const shape = shapeText
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map(Number);
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) throw new Error(`bad .npy shape (${shapeText})`);
  const byteLength = elementCount(shape) * type.size;
  if (bytes.length - dataStart !== byteLength) {
    throw new Error(
      `.npy data of ${bytes.length - dataStart} bytes, expected ${byteLength} for ${descr} shape (${shape})`,
    );
  }
  const data = type.make(bytes.slice(dataStart, dataStart + byteLength).buffer);
  return { dtype: type.dtype, shape, data };
}

/** The bytes of an .npy file (format 1.0) holding `data` (a typed array) of `shape`, as `dtype`. */
export function formatNpy({ dtype, shape, data }) {
  const descr = DESCR_OF[dtype];
  if (!descr) throw new Error(`cannot write dtype '${dtype}' to .npy (supported: ${Object.keys(DESCR_OF)})`);
  const size = DTYPES[descr].size;
  if (!ArrayBuffer.isView(data) || data.BYTES_PER_ELEMENT !== size) {
    throw new TypeError(`${dtype} data must be a typed array of ${size}-byte elements`);
  }
  if (data.length !== elementCount(shape)) {
    throw new Error(`${data.length} elements do not fill shape (${shape})`);
  }
  const shapeText = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shapeText}, }`;
  // NumPy pads the header with spaces and ends it with a newline so that the data start at a
  // multiple of 64 bytes.
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  if (header.length > 0xffff) throw new Error("shape too long for an .npy 1.0 header");
  const out = new Uint8Array(10 + header.length + data.byteLength);
  out.set(MAGIC, 0);
  out.set([1, 0, header.length & 0xff, header.length >> 8], 6);
  for (let i = 0; i < header.length; i++) out[10 + i] = header.charCodeAt(i);
  out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), 10 + header.length);
  return out;
}

/** An onnxruntime-js tensor's dtype, shape and data as an array for formatNpy (no copy, no cast). */
export function fromTensor(tensor) {
  return { dtype: tensor.type, shape: Array.from(tensor.dims), data: tensor.data };
}

function halfToNumber(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

/** Any supported array's values as plain numbers (a Float64Array; float16 bits decoded), to compare. */
export function toNumbers({ dtype, data }) {
  if (dtype === "float16" && data instanceof Uint16Array) return Float64Array.from(data, halfToNumber);
  return Float64Array.from(data, Number);
}
