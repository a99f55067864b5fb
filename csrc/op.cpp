#include "op.h"

#include <ATen/DeviceGuard.h>

#include <cstring>

#include "comm/agree.h"
#include "comm/all_reduce.h"
#include "comm/fingerprint.h"

namespace gmm_allreduce {
namespace {

constexpr size_t kSmallCopyBytes = size_t{1} << 20;

// Elements [begin, end) of the 1-D `flat`; flat itself, with no dispatch, when that is all of it.
at::Tensor elements(const at::Tensor& flat, int64_t begin, int64_t end) {
  return begin == 0 && end == flat.numel() ? flat : flat.narrow(0, begin, end - begin);
}

// The returned tensors. One output (split_item 2, 3, or a single group): a view of the flat buffer
// (which may end with the fingerprint).
// Several outputs: each group's block copied out of the buffer into its own tensor, since PyTorch's
// custom-op contract forbids outputs that alias each other (an error under torch.compile in CI,
// and in future PyTorch); the single collective over the buffer stays.
std::vector<at::Tensor> outputs_of(const Plan& plan, const at::Tensor& flat) {
  const at::Tensor used = elements(flat, 0, plan.numel);
  if (plan.out_shapes.size() == 1) return {used.view(plan.out_shapes[0])};
  std::vector<at::Tensor> outputs;
  outputs.reserve(plan.groups.size());
  for (size_t i = 0; i < plan.groups.size(); ++i) {
    outputs.push_back(at::empty(plan.out_shapes[i], flat.options()));
  }
  if (flat.is_cpu()) {
    // A memcpy per small group (ATen's copy costs ~1 us per call); ATen's (parallel) copy for
    // large ones.
    const auto* src = static_cast<const char*>(flat.const_data_ptr());
    int64_t begin = 0;
    for (at::Tensor& out : outputs) {
      const int64_t n = out.numel();
      if (n > 0 && out.nbytes() <= kSmallCopyBytes) {
        std::memcpy(out.mutable_data_ptr(), src + begin * flat.element_size(), out.nbytes());
      } else if (n > 0) {
        out.view({-1}).copy_(flat.narrow(0, begin, n));
      }
      begin += n;
    }
    return outputs;
  }
  // One op for all (on CUDA one kernel: ATen's fast path for contiguous splits).
  std::vector<int64_t> sizes;
  std::vector<at::Tensor> flat_outputs;
  for (size_t i = 0; i < outputs.size(); ++i) {
    sizes.push_back(outputs[i].numel());
    flat_outputs.push_back(outputs[i].view({-1}));
  }
  at::split_with_sizes_copy_out(flat_outputs, used, sizes);
  return outputs;
}

// Asks the engine whether it takes the group rows from the device (before validation).
void ask_device_rows(const Engine& engine, OpArgs& args) {
  args.device_rows = engine.device_rows != nullptr && engine.device_rows(args);
}

at::Tensor empty_flat(const Plan& plan, int64_t extra = 0) {
  return at::empty({plan.numel + extra}, at::TensorOptions(plan.dtype).device(plan.device));
}

}  // namespace

std::vector<at::Tensor> run_op(const Engine& engine, OpArgs args, std::string_view group_name,
                               bool check_ranks) {
  // Nothing for an empty x, rejected below.
  const at::OptionalDeviceGuard guard(at::device_of(args.x));
  ask_device_rows(engine, args);
  // Everything that can reject the call happens here, before the first collective.
  const GroupPtr group = resolve_group(std::string(group_name));
  const Plan plan = check_ranks ? make_plan_agreed(args, group) : make_plan(args);

  const int64_t world_size = group->getSize();
  // The plan's fingerprint follows the outputs in the buffer and travels with the last chunk;
  // with check_ranks the ranks have already agreed on the plan, so it would prove nothing more.
  const int64_t tail = check_ranks ? 0 : fingerprint_size(plan, world_size);
  at::Tensor flat = empty_flat(plan, tail);
  at::Tensor fingerprint;
  if (tail > 0) {
    fingerprint = elements(flat, plan.numel, plan.numel + tail);
    write_fingerprint(plan, fingerprint);
  }
  // Chunk c's all-reduce runs (on the backend's threads or stream) while chunk c + 1 computes.
  // Valid calls of one group plan the same chunks, so the ranks issue matching collectives, and
  // all skip an empty buffer together.
  AllReduce all_reduce(group, flat);
  for (const Chunk& chunk : plan.chunks) {
    engine.compute(plan, args, world_size, flat, chunk);
    const int64_t end = chunk.elem_end == plan.numel ? plan.numel + tail : chunk.elem_end;
    all_reduce.start(elements(flat, chunk.elem_begin, end));
  }
  all_reduce.wait();
  if (tail > 0) check_fingerprint(plan, fingerprint, world_size);
  return outputs_of(plan, flat);
}

std::vector<at::Tensor> run_compute(const Engine& engine, OpArgs args, int64_t world_size) {
  TORCH_CHECK_VALUE(world_size >= 1, "world_size: expected an integer >= 1, got ", world_size);
  const at::OptionalDeviceGuard guard(at::device_of(args.x));
  ask_device_rows(engine, args);
  const Plan plan = make_plan(args);
  at::Tensor flat = empty_flat(plan);
  engine.compute(plan, args, world_size, flat, plan.chunks.front());
  return outputs_of(plan, flat);
}

}  // namespace gmm_allreduce
