#include "comm/reduce_scatter.h"

#include "comm/all_reduce.h"
#include "comm/shm/same_host_group.h"

namespace gmm_allreduce {
namespace {

// ProcessGroup's one-tensor collectives under whichever names this torch has: *_single, or the
// older _reduce_scatter_base / _allgather_base (deprecated aliases where both exist).
template <typename G>
c10::intrusive_ptr<c10d::Work> reduce_scatter_one(G& group, at::Tensor& out, at::Tensor& in) {
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  if constexpr (requires { group.reduce_scatter_single(out, in, opts); }) {
    return group.reduce_scatter_single(out, in, opts);
  } else {
    return group._reduce_scatter_base(out, in, opts);
  }
}

template <typename G>
c10::intrusive_ptr<c10d::Work> all_gather_one(G& group, at::Tensor& out, at::Tensor& in) {
  if constexpr (requires { group.all_gather_single(out, in); }) {
    return group.all_gather_single(out, in);
  } else {
    return group._allgather_base(out, in);
  }
}

}  // namespace

ReduceScatter::ReduceScatter(const GroupPtr& group, const at::Tensor& like)
    : group_(group), shm_(shared_memory_of(group, like)) {}

void ReduceScatter::start(const at::Tensor& in, const at::Tensor& out) {
  if (out.numel() == 0) return;  // every rank's parts are empty alike
  if (group_->getSize() == 1 && !collectives_at_world_size_1()) {  // a sum over one rank
    out.copy_(in);
    return;
  }
  if (shm_ && shm_->reduce_scatter(in.view({group_->getSize(), -1}).unbind(0), out)) return;
  at::Tensor input = in;
  at::Tensor output = out;
  pending_.push_back(reduce_scatter_one(*group_, output, input));
}

void ReduceScatter::start(const std::vector<at::Tensor>& pieces, const at::Tensor& out) {
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(pieces.size()) == group_->getSize());
  if (out.numel() == 0) return;
  if (pieces.size() == 1 && !collectives_at_world_size_1()) {
    out.copy_(pieces[0]);
    return;
  }
  if (shm_ && shm_->reduce_scatter(pieces, out)) return;
  std::vector<at::Tensor> outputs{out};
  std::vector<std::vector<at::Tensor>> inputs{pieces};
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  pending_.push_back(group_->reduce_scatter(outputs, inputs, opts));
}

void ReduceScatter::wait() {
  for (const auto& work : pending_) work->wait();
  pending_.clear();
}

at::Tensor all_gather_rows(const GroupPtr& group, const at::Tensor& t) {
  if (group->getSize() == 1) return t.clone();
  std::vector<int64_t> shape = t.sizes().vec();
  shape[0] *= group->getSize();
  at::Tensor out = at::empty(shape, t.options());
  if (t.numel() == 0) return out;
  at::Tensor in = t.contiguous();
  all_gather_one(*group, out, in)->wait();
  return out;
}

}  // namespace gmm_allreduce
