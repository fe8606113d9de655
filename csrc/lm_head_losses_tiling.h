// How lm_head_losses cuts its work on each device: rows that need logits go in row chunks of
// at most max_chunk_rows (the first chunk also holds every paired row), the vocabulary in
// blocks of vocab_block columns. The tests read these numbers (crystal_ext._C.lm_head_losses_tiling)
// so that the multi-chunk and multi-block cases provably cover more than one of each.
#pragma once

#include <algorithm>
#include <cstdint>

namespace crystal_ext {
namespace lm_head {

namespace cpu_tiling {
constexpr int64_t kMaxChunkRows = 2048;
constexpr int64_t kBlockElements = int64_t(1) << 20;  // S block of about 4 MB in fp32

// About kBlockElements logits per block, a multiple of 128, in [256, 8192].
inline int64_t vocab_block(int64_t rows, int64_t vocab) {
  int64_t vb = kBlockElements / std::max<int64_t>(rows, 1);
  vb = std::max<int64_t>(256, std::min<int64_t>(8192, vb / 128 * 128));
  return std::min(vb, vocab);
}
}  // namespace cpu_tiling

namespace cuda_tiling {
constexpr int64_t kMaxChunkRows = 4096;
constexpr int64_t kBlockElements = int64_t(1) << 23;  // S block of about 32 MB in fp32

// About kBlockElements logits per block, a multiple of 256, in [1024, 32768], and at most
// 2 * kBlockElements weight elements per block (bounds the per-block GEMM temporaries).
inline int64_t vocab_block(int64_t rows, int64_t vocab, int64_t hidden_dim) {
  int64_t vb = kBlockElements / std::max<int64_t>(rows, 1);
  vb = std::min<int64_t>(vb, 2 * kBlockElements / std::max<int64_t>(hidden_dim, 1));
  vb = std::max<int64_t>(1024, std::min<int64_t>(32768, vb / 256 * 256));
  return std::min(vb, vocab);
}
}  // namespace cuda_tiling

}  // namespace lm_head
}  // namespace crystal_ext
