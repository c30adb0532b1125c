// onnxruntime-web (its WebAssembly build) from the installed npm package, served with this page; it
// loads its .wasm from the same folder. Several threads need SharedArrayBuffer, which browsers give
// only to cross-origin isolated pages (COOP/COEP headers); a plain static server gets one thread.
import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";

ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1;

export { ort };
