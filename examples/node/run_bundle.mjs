// node run_bundle.mjs BUNDLE RESULTS
// Runs every "onnx" case of a vqcore consumer bundle in onnxruntime-node and writes each output k of
// case NAME to RESULTS/NAME.out<k>.npy; prints "NAME ok" or "NAME FAILED: reason" per case and exits 0
// when every case ran, 1 otherwise. Python compares the results (tests/consumer_bundle.py).

import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import * as ort from "onnxruntime-node";

import { runBundle } from "./bundle.mjs";

const [bundle, results] = process.argv.slice(2);
if (!bundle || !results) {
  console.error("usage: node run_bundle.mjs BUNDLE RESULTS");
  process.exit(2);
}
await mkdir(results, { recursive: true });
try {
  const { ok, failed } = await runBundle({
    ort,
    readBytes: (file) => readFile(path.join(bundle, file)),
    writeResult: (file, bytes) => writeFile(path.join(results, file), bytes),
    log: (line) => console.log(line),
  });
  console.error(`${ok} onnx case(s) ran, ${failed} failed`);
  process.exitCode = failed === 0 ? 0 : 1;
} catch (err) {
  console.error(`cannot run the bundle ${bundle}: ${err.message}`);
  process.exitCode = 1;
}
