// run_bundle.html?bundle=URL&results=URL: the consumer bundle's "onnx" cases in onnxruntime-web, with
// the runner Node.js uses (../node/bundle.mjs). Each output is PUT to RESULTS/NAME.out<k>.npy (no
// results= runs without storing); one line per case in #log; the title ends as "done: N ok, M failed"
// (or "error: ..." when the bundle cannot be read).

import { runBundle } from "../node/bundle.mjs";
import { ort } from "./ort.mjs";

const params = new URLSearchParams(location.search);
const folder = (name) => params.get(name) && new URL(params.get(name).replace(/\/?$/, "/"), location.href);
const bundle = folder("bundle");
const results = folder("results");
const log = (line) => {
  document.getElementById("log").textContent += `${line}\n`;
};

async function readBytes(file) {
  const url = new URL(file, bundle);
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot load ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function writeResult(file, bytes) {
  if (!results) return;
  const url = new URL(file, results);
  const response = await fetch(url, { method: "PUT", body: bytes });
  if (!response.ok) throw new Error(`cannot store ${url}: HTTP ${response.status}`);
}

try {
  if (!bundle) throw new Error("no bundle: open run_bundle.html?bundle=URL&results=URL");
  const { ok, failed } = await runBundle({ ort, readBytes, writeResult, log });
  document.title = `done: ${ok} ok, ${failed} failed`;
} catch (err) {
  log(`cannot run the bundle: ${err?.message ?? err}`);
  document.title = "error: the bundle did not run";
}
