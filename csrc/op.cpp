#include "op.h"

#include <ATen/DeviceGuard.h>

#include <cstring>

#include "comm/all_reduce.h"
#include "comm/deferred.h"
#include "comm/reduce_scatter.h"
#include "consensus.h"

namespace gmm_allreduce {
namespace {

constexpr size_t kSmallCopyBytes = size_t{1} << 20;

// Elements [begin, end) of the 1-D `flat`; flat itself, with no dispatch, when that is all of it.
at::Tensor elements(const at::Tensor& flat, int64_t begin, int64_t end) {
  return begin == 0 && end == flat.numel() ? flat : flat.narrow(0, begin, end - begin);
}

// Whether the one output is the flat buffer itself (a view of it): no copy and no rounding left.
bool output_is_buffer(const Plan& plan) {
  return plan.out_shapes.size() == 1 && plan.reduce_dtype == plan.dtype;
}

// The returned tensors, made before the sum is done (async_op returns them then). One output
// (split_item 2, 3, or a single group): a view of the flat buffer (which may end with the
// fingerprint), or a tensor of its own where the sum runs in fp32 (rounded into it by
// fill_outputs). Several outputs: tensors of their own, since PyTorch's custom-op contract forbids
// outputs that alias each other (an error under torch.compile in CI, and in future PyTorch); the
// single collective over the buffer stays, and fill_outputs copies each group's block out.
std::vector<at::Tensor> make_outputs(const Plan& plan, const at::Tensor& flat) {
  if (output_is_buffer(plan)) return {elements(flat, 0, plan.numel).view(plan.out_shapes[0])};
  std::vector<at::Tensor> outputs;
  outputs.reserve(plan.out_shapes.size());
  for (const auto& shape : plan.out_shapes) {
    outputs.push_back(at::empty(shape, flat.options().dtype(plan.dtype)));
  }
  return outputs;
}

// The summed buffer into the outputs of make_outputs.
void fill_outputs(const Plan& plan, const at::Tensor& flat, std::vector<at::Tensor>& outputs) {
  if (output_is_buffer(plan)) return;
  if (outputs.size() == 1) {  // one rounding from the fp32 sum
    outputs[0].view({-1}).copy_(elements(flat, 0, plan.numel));
    return;
  }
  // The outputs' one rounding, where the sum ran in reduce_dtype (no copy otherwise).
  const at::Tensor used = elements(flat, 0, plan.numel).to(plan.dtype);
  if (used.is_cpu()) {
    // A memcpy per small group (ATen's copy costs ~1 us per call); ATen's (parallel) copy for
    // large ones.
    const auto* src = static_cast<const char*>(used.const_data_ptr());
    int64_t begin = 0;
    for (at::Tensor& out : outputs) {
      const int64_t n = out.numel();
      if (n > 0 && out.nbytes() <= kSmallCopyBytes) {
        std::memcpy(out.mutable_data_ptr(), src + begin * used.element_size(), out.nbytes());
      } else if (n > 0) {
        out.view({-1}).copy_(used.narrow(0, begin, n));
      }
      begin += n;
    }
    return;
  }
  // One op for all (on CUDA one kernel: ATen's fast path for contiguous splits).
  std::vector<int64_t> sizes;
  std::vector<at::Tensor> flat_outputs;
  for (const at::Tensor& out : outputs) {
    sizes.push_back(out.numel());
    flat_outputs.push_back(out.view({-1}));
  }
  at::split_with_sizes_copy_out(flat_outputs, used, sizes);
}

// Asks the engine whether it takes the group rows from the device (before validation).
void ask_engine_for_device_group_list(const Engine& engine, OpArgs& args) {
  args.keep_group_list_on_device =
      engine.takes_device_group_list != nullptr && engine.takes_device_group_list(args);
}

at::Tensor empty_flat(const Plan& plan) {
  return at::empty({plan.numel}, at::TensorOptions(plan.reduce_dtype).device(plan.device));
}

// The reduce-scatter's rounds: round c computes the c-th run of rows of every rank's block (one
// chunk each), then reduce-scatters them into this rank's rows of that run, while round c + 1
// computes. Returns this rank's [M / n, N] rows.
std::vector<at::Tensor> scatter_rows(const Engine& engine, const Plan& plan, const OpArgs& args,
                                     const GroupPtr& group, bool async_op) {
  const int64_t ranks = plan.ranks;
  at::Tensor flat = empty_flat(plan);
  at::Tensor out = at::empty({plan.numel / ranks}, flat.options());
  ReduceScatter reduce_scatter(group, flat);
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
    one_round ? reduce_scatter.start(flat, mine) : reduce_scatter.start(pieces, mine);
  }
  const std::vector<int64_t> shape{plan.rows / ranks, plan.out_shapes[0][1]};
  at::Tensor y = plan.reduce_dtype == plan.dtype
                     ? out.view(shape)
                     : at::empty(shape, out.options().dtype(plan.dtype));
  auto finish = [convert = plan.reduce_dtype != plan.dtype, out,
                 reduce_scatter = std::move(reduce_scatter)](std::vector<at::Tensor>& y) mutable {
    reduce_scatter.wait();
    if (convert) y[0].view({-1}).copy_(out);  // one rounding
    record_on_current_stream(out);            // read here, on the waiting stream
  };
  return finish_or_defer(std::move(finish), {y}, async_op);
}

}  // namespace

