// node tokenize_digits.mjs DEMO_OUT
// The tokenizer and detokenizer that `vqcore demo --out DEMO_OUT` exported, run in Node.js with
// onnxruntime-node: tokenize the held-out digits, compare the tokens with Python's, decode Python's
// tokens and compare the images with Python's. Exits 0 iff every token agrees and the decoded images
// are within 1e-5 of Python's.

import { readFile } from "node:fs/promises";
import path from "node:path";
import * as ort from "onnxruntime-node";

import { fromTensor, parseNpy, toNumbers } from "./npy.mjs";

const MAX_DECODE_ERROR = 1e-5;

const demoOut = process.argv[2];
if (!demoOut) {
  console.error("usage: node tokenize_digits.mjs DEMO_OUT   (the folder `vqcore demo --out DEMO_OUT` wrote)");
  process.exit(2);
}

function fail(message) {
  console.error(message);
  process.exit(1);
}

async function readDemoFile(name) {
  const file = path.join(demoOut, name);
  try {
    return await readFile(file);
  } catch (err) {
    if (err.code !== "ENOENT") throw err;
    fail(`missing ${file}: run \`vqcore demo --out ${demoOut}\` first`);
  }
}

async function readDemoArray(name) {
  const bytes = await readDemoFile(name);
  try {
    return parseNpy(bytes);
  } catch (err) {
    fail(`${path.join(demoOut, name)}: ${err.message}`);
  }
}

const toTensor = (array) => new ort.Tensor(array.dtype, array.data, array.shape);

// run a one-input graph; its first output
async function run(session, tensor) {
  const results = await session.run({ [session.inputNames[0]]: tensor });
  return results[session.outputNames[0]];
}

const tokenizer = await ort.InferenceSession.create(await readDemoFile("tokenizer.onnx"));
const detokenizer = await ort.InferenceSession.create(await readDemoFile("detokenizer.onnx"));
const images = await readDemoArray("heldout_images.npy"); // float32 (N, 1, 8, 8)
const pythonTokens = await readDemoArray("heldout_tokens.npy"); // Python's tokens of the images
const pythonDecoded = await readDemoArray("heldout_decoded.npy"); // Python's images of its tokens
if (images.dtype !== "float32" || images.shape.length !== 4 || images.shape.slice(1).join() !== "1,8,8") {
  fail(`heldout_images.npy: expected float32 images (N, 1, 8, 8), got ${images.dtype} (${images.shape})`);
}

// tokenize every held-out image in one batch
const tokens = await run(tokenizer, toTensor(images));
if (tokens.dims.join() !== pythonTokens.shape.join()) {
  fail(`tokens of shape (${tokens.dims}), Python's are (${pythonTokens.shape})`);
}
const ours = toNumbers(fromTensor(tokens));
const theirs = toNumbers(pythonTokens);
const mismatched = [...ours.keys()].filter((i) => ours[i] !== theirs[i]);

// decode Python's tokens
const decoded = await run(detokenizer, toTensor(pythonTokens));
if (decoded.dims.join() !== pythonDecoded.shape.join()) {
  fail(`decoded images of shape (${decoded.dims}), Python's are (${pythonDecoded.shape})`);
}
const expected = toNumbers(pythonDecoded);
const decodedValues = toNumbers(fromTensor(decoded));
const decodeError = decodedValues.reduce((e, v, i) => Math.max(e, Math.abs(v - expected[i])), 0);

const n = images.shape[0];
const perImage = ours.length / n; // the ids of image 0 come first (batch-first token ids)
console.log(`first image's tokens: ${JSON.stringify(Array.from(ours.subarray(0, perImage)))}`);
for (const i of mismatched.slice(0, 10)) {
  console.log(`  image ${Math.floor(i / perImage)}, id ${i % perImage}: ${ours[i]}, Python's ${theirs[i]}`);
}
const error = decodeError.toExponential(2);
console.log(`${n} images: ${mismatched.length} token mismatches, max decode error ${error}`);
process.exitCode = mismatched.length === 0 && decodeError <= MAX_DECODE_ERROR ? 0 : 1;
