// A grouped GEMM in one launch for the calls the libraries cannot take in one: fp16 (torch's
// grouped GEMM is bf16 only), differing K and N per group (split_item 0), weights that are
// separate tensors, operands of any strides.
//
// Layout: each block of the launch is one group's part of a chunk, y[m, n] = x[m, k] @ w[k, n],
// y a row-major block of the flat output buffer; x and w are read through their strides.
// Tiling: the grid is the 64x64 output tiles of all blocks, in block order (a tile finds its block
// by binary search over the blocks' first tiles). A CTA of 4 warps stages 64x32 of x and 32x64 of w
// in shared memory per step of K, and each warp accumulates a 32x32 quarter of the tile with
// tensor-core WMMA 16x16x16 fragments in fp32.
// Epilogue: fp32 tile to shared memory, then y = round(acc + bias / world_size): one rounding.
// This is the simple, general kernel (the scheduling and TMA/WGMMA pipeline of a Hopper kernel are
// issue 7's); it serves where launches, not FLOPs, dominate: many small groups.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../epilogue.h"
#include "kernels.h"

namespace gmm_allreduce::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
[[maybe_unused]] constexpr int kTileK = 32;
constexpr int kThreads = 128;  // 4 warps, 2 x 2 over the tile
// Keeps WMMA's leading dimensions multiples of 8 and the rows' banks apart.
[[maybe_unused]] constexpr int kPad = 8;

struct Block {
  const uint16_t* x;  // 16-bit elements, read through the strides below
  const uint16_t* w;
  uint16_t* y;  // row-major, row stride n
  const void* bias;
  int64_t m, n, k;
  int64_t x_rs, x_cs, w_rs, w_cs;
  int64_t first_tile;  // this block's first tile in the grid
  int8_t bias_dtype;
};

// By value, as kernel parameters (13 KB, within CUDA 12.1+'s 32 KB on sm_70 and newer).
struct TiledArgs {
  int32_t blocks;
  int64_t world_size;
  Block block[kMaxTileGroups];
};

// v rounded to T (__half or __nv_bfloat16), as its bits.
template <typename T>
__device__ uint16_t round_to_bits(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half_as_ushort(__float2half_rn(v));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    tiled_gemm_kernel(const __grid_constant__ TiledArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the engine picks this kernel on sm_80 and newer only
#else
  using namespace nvcuda;
  __shared__ __align__(32) uint16_t xs[kTileM][kTileK + kPad];
  __shared__ __align__(32) uint16_t ws[kTileK][kTileN + kPad];
  __shared__ __align__(32) float acc_s[kTileM][kTileN + kPad];

  // The block this tile belongs to: the last one whose first tile is <= blockIdx.x.
  const int64_t tile = blockIdx.x;
  int32_t lo = 0, hi = args.blocks - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (args.block[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const Block& b = args.block[lo];
  const int64_t tiles_n = (b.n + kTileN - 1) / kTileN;
  const int64_t row0 = (tile - b.first_tile) / tiles_n * kTileM;
  const int64_t col0 = (tile - b.first_tile) % tiles_n * kTileN;

  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32;  // this warp's quarter of the tile
  const int wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc) {
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  }

  for (int64_t k0 = 0; k0 < b.k; k0 += kTileK) {
    // Stage x[row0 : +64, k0 : +32] and w[k0 : +32, col0 : +64], zeros past the edges;
    // consecutive threads take consecutive k (x) and n (w), coalesced for row-major operands.
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t gr = row0 + r, gc = k0 + c;
      xs[r][c] = (gr < b.m && gc < b.k) ? b.x[gr * b.x_rs + gc * b.x_cs] : uint16_t{0};
    }
    for (int i = threadIdx.x; i < kTileK * kTileN; i += kThreads) {
      const int r = i / kTileN, c = i % kTileN;
      const int64_t gr = k0 + r, gc = col0 + c;
      ws[r][c] = (gr < b.k && gc < b.n) ? b.w[gr * b.w_rs + gc * b.w_cs] : uint16_t{0};
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const T*>(&xs[wm + 16 * i][kk]),
                               kTileK + kPad);
        wmma::load_matrix_sync(fb[i], reinterpret_cast<const T*>(&ws[kk][wn + 16 * i]),
                               kTileN + kPad);
      }
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&acc_s[wm + 16 * i][wn + 16 * j], acc[i][j], kTileN + kPad,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  const auto world = static_cast<float>(args.world_size);
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kThreads) {
    const int r = i / kTileN, c = i % kTileN;
    const int64_t gr = row0 + r, gc = col0 + c;
    if (gr >= b.m || gc >= b.n) continue;
    float v = acc_s[r][c];
    if (b.bias != nullptr) v += load_bias<float>(b.bias, b.bias_dtype, gc) / world;
    b.y[gr * b.n + gc] = round_to_bits<T>(v);
  }
#endif
}

}  // namespace

void tiled_grouped_gemm(at::ScalarType dtype, const std::vector<GemmBlock>& blocks,
                        int64_t world_size) {
  if (blocks.empty()) return;
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "tiled_grouped_gemm: float16 or bfloat16 only, got ", dtype);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t b0 = 0; b0 < blocks.size(); b0 += kMaxTileGroups) {
    const size_t b1 = std::min(blocks.size(), b0 + kMaxTileGroups);
    TiledArgs args{};
    args.world_size = world_size;
    int64_t tiles = 0;
    for (size_t i = b0; i < b1; ++i) {
      const GemmBlock& g = blocks[i];
      Block& b = args.block[args.blocks++];
      b.x = static_cast<const uint16_t*>(g.x);
      b.w = static_cast<const uint16_t*>(g.w);
      b.y = static_cast<uint16_t*>(g.y);
      b.m = g.m;
      b.n = g.n;
      b.k = g.k;
      b.x_rs = g.x_rs;
      b.x_cs = g.x_cs;
      b.w_rs = g.w_rs;
      b.w_cs = g.w_cs;
      b.bias = g.bias;
      b.bias_dtype = g.bias != nullptr ? bias_dtype(g.bias_dtype) : kBiasFloat;
      b.first_tile = tiles;
      tiles += ((b.m + kTileM - 1) / kTileM) * ((b.n + kTileN - 1) / kTileN);
    }
    if (tiles == 0) continue;
    TORCH_CHECK(tiles < (int64_t{1} << 31), "tiled_grouped_gemm: too many tiles (", tiles, ")");
    const auto grid = static_cast<unsigned>(tiles);
    if (dtype == at::kHalf) {
      tiled_gemm_kernel<__half><<<grid, kThreads, 0, stream>>>(args);
    } else {
      tiled_gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace gmm_allreduce::cuda
