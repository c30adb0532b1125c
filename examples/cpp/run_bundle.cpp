// run_bundle: the libtorch runner of a vqcore consumer bundle (tests/consumer_bundle.py writes one).
//
//   run_bundle BUNDLE RESULTS
//
// Reads BUNDLE/manifest.tsv (one case a line: name, format, artifact, input0, outputs; tab-separated) and
// runs, in that order, every case of the formats "torchscript" and "aoti" on its input. Output k of case
// NAME goes to RESULTS/NAME.out<k>.npy as the runtime returned it (dtype and shape, no cast). Prints one
// line a case, "NAME ok" or "NAME FAILED: reason". It does not compare: Python does, with the same rules
// for every consumer. Exit status: 0 when every case of its formats ran, 1 when one failed, 2 on bad
// arguments or an unreadable manifest.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "npy.h"

namespace fs = std::filesystem;

struct Case {
  std::string name, format, artifact, input;
  size_t outputs = 0;
};

std::vector<Case> read_manifest(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot open (is it a consumer bundle?)");
  std::vector<Case> cases;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    std::vector<std::string> fields;
    std::stringstream split(line);
    for (std::string field; std::getline(split, field, '\t');) fields.push_back(field);
    const std::string where = path.string() + " line " + std::to_string(number);
    if (fields.size() != 5)
      throw std::runtime_error(where + ": expected 5 tab-separated fields (name, format, artifact, input0, " +
                               "outputs), got " + std::to_string(fields.size()));
    size_t outputs = 0, used = 0;
    try {
      outputs = std::stoul(fields[4], &used);
    } catch (const std::exception&) {
    }
    if (used == 0 || used != fields[4].size() || outputs == 0)
      throw std::runtime_error(where + ": expected a positive number of outputs, got '" + fields[4] + "'");
    cases.push_back({fields[0], fields[1], fields[2], fields[3], outputs});
  }
  return cases;
}

// The outputs of a TorchScript module: one Tensor, or a tuple / list of Tensors.
std::vector<at::Tensor> tensors_of(const c10::IValue& out) {
  if (out.isTensor()) return {out.toTensor()};
  if (out.isTensorList()) return out.toTensorVector();
  if (out.isTuple()) {
    std::vector<at::Tensor> tensors;
    for (const auto& element : out.toTupleRef().elements()) {
      if (!element.isTensor())
        throw std::runtime_error("expected a tuple of Tensors, got an element of type " +
                                 element.tagKind());
      tensors.push_back(element.toTensor());
    }
    return tensors;
  }
  throw std::runtime_error("expected a Tensor or a tuple of Tensors, got " + out.tagKind());
}

// The reason on a case's one line: the last line of a message (a TorchScript error ends with the
// exception under its traceback).
std::string reason(const std::string& message) {
  const size_t end = message.find_last_not_of(" \n");
  if (end == std::string::npos) return "(no message)";
  const size_t newline = message.find_last_of('\n', end);
  const size_t start = newline == std::string::npos ? 0 : newline + 1;
  return message.substr(start, end + 1 - start);
}

std::vector<at::Tensor> run_case(const fs::path& bundle, const Case& c) {
  const fs::path artifact = bundle / c.artifact;
  if (!fs::exists(artifact)) throw std::runtime_error(artifact.string() + ": missing");
  at::Tensor input = npy::load((bundle / c.input).string());
  if (c.format == "torchscript") {
    torch::jit::Module module = torch::jit::load(artifact.string());
    module.eval();
    return tensors_of(module.forward({input}));
  }
  torch::inductor::AOTIModelPackageLoader package(artifact.string());
  return package.run({input});
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE RESULTS\n";
    return 2;
  }
  const fs::path bundle = argv[1], results = argv[2];
  std::vector<Case> cases;
  try {
    cases = read_manifest(bundle / "manifest.tsv");
    fs::create_directories(results);
  } catch (const std::exception& e) {
    std::cerr << argv[0] << ": " << e.what() << "\n";
    return 2;
  }
  // Inference only: InferenceMode skips autograd's bookkeeping for every tensor made here.
  c10::InferenceMode inference;
  size_t ran = 0, failed = 0;
  for (const Case& c : cases) {
    if (c.format != "torchscript" && c.format != "aoti") continue;
    ++ran;
    try {
      std::vector<at::Tensor> outputs = run_case(bundle, c);
      if (outputs.size() != c.outputs)
        throw std::runtime_error("expected " + std::to_string(c.outputs) + " outputs, got " +
                                 std::to_string(outputs.size()));
      for (size_t k = 0; k < outputs.size(); ++k)
        npy::save((results / (c.name + ".out" + std::to_string(k) + ".npy")).string(), outputs[k]);
      std::cout << c.name << " ok" << std::endl;
    } catch (const c10::Error& e) {
      ++failed;
      std::cout << c.name << " FAILED: " << reason(e.what_without_backtrace()) << std::endl;
    } catch (const std::exception& e) {
      ++failed;
      std::cout << c.name << " FAILED: " << reason(e.what()) << std::endl;
    }
  }
  if (ran == 0) std::cerr << argv[0] << ": the manifest lists no torchscript or aoti case\n";
  return failed == 0 ? 0 : 1;
}
