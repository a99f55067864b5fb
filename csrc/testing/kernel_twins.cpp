// Test-only CPU twins of the CUDA engine's logic, for tests/test_kernel_twins.py (no GPU needed):
// - _gemm_blocks_reference: the op's flat output buffer computed from gemm_blocks (blocks.h),
//   chunk by chunk, by the formula of the tiled kernel (cuda/tiled_gemm.cu): y[r * n + c] =
//   round(sum_k x[r * x_rs + k * x_cs] * w[k * w_rs + c * w_cs] + bias[c] / world_size), here in
//   double. The buffer starts as NaN, so an element no block writes shows.
// - _row_ends_reference: write_row_ends (epilogue.h), the body of the row-offsets kernel.
// - _tiled_reference: the tiled kernel's schedule, staging and epilogue (tiles.h) around a scalar
//   fp32 MMA in place of its WMMA fragments (fp16 and bf16), for host-planned blocks or, in the
//   rows layout, for a rows-on-device plan of split_item 3 (group rows from the row ends); with
//   reduce_dtype float32, into an fp32 buffer.
// - _bias_reference: bias_launches and add_bias_at (epilogue.h), the bias epilogue, applied to a
//   zero buffer or to an fp32 source (the loop GEMM's), in the plan's layout or (split_item 3) in
//   the rows layout of a device group_list.
// - _gemm_choice: the CUDA engine's GEMM for a call on a device of a given compute capability
//   (choice.h), with "+rows_on_device" when a group_list tensor would stay on the GPU.
// - _plan_signature: what check_ranks compares (Plan::signature), also for a rows-on-device plan.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/host/blocks.h"
#include "cuda/host/choice.h"
#include "cuda/host/epilogue.h"
#include "cuda/host/tiles.h"

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

// The op's arguments of a twin's call (its schema's leading arguments, as the op's).
OpArgs twin_args(at::TensorList x, at::TensorList weight, std::optional<at::TensorList> bias,
                 at::OptionalIntArrayRef group_list,
                 const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                 int64_t group_list_type, int64_t comm_turn) {
  OpArgs args{.x = x.vec(),
              .weight = weight.vec(),
              .group_list_tensor = group_list_tensor,
              .split_item = split_item,
              .group_list_type = group_list_type,
              .collective = {.comm_turn = comm_turn}};
  if (bias) args.bias = bias->vec();
  if (group_list) args.group_list = group_list->vec();
  return args;
}

// The flat buffer after fn(plan, blocks) for every chunk's blocks, in order; it starts as NaN, so
// an element nothing writes shows.
at::Tensor nan_flat(const Plan& plan) {
  return at::full({plan.numel}, std::numeric_limits<double>::quiet_NaN(),
                  at::TensorOptions(plan.reduce_dtype));
}

template <typename Fn>
at::Tensor flat_from_blocks(const OpArgs& args, Fn&& fn) {
  const Plan plan = make_plan(args);
  at::Tensor flat = nan_flat(plan);
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
  const OpArgs args = twin_args(x, weight, bias, group_list, group_list_tensor, split_item,
                                group_list_type, comm_turn);
  return flat_from_blocks(args, [&](const Plan& plan, const std::vector<GemmBlock>& blocks) {
    for (const GemmBlock& b : blocks) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "gemm_blocks",
                                      [&] { compute_block<scalar_t>(b, world_size); });
    }
  });
}

// One output tile of block b at (row0, col0), as a CTA of the tiled kernel computes it, with a
// scalar MMA in place of its WMMA fragments. C: x's type; O: the output's (C or float).
template <typename C, typename O>
void run_tile(const TileBlock& b, int64_t world_size, int64_t row0, int64_t col0) {
  std::vector<uint16_t> xs(kTileM * kTileK), ws(kTileK * kTileN);
  std::vector<float> acc(kTileM * kTileN, 0.0f);
  auto value = [](uint16_t bits) { return static_cast<float>(C(bits, typename C::from_bits_t())); };
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
      store_tile_at<O>(b, world_size, row0, col0, r, c, acc[r * kTileN + c]);
    }
  }
}

// Every CTA of a blocks launch.
template <typename C, typename O>
void run_tiles(const TiledArgs& a) {
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    const TileBlock& b = a.block[tile_block(a, tile)];
    int64_t row0 = 0, col0 = 0;
    tile_origin(b, tile, row0, col0);
    run_tile<C, O>(b, a.world_size, row0, col0);
  }
}

