// Loader of the flat binary model file; the layout and the order of the checks are those of
// docs/format.md. Every field is read with memcpy from inside bounds already established, and every
// size computation is overflow-checked, so a hostile file can only produce a FormatError.
#include "engine/format.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <unordered_map>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the model file is little-endian and is read in place: a big-endian host would need byte swaps"
#endif

namespace gpt2s {

namespace {

constexpr const char* kReexport = "re-export it with `gpt_2_simple export`";
constexpr uint64_t kMaxDim = 0x7fffffff;  // Config holds ints

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

std::string hex(uint64_t v) { return cat("0x", std::hex, v); }

template <typename T>
T read(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

// Slicing-by-8 CRC-32 tables: table[k][b] is the CRC of byte b followed by k zero bytes.
struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (int k = 1; k < 8; ++k)
      for (int i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
  }
};

const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

// The first bytes of files people are likely to pass instead of an export.
std::string what_it_looks_like(const uint8_t* p, uint64_t size) {
  if (size >= 9 && read<uint64_t>(p) < size && p[8] == '{') return "it looks like a safetensors checkpoint: convert it with `gpt_2_simple export`";
  if (size >= 4 && std::memcmp(p, "PK\x03\x04", 4) == 0) return "it looks like a PyTorch checkpoint (zip): convert it with `gpt_2_simple export`";
  if (size >= 1 && (p[0] == '{' || p[0] == '[')) return "it looks like a JSON file: pass the model file written by `gpt_2_simple export`";
  return "export a model with `gpt_2_simple export` and pass the file it writes";
}

// What a well-formed file of the header's config holds, name by name.
struct Expected {
  std::string name;
  TensorView* slot;
  int ndim;
  uint64_t rows, cols;  // cols == 0 for vectors
  DType dtype;
  int64_t entry = -1;   // table entry that supplied it
};

std::vector<Expected> expected_tensors(ModelWeights& w) {
  const uint64_t V = w.config.n_vocab, N = w.config.n_ctx, C = w.config.n_embd;
  const DType wd = w.dtype, f32 = DType::F32;
  std::vector<Expected> e;
  e.reserve(12 * w.h.size() + 4);
  e.push_back({"wte.weight", &w.wte, 2, V, C, wd});
  e.push_back({"wpe.weight", &w.wpe, 2, N, C, wd});
  for (size_t i = 0; i < w.h.size(); ++i) {
    const std::string prefix = cat("h.", i, ".");
    for (const LayerTensor& t : kLayerTensors)
      e.push_back({prefix + t.suffix, &(w.h[i].*t.field), t.cols ? 2 : 1, t.rows * C, t.cols * C, t.cols ? wd : f32});
  }
  e.push_back({"ln_f.weight", &w.ln_f_w, 1, C, 0, f32});
  e.push_back({"ln_f.bias", &w.ln_f_b, 1, C, 0, f32});
  return e;
}

std::string shape_str(int ndim, uint64_t d0, uint64_t d1) {
  if (ndim != 1) return cat("(", d0, ", ", d1, ")");
  return d1 == 0 ? cat("(", d0, ")") : cat("(", d0, ") with a nonzero unused dimension ", d1);
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "fp32";
    case DType::BF16: return "bf16";
    case DType::I8: return "int8";
  }
  return "unknown";
}

size_t dtype_size(DType dtype) { return dtype == DType::BF16 ? 2 : dtype == DType::I8 ? 1 : 4; }

uint32_t crc32(uint32_t crc, const void* data, size_t n) {
  const auto& t = crc_tables().t;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (; n >= 8; n -= 8, p += 8) {
    const uint32_t lo = read<uint32_t>(p) ^ crc, hi = read<uint32_t>(p + 4);
    crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
          t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
  }
  for (; n; --n, ++p) crc = t[0][(crc ^ *p) & 0xff] ^ (crc >> 8);
  return ~crc;
}

namespace {

// `size` bytes of `fd` into a fresh 64-byte aligned buffer (the kernels' alignment rule holds
// relative to the file's start). A file that shrinks while being read is reported, not padded.
uint8_t* read_whole(int fd, const std::string& path, uint64_t size) {
  void* p = nullptr;
  if (size > SIZE_MAX || posix_memalign(&p, kAlignment, static_cast<size_t>(size)) != 0)
    throw SystemError(cat("cannot allocate ", size, " bytes to read model file ", path, " into memory"), ENOMEM);
  uint8_t* buf = static_cast<uint8_t*>(p);
  uint64_t done = 0;
  while (done < size) {
    const ssize_t n = ::pread(fd, buf + done, static_cast<size_t>(std::min<uint64_t>(size - done, 1u << 30)), static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : 0;
      std::free(buf);
      if (err) throw SystemError(cat("cannot read model file ", path, ": ", std::strerror(err)), err);
      throw FormatError(cat(path, " shrank while it was being read (", done, " of ", size,
                            " bytes): another process is writing it; wait for it to finish, or ", kReexport));
    }
    done += static_cast<uint64_t>(n);
  }
  return buf;
}

}  // namespace

std::shared_ptr<const LoadedModel> LoadedModel::open(const std::string& path, const LoadOptions& options) {
  std::shared_ptr<LoadedModel> m(new LoadedModel());
  m->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw SystemError(cat("cannot open model file ", path, ": ", std::strerror(err)), err);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw SystemError(cat("cannot read model file ", path, ": ", std::strerror(err)), err);
  }
  if (!S_ISREG(st.st_mode)) {
    const bool is_dir = S_ISDIR(st.st_mode);
    ::close(fd);
    throw FormatError(is_dir ? cat(path, " is a folder, not a model file: pass the .bin file written by `gpt_2_simple export`")
                             : cat(path, " is not a regular file: pass the .bin file written by `gpt_2_simple export`"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kHeaderSize) {
    ::close(fd);
    throw FormatError(cat(path, " is not a gpt_2_simple model file: it has ", size,
                          " bytes, fewer than the 128-byte header (an empty or truncated file?); ", kReexport));
  }
  if (options.mmap) {
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);  // the mapping keeps the file alive
    if (p == MAP_FAILED) throw SystemError(cat("cannot memory-map model file ", path, ": ", std::strerror(err)), err);
    m->base_ = static_cast<const uint8_t*>(p);
    m->mapped_ = true;
  } else {
    try {
      m->base_ = read_whole(fd, path, size);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
  }
  m->size_ = size;
  m->parse();  // on a throw, m's destructor unmaps (or frees)
  if (options.verify_data) m->verify_data();
  // The engine reads every weight on its first forward pass: start reading the file in now.
  // (Not MADV_SEQUENTIAL: weights are re-read every step and must stay cached.)
  if (m->mapped_) madvise(const_cast<uint8_t*>(m->base_), m->size_, MADV_WILLNEED);
  return m;
}

std::shared_ptr<const LoadedModel> LoadedModel::from_bytes(const std::string& name, const uint8_t* data, size_t size, bool verify_data) {
  std::shared_ptr<LoadedModel> m(new LoadedModel());
  m->path_ = name;
  if (size < kHeaderSize)
    throw FormatError(cat(name, " is not a gpt_2_simple model file: it has ", size, " bytes, fewer than the 128-byte header; ", kReexport));
  void* p = nullptr;
  if (posix_memalign(&p, kAlignment, size) != 0) throw SystemError(cat("cannot allocate ", size, " bytes for ", name), ENOMEM);
  std::memcpy(p, data, size);
  m->base_ = static_cast<const uint8_t*>(p);
  m->size_ = size;
  m->parse();
  if (verify_data) m->verify_data();
  return m;
}

LoadedModel::~LoadedModel() {
  if (base_ == nullptr) return;
  if (mapped_)
    munmap(const_cast<uint8_t*>(base_), size_);
  else
    std::free(const_cast<uint8_t*>(base_));
}

void LoadedModel::parse() {
  const uint8_t* b = base_;
  auto fail = [&](const std::string& what) -> void { throw FormatError(cat(path_, " ", what)); };
  auto damaged = [&](const std::string& what) -> void {
    fail(cat("is damaged: ", what, "; ", kReexport));
  };

  // 1. Identity and size.
  if (std::memcmp(b, kFormatMagic, 8) != 0) {
    std::string start;
    for (int i = 0; i < 8; ++i) start += (b[i] >= 0x20 && b[i] < 0x7f) ? static_cast<char>(b[i]) : '.';
    fail(cat("is not a gpt_2_simple model file (it starts with '", start, "', not 'GPT2SBIN'); ", what_it_looks_like(b, size_)));
  }
  version_ = read<uint32_t>(b + 8);
  if (version_ > kFormatVersion)
    fail(cat("was written by a newer gpt_2_simple (format version ", version_, "; this one reads version ", kFormatVersion,
             "): upgrade gpt_2_simple, or re-export the model with this version"));
  if (version_ < 1) damaged(cat("format version ", version_, " does not exist"));
  if (read<uint32_t>(b + 12) != kHeaderSize) damaged(cat("header_size is ", read<uint32_t>(b + 12), ", not 128"));
  if (read<uint32_t>(b + 68) != kTableEntrySize) damaged(cat("table_entry_size is ", read<uint32_t>(b + 68), ", not 128"));
  for (int i = 112; i < 124; ++i)
    if (b[i] != 0) damaged(cat("reserved header byte ", i, " is not zero"));
  const uint64_t file_size = read<uint64_t>(b + 16);
  if (size_ < file_size)
    fail(cat("is truncated: it has ", size_, " bytes but its header says ", file_size, " (", file_size - size_,
             " bytes missing: an interrupted copy or download?); copy it again or ", kReexport));
  if (size_ > file_size) damaged(cat("it has ", size_, " bytes but its header says ", file_size));
  flags_ = read<uint32_t>(b + 48);
  if (flags_ >> 16)
    fail(cat("uses features this gpt_2_simple does not know (flags ", hex(flags_), "): upgrade gpt_2_simple, or re-export the model with this version"));

  // 2. Config, dtype, counts.
  const char* names[5] = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"};
  uint64_t cfg[5];
  for (int i = 0; i < 5; ++i) {
    cfg[i] = read<uint32_t>(b + 24 + 4 * i);
    if (cfg[i] < 1 || cfg[i] > kMaxDim) damaged(cat("header field ", names[i], " is ", cfg[i], "; it must be 1..", kMaxDim));
  }
  const uint64_t V = cfg[0], C = cfg[2], NH = cfg[3], L = cfg[4];
  if (C % NH) damaged(cat("n_embd (", C, ") is not a multiple of n_head (", NH, ")"));
  const uint32_t dtype_code = read<uint32_t>(b + 44);
  if (dtype_code > 2) damaged(cat("unknown weight dtype code ", dtype_code));
  if (dtype_code == 2 && version_ < 2) damaged("its weights are int8 (dtype code 2), which format version 1 does not have");
  const int32_t eot = read<int32_t>(b + 52);
  if (eot < -1 || static_cast<int64_t>(eot) >= static_cast<int64_t>(V))
    damaged(cat("eot_token is ", eot, ", outside the vocabulary of ", V, " tokens"));
  const uint64_t n_tensors = read<uint32_t>(b + 64);
  // Names are matched in step 6, which reports a missing or extra tensor by name; here only bound
  // n_layer by the file's size, since the expected set is allocated from it.
  const uint64_t n_expected = 12 * L + 4;  // L < 2^31: no overflow
  if (n_expected * kTableEntrySize > size_)
    damaged(cat("n_layer is ", L, ", but the table of ", n_expected, " tensors that needs would not fit in its ", size_, " bytes"));

  // 3. Sections: aligned, inside their region, not overlapping.
  const uint64_t data_offset = read<uint64_t>(b + 104);
  if (data_offset % kAlignment || data_offset < kHeaderSize || data_offset > size_)
    damaged(cat("data_offset ", data_offset, " is not a multiple of 64 inside the file (128..", size_, ")"));
  struct Section {
    const char* name;
    uint64_t offset, size;
  };
  Section sections[3] = {{"tensor table", read<uint64_t>(b + 56), n_tensors * kTableEntrySize},
                         {"tokenizer", read<uint64_t>(b + 72), read<uint64_t>(b + 80)},
                         {"metadata", read<uint64_t>(b + 88), read<uint64_t>(b + 96)}};
  for (const Section& s : sections) {
    uint64_t end;
    if (s.offset % kAlignment || s.offset < kHeaderSize || !checked_add(s.offset, s.size, &end) || end > data_offset)
      damaged(cat("the ", s.name, " (offset ", s.offset, ", ", s.size, " bytes) is not 64-byte aligned inside bytes 128..", data_offset));
  }
  for (int i = 0; i < 3; ++i)
    for (int j = i + 1; j < 3; ++j) {
      const Section &x = sections[i], &y = sections[j];
      if (x.size && y.size && x.offset < y.offset + y.size && y.offset < x.offset + x.size)
        damaged(cat("the ", x.name, " and the ", y.name, " overlap"));
    }

  // 4. Header checksum over everything before the data (the checksum field counts as zero).
  const uint32_t zero = 0;
  uint32_t crc = crc32(0, b, 124);
  crc = crc32(crc, &zero, 4);
  crc = crc32(crc, b + kHeaderSize, data_offset - kHeaderSize);
  const uint32_t stored_crc = read<uint32_t>(b + 124);
  if (crc != stored_crc)
    damaged(cat("header checksum mismatch (stored ", hex(stored_crc), ", computed ", hex(crc),
                "): its header, tensor table or tokenizer was changed or corrupted"));

  weights_.config = {static_cast<int>(V), static_cast<int>(cfg[1]), static_cast<int>(C), static_cast<int>(NH), static_cast<int>(L)};
  weights_.dtype = static_cast<DType>(dtype_code);
  weights_.eot_token = eot;

  // 5. Tokenizer. Its size is bounded by data_offset <= file size, so is everything allocated below.
  {
    const Section& s = sections[1];
    if (s.size < 28) damaged(cat("the tokenizer section has ", s.size, " bytes, fewer than its 28-byte header"));
    const uint8_t* t = b + s.offset;
    const uint64_t n = read<uint32_t>(t), bytes_size = read<uint64_t>(t + 8), merges_size = read<uint64_t>(t + 16);
    if (n != V) damaged(cat("the tokenizer has ", n, " tokens but the model's vocabulary has ", V));
    if (read<uint32_t>(t + 4) != 0) damaged("the tokenizer's reserved field is not zero");
    uint64_t need = 28 + 5 * n, total;  // n < 2^31: no overflow
    if (!checked_add(need, bytes_size, &total) || !checked_add(total, merges_size, &total) || total != s.size)
      damaged(cat("the tokenizer section has ", s.size, " bytes, which its counts (", n, " tokens, ", bytes_size,
                  " token bytes, ", merges_size, " bytes of merges) do not add up to"));
    const uint8_t* ends = t + 24;
    const uint8_t* kinds = ends + 4 * (n + 1);
    const uint8_t* blob = kinds + n;
    if (read<uint32_t>(ends) != 0 || read<uint32_t>(ends + 4 * n) != bytes_size)
      damaged("the token byte table does not start at 0 and end at the blob's size");
    weights_.token_bytes.resize(n);
    uint64_t prev = 0;
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t end = read<uint32_t>(ends + 4 * (i + 1));
      if (end < prev) damaged(cat("token ", i, "'s bytes end before they start"));
      if (kinds[i] > 1) damaged(cat("token ", i, " has unknown kind ", +kinds[i]));
      weights_.token_bytes[i] = std::string_view(reinterpret_cast<const char*>(blob + prev), end - prev);
      prev = end;
    }
    token_kinds_ = std::string_view(reinterpret_cast<const char*>(kinds), n);
    merges_ = std::string_view(reinterpret_cast<const char*>(blob + bytes_size), merges_size);
    check_tokenizer(kinds);
  }
  metadata_ = std::string_view(reinterpret_cast<const char*>(b + sections[2].offset), sections[2].size);

  // 6. Tensor table: exactly the expected names, each with its dtype and shape, inside the data.
  weights_.h.resize(L);  // L < file size / (12 * 128), checked in step 2
  std::vector<Expected> expected = expected_tensors(weights_);
  std::unordered_map<std::string_view, size_t> index;
  index.reserve(expected.size());
  for (size_t i = 0; i < expected.size(); ++i) index.emplace(expected[i].name, i);

  tensors_.resize(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const uint8_t* e = b + sections[0].offset + i * kTableEntrySize;
    size_t len = 0;
    while (len < 64 && e[len] != 0) ++len;
    const std::string_view raw(reinterpret_cast<const char*>(e), len);
    if (len == 0 || len == 64 || std::any_of(raw.begin(), raw.end(), [](char c) { return c < 0x21 || c > 0x7e; }) ||
        std::any_of(e + len, e + 64, [](uint8_t c) { return c != 0; }))
      damaged(cat("tensor table entry ", i, " has a malformed name (printable ASCII, 1-63 bytes, NUL-padded)"));
    auto it = index.find(raw);
    if (it == index.end())
      fail(cat("holds an unknown tensor '", raw, "' (entry ", i, "), which a ", L,
               "-layer GPT-2 does not have: the file is damaged or not a GPT-2 export; ", kReexport));
    Expected& x = expected[it->second];
    if (x.entry >= 0) damaged(cat("tensor ", x.name, " appears twice (entries ", x.entry, " and ", i, ")"));
    x.entry = static_cast<int64_t>(i);

    TensorInfo& info = tensors_[i];
    info.name = x.name;
    const uint32_t code = read<uint32_t>(e + 64);
    const uint64_t ndim = read<uint32_t>(e + 68), d0 = read<uint64_t>(e + 72), d1 = read<uint64_t>(e + 80);
    info.offset = read<uint64_t>(e + 88);
    info.nbytes = read<uint64_t>(e + 96);
    info.crc32 = read<uint32_t>(e + 120);
    if (code != static_cast<uint32_t>(x.dtype))
      damaged(cat("tensor ", x.name, " has dtype code ", code, ", expected ", static_cast<uint32_t>(x.dtype), " (", dtype_name(x.dtype), ")"));
    if (ndim != static_cast<uint64_t>(x.ndim) || d0 != x.rows || d1 != x.cols)
      fail(cat("has tensor ", x.name, " of shape ", (ndim == 1 || ndim == 2 ? shape_str(static_cast<int>(ndim), d0, d1) : cat(ndim, "-d")),
               " but the header's config (n_vocab=", V, ", n_ctx=", cfg[1], ", n_embd=", C, ", n_layer=", L, ") needs ",
               shape_str(x.ndim, x.rows, x.cols), ": the file is damaged; ", kReexport));
    info.scales_offset = read<uint64_t>(e + 104);
    info.scales_nbytes = read<uint64_t>(e + 112);
    info.scales_crc32 = read<uint32_t>(e + 124);
    if (x.dtype == DType::I8) {  // (rows) fp32 scales, 64-byte aligned inside the data
      uint64_t scales_end;
      if (info.scales_nbytes != 4 * x.rows)  // rows < 2^31
        damaged(cat("tensor ", x.name, " has ", info.scales_nbytes, " bytes of scales but its ", x.rows, " rows need ", 4 * x.rows));
      if (info.scales_offset % kAlignment || info.scales_offset < data_offset ||
          !checked_add(info.scales_offset, info.scales_nbytes, &scales_end) || scales_end > size_)
        damaged(cat("tensor ", x.name, "'s scales (offset ", info.scales_offset, ") are not 64-byte aligned inside the data"));
    } else if (info.scales_offset != 0 || info.scales_nbytes != 0 || info.scales_crc32 != 0) {
      damaged(cat("tensor ", x.name, "'s reserved fields are not zero"));
    }
    uint64_t nbytes;
    if (!checked_mul(x.rows, x.ndim == 2 ? x.cols : 1, &nbytes) || !checked_mul(nbytes, dtype_size(x.dtype), &nbytes))
      damaged(cat("tensor ", x.name, " of shape ", shape_str(x.ndim, x.rows, x.cols), " is too large to address"));
    if (info.nbytes != nbytes) damaged(cat("tensor ", x.name, " has ", info.nbytes, " bytes but its shape needs ", nbytes));
    uint64_t end;
    if (info.offset % kAlignment || info.offset < data_offset)
      damaged(cat("tensor ", x.name, " starts at byte ", info.offset, ", which is not a 64-byte aligned position in the data (from byte ", data_offset, ")"));
    if (!checked_add(info.offset, nbytes, &end) || end > size_)
      fail(cat("is truncated or damaged: tensor ", x.name, " ends at byte ", (end > info.offset ? cat(end) : cat(info.offset, "+", nbytes)),
               " but the file has ", size_, " bytes; ", kReexport));
    info.dtype = x.dtype;
    info.ndim = x.ndim;
    info.shape[0] = static_cast<int64_t>(x.rows);
    info.shape[1] = static_cast<int64_t>(x.cols);
    *x.slot = TensorView{b + info.offset, x.dtype, x.ndim == 2 ? static_cast<int64_t>(x.rows) : 1,
                         static_cast<int64_t>(x.ndim == 2 ? x.cols : x.rows),
                         x.dtype == DType::I8 ? reinterpret_cast<const float*>(b + info.scales_offset) : nullptr};
  }
  for (const Expected& x : expected)
    if (x.entry < 0)
      damaged(cat("tensor ", x.name, " is missing (the table has ", n_tensors, " entries; a ", L, "-layer model has ", n_expected, ")"));

  struct Region {
    uint64_t offset, nbytes;
    std::string name;
  };
  std::vector<Region> regions;  // every tensor's data, and an int8 tensor's scales
  regions.reserve(2 * tensors_.size());
  for (const TensorInfo& t : tensors_) {
    regions.push_back({t.offset, t.nbytes, t.name});
    if (t.dtype == DType::I8) regions.push_back({t.scales_offset, t.scales_nbytes, t.name + "'s scales"});
  }
  std::sort(regions.begin(), regions.end(), [](const Region& x, const Region& y) { return x.offset < y.offset; });
  for (size_t i = 1; i < regions.size(); ++i)
    if (regions[i - 1].offset + regions[i - 1].nbytes > regions[i].offset)
      damaged(cat("tensors ", regions[i - 1].name, " and ", regions[i].name, " overlap"));
}

namespace {
constexpr std::string_view kEndOfText = "<|endoftext|>";
}  // namespace

// What the Python tokenizer (tokenizer.py) needs to rebuild encoder.json and encode any text:
// distinct byte-level tokens covering all 256 bytes and <|endoftext|> as the only special token.
// Checked here so that a crafted file fails at load with a message, not later inside the
// tokenizer. The merges, which only the Python tokenizer reads, are checked where it reads them
// (export.read_tokenizer): checking GPT-2's 50,000 here would make every load several ms slower.
// Duplicates are found with a flat open-addressing table of token ids (a node-based map of
// GPT-2's 50,257 tokens cost ~25 ms on a 2-core VM).
void LoadedModel::check_tokenizer(const uint8_t* kinds) const {
  auto bad = [&](const std::string& what) {
    throw FormatError(cat(path_, " has an unusable tokenizer: ", what,
                          "; export the model again with its own encoder.json and vocab.bpe (GPT-2's byte-level BPE)"));
  };
  const std::vector<std::string_view>& tokens = weights_.token_bytes;
  const int64_t eot = weights_.eot_token;
  size_t capacity = 1024, bits = 10;
  while (capacity < 2 * tokens.size()) capacity *= 2, ++bits;
  std::vector<uint32_t> slots(capacity, UINT32_MAX);
  bool single[256] = {};
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string_view t = tokens[i];
    if (t.empty()) bad(cat("token ", i, " is empty"));
    if (kinds[i] == 1) {
      if (static_cast<int64_t>(i) != eot || t != kEndOfText)
        bad(cat("token ", i, " is a special token ('", t.substr(0, 40), "'); only <|endoftext|>, the header's eot_token, can be one"));
      continue;
    }
    if (static_cast<int64_t>(i) == eot) bad(cat("the eot_token ", i, " is not the special token <|endoftext|>"));
    if (eot >= 0 && t == kEndOfText) bad(cat("token ", i, " duplicates the special token <|endoftext|> (", eot, ")"));
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (char c : t) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
    // FNV's low bits depend only on the bytes' low bits: take the slot from the top of a remix
    for (size_t slot = (h * 0x9E3779B97F4A7C15ull) >> (64 - bits);; slot = (slot + 1) & (capacity - 1)) {
      if (slots[slot] == UINT32_MAX) {
        slots[slot] = static_cast<uint32_t>(i);
        break;
      }
      if (tokens[slots[slot]] == t) bad(cat("tokens ", slots[slot], " and ", i, " are the same bytes"));
    }
    if (t.size() == 1) single[static_cast<uint8_t>(t[0])] = true;
  }
  for (int b = 0; b < 256; ++b)
    if (!single[b]) bad(cat("no token stands for the single byte ", b, ", so some texts could not be encoded (not a byte-level vocabulary)"));
}

