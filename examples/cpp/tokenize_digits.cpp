// tokenize_digits: run the vqcore demo's tokenizer and detokenizer from C++ (libtorch) and check them
// against what Python computed.
//
//   tokenize_digits DEMO_OUT
//
// DEMO_OUT is the folder `vqcore demo` writes: tokenizer.pt / detokenizer.pt (TorchScript; also
// tokenizer.pt2 / detokenizer.pt2, AOTInductor packages, when they are there), heldout_images.npy (float32
// (N, 1, 8, 8)), heldout_tokens.npy (Python's token ids of those images) and heldout_decoded.npy (Python's
// images decoded from those ids). For each artifact format it tokenizes the images, counts the tokens that
// differ from Python's, decodes Python's tokens and measures the largest difference from Python's images.
//
// Exit status: 0 when every format gives Python's tokens exactly and its images within 1e-5; 1 when one
// does not; 2 on bad input (a missing or malformed file).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <string>

#include "npy.h"

namespace fs = std::filesystem;

constexpr double kMaxDecodeError = 1e-5;

// One artifact: a tensor in, its first output out (the tokenizer's ids, the detokenizer's images).
using Artifact = std::function<at::Tensor(const at::Tensor&)>;

Artifact load_torchscript(const fs::path& path) {
  auto module = std::make_shared<torch::jit::Module>(torch::jit::load(path.string()));
  module->eval();
  return [module](const at::Tensor& input) {
    c10::IValue out = module->forward({input});
    return out.isTuple() ? out.toTupleRef().elements().at(0).toTensor() : out.toTensor();
  };
}

Artifact load_aoti(const fs::path& path) {
  auto package = std::make_shared<torch::inductor::AOTIModelPackageLoader>(path.string());
  return [package](const at::Tensor& input) { return package->run({input}).at(0); };
}

fs::path existing(const fs::path& path) {
  if (!fs::exists(path))
    throw std::runtime_error(path.string() + ": missing (does the folder hold the output of `vqcore demo`?)");
  return path;
}

struct Heldout {
  at::Tensor images, tokens, decoded;  // what Python wrote
};

Heldout load_heldout(const fs::path& dir) {
  Heldout data{npy::load(existing(dir / "heldout_images.npy").string()),
               npy::load(existing(dir / "heldout_tokens.npy").string()),
               npy::load(existing(dir / "heldout_decoded.npy").string())};
  const auto image = data.images.sizes();
  if (data.images.scalar_type() != at::kFloat || image.size() != 4 || image[1] != 1 || image[2] != 8 ||
      image[3] != 8)
    throw std::runtime_error("heldout_images.npy: expected float32 images (N, 1, 8, 8), got " +
                             npy::dtype_name(data.images.scalar_type()) + " " +
                             c10::str(data.images.sizes()));
  if (!at::isIntegralType(data.tokens.scalar_type(), /*includeBool=*/false))
    throw std::runtime_error("heldout_tokens.npy: expected integer token ids (int32 or int64), got " +
                             npy::dtype_name(data.tokens.scalar_type()));
  if (!at::isFloatingType(data.decoded.scalar_type()) || data.decoded.sizes() != data.images.sizes())
    throw std::runtime_error("heldout_decoded.npy: expected float images of the images' shape " +
                             c10::str(data.images.sizes()) + ", got " +
                             npy::dtype_name(data.decoded.scalar_type()) + " " +
                             c10::str(data.decoded.sizes()));
  return data;
}

// Runs one format's tokenizer and detokenizer on the held-out data, prints what it found and whether
// it meets the targets.
bool check(const std::string& format, const Artifact& tokenize, const Artifact& detokenize,
           const Heldout& data) {
  const int64_t n = data.images.size(0);
  at::Tensor tokens = tokenize(data.images);
  if (tokens.sizes() != data.tokens.sizes()) {
    std::cout << format << ": FAILED: tokens of shape " << tokens.sizes() << ", Python's have shape "
              << data.tokens.sizes() << "\n";
    return false;
  }
  const int64_t mismatches = tokens.ne(data.tokens).sum().item<int64_t>();
  at::Tensor decoded = detokenize(data.tokens);
  if (decoded.sizes() != data.decoded.sizes()) {
    std::cout << format << ": FAILED: decoded images of shape " << decoded.sizes()
              << ", Python's have shape " << data.decoded.sizes() << "\n";
    return false;
  }
  const double error = (decoded.to(at::kDouble) - data.decoded.to(at::kDouble)).abs().max().item<double>();

  // the image axis of the ids is 0, or 1 for groups-first ids (groups, N, tokens, layers)
  const int64_t axis = tokens.dim() == 4 && tokens.size(0) != n && tokens.size(1) == n ? 1 : 0;
  std::cout << format << " first image tokens:";
  at::Tensor first = tokens.select(axis, 0).flatten().to(at::kLong);
  for (int64_t i = 0; i < first.numel(); ++i) std::cout << " " << first[i].item<int64_t>();
  std::cout << "\n"
            << format << ": " << n << " images: " << mismatches << " token mismatches, max decode error "
            << error << "\n";
  return mismatches == 0 && error <= kMaxDecodeError;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " DEMO_OUT   (the folder `vqcore demo --out DEMO_OUT` wrote)\n";
    return 2;
  }
  const fs::path dir = argv[1];
  // Inference only: no tensor made here needs autograd's bookkeeping (the artifacts' outputs never
  // require grad either); InferenceMode says so and skips that work.
  c10::InferenceMode inference;
  try {
    const Heldout data = load_heldout(dir);
    bool ok = check("torchscript", load_torchscript(existing(dir / "tokenizer.pt")),
                    load_torchscript(existing(dir / "detokenizer.pt")), data);
    if (fs::exists(dir / "tokenizer.pt2") || fs::exists(dir / "detokenizer.pt2"))
      ok = check("aoti", load_aoti(existing(dir / "tokenizer.pt2")),
                 load_aoti(existing(dir / "detokenizer.pt2")), data) && ok;
    return ok ? 0 : 1;
  } catch (const c10::Error& e) {
    std::cerr << argv[0] << ": " << e.what_without_backtrace() << "\n";
  } catch (const std::exception& e) {
    std::cerr << argv[0] << ": " << e.what() << "\n";
  }
  return 2;
}
