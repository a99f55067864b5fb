// Test-only CPU twins of the CUDA engine's logic, for tests/test_kernel_twins.py (no GPU needed):
// - _gemm_blocks_reference: the op's flat output buffer computed from gemm_blocks (blocks.h),
//   chunk by chunk, by the formula of the tiled kernel (cuda/tiled_gemm.cu): y[r * n + c] =
//   round(sum_k x[r * x_rs + k * x_cs] * w[k * w_rs + c * w_cs] + bias[c] / world_size), here in
//   double. The buffer starts as NaN, so an element no block writes shows.
// - _row_ends_reference: write_row_ends (epilogue.h), the body of the row-offsets kernel.
// - _tiled_reference: the tiled kernel's schedule, staging and epilogue (tiles.h) around a scalar
//   fp32 MMA in place of its WMMA fragments (fp16 and bf16).
// - _bias_reference: bias_launches and add_bias_at (epilogue.h), the bias epilogue, applied to a
//   zero buffer, in the plan's layout or (split_item 3) in the rows layout of a device group_list.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "blocks.h"
#include "epilogue.h"
#include "tiles.h"

namespace gmm_allreduce {
namespace {

double bias_at(const GemmBlock& b, int64_t c) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.bias_dtype, "bias_at", [&] {
    v = static_cast<double>(static_cast<const scalar_t*>(b.bias)[c]);
  });
  return v;
}

template <typename T>
void compute_block(const GemmBlock& b, int64_t world_size) {
  const auto* x = static_cast<const T*>(b.x);
  const auto* w = static_cast<const T*>(b.w);
  auto* y = static_cast<T*>(b.y);
  for (int64_t r = 0; r < b.m; ++r) {
    for (int64_t c = 0; c < b.n; ++c) {
      double acc = 0;
      for (int64_t k = 0; k < b.k; ++k) {
        acc += static_cast<double>(x[r * b.x_rs + k * b.x_cs]) *
               static_cast<double>(w[k * b.w_rs + c * b.w_cs]);
      }
      if (b.bias != nullptr) acc += bias_at(b, c) / static_cast<double>(world_size);
      y[r * b.n + c] = static_cast<T>(acc);
    }
  }
}

// The flat buffer after fn(plan, blocks) for every chunk's blocks, in order; it starts as NaN, so
// an element nothing writes shows.
template <typename Fn>
at::Tensor flat_from_blocks(const OpArgs& args, Fn&& fn) {
  const Plan plan = make_plan(args);
  at::Tensor flat = at::full({plan.numel}, std::numeric_limits<double>::quiet_NaN(),
                             at::TensorOptions(plan.dtype));
  for (const Chunk& chunk : plan.chunks) {
    std::vector<at::Tensor> keep;
    fn(plan, gemm_blocks(plan, args, flat, chunk, keep));
  }
  return flat;
}

at::Tensor gemm_blocks_reference(at::TensorList x, at::TensorList weight,
                                 std::optional<at::TensorList> bias,
                                 at::OptionalIntArrayRef group_list,
                                 const std::optional<at::Tensor>& group_list_tensor,
                                 int64_t split_item, int64_t group_list_type, int64_t world_size,
                                 int64_t comm_turn) {
  const OpArgs args{x,          weight, bias,      group_list,     group_list_tensor,
                    split_item, "sum",  comm_turn, group_list_type};
  return flat_from_blocks(args, [&](const Plan& plan, const std::vector<GemmBlock>& blocks) {
    for (const GemmBlock& b : blocks) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "gemm_blocks",
                                      [&] { compute_block<scalar_t>(b, world_size); });
    }
  });
}