std::vector<at::Tensor> run_op(const Engine& engine, OpArgs args, std::string_view group_name,
                               bool check_ranks, bool async_op) {
  // Nothing for an empty x, rejected below.
  const at::OptionalDeviceGuard guard(at::device_of(args.x));
  ask_engine_for_device_group_list(engine, args);
  // Everything that can reject the call happens here, before the first collective.
  const GroupPtr group = resolve_group(std::string(group_name));
  const int64_t world_size = group->getSize();
  args.ranks = world_size;
  Plan plan = check_ranks ? make_plan_agreed(args, group) : make_plan(args);
  if (plan.collective == Collective::kReduceScatter) {
    return scatter_rows(engine, plan, args, group, async_op);
  }

  // The plan's fingerprint follows the outputs in the buffer and travels with the last chunk;
  // with check_ranks the ranks have already agreed on the plan, so it would prove nothing more.
  Fingerprint fingerprint(plan, world_size, /*wanted=*/!check_ranks);
  at::Tensor flat = fingerprint.new_buffer();
  // Chunk c's all-reduce runs (on the backend's threads or stream) while chunk c + 1 computes.
  // Valid calls of one group plan the same chunks, so the ranks issue matching collectives, and
  // all skip an empty buffer together.
  AllReduce all_reduce(group, flat);
  for (const Chunk& chunk : plan.chunks) {
    engine.compute(plan, args, world_size, flat, chunk);
    const int64_t end = chunk.elem_end == plan.numel ? flat.numel() : chunk.elem_end;
    all_reduce.start(elements(flat, chunk.elem_begin, end));
  }
  std::vector<at::Tensor> outputs = make_outputs(plan, flat);
  // The rest of the call, now or at the first wait (async_op); the plan moves in, not copied.
  auto finish = [plan = std::move(plan), fingerprint = std::move(fingerprint), flat,
                 all_reduce = std::move(all_reduce)](std::vector<at::Tensor>& outputs) mutable {
    all_reduce.wait();
    fingerprint.check(flat);
    fill_outputs(plan, flat, outputs);
    record_on_current_stream(flat);  // read here, on the waiting stream
  };
  return finish_or_defer(std::move(finish), std::move(outputs), async_op);
}

std::vector<at::Tensor> run_compute(const Engine& engine, OpArgs args, int64_t world_size) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size: expected an integer >= 1, got ", world_size);
  const at::OptionalDeviceGuard guard(at::device_of(args.x));
  ask_engine_for_device_group_list(engine, args);
  args.ranks = world_size;
  const Plan plan = make_plan(args);
  at::Tensor flat = empty_flat(plan);
  engine.compute(plan, args, world_size, flat, plan.chunks.front());
  std::vector<at::Tensor> outputs = make_outputs(plan, flat);
  fill_outputs(plan, flat, outputs);
  return outputs;
}

}  // namespace gmm_allreduce
