#include "comm/all_to_all.h"

#include <ATen/record_function.h>

#include <numeric>

#include "comm/all_reduce.h"
#include "comm/shm/same_host_group.h"

namespace gmm_allreduce {
namespace {

int64_t rows_of(const RowRuns& runs) {
  int64_t rows = 0;
  for (const auto& run : runs) rows += run.second;
  return rows;
}

// Whether the runs of every rank, in rank order, are the rows of `t` in order, all of them: then
// `t` is the backend's buffer as it is.
bool in_rank_order(const std::vector<RowRuns>& runs, const at::Tensor& t) {
  int64_t next = 0;
  for (const RowRuns& rank : runs) {
    for (const auto& [row, rows] : rank) {
      if (rows == 0) continue;
      if (row != next) return false;
      next += rows;
    }
  }
  return next == t.size(0);
}

}  // namespace

void all_to_all_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const at::Tensor& out, const std::vector<RowRuns>& recv) {
  RECORD_FUNCTION("gmm_allreduce::all_to_all_rows", std::vector<c10::IValue>());
  const int world = group->getSize();
  TORCH_INTERNAL_ASSERT(static_cast<int>(send.size()) == world &&
                        static_cast<int>(recv.size()) == world && in.is_contiguous() &&
                        out.is_contiguous());
  if (const auto shm = shared_memory_of(group, in); shm && shm->all_to_all(in, send, out, recv)) {
    return;
  }
  // The process group: one buffer in rank order each way, gathered and scattered where the runs
  // are not that order already.
  std::vector<int64_t> in_splits(world), out_splits(world);
  std::vector<at::Tensor> pieces;
  for (int r = 0; r < world; ++r) {
    in_splits[r] = rows_of(send[r]);
    out_splits[r] = rows_of(recv[r]);
    for (const auto& [row, rows] : send[r]) pieces.push_back(in.narrow(0, row, rows));
  }
  at::Tensor send_buf = in_rank_order(send, in) ? in : at::cat(pieces).contiguous();
  const bool direct = in_rank_order(recv, out);
  at::Tensor recv_buf =
      direct ? out
             : at::empty(
                   {std::accumulate(out_splits.begin(), out_splits.end(), int64_t{0}), out.size(1)},
                   out.options());
  // alltoall_base: its newer name, all_to_all_single, is missing from older torch releases.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  group->alltoall_base(recv_buf, send_buf, out_splits, in_splits)->wait();
#pragma GCC diagnostic pop
  if (direct) return;
  int64_t at = 0;
  for (int s = 0; s < world; ++s) {
    for (const auto& [row, rows] : recv[s]) {
      out.narrow(0, row, rows).copy_(recv_buf.narrow(0, at, rows));
      at += rows;
    }
  }
}

}  // namespace gmm_allreduce