// Every CTA of a rows launch (those past the last tile find none).
template <typename C, typename O>
void run_tiles(const RowsTiledArgs& a) {
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    TileBlock b{};
    int64_t row0 = 0, col0 = 0;
    if (rows_tile(a, tile, b, row0, col0)) run_tile<C, O>(b, a.world_size, row0, col0);
  }
}

// Every CTA of `a`, for x's dtype and the output's (x's, or fp32), as the kernel's launcher picks
// them.
template <typename Args>
void run_launch(const Args& a, at::ScalarType dtype, at::ScalarType out_dtype) {
  const bool fp32 = out_dtype == at::kFloat;
  if (dtype == at::kHalf) {
    fp32 ? run_tiles<c10::Half, float>(a) : run_tiles<c10::Half, c10::Half>(a);
  } else {
    fp32 ? run_tiles<c10::BFloat16, float>(a) : run_tiles<c10::BFloat16, c10::BFloat16>(a);
  }
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

// The chunk's end rows, as the row-offsets kernel writes them.
at::Tensor chunk_row_ends(const at::Tensor& values, int64_t group_list_type, const Plan& plan,
                          const Chunk& chunk) {
  return row_ends_reference(values, group_list_type, plan.rows, chunk.row_begin, chunk.row_end);
}

// args with its group_list as a tensor, planned as a rows-on-device plan (split_item 3): the group
// rows are not read by the plan, as on the GPU. `values` is the group_list tensor.
Plan rows_plan(OpArgs& args, at::Tensor& values) {
  TORCH_CHECK(args.split_item == 3, "rows_layout: split_item 3 only");
  values = args.group_list ? at::tensor(*args.group_list, at::kLong) : *args.group_list_tensor;
  args.group_list = std::nullopt;
  args.group_list_tensor = values;
  args.keep_group_list_on_device = true;
  Plan plan = make_plan(args);
  TORCH_CHECK(plan.rows_on_device, "rows_layout: the plan kept its rows on the host");
  return plan;
}

at::Tensor tiled_reference(at::TensorList x, at::TensorList weight,
                           std::optional<at::TensorList> bias, at::OptionalIntArrayRef group_list,
                           const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                           int64_t group_list_type, int64_t world_size, int64_t comm_turn,
                           bool rows_layout, std::optional<at::ScalarType> reduce_dtype) {
  OpArgs args = twin_args(x, weight, bias, group_list, group_list_tensor, split_item,
                          group_list_type, comm_turn);
  args.collective.reduce_dtype = reduce_dtype;
  TORCH_CHECK(x.empty() || x[0].scalar_type() == at::kHalf || x[0].scalar_type() == at::kBFloat16,
              "_tiled_reference: float16 or bfloat16 only");
  if (!rows_layout) {
    return flat_from_blocks(args, [&](const Plan& plan, const std::vector<GemmBlock>& blocks) {
      for (const TiledArgs& a : tiled_launches(blocks, world_size)) {
        run_launch(a, plan.dtype, plan.reduce_dtype);
      }
    });
  }
  at::Tensor values;
  const Plan plan = rows_plan(args, values);
  at::Tensor flat = nan_flat(plan);
  for (const Chunk& chunk : plan.chunks) {
    const at::Tensor ends = chunk_row_ends(values, group_list_type, plan, chunk);
    std::vector<at::Tensor> keep;
    for (const RowsTiledArgs& a : rows_tiled_launches(
             plan, args, flat, chunk, ends.const_data_ptr<int32_t>(), world_size, keep)) {
      run_launch(a, plan.dtype, plan.reduce_dtype);
    }
  }
  return flat;
}

at::Tensor bias_reference(at::TensorList x, at::TensorList weight, at::TensorList bias,
                          at::OptionalIntArrayRef group_list,
                          const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                          int64_t group_list_type, int64_t world_size, int64_t comm_turn,
                          bool rows_layout, bool from_fp32) {
  OpArgs args = twin_args(x, weight, bias, group_list, group_list_tensor, split_item,
                          group_list_type, comm_turn);
  at::Tensor values;
  const Plan plan = rows_layout ? rows_plan(args, values) : make_plan(args);
  // From an fp32 source (src[e] = e % 4 for the chunk's elements e), the buffer starts as NaN so
  // that an element the epilogue does not write shows; otherwise as zeros, to add the bias to.
  at::Tensor flat = from_fp32 ? nan_flat(plan) : at::zeros({plan.numel}, plan.dtype);
  for (const Chunk& chunk : plan.chunks) {
    at::Tensor ends, src;
    if (rows_layout) ends = chunk_row_ends(values, group_list_type, plan, chunk);
    if (from_fp32)
      src = at::arange(chunk.elem_begin, chunk.elem_end, at::kLong).remainder(4).to(at::kFloat);
    std::vector<at::Tensor> keep;
    for (const BiasArgs& a : bias_launches(
             plan, bias, world_size, chunk, rows_layout ? ends.const_data_ptr<int32_t>() : nullptr,
             from_fp32 ? src.const_data_ptr<float>() : nullptr, keep)) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.dtype, "bias_reference", [&] {
        for (int64_t e = a.elem_begin; e < a.elem_end; ++e) {
          add_bias_at(flat.mutable_data_ptr<scalar_t>(), a, e);
        }
      });
    }
  }
  return flat;
}

