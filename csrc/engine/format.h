// The flat binary model file (docs/format.md): memory-mapped read-only, validated completely
// before anything points into it, and turned into the ModelWeights the engines read.
// Every failure is a FormatError (or SystemError for the operating system's refusals) whose
// message names the file, the problem and the fix; no input can make the loader read outside the
// mapping or allocate more than the file's size justifies.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "model.h"

namespace gpt2s {

inline constexpr char kFormatMagic[8] = {'G', 'P', 'T', '2', 'S', 'B', 'I', 'N'};
// Version 2 added int8 weights (dtype code 2, per-row scales); writers still write version 1 for
// fp32 and bf16 files, which every reader so far reads, and the loader reads both.
inline constexpr uint32_t kFormatVersion = 2;
inline constexpr uint64_t kHeaderSize = 128;
inline constexpr uint64_t kTableEntrySize = 128;
inline constexpr uint64_t kAlignment = 64;

// The file is not a valid model file (wrong kind, damaged, hostile or from another version).
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The operating system refused to open or map the file; `code` is the errno value.
class SystemError : public std::runtime_error {
 public:
  SystemError(const std::string& message, int code) : std::runtime_error(message), code(code) {}
  int code;
};

// The tensors of one layer in file order (docs/format.md): name suffix after "h.{i}.", the
// ModelWeights field it fills, and its shape as multiples of C: (rows x C, cols x C), cols 0 for
// vectors. Matrices are in the file's weight dtype, vectors in fp32.
struct LayerTensor {
  const char* suffix;
  TensorView LayerWeights::*field;
  int rows, cols;
};
inline constexpr LayerTensor kLayerTensors[12] = {
    {"ln_1.weight", &LayerWeights::ln_1_w, 1, 0},
    {"ln_1.bias", &LayerWeights::ln_1_b, 1, 0},
    {"attn.c_attn.weight", &LayerWeights::attn_c_attn_w, 3, 1},  // (out, in)
    {"attn.c_attn.bias", &LayerWeights::attn_c_attn_b, 3, 0},
    {"attn.c_proj.weight", &LayerWeights::attn_c_proj_w, 1, 1},
    {"attn.c_proj.bias", &LayerWeights::attn_c_proj_b, 1, 0},
    {"ln_2.weight", &LayerWeights::ln_2_w, 1, 0},
    {"ln_2.bias", &LayerWeights::ln_2_b, 1, 0},
    {"mlp.c_fc.weight", &LayerWeights::mlp_c_fc_w, 4, 1},
    {"mlp.c_fc.bias", &LayerWeights::mlp_c_fc_b, 4, 0},
    {"mlp.c_proj.weight", &LayerWeights::mlp_c_proj_w, 1, 4},
    {"mlp.c_proj.bias", &LayerWeights::mlp_c_proj_b, 1, 0},
};

const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

// One entry of the tensor table, as validated.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[2] = {0, 0};  // shape[1] is 0 for vectors
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  uint32_t crc32 = 0;
  // int8 tensors (version 2): their (rows) fp32 scales, elsewhere in the data, with their own CRC-32.
  uint64_t scales_offset = 0;
  uint64_t scales_nbytes = 0;
  uint32_t scales_crc32 = 0;
};

// How to load a model file.
struct LoadOptions {
  bool verify_data = false;  // also check each tensor's CRC-32 (reads the whole file)
  // Map the file (no copy, pages read on use) or read it into memory. A mapping shows what the
  // file holds now: truncating it in place or writing over it while mapped (cp onto it, not a
  // rename) kills the process with SIGBUS or changes the weights underneath; mmap=false costs a
  // copy of the file in memory and protects against both.
  bool mmap = true;
};

// A validated model file, mapped (or read into memory) for as long as this object lives. The
// engine keeps a shared_ptr to it; every view in weights() points into that memory. Our writers
// replace files by rename, which leaves an open mapping intact.
class LoadedModel {
 public:
  // Opens `path` and validates everything but the tensor data checksums (docs/format.md, steps
  // 1-6); with options.verify_data, also each tensor's CRC-32.
  static std::shared_ptr<const LoadedModel> open(const std::string& path, const LoadOptions& options = {});
  // The same checks on `size` bytes already in memory (copied: the fuzzer and tests use it);
  // `name` stands for the path in messages.
  static std::shared_ptr<const LoadedModel> from_bytes(const std::string& name, const uint8_t* data, size_t size,
                                                       bool verify_data = false);

  ~LoadedModel();
  LoadedModel(const LoadedModel&) = delete;
  LoadedModel& operator=(const LoadedModel&) = delete;

  const ModelWeights& weights() const { return weights_; }
  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  uint32_t version() const { return version_; }
  uint32_t flags() const { return flags_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in table order
  std::string_view token_kinds() const { return token_kinds_; }         // V bytes: 0 byte-level, 1 special
  std::string_view merges() const { return merges_; }                   // vocab.bpe, verbatim
  std::string_view metadata() const { return metadata_; }               // JSON text

  // Checks every tensor's CRC-32 (in parallel); throws FormatError naming the first damaged one.
  void verify_data() const;

 private:
  LoadedModel() = default;
  void parse();
  void check_tokenizer(const uint8_t* kinds) const;

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  bool mapped_ = false;  // base_ is an mmap (else a posix_memalign buffer)
  uint32_t version_ = 0;
  uint32_t flags_ = 0;
  ModelWeights weights_;
  std::vector<TensorInfo> tensors_;
  std::string_view token_kinds_, merges_, metadata_;
};

// CRC-32 as zlib computes it (ISO-HDLC), continuing from `crc` (0 to start).
uint32_t crc32(uint32_t crc, const void* data, size_t n);

}  // namespace gpt2s
