#include "comm/all_to_all.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
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

// The process group's all-to-all: `in`'s runs gathered into one buffer in rank order (unless they
// are that already), received into `recv_buf` ([sum of recv_rows, width], rank order).
void backend_all_to_all(const GroupPtr& group, const at::Tensor& in,
                        const std::vector<RowRuns>& send, std::vector<int64_t> out_splits,
                        at::Tensor& recv_buf) {
  const int world = group->getSize();
  std::vector<int64_t> in_splits(world);
  std::vector<at::Tensor> pieces;
  for (int r = 0; r < world; ++r) {
    in_splits[r] = rows_of(send[r]);
    for (const auto& [row, rows] : send[r]) pieces.push_back(in.narrow(0, row, rows));
  }
  at::Tensor send_buf = in_rank_order(send, in) ? in : at::cat(pieces).contiguous();
  // alltoall_base: its newer name, all_to_all_single, is missing from older torch releases.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  group->alltoall_base(recv_buf, send_buf, out_splits, in_splits)->wait();
#pragma GCC diagnostic pop
}

}  // namespace

void all_to_all_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const at::Tensor& out, const std::vector<RowRuns>& recv) {
  RECORD_FUNCTION("gmm_allreduce::all_to_all_rows", std::vector<c10::IValue>());
  const int world = group->getSize();
  TORCH_INTERNAL_ASSERT(static_cast<int>(send.size()) == world &&
                        static_cast<int>(recv.size()) == world && in.is_contiguous() &&
                        out.is_contiguous());
  std::vector<int64_t> out_splits(world);
  for (int s = 0; s < world; ++s) out_splits[s] = rows_of(recv[s]);
  const bool direct = in_rank_order(recv, out);
  if (in.is_cpu() && (!direct || shared_memory_of(group, in))) {
    // Each sender's rows copied into their runs of `out` as they arrive.
    const int64_t row_bytes = out.size(1) * static_cast<int64_t>(out.element_size());
    char* dst = static_cast<char*>(out.data_ptr());
    return all_to_all_rows(group, in, send, out_splits,
                           [&](int from, int64_t first, int64_t count, const char* data) {
                             int64_t at = 0;  // rows of from's runs before this one
                             for (const auto& [row, rows] : recv[from]) {
                               const int64_t b = std::max(first, at);
                               const int64_t e = std::min(first + count, at + rows);
                               if (b < e) {
                                 std::memcpy(dst + (row + b - at) * row_bytes,
                                             data + (b - first) * row_bytes, (e - b) * row_bytes);
                               }
                               at += rows;
                             }
                           });
  }
  at::Tensor recv_buf =
      direct ? out
             : at::empty(
                   {std::accumulate(out_splits.begin(), out_splits.end(), int64_t{0}), out.size(1)},
                   out.options());
  backend_all_to_all(group, in, send, out_splits, recv_buf);
  if (direct) return;
  int64_t at = 0;
  for (int s = 0; s < world; ++s) {
    for (const auto& [row, rows] : recv[s]) {
      out.narrow(0, row, rows).copy_(recv_buf.narrow(0, at, rows));
      at += rows;
    }
  }
}

void all_to_all_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const std::vector<int64_t>& recv_rows, RowSink sink) {
  RECORD_FUNCTION("gmm_allreduce::all_to_all_rows", std::vector<c10::IValue>());
  const int world = group->getSize();
  TORCH_INTERNAL_ASSERT(static_cast<int>(send.size()) == world &&
                        static_cast<int>(recv_rows.size()) == world && in.is_cpu() &&
                        in.is_contiguous() && in.dim() == 2);
  if (in.size(1) > 0) {
    if (const auto shm = shared_memory_of(group, in);
        shm && shm->all_to_all(in, send, recv_rows, sink)) {
      return;
    }
  }
  at::Tensor buf = at::empty(
      {std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0}), in.size(1)}, in.options());
  backend_all_to_all(group, in, send, recv_rows, buf);
  const int64_t row_bytes = in.size(1) * static_cast<int64_t>(in.element_size());
  int64_t at = 0;
  for (int s = 0; s < world; ++s) {
    if (recv_rows[s] > 0) {
      sink(s, 0, recv_rows[s], static_cast<const char*>(buf.const_data_ptr()) + at * row_bytes);
    }
    at += recv_rows[s];
  }
}

}  // namespace gmm_allreduce