// The tiles of one launch, as the kernel's CTAs compute them, with a scalar MMA.
template <typename C>
void run_tiles(const TiledArgs& a) {
  std::vector<uint16_t> xs(kTileM * kTileK), ws(kTileK * kTileN);
  std::vector<float> acc(kTileM * kTileN);
  auto value = [](uint16_t bits) { return static_cast<float>(C(bits, typename C::from_bits_t())); };
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    const TileBlock& b = a.block[tile_block(a, tile)];
    int64_t row0 = 0, col0 = 0;
    tile_origin(b, tile, row0, col0);
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k0 = 0; k0 < b.k; k0 += kTileK) {
      for (int r = 0; r < kTileM; ++r) {
        for (int c = 0; c < kTileK; ++c) xs[r * kTileK + c] = x_tile_at(b, row0, k0, r, c);
      }
      for (int r = 0; r < kTileK; ++r) {
        for (int c = 0; c < kTileN; ++c) ws[r * kTileN + c] = w_tile_at(b, k0, col0, r, c);
      }
      for (int r = 0; r < kTileM; ++r) {
        for (int c = 0; c < kTileN; ++c) {
          for (int kk = 0; kk < kTileK; ++kk) {
            acc[r * kTileN + c] += value(xs[r * kTileK + kk]) * value(ws[kk * kTileN + c]);
          }
        }
      }
    }
    for (int r = 0; r < kTileM; ++r) {
      for (int c = 0; c < kTileN; ++c) {
        store_tile_at<C>(b, a.world_size, row0, col0, r, c, acc[r * kTileN + c]);
      }
    }
  }
}

at::Tensor tiled_reference(at::TensorList x, at::TensorList weight,
                           std::optional<at::TensorList> bias, at::OptionalIntArrayRef group_list,
                           const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                           int64_t group_list_type, int64_t world_size, int64_t comm_turn) {
  const OpArgs args{x,          weight, bias,      group_list,     group_list_tensor,
                    split_item, "sum",  comm_turn, group_list_type};
  return flat_from_blocks(args, [&](const Plan& plan, const std::vector<GemmBlock>& blocks) {
    TORCH_CHECK(plan.dtype == at::kHalf || plan.dtype == at::kBFloat16,
                "_tiled_reference: float16 or bfloat16 only");
    for (const TiledArgs& a : tiled_launches(blocks, world_size)) {
      plan.dtype == at::kHalf ? run_tiles<c10::Half>(a) : run_tiles<c10::BFloat16>(a);
    }
  });
}

at::Tensor row_ends_reference(const at::Tensor& group_list, int64_t group_list_type, int64_t rows,
                              int64_t row_begin, int64_t row_end) {
  at::Tensor out = at::empty({group_list.numel()}, at::kInt);
  AT_DISPATCH_INDEX_TYPES(group_list.scalar_type(), "row_ends_reference", [&] {
    write_row_ends(group_list.const_data_ptr<index_t>(), group_list.stride(0), group_list.numel(),
                   group_list_type == 1, rows, row_begin, row_end, out.mutable_data_ptr<int32_t>());
  });
  return out;
}

at::Tensor bias_reference(at::TensorList x, at::TensorList weight, at::TensorList bias,
                          at::OptionalIntArrayRef group_list,
                          const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                          int64_t group_list_type, int64_t world_size, int64_t comm_turn,
                          bool rows_layout) {
  const OpArgs args{x,          weight, bias,      group_list,     group_list_tensor,
                    split_item, "sum",  comm_turn, group_list_type};
  const Plan plan = make_plan(args);
  TORCH_CHECK(!rows_layout || split_item == 3, "rows_layout: split_item 3 only");
  at::Tensor flat = at::zeros({plan.numel}, at::TensorOptions(plan.dtype));
  const at::Tensor values =
      group_list ? at::tensor(group_list->vec(), at::kLong) : *group_list_tensor;
  for (const Chunk& chunk : plan.chunks) {
    at::Tensor ends;  // the chunk's end rows, as the row-offsets kernel gives them
    if (rows_layout) {
      ends = row_ends_reference(values, group_list_type, plan.rows, chunk.row_begin, chunk.row_end);
    }
    std::vector<at::Tensor> keep;
    for (const BiasArgs& a :
         bias_launches(plan, bias, world_size, chunk,
                       rows_layout ? ends.const_data_ptr<int32_t>() : nullptr, keep)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "bias_reference", [&] {
        for (int64_t e = a.elem_begin; e < a.elem_end; ++e) {
          add_bias_at(flat.mutable_data_ptr<scalar_t>(), a, e);
        }
      });
    }
  }
  return flat;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) {
  m.impl("_gemm_blocks_reference", &gemm_blocks_reference);
  m.impl("_tiled_reference", &tiled_reference);
  m.impl("_row_ends_reference", &row_ends_reference);
  m.impl("_bias_reference", &bias_reference);
}

}  // namespace gmm_allreduce