std::string gemm_choice(at::TensorList x, at::TensorList weight, std::optional<at::TensorList> bias,
                        at::OptionalIntArrayRef group_list,
                        const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                        int64_t group_list_type, int64_t capability_major, c10::string_view forced,
                        std::optional<at::ScalarType> reduce_dtype) {
  OpArgs args =
      twin_args(x, weight, bias, group_list, group_list_tensor, split_item, group_list_type, 0);
  args.collective.reduce_dtype = reduce_dtype;
  const GemmDevice device{static_cast<int>(capability_major), parse_gemm(forced)};
  Plan plan = make_plan(args);  // validated as the op validates it
  // The CUDA engine's hook decides whether the rows stay on the device before planning, for a
  // group_list on the GPU.
  plan.rows_on_device = serves_device_group_list(args, device);
  std::optional<at::Tensor> weight3;
  const Gemm gemm = choose_gemm(plan, args, device, weight3);
  TORCH_CHECK((gemm == Gemm::kGrouped) == weight3.has_value(), "weight3 without the grouped GEMM");
  return std::string(gemm_name(gemm)) + (plan.rows_on_device ? "+rows_on_device" : "");
}

std::string plan_signature(at::TensorList x, at::TensorList weight,
                           std::optional<at::TensorList> bias, at::OptionalIntArrayRef group_list,
                           const std::optional<at::Tensor>& group_list_tensor, int64_t split_item,
                           int64_t group_list_type, int64_t comm_turn, bool rows_on_device) {
  OpArgs args = twin_args(x, weight, bias, group_list, group_list_tensor, split_item,
                          group_list_type, comm_turn);
  args.keep_group_list_on_device = rows_on_device;
  return make_plan(args).signature();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gmm_allreduce, m) {
  m.def(
      "_gemm_blocks_reference(Tensor[] x, Tensor[] weight, Tensor[]? bias, int[]? group_list, "
      "Tensor? group_list_tensor, int split_item, int group_list_type, int world_size, "
      "int comm_turn) -> Tensor");
  m.def(
      "_tiled_reference(Tensor[] x, Tensor[] weight, Tensor[]? bias, int[]? group_list, "
      "Tensor? group_list_tensor, int split_item, int group_list_type, int world_size, "
      "int comm_turn, bool rows_layout, ScalarType? reduce_dtype=None) -> Tensor");
  m.def(
      "_row_ends_reference(Tensor group_list, int group_list_type, int rows, int row_begin, "
      "int row_end) -> Tensor");
  m.def(
      "_bias_reference(Tensor[] x, Tensor[] weight, Tensor[] bias, int[]? group_list, "
      "Tensor? group_list_tensor, int split_item, int group_list_type, int world_size, "
      "int comm_turn, bool rows_layout, bool from_fp32) -> Tensor");
  m.def(
      "_gemm_choice(Tensor[] x, Tensor[] weight, Tensor[]? bias, int[]? group_list, "
      "Tensor? group_list_tensor, int split_item, int group_list_type, int capability_major, "
      "str forced, ScalarType? reduce_dtype=None) -> str");
  m.def(
      "_plan_signature(Tensor[] x, Tensor[] weight, Tensor[]? bias, int[]? group_list, "
      "Tensor? group_list_tensor, int split_item, int group_list_type, int comm_turn, "
      "bool rows_on_device) -> str");
}

TORCH_LIBRARY_IMPL(gmm_allreduce, CPU, m) {
  m.impl("_gemm_blocks_reference", &gemm_blocks_reference);
  m.impl("_tiled_reference", &tiled_reference);
  m.impl("_row_ends_reference", &row_ends_reference);
  m.impl("_bias_reference", &bias_reference);
}

// On tensors of any device: tests/test_cuda.py asks it about its CUDA calls.
TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("_gemm_choice", &gemm_choice);
  m.impl("_plan_signature", &plan_signature);
}

}  // namespace gmm_allreduce
