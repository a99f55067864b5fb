// The tiled grouped GEMM's schedule and data movement (cuda/tiled_gemm.cu), as host-and-device
// code: its launch arguments, which block and output tile a CTA computes, the staging of x and w
// tiles (zeros past the edges), and the epilogue. The kernel calls these on the GPU around its
// tensor-core MMA; the CPU twin (_tiled_reference, testing/kernel_twins.cpp) calls them around a
// scalar MMA, so tests check everything but the WMMA fragments without a GPU. Its output is x's
// 16-bit type or, for partials kept in fp32 (reduce_dtype float32), fp32.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

#include "cuda/host/blocks.h"
#include "cuda/host/epilogue.h"

namespace gmm_allreduce {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int64_t kMaxTileGroups = 128;  // blocks per launch

struct TileBlock {
  const uint16_t* x;  // 16-bit elements, read through the strides below
  const uint16_t* w;
  void* y;  // row-major, row stride n: x's 16-bit type, or fp32
  const void* bias;
  int64_t m, n, k;
  int64_t x_rs, x_cs, w_rs, w_cs;
  int64_t first_tile;  // this block's first tile in the grid
  int8_t bias_dtype;
};

// One launch, by value as kernel parameters (13 KB, within CUDA 12.1+'s 32 KB on sm_70+).
struct TiledArgs {
  int32_t blocks;
  int64_t world_size;
  int64_t tiles;  // the grid: every block's 64 x 64 output tiles, in block order
  TileBlock block[kMaxTileGroups];
};

// The launches for `blocks` (kMaxTileGroups blocks each; launches without tiles left out).
std::vector<TiledArgs> tiled_launches(const std::vector<GemmBlock>& blocks, int64_t world_size);

// One launch for a chunk of split_item 3 whose group rows live on the device (a rows-on-device
// plan): the chunk's rows of x times each group's weight, into the chunk's [rows, n] block of the
// output. Group g (of this launch: group_begin + i) covers the chunk's rows [row_ends[g - 1],
// row_ends[g]) (0 for the first), as write_row_ends gives them; the host knows only their sum. The
// grid is an upper bound of the tiles: the groups' row tiles sum to at most ceil(rows / kTileM) +
// groups (a group of m rows has ceil(m / kTileM) <= m / kTileM + 1), times the column tiles; the
// CTAs past the last tile do nothing. By value as kernel parameters (4.3 KB).
struct RowsTiledArgs {
  const uint16_t* x;  // the chunk's first row of x
  void* y;            // the chunk's first output element
  int64_t y_bytes;    // an output element's: 2, or 4 for fp32 partials
  int64_t rows, n, k, x_rs, x_cs;
  const int32_t* row_ends;  // every group's end row, within the chunk (device memory)
  int32_t group_begin, groups;
  int64_t world_size;
  int64_t tiles;
  const uint16_t* w[kMaxTileGroups];
  int64_t w_rs[kMaxTileGroups], w_cs[kMaxTileGroups];
  const void* bias[kMaxTileGroups];  // nullptr: none
  int8_t bias_dtype[kMaxTileGroups];
};

// The launches for a rows-on-device chunk (kMaxTileGroups groups each). row_ends: the chunk's end
// rows (write_row_ends); biases that are not contiguous are copied into `keep`, which must outlive
// them.
std::vector<RowsTiledArgs> rows_tiled_launches(const Plan& plan, const OpArgs& args,
                                               at::Tensor& flat, const Chunk& chunk,
                                               const int32_t* row_ends, int64_t world_size,
                                               std::vector<at::Tensor>& keep);

// Grid tile `tile` of a rows launch: its group's block b (x, y and m from the group's rows) and
// the tile's first row and column in it. False for a tile past the last one. Tiles are numbered
// group by group, row tile by row tile, and column tile fastest, like the blocks' launches.
C10_HOST_DEVICE inline bool rows_tile(const RowsTiledArgs& a, int64_t tile, TileBlock& b,
                                      int64_t& row0, int64_t& col0) {
  const int64_t tiles_n = (a.n + kTileN - 1) / kTileN;
  int64_t t = tile / tiles_n;  // the row tile among this launch's groups
  col0 = tile % tiles_n * kTileN;
  for (int32_t i = 0; i < a.groups; ++i) {
    const int32_t g = a.group_begin + i;
    const int64_t r0 = g == 0 ? 0 : a.row_ends[g - 1];
    const int64_t m = a.row_ends[g] - r0;  // >= 0: write_row_ends never decreases
    const int64_t tiles_m = (m + kTileM - 1) / kTileM;
    if (t < tiles_m) {
      b = TileBlock{};
      b.x = a.x + r0 * a.x_rs;
      b.w = a.w[i];
      b.y = static_cast<char*>(a.y) + r0 * a.n * a.y_bytes;
      b.bias = a.bias[i];
      b.m = m;
      b.n = a.n;
      b.k = a.k;
      b.x_rs = a.x_rs;
      b.x_cs = a.x_cs;
      b.w_rs = a.w_rs[i];
      b.w_cs = a.w_cs[i];
      b.bias_dtype = a.bias_dtype[i];
      row0 = t * kTileM;
      return true;
    }
    t -= tiles_m;
  }
  return false;
}

// The block that grid tile `tile` belongs to: the last one whose first tile is <= tile.
C10_HOST_DEVICE inline int32_t tile_block(const TiledArgs& a, int64_t tile) {
  int32_t lo = 0, hi = a.blocks - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (a.block[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The first output row and column of grid tile `tile` within its block b.
C10_HOST_DEVICE inline void tile_origin(const TileBlock& b, int64_t tile, int64_t& row0,
                                        int64_t& col0) {
  const int64_t tiles_n = (b.n + kTileN - 1) / kTileN;
  row0 = (tile - b.first_tile) / tiles_n * kTileM;
  col0 = (tile - b.first_tile) % tiles_n * kTileN;
}

// Element [r, c] of the x tile at (row0, k0) and of the w tile at (k0, col0); zero past the edges.
C10_HOST_DEVICE inline uint16_t x_tile_at(const TileBlock& b, int64_t row0, int64_t k0, int r,
                                          int c) {
  const int64_t gr = row0 + r, gc = k0 + c;
  return (gr < b.m && gc < b.k) ? b.x[gr * b.x_rs + gc * b.x_cs] : uint16_t{0};
}

C10_HOST_DEVICE inline uint16_t w_tile_at(const TileBlock& b, int64_t k0, int64_t col0, int r,
                                          int c) {
  const int64_t gr = k0 + r, gc = col0 + c;
  return (gr < b.k && gc < b.n) ? b.w[gr * b.w_rs + gc * b.w_cs] : uint16_t{0};
}

// The epilogue of element [r, c] of the tile at (row0, col0): y = round(acc + bias / world), one
// rounding into T (c10::Half or c10::BFloat16: round to nearest even, as the CUDA intrinsics), or
// none for T = float.
template <typename T>
C10_HOST_DEVICE inline void store_tile_at(const TileBlock& b, int64_t world_size, int64_t row0,
                                          int64_t col0, int r, int c, float acc) {
  const int64_t gr = row0 + r, gc = col0 + c;
  if (gr >= b.m || gc >= b.n) return;
  if (b.bias != nullptr) {
    acc += load_bias<float>(b.bias, b.bias_dtype, gc) / static_cast<float>(world_size);
  }
  static_cast<T*>(b.y)[gr * b.n + gc] = T(acc);
}

}  // namespace gmm_allreduce
