// npy.h: read and write NumPy .npy files as at::Tensor (header-only).
//
// Reads format versions 1.0 and 2.0, writes 1.0. C order only. Little-endian dtypes only:
//   <f4 float32   <f2 float16   <i4 int32   <i8 int64   |b1 bool
// Anything else (big-endian, Fortran order, other dtypes, a truncated file, trailing bytes) throws
// std::runtime_error naming the file, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.h reads and writes little-endian data with memcpy: it needs a little-endian host"
#endif

namespace npy {

namespace detail {

inline const char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

struct Dtype {
  const char* descr;
  at::ScalarType type;
  uint64_t itemsize;
  const char* name;  // numpy's
};

inline const Dtype kDtypes[] = {
    {"<f4", at::kFloat, 4, "float32"}, {"<f2", at::kHalf, 2, "float16"}, {"<i4", at::kInt, 4, "int32"},
    {"<i8", at::kLong, 8, "int64"},    {"|b1", at::kBool, 1, "bool"},
};

inline std::string supported() {
  std::string names;
  for (const auto& d : kDtypes) names += (names.empty() ? "" : " ") + std::string(d.descr);
  return names;
}

[[noreturn]] inline void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// The header is a Python dict literal, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 1, 8, 8), }
// This parser accepts exactly the three keys numpy writes, in any order.
class HeaderParser {
 public:
  HeaderParser(std::string text, std::string path) : s_(std::move(text)), path_(std::move(path)) {
    s_.erase(s_.find_last_not_of(" \n") + 1);  // numpy's padding
  }

  void parse(std::string& descr, bool& fortran_order, std::vector<int64_t>& shape) {
    bool seen_descr = false, seen_order = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      std::string key = quoted();
      expect(':');
      if (key == "descr") {
        descr = quoted();
        seen_descr = true;
      } else if (key == "fortran_order") {
        fortran_order = boolean();
        seen_order = true;
      } else if (key == "shape") {
        shape = tuple();
        seen_shape = true;
      } else {
        error("a key 'descr', 'fortran_order' or 'shape'", "'" + key + "'");
      }
      if (!next_item('}')) break;
    }
    if (!seen_descr || !seen_order || !seen_shape)
      error("the keys 'descr', 'fortran_order' and 'shape'", "a header without one of them");
  }

 private:
  std::string s_, path_;
  size_t pos_ = 0;

  [[noreturn]] void error(const std::string& expected, const std::string& came) {
    fail(path_, "bad .npy header: expected " + expected + ", got " + came + " in " + s_);
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    if (pos_ >= s_.size()) error("more text", "the end of the header");
    return s_[pos_];
  }
  // After an item of a dict or tuple: true at a ',' (consumed), false at the closing character.
  bool next_item(char close) {
    skip_space();
    if (peek() == ',') return ++pos_, true;
    if (peek() != close) error(std::string("',' or '") + close + "'", std::string("'") + s_[pos_] + "'");
    return false;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) error(std::string("'") + c + "'", std::string("'") + s_[pos_] + "'");
    ++pos_;
  }
  std::string quoted() {
    skip_space();
    char q = peek();
    if (q != '\'' && q != '"') error("a quoted string", std::string("'") + q + "'");
    size_t end = s_.find(q, pos_ + 1);
    if (end == std::string::npos) error("a closing quote", "the end of the header");
    std::string out = s_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return out;
  }
  bool boolean() {
    skip_space();
    if (s_.compare(pos_, 4, "True") == 0) return pos_ += 4, true;
    if (s_.compare(pos_, 5, "False") == 0) return pos_ += 5, false;
    error("True or False", "'" + s_.substr(pos_, 5) + "'");
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> dims;
    expect('(');
    while (true) {
      skip_space();
      if (peek() == ')') break;
      size_t start = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      if (pos_ == start || pos_ - start > 18)  // 18 digits fit an int64_t
        error("a dimension (a non-negative integer)", "'" + s_.substr(start, 8) + "'");
      dims.push_back(std::stoll(s_.substr(start, pos_ - start)));
      if (!next_item(')')) break;
    }
    ++pos_;
    return dims;
  }
};

inline uint32_t little_endian(const unsigned char* p, size_t bytes) {
  uint32_t v = 0;
  for (size_t i = 0; i < bytes; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}

}  // namespace detail

// numpy's name of a dtype ("float32", ...), for messages
inline std::string dtype_name(at::ScalarType type) {
  for (const auto& d : detail::kDtypes)
    if (d.type == type) return d.name;
  return c10::toString(type);
}

