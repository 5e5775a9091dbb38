// Where the sampled-gradient kernels (sampled_product.h) read their operands. A position
// is one vector of features: a row of a features-last (N, D) matrix, or one of the N * S
// (image, spatial position) pairs of a features-first (N, D, S) map. The kernels sum over
// positions p in order and pack, per chunk of positions, B consecutive features of each
// position into the contiguous panels their micro-kernels read:
//
//   pack<Ops, B>(panels, ld, f0s, count, p0, steps, P)
//     for every panel j < count: panels[j * ld + q * B + c] holds feature f0s[j] + c of the
//     position(s) of panel row q < steps (Ops::kRowsPerStep consecutive positions from
//     p0 + q * kRowsPerStep; a position >= P counts as zeros), written by Ops::pack;
//   at(p, f) / feature_stride: element (p, f) and the distance between features f, f + 1.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace entskip::cpu {

// Features last: position p is row p of a (P, ld) matrix, its features contiguous.
template <typename scalar_t>
struct RowPositions {
  const scalar_t* data;
  int64_t ld;

  const scalar_t* at(int64_t p, int64_t f) const { return data + p * ld + f; }
  int64_t feature_stride() const { return 1; }

  // Row by row, every panel of a row before the next row: each row is read once, in order.
  template <typename Ops, int B, typename panel_t>
  void pack(panel_t* panels, int64_t ld, const int64_t* f0s, int64_t count, int64_t p0, int64_t steps,
            int64_t P) const {
    constexpr int step = Ops::kRowsPerStep;
    for (int64_t q = 0; q < steps; ++q) {
      const int64_t p = p0 + q * step;
      const bool second = step == 2 && p + 1 < P;
      for (int64_t j = 0; j < count; ++j)
        Ops::pack(panels + j * ld + q * B, at(p, f0s[j]), second ? at(p + 1, f0s[j]) : nullptr);
    }
  }
};

// Features first: position p = n * S + s of an (N, D, S) map (contiguous), feature f of it at
// data[(n * D + f) * S + s]. pack transposes each panel's B feature rows of the chunk's
// positions (read along s, in order) into a per-thread buffer of B-feature rows, which
// Ops::pack then turns into panel rows.
template <typename scalar_t>
struct SpatialPositions {
  const scalar_t* data;
  int64_t D, S;
  mutable std::vector<scalar_t> rows;  // (positions of a chunk, B)

  const scalar_t* at(int64_t p, int64_t f) const { return data + ((p / S) * D + f) * S + p % S; }
  int64_t feature_stride() const { return S; }

  // dst[i * B + c] = src[c * S + i] for the B features c and `run` positions i of one image:
  // W x W tiles transposed in registers (simd::transpose_tile), the last run % W positions
  // one by one.
  template <int B>
  void transpose_run(const scalar_t* src, int64_t run, scalar_t* dst) const {
    constexpr int W = simd::StorageLanes<scalar_t>::W;
    static_assert(B % W == 0, "blocks of whole tiles");
    int64_t i = 0;
    for (; i + W <= run; i += W)
      for (int c = 0; c < B; c += W) simd::transpose_tile(src + c * S + i, S, dst + i * B + c, B);
    for (; i < run; ++i)
      for (int c = 0; c < B; ++c) dst[i * B + c] = src[c * S + i];
  }

  template <typename Ops, int B, typename panel_t>
  void pack(panel_t* panels, int64_t ld, const int64_t* f0s, int64_t count, int64_t p0, int64_t steps,
            int64_t P) const {
    constexpr int step = Ops::kRowsPerStep;
    const int64_t p1 = std::min(P, p0 + steps * step), len = p1 - p0;
    rows.resize(std::max<int64_t>(static_cast<int64_t>(rows.size()), steps * step * B));
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t p = p0; p < p1;) {  // runs of positions within one image
        const int64_t run = std::min(p1 - p, S - p % S);
        transpose_run<B>(at(p, f0s[j]), run, rows.data() + (p - p0) * B);
        p += run;
      }
      for (int64_t q = 0; q < steps; ++q) {
        const int64_t r = q * step;
        Ops::pack(panels + j * ld + q * B, rows.data() + r * B, step == 2 && r + 1 < len ? rows.data() + (r + 1) * B : nullptr);
      }
    }
  }
};

}  // namespace entskip::cpu
