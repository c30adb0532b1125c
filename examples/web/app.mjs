// The digit tokenizer page: loads the demo's tokenizer.onnx / detokenizer.onnx and held-out digits from
// the folder in ?demo= (default: the repository's demo-output/ when the repository root is served),
// tokenizes a picked or drawn digit in onnxruntime-web and draws the detokenizer's reconstruction.
// The page also tokenizes every held-out digit and decodes Python's tokens, and reports how they agree
// with Python's. What it computed is on `window.vqcoreDemo` (see the end of this file).

import { fromTensor, parseNpy, toNumbers } from "../node/npy.mjs";
import { ort } from "./ort.mjs";

const GRID = 4; // 8x8 images -> a 4x4 grid of tokens
const TOKENS = GRID * GRID;
const SIDE = 8; // the digits are 8x8
// drawn on 32x32 on/off cells, each 4x4 block counted into one pixel of 0..16: how the digits were made
const DRAW_SIDE = 32;
const MAX_DECODE_ERROR = 1e-5;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const demoFolder = new URL(params.get("demo") ?? "../../demo-output/", location.href);

async function fetchDemoFile(name) {
  const url = new URL(name, demoFolder);
  const response = await fetch(url);
  if (!response.ok) {
    throw new Error(
      `cannot load ${url} (HTTP ${response.status}): run \`make demo\` and serve the demo's folder`,
    );
  }
  return new Uint8Array(await response.arrayBuffer());
}

const toTensor = (array) => new ort.Tensor(array.dtype, array.data, array.shape);

async function runGraph(session, array) {
  const results = await session.run({ [session.inputNames[0]]: toTensor(array) });
  return fromTensor(results[session.outputNames[0]]);
}

// token ids of `batch` images (batch-first, or groups-first when the first axis is not the batch's)
// -> image b's ids per grid cell
function cellsOf(ids, batch, b) {
  const values = toNumbers(ids);
  const batchAxis = ids.shape[0] === batch ? 0 : 1;
  const perImage = ids.shape.filter((_, axis) => axis !== batchAxis);
  const n = ids.shape[batchAxis];
  const outer = batchAxis === 0 ? 1 : ids.shape[0];
  const inner = values.length / (outer * n);
  const mine = [];
  for (let o = 0; o < outer; o++) mine.push(...values.subarray((o * n + b) * inner, (o * n + b + 1) * inner));
  const stride = perImage.slice(perImage.indexOf(TOKENS) + 1).reduce((a, d) => a * d, 1);
  const cells = Array.from({ length: TOKENS }, () => []);
  mine.forEach((id, i) => cells[Math.floor(i / stride) % TOKENS].push(id));
  return cells;
}

// -- drawing ---------------------------------------------------------------------------------------

function drawPixels(canvas, pixels) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(SIDE, SIDE);
  pixels.forEach((v, i) => {
    const grey = Math.round(255 * (1 - Math.min(1, Math.max(0, v)))); // ink dark on white
    image.data.set([grey, grey, grey, 255], 4 * i);
  });
  context.putImageData(image, 0, 0);
}

function showCells(element, cells, reference) {
  element.replaceChildren(
    ...cells.map((ids, t) => {
      const cell = document.createElement("div");
      cell.textContent = ids.join("\n"); // one id per book (layer, group)
      if (reference && ids.join() !== reference[t].join()) cell.className = "differs";
      return cell;
    }),
  );
}

// the pad's ink as the digits' pixels: 32x32 on/off cells, each 4x4 block's count of on cells / 16
function padPixels(pad) {
  const { data } = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height);
  const scale = pad.width / DRAW_SIDE;
  const on = new Uint8Array(DRAW_SIDE * DRAW_SIDE);
  for (let y = 0; y < DRAW_SIDE; y++) {
    for (let x = 0; x < DRAW_SIDE; x++) {
      let ink = 0;
      for (let dy = 0; dy < scale; dy++) {
        for (let dx = 0; dx < scale; dx++)
          ink += data[4 * ((y * scale + dy) * pad.width + x * scale + dx) + 3];
      }
      on[y * DRAW_SIDE + x] = ink / (255 * scale * scale) >= 0.5 ? 1 : 0;
    }
  }
  const block = DRAW_SIDE / SIDE;
  const pixels = new Float32Array(SIDE * SIDE);
  for (let i = 0; i < DRAW_SIDE * DRAW_SIDE; i++) {
    const [y, x] = [Math.floor(i / DRAW_SIDE), i % DRAW_SIDE];
    pixels[Math.floor(y / block) * SIDE + Math.floor(x / block)] += on[i] / (block * block);
  }
  return pixels;
}

