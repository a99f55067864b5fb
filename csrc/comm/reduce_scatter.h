// The reduce-scatter that grouped_mat_mul_reduce_scatter issues over its process group, and the
// all-gather of its backward. The reduce-scatter goes through shared memory where the op's
// all-reduce does (CPU tensors, ranks of one host: shm/same_host_group.h), otherwise through the
// process group, on any backend (gloo, NCCL, ...), where the backend runs it (NCCL: its own
// stream); the all-gather through the process group.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "comm/group.h"

namespace gmm_allreduce {

class SameHostGroup;

class ReduceScatter {
 public:
  // Reduce-scatters of tensors like `like` (its device decides) over `group`.
  ReduceScatter(const GroupPtr& group, const at::Tensor& like);

  // Starts out = the sum over the group's ranks of their part r of `in`, where r is this rank: `in`
  // holds one part per rank, each the size of out, in rank order (both contiguous).
  void start(const at::Tensor& in, const at::Tensor& out);
  // The same with part r in pieces[r] (each contiguous, anywhere).
  void start(const std::vector<at::Tensor>& pieces, const at::Tensor& out);
  // Until every started reduce-scatter is done (on CUDA: for work then queued on the current
  // stream).
  void wait();

 private:
  GroupPtr group_;
  std::shared_ptr<SameHostGroup> shm_;
  std::vector<c10::intrusive_ptr<c10d::Work>> pending_;
};

// The group's ranks' `t` ([rows, ...], contiguous) stacked along dim 0 in rank order, on every
// rank.
at::Tensor all_gather_rows(const GroupPtr& group, const at::Tensor& t);

}  // namespace gmm_allreduce
