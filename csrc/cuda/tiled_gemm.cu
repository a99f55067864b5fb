// A grouped GEMM in one launch for the calls the libraries cannot take in one: fp16 (torch's
// grouped GEMM is bf16 only), differing K and N per group (split_item 0), weights that are
// separate tensors, operands of any strides.
//
// Layout: each block of the launch is one group's part of a chunk, y[m, n] = x[m, k] @ w[k, n],
// y a row-major block of the flat output buffer; x and w are read through their strides.
// Tiling: the grid is the 64x64 output tiles of all blocks, in block order (a tile finds its block
// by binary search over the blocks' first tiles). For split_item 3 with its group rows on the
// device (RowsTiledArgs), the grid is an upper bound of the groups' tiles, and each CTA finds its
// group and tile from the device row ends; those past the last tile return. A CTA of 4 warps stages
// 64x32 of x and 32x64 of w in shared memory per step of K, and each warp accumulates a 32x32
// quarter of the tile with tensor-core WMMA 16x16x16 fragments in fp32. Epilogue: fp32 tile to
// shared memory, then y = round(acc + bias / world_size): one rounding into x's type, or none for
// partials kept in fp32 (reduce_dtype float32). Schedule, staging and
// epilogue are host-and-device code in cuda/host/tiles.h, checked on the CPU by its twin; this
// file adds the WMMA. It is the simple, general kernel (the scheduling and TMA/WGMMA pipeline of a
// Hopper kernel are left to the grouped GEMM); it serves where launches, not FLOPs, dominate: many
// small groups.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/host/tiles.h"
#include "cuda/launches.h"

namespace gmm_allreduce::cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps, 2 x 2 over the tile
// Keeps WMMA's leading dimensions multiples of 8 and the rows' banks apart.
[[maybe_unused]] constexpr int kPad = 8;

// One output tile of block b at (row0, col0), by the CTA's 4 warps. T: the WMMA element type
// (__half, __nv_bfloat16); O: the output's (T's c10 twin, or float).
template <typename T, typename O>
__device__ void compute_tile(const TileBlock& b, int64_t world_size, int64_t row0, int64_t col0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched there: the engine picks this kernel on sm_80 and newer only
#else
  using namespace nvcuda;
  __shared__ __align__(32) uint16_t xs[kTileM][kTileK + kPad];
  __shared__ __align__(32) uint16_t ws[kTileK][kTileN + kPad];
  __shared__ __align__(32) float acc_s[kTileM][kTileN + kPad];

  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32;  // this warp's quarter of the tile
  const int wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (auto& row : acc) {
    for (auto& f : row) wmma::fill_fragment(f, 0.0f);
  }

  for (int64_t k0 = 0; k0 < b.k; k0 += kTileK) {
    // Consecutive threads take consecutive k (x) and n (w): coalesced for row-major operands.
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      xs[i / kTileK][i % kTileK] = x_tile_at(b, row0, k0, i / kTileK, i % kTileK);
    }
    for (int i = threadIdx.x; i < kTileK * kTileN; i += kThreads) {
      ws[i / kTileN][i % kTileN] = w_tile_at(b, k0, col0, i / kTileN, i % kTileN);
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
  for (int i = threadIdx.x; i < kTileM * kTileN; i += kThreads) {
    const int r = i / kTileN, c = i % kTileN;
    store_tile_at<O>(b, world_size, row0, col0, r, c, acc_s[r][c]);
  }
#endif
}

// Host-planned blocks: CTA i computes grid tile i of its block.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    tiled_gemm_kernel(const __grid_constant__ TiledArgs args) {
  const int64_t tile = blockIdx.x;
  const TileBlock& b = args.block[tile_block(args, tile)];
  int64_t row0, col0;
  tile_origin(b, tile, row0, col0);
  compute_tile<T, O>(b, args.world_size, row0, col0);
}

// Group rows on the device: one thread finds the CTA's group and tile from the row ends (a scan
// over at most kMaxTileGroups groups), the others wait for it; CTAs past the last tile return.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    rows_tiled_gemm_kernel(const __grid_constant__ RowsTiledArgs args) {
  __shared__ TileBlock b;
  __shared__ int64_t row0, col0;
  __shared__ bool found;
  if (threadIdx.x == 0) found = rows_tile(args, blockIdx.x, b, row0, col0);
  __syncthreads();
  if (!found) return;  // the whole CTA: `found` is shared
  compute_tile<T, O>(b, args.world_size, row0, col0);
}

// The kernel for x's WMMA type T and the output's O, for every launch.
template <typename T, typename O, typename Args>
void launch_each(const std::vector<Args>& launches) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Args& args : launches) {
    const auto grid = static_cast<unsigned>(args.tiles);
    if (grid == 0) continue;
    if constexpr (std::is_same_v<Args, TiledArgs>) {
      tiled_gemm_kernel<T, O><<<grid, kThreads, 0, stream>>>(args);
    } else {
      rows_tiled_gemm_kernel<T, O><<<grid, kThreads, 0, stream>>>(args);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// C: T's c10 twin; the output is of that type, or fp32.
template <typename T, typename C, typename Args>
void launch_for(at::ScalarType out_dtype, const std::vector<Args>& launches) {
  if (out_dtype == at::kFloat) {
    launch_each<T, float>(launches);
  } else {
    launch_each<T, C>(launches);
  }
}

template <typename Args>
void launch_all(at::ScalarType dtype, at::ScalarType out_dtype, const std::vector<Args>& launches) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "tiled_grouped_gemm: float16 or bfloat16 only, got ", dtype);
  TORCH_CHECK(out_dtype == dtype || out_dtype == at::kFloat,
              "tiled_grouped_gemm: an output of x's dtype or float32, got ", out_dtype);
  if (dtype == at::kHalf) {
    launch_for<__half, c10::Half>(out_dtype, launches);
  } else {
    launch_for<__nv_bfloat16, c10::BFloat16>(out_dtype, launches);
  }
}

}  // namespace

void tiled_grouped_gemm(at::ScalarType dtype, at::ScalarType out_dtype,
                        const std::vector<TiledArgs>& launches) {
  launch_all(dtype, out_dtype, launches);
}

void tiled_grouped_gemm(at::ScalarType dtype, at::ScalarType out_dtype,
                        const std::vector<RowsTiledArgs>& launches) {
  launch_all(dtype, out_dtype, launches);
}

}  // namespace gmm_allreduce::cuda
