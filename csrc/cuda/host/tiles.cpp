#include "cuda/host/tiles.h"

#include <algorithm>

namespace gmm_allreduce {

std::vector<TiledArgs> tiled_launches(const std::vector<GemmBlock>& blocks, int64_t world_size) {
  std::vector<TiledArgs> launches;
  for (size_t b0 = 0; b0 < blocks.size(); b0 += kMaxTileGroups) {
    const size_t b1 = std::min<size_t>(blocks.size(), b0 + kMaxTileGroups);
    TiledArgs args{};
    args.world_size = world_size;
    for (size_t i = b0; i < b1; ++i) {
      const GemmBlock& g = blocks[i];
      TileBlock& b = args.block[args.blocks++];
      b.x = static_cast<const uint16_t*>(g.x);
      b.w = static_cast<const uint16_t*>(g.w);
      b.y = g.y;
      b.m = g.m;
      b.n = g.n;
      b.k = g.k;
      b.x_rs = g.x_rs;
      b.x_cs = g.x_cs;
      b.w_rs = g.w_rs;
      b.w_cs = g.w_cs;
      b.bias = g.bias;
      b.bias_dtype = g.bias != nullptr ? bias_dtype(g.bias_dtype) : kBiasFloat;
      b.first_tile = args.tiles;
      args.tiles += ((b.m + kTileM - 1) / kTileM) * ((b.n + kTileN - 1) / kTileN);
    }
    TORCH_CHECK(args.tiles < (int64_t{1} << 31), "tiled grouped GEMM: too many tiles (", args.tiles,
                ")");
    if (args.tiles > 0) launches.push_back(args);
  }
  return launches;
}

std::vector<RowsTiledArgs> rows_tiled_launches(const Plan& plan, const OpArgs& a, at::Tensor& flat,
                                               const Chunk& chunk, const int32_t* row_ends,
                                               int64_t world_size, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(plan.rows_on_device, "rows_tiled_launches: a rows-on-device plan only");
  const int64_t rows = chunk.row_end - chunk.row_begin;
  const int64_t n = plan.groups.front().n;
  const at::Tensor& x = a.x[0];
  const auto x_bytes = static_cast<int64_t>(x.element_size());
  const auto y_bytes = static_cast<int64_t>(flat.element_size());
  std::vector<RowsTiledArgs> launches;
  if (rows == 0 || n == 0) return launches;
  const auto groups = static_cast<int64_t>(plan.groups.size());
  for (int64_t g0 = 0; g0 < groups; g0 += kMaxTileGroups) {
    RowsTiledArgs& r = launches.emplace_back();
    r.x = reinterpret_cast<const uint16_t*>(static_cast<const char*>(x.const_data_ptr()) +
                                            chunk.row_begin * x.stride(0) * x_bytes);
    r.y = static_cast<char*>(flat.data_ptr()) + chunk.elem_begin * y_bytes;
    r.y_bytes = y_bytes;
    r.rows = rows;
    r.n = n;
    r.k = x.size(1);
    r.x_rs = x.stride(0);
    r.x_cs = x.stride(1);
    r.row_ends = row_ends;
    r.group_begin = static_cast<int32_t>(g0);
    r.groups = static_cast<int32_t>(std::min(groups - g0, kMaxTileGroups));
    r.world_size = world_size;
    r.tiles = ((rows + kTileM - 1) / kTileM + r.groups) * ((n + kTileN - 1) / kTileN);
    TORCH_CHECK(r.tiles < (int64_t{1} << 31), "tiled grouped GEMM: too many tiles (", r.tiles, ")");
    for (int32_t i = 0; i < r.groups; ++i) {
      const at::Tensor& w = a.weight[g0 + i];
      r.w[i] = static_cast<const uint16_t*>(w.const_data_ptr());
      r.w_rs[i] = w.stride(0);
      r.w_cs[i] = w.stride(1);
      r.bias[i] = nullptr;
      r.bias_dtype[i] = kBiasFloat;
      if (plan.has_bias) {
        const at::Tensor* b = &(*a.bias)[g0 + i];
        if (!b->is_contiguous()) b = &keep.emplace_back(b->contiguous());
        r.bias[i] = b->const_data_ptr();
        r.bias_dtype[i] = bias_dtype(b->scalar_type());
      }
    }
  }
  return launches;
}

}  // namespace gmm_allreduce