function setUpPad(pad, onDrawn) {
  const context = pad.getContext("2d");
  context.lineWidth = 22;
  context.lineCap = context.lineJoin = "round";
  let last = null;
  const at = (event) => {
    const box = pad.getBoundingClientRect();
    return [
      ((event.clientX - box.left) * pad.width) / box.width,
      ((event.clientY - box.top) * pad.height) / box.height,
    ];
  };
  pad.addEventListener("pointerdown", (event) => {
    pad.setPointerCapture(event.pointerId);
    last = at(event);
    context.beginPath();
    context.arc(...last, context.lineWidth / 2, 0, 2 * Math.PI);
    context.fill();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = at(event);
    context.beginPath();
    context.moveTo(...last);
    context.lineTo(...point);
    context.stroke();
    last = point;
  });
  const end = () => {
    if (last) onDrawn(padPixels(pad));
    last = null;
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", () => context.clearRect(0, 0, pad.width, pad.height));
}

// -- the page ----------------------------------------------------------------------------------------

const state = { ready: false, error: null, last: null, summary: null };
window.vqcoreDemo = state;

async function main() {
  const [tokenizerBytes, detokenizerBytes, imagesBytes, tokensBytes, decodedBytes] = await Promise.all(
    [
      "tokenizer.onnx",
      "detokenizer.onnx",
      "heldout_images.npy",
      "heldout_tokens.npy",
      "heldout_decoded.npy",
    ].map(fetchDemoFile),
  );
  const tokenizer = await ort.InferenceSession.create(tokenizerBytes);
  const detokenizer = await ort.InferenceSession.create(detokenizerBytes);
  const images = parseNpy(imagesBytes); // float32 (N, 1, 8, 8)
  const pythonTokens = parseNpy(tokensBytes);
  const pythonDecoded = parseNpy(decodedBytes);
  const n = images.shape[0];
  const imageOf = (b) => images.data.subarray(b * SIDE * SIDE, (b + 1) * SIDE * SIDE);

  // one image through the tokenizer and back through the detokenizer: what the picker and the pad do
  async function show(pixels, title, pythonCells) {
    const tokens = await runGraph(tokenizer, { dtype: "float32", shape: [1, 1, SIDE, SIDE], data: pixels });
    const reconstruction = await runGraph(detokenizer, tokens);
    const cells = cellsOf(tokens, 1, 0);
    $("source").textContent = title;
    drawPixels($("input-image"), pixels);
    drawPixels($("reconstruction"), toNumbers(reconstruction));
    showCells($("tokens"), cells, pythonCells);
    $("python-figure").hidden = !pythonCells;
    if (pythonCells) {
      showCells($("python-tokens"), pythonCells, cells);
      const agree = cells.filter((ids, t) => ids.join() === pythonCells[t].join()).length;
      $("agreement").innerHTML =
        `Python's tokens: <span class="${agree === TOKENS ? "agree" : "disagree"}">` +
        `${agree}/${TOKENS} agree</span>`;
    }
    state.last = {
      title,
      pixels: Array.from(pixels),
      tokens: { dtype: tokens.dtype, shape: tokens.shape, ids: cells.flat() },
    };
  }

  const pick = (b) => {
    $("digit-index").value = b;
    document
      .querySelectorAll("#thumbnails canvas")
      .forEach((c, i) => c.classList.toggle("selected", i === b));
    return show(Float32Array.from(imageOf(b)), `held-out digit ${b}`, cellsOf(pythonTokens, n, b));
  };

  $("digit-count").textContent = `of 0–${n - 1}`;
  $("digit-index").max = n - 1;
  $("digit-index").addEventListener("change", (event) => {
    const b = Number(event.target.value);
    if (Number.isInteger(b) && b >= 0 && b < n) pick(b);
  });
  for (let b = 0; b < n; b++) {
    const thumbnail = document.createElement("canvas");
    [thumbnail.width, thumbnail.height, thumbnail.title] = [SIDE, SIDE, `held-out digit ${b}`];
    drawPixels(thumbnail, imageOf(b));
    thumbnail.addEventListener("click", () => pick(b));
    $("thumbnails").append(thumbnail);
  }
  setUpPad($("pad"), (pixels) => show(pixels, "your drawing", null));

  // every held-out digit in one batch, and Python's tokens decoded, against Python's
  const tokens = await runGraph(tokenizer, images);
  const ours = toNumbers(tokens);
  const theirs = toNumbers(pythonTokens);
  const mismatches =
    ours.length === theirs.length ? ours.reduce((m, id, i) => m + (id !== theirs[i]), 0) : ours.length;
  const decoded = await runGraph(detokenizer, pythonTokens);
  const expected = toNumbers(pythonDecoded);
  const decodeError = toNumbers(decoded).reduce((e, v, i) => Math.max(e, Math.abs(v - expected[i])), 0);
  state.summary = {
    images: n,
    tokens: { dtype: tokens.dtype, shape: tokens.shape, values: Array.from(ours) },
    decoded: { dtype: decoded.dtype, shape: decoded.shape, values: Array.from(toNumbers(decoded)) },
    mismatches,
    decodeError,
  };
  const good = mismatches === 0 && decodeError <= MAX_DECODE_ERROR;
  $("summary").innerHTML =
    `${n} digits tokenized in the browser: <span class="${mismatches ? "disagree" : "agree"}">` +
    `${ours.length - mismatches}/${ours.length} token ids equal Python's</span>; Python's tokens decoded here ` +
    `within <span class="nowrap">${decodeError.toExponential(1)}</span> of Python's images ` +
    `<span class="${good ? "agree" : "disagree"}">` +
    `(${good ? "ok" : "differs"})</span>.`;

  await pick(0);
  const threads = `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads > 1 ? "s" : ""}`;
  $("status").textContent =
    `ready: onnxruntime-web ${ort.env.versions.web} (WebAssembly, ${threads}), models from ${demoFolder}`;
  state.ready = true;
}

main().catch((err) => {
  state.error = String(err?.message ?? err);
  $("status").textContent = state.error;
  $("status").classList.add("error");
});
