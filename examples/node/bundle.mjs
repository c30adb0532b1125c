// The runner of vqcore's consumer bundle for format "onnx", shared by Node.js (run_bundle.mjs) and the
// browser (../web/run_bundle.html): it reads files and writes results through the functions it is given
// and imports nothing, so that both run the same code.
//
// A bundle is a folder with manifest.json ({"schema": "vqcore.consumer-bundle/1", "cases": [...]}); each
// case names its artifact, its input .npy files and its number of outputs, all paths relative to the
// bundle. For every "onnx" case, in manifest order, the runner feeds the inputs (in the artifact's input
// order, with the dtypes the files hold), runs the artifact and writes each output k, as the runtime
// returned it, to `NAME.out<k>.npy` among the results. It does not compare: Python does.

import { formatNpy, fromTensor, parseNpy } from "./npy.mjs";

export const SCHEMA = "vqcore.consumer-bundle/1";
export const FORMAT = "onnx";

export function resultName(caseName, k) {
  return `${caseName}.out${k}.npy`;
}

/** The manifest's cases of format "onnx", after checking the schema. */
export function onnxCases(manifest) {
  if (manifest?.schema !== SCHEMA) {
    throw new Error(`manifest schema is ${JSON.stringify(manifest?.schema)}, expected "${SCHEMA}"`);
  }
  return manifest.cases.filter((c) => c.format === FORMAT);
}

/** Run one case; returns the outputs as .npy bytes, in the artifact's output order. */
export async function runCase(ort, entry, readBytes) {
  const session = await ort.InferenceSession.create(await readBytes(entry.artifact));
  try {
    if (entry.inputs.length !== session.inputNames.length) {
      throw new Error(`${entry.inputs.length} input file(s) for ${session.inputNames.length} graph input(s)`);
    }
    if (session.outputNames.length !== entry.outputs) {
      throw new Error(
        `the manifest says ${entry.outputs} output(s), the artifact has ${session.outputNames.length}`,
      );
    }
    const feeds = {};
    for (const [i, name] of session.inputNames.entries()) {
      const array = parseNpy(await readBytes(entry.inputs[i]));
      feeds[name] = new ort.Tensor(array.dtype, array.data, array.shape);
    }
    const results = await session.run(feeds);
    return session.outputNames.map((name) => formatNpy(fromTensor(results[name])));
  } finally {
    await session.release();
  }
}

/**
 * Run every "onnx" case of the bundle. `readBytes(relativePath)` returns a file's bytes,
 * `writeResult(fileName, bytes)` stores one output, `log(line)` reports "NAME ok" or
 * "NAME FAILED: reason". Returns {ok, failed} (counts).
 */
export async function runBundle({ ort, readBytes, writeResult, log }) {
  const manifest = JSON.parse(new TextDecoder().decode(await readBytes("manifest.json")));
  let ok = 0;
  let failed = 0;
  for (const entry of onnxCases(manifest)) {
    try {
      const outputs = await runCase(ort, entry, readBytes);
      for (const [k, bytes] of outputs.entries()) await writeResult(resultName(entry.name, k), bytes);
      log(`${entry.name} ok`);
      ok += 1;
    } catch (err) {
      log(`${entry.name} FAILED: ${String(err?.message ?? err).split("\n")[0]}`);
      failed += 1;
    }
  }
  return { ok, failed };
}
