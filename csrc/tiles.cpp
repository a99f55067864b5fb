#include "tiles.h"

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
      b.first_tile = args.tiles;
      args.tiles += ((b.m + kTileM - 1) / kTileM) * ((b.n + kTileN - 1) / kTileN);
    }
    TORCH_CHECK(args.tiles < (int64_t{1} << 31), "tiled grouped GEMM: too many tiles (", args.tiles,
                ")");
    if (args.tiles > 0) launches.push_back(args);
  }
  return launches;
}

}  // namespace gmm_allreduce