// The .npy descr of a dtype ("<f4", ...); throws for a dtype this header does not write.
inline std::string descr_of(at::ScalarType type, const std::string& path) {
  for (const auto& d : detail::kDtypes)
    if (d.type == type) return d.descr;
  detail::fail(path, std::string("cannot write dtype ") + c10::toString(type) + " (writes " +
                         detail::supported() + ")");
}

inline at::Tensor load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail(path, "cannot open for reading (missing file?)");
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);

  unsigned char preamble[12];
  in.read(reinterpret_cast<char*>(preamble), 8);
  if (!in || std::memcmp(preamble, detail::kMagic, detail::kMagicSize) != 0)
    detail::fail(path, "not a .npy file: expected the magic bytes \\x93NUMPY at the start");
  const int major = preamble[6], minor = preamble[7];
  size_t len_bytes = 0;
  if (major == 1 && minor == 0) len_bytes = 2;
  else if (major == 2 && minor == 0) len_bytes = 4;
  else
    detail::fail(path, "expected .npy format version 1.0 or 2.0, got " + std::to_string(major) + "." +
                           std::to_string(minor));
  in.read(reinterpret_cast<char*>(preamble + 8), static_cast<std::streamsize>(len_bytes));
  if (!in) detail::fail(path, "truncated .npy preamble");
  const uint64_t header_len = detail::little_endian(preamble + 8, len_bytes);
  const uint64_t data_offset = 8 + len_bytes + header_len;
  if (data_offset > file_size)
    detail::fail(path, "truncated: the header says " + std::to_string(header_len) + " bytes, the file has " +
                           std::to_string(file_size - 8 - len_bytes) + " after the preamble");
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));

  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  detail::HeaderParser(header, path).parse(descr, fortran_order, shape);
  if (fortran_order) detail::fail(path, "expected C order (fortran_order False), got Fortran order");
  const detail::Dtype* dtype = nullptr;
  for (const auto& d : detail::kDtypes)
    if (descr == d.descr) dtype = &d;
  if (!dtype) detail::fail(path, "expected a dtype among " + detail::supported() + ", got '" + descr + "'");

  // the byte count the header promises, checked against the file before anything is allocated
  const uint64_t available = file_size - data_offset;
  uint64_t data_bytes = dtype->itemsize;
  bool overflow = false;
  for (int64_t d : shape) {
    if (d != 0 && data_bytes > UINT64_MAX / static_cast<uint64_t>(d)) overflow = true;
    data_bytes *= static_cast<uint64_t>(d);
  }
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) overflow = false, data_bytes = 0;
  if (overflow || data_bytes != available)
    detail::fail(path, "expected " + (overflow ? "more than 2^64" : std::to_string(data_bytes)) +
                           " data bytes for shape " + c10::str(at::IntArrayRef(shape)) + " " + descr +
                           ", the file has " + std::to_string(available));
  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(dtype->type));
  in.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(data_bytes));
  if (!in) detail::fail(path, "read error in the data");
  return tensor;
}

// Writes format 1.0, C order; the tensor is written as it is (no cast), from the CPU.
inline void save(const std::string& path, const at::Tensor& tensor) {
  const std::string descr = descr_of(tensor.scalar_type(), path);
  at::Tensor data = tensor.cpu().contiguous();
  std::ostringstream shape;
  shape << "(";
  for (int64_t d : data.sizes()) shape << d << ", ";
  std::string dims = shape.str();
  if (data.dim() > 1) dims.resize(dims.size() - 2);  // (3, 4) but (3,)
  else if (data.dim() == 1) dims.resize(dims.size() - 1);
  dims += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + dims + ", }";
  // numpy pads the header with spaces so that the data starts at a multiple of 64 bytes
  const size_t unpadded = detail::kMagicSize + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 65535) detail::fail(path, "header too long for .npy format 1.0");

  std::ofstream out(path, std::ios::binary);
  if (!out) detail::fail(path, "cannot open for writing");
  const unsigned char version_and_len[4] = {1, 0, static_cast<unsigned char>(header.size() & 0xff),
                                            static_cast<unsigned char>(header.size() >> 8)};
  out.write(detail::kMagic, detail::kMagicSize);
  out.write(reinterpret_cast<const char*>(version_and_len), 4);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data.data_ptr()), static_cast<std::streamsize>(data.nbytes()));
  if (!out) detail::fail(path, "write error");
}

}  // namespace npy
