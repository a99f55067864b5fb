#include "core/collective.h"

#include "comm/all_reduce.h"
#include "comm/deferred.h"
#include "comm/reduce_scatter.h"
#include "core/buffer.h"
#include "core/consensus.h"

namespace gmm_allreduce {
namespace {

void keep_chunks(Plan&, const OpArgs&) {}

// The comm-free op: its one chunk computed, the outputs filled.
std::vector<at::Tensor> compute_only(const Engine& engine, Plan plan, const OpArgs& args,
                                     const GroupPtr&) {
  at::Tensor flat = empty_flat(plan);
  engine.compute(plan, args, args.collective.ranks, flat, plan.chunks.front());
  std::vector<at::Tensor> outputs = make_outputs(plan, flat);
  fill_outputs(plan, flat, outputs);
  return outputs;
}

// The all-reduce: chunk c's sum runs (on the backend's threads or stream) while chunk c + 1
// computes. Valid calls of one group plan the same chunks, so the ranks issue matching
// collectives, and all skip an empty buffer together.
std::vector<at::Tensor> all_reduce(const Engine& engine, Plan plan, const OpArgs& args,
                                   const GroupPtr& group) {
  const int64_t world_size = args.collective.ranks;
  // The plan's fingerprint follows the outputs in the buffer and travels with the last chunk;
  // with check_ranks the ranks have already agreed on the plan, so it would prove nothing more.
  Fingerprint fingerprint(plan, world_size, /*wanted=*/!args.collective.check_ranks);
  at::Tensor flat = fingerprint.new_buffer();
  AllReduce sum(group, flat);
  for (const Chunk& chunk : plan.chunks) {
    engine.compute(plan, args, world_size, flat, chunk);
    const int64_t end = chunk.elem_end == plan.numel ? flat.numel() : chunk.elem_end;
    sum.start(elements(flat, chunk.elem_begin, end));
  }
  std::vector<at::Tensor> outputs = make_outputs(plan, flat);
  // The rest of the call, now or at the first wait (async_op); the plan moves in, not copied.
  auto finish = [plan = std::move(plan), fingerprint = std::move(fingerprint), flat,
                 sum = std::move(sum)](std::vector<at::Tensor>& outputs) mutable {
    sum.wait();
    fingerprint.check(flat);
    fill_outputs(plan, flat, outputs);
    record_on_current_stream(flat);  // read here, on the waiting stream
  };
  return finish_or_defer(std::move(finish), std::move(outputs), args.collective.async_op);
}

// For a reduce-scatter over `ranks` (single output, rows divisible by ranks): each rank's block of
// rows / ranks rows cut alike into k = min(turns, rows / ranks), at least 1, runs of about equal
// rows; returned round by round, rank by rank (k * ranks chunks, round c's at [c * ranks, ...)).
std::vector<Chunk> scatter_chunks(const Plan& plan, int64_t turns, int64_t ranks) {
  const int64_t block = plan.rows / ranks;
  const int64_t n = plan.rows == 0 ? 0 : plan.numel / plan.rows;  // one output: N per row
  const int64_t k = std::clamp<int64_t>(turns, 1, std::max<int64_t>(block, 1));
  std::vector<Chunk> chunks;
  for (int64_t c = 0; c < k; ++c) {
    // Rows block * c / k and block * (c + 1) / k, without overflowing block * c.
    const int64_t lo = (block / k) * c + (block % k) * c / k;
    const int64_t hi = (block / k) * (c + 1) + (block % k) * (c + 1) / k;
    for (int64_t r = 0; r < ranks; ++r) {
      const int64_t first = r * block;
      chunks.push_back({first + lo, first + hi, (first + lo) * n, (first + hi) * n});
    }
  }
  return chunks;
}

// The reduce-scatter's rules: one output, its rows divisible by the group's ranks.
void plan_scatter(Plan& plan, const OpArgs& a) {
  const int64_t ranks = a.collective.ranks;
  TORCH_CHECK_VALUE(plan.single_y,
                    "split_item: the reduce-scatter returns one tensor, scattered by rows: "
                    "expected 2 or 3, got ",
                    a.split_item);
  const char* rows = plan.combine ? "num_tokens" : "M";
  TORCH_CHECK_VALUE(plan.rows % ranks == 0, plan.combine ? "num_tokens" : "x", ": the output's ",
                    plan.rows, " rows cannot be scattered evenly over the group's ", ranks,
                    " ranks (rank r ", "gets rows [r * ", rows, " / n, (r + 1) * ", rows,
                    " / n)); pad ", rows, " to a multiple of ", ranks);
  plan.chunks = scatter_chunks(plan, a.collective.comm_turn, ranks);
}

// The reduce-scatter's rounds: round c computes the c-th run of rows of every rank's block (one
// chunk each), then reduce-scatters them into this rank's rows of that run, while round c + 1
// computes. Returns this rank's [M / n, N] rows.
std::vector<at::Tensor> reduce_scatter(const Engine& engine, Plan plan, const OpArgs& args,
                                       const GroupPtr& group) {
  const int64_t ranks = plan.ranks;
  at::Tensor flat = empty_flat(plan);
  at::Tensor out = at::empty({plan.numel / ranks}, flat.options());
  ReduceScatter scatter(group, flat);
  const bool one_round = static_cast<int64_t>(plan.chunks.size()) == ranks;
  for (size_t c = 0; c < plan.chunks.size(); c += ranks) {
    std::vector<at::Tensor> pieces;
    for (int64_t r = 0; r < ranks; ++r) {
      const Chunk& chunk = plan.chunks[c + r];
      engine.compute(plan, args, ranks, flat, chunk);
      pieces.push_back(elements(flat, chunk.elem_begin, chunk.elem_end));
    }
    // Rank 0's run: its place in a block is every rank's.
    const Chunk& first = plan.chunks[c];
    const at::Tensor mine = elements(out, first.elem_begin, first.elem_end);
    one_round ? scatter.start(flat, mine) : scatter.start(pieces, mine);
  }
  const std::vector<int64_t> shape{plan.rows / ranks, plan.out_shapes[0][1]};
  at::Tensor y = plan.reduce_dtype == plan.dtype
                     ? out.view(shape)
                     : at::empty(shape, out.options().dtype(plan.dtype));
  auto finish = [convert = plan.reduce_dtype != plan.dtype, out,
                 scatter = std::move(scatter)](std::vector<at::Tensor>& y) mutable {
    scatter.wait();
    if (convert) y[0].view({-1}).copy_(out);  // one rounding
    record_on_current_stream(out);            // read here, on the waiting stream
  };
  return finish_or_defer(std::move(finish), {y}, args.collective.async_op);
}

constexpr CollectiveStrategy kStrategies[] = {
    {Collective::kNone, "grouped_mat_mul", "grouped_mlp", &keep_chunks, &compute_only},
    {Collective::kAllReduce, "grouped_mat_mul_all_reduce", "grouped_mlp_all_reduce", &keep_chunks,
     &all_reduce},
    {Collective::kReduceScatter, "grouped_mat_mul_reduce_scatter", "grouped_mlp_reduce_scatter",
     &plan_scatter, &reduce_scatter},
};

}  // namespace

const CollectiveStrategy& collective_strategy(Collective kind) {
  for (const CollectiveStrategy& s : kStrategies) {
    if (s.kind == kind) return s;
  }
  TORCH_INTERNAL_ASSERT(false, "no strategy for collective ", static_cast<int>(kind));
}

const CollectiveStrategy* collective_strategy(std::string_view op) {
  for (const CollectiveStrategy& s : kStrategies) {
    if (op == s.op || op == s.mlp_op) return &s;
  }
  return nullptr;
}

std::vector<const char*> strategy_ops() {
  std::vector<const char*> ops;
  for (const CollectiveStrategy& s : kStrategies) ops.push_back(s.op);
  for (const CollectiveStrategy& s : kStrategies) ops.push_back(s.mlp_op);
  return ops;
}

Plan plan_call(const OpArgs& args) {
  Plan plan = make_plan(args);
  collective_strategy(args.collective.kind).plan(plan, args);
  return plan;
}

}  // namespace gmm_allreduce