void LoadedModel::verify_data() const {
  const int64_t n = static_cast<int64_t>(tensors_.size());
  std::vector<uint32_t> crcs(tensors_.size()), scale_crcs(tensors_.size());
  // One tensor per task: wte (the largest) starts first, the layers share the other threads.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    crcs[i] = crc32(0, base_ + tensors_[i].offset, tensors_[i].nbytes);
    if (tensors_[i].dtype == DType::I8) scale_crcs[i] = crc32(0, base_ + tensors_[i].scales_offset, tensors_[i].scales_nbytes);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (crcs[i] != tensors_[i].crc32)
      throw FormatError(cat(path_, " is damaged: tensor ", tensors_[i].name, " fails its checksum (stored ", hex(tensors_[i].crc32),
                            ", computed ", hex(crcs[i]), "): its weights were corrupted after export; ", kReexport));
    if (tensors_[i].dtype == DType::I8 && scale_crcs[i] != tensors_[i].scales_crc32)
      throw FormatError(cat(path_, " is damaged: tensor ", tensors_[i].name, "'s scales fail their checksum (stored ",
                            hex(tensors_[i].scales_crc32), ", computed ", hex(scale_crcs[i]),
                            "): its weights were corrupted after export; ", kReexport));
  }
}

}  // namespace gpt2s
