// The all-to-all-v of rows that the expert-parallel ops issue over their process group: through
// shared memory where the op's all-reduce goes (CPU tensors, ranks of one host:
// shm/same_host_group.h), otherwise through the process group's all-to-all with row splits, on any
// backend (gloo, NCCL, ...).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <utility>
#include <vector>

#include "comm/group.h"

namespace gmm_allreduce {

// Rows of a 2-D tensor as runs (first row, row count), taken in order.
using RowRuns = std::vector<std::pair<int64_t, int64_t>>;

// This rank's rows send[r] of `in` go to rank r; rank s's rows for this rank land, in the order
// sent, in the rows recv[s] of `out` (in and out: contiguous, 2-D, one width and dtype). Returns
// when done. Every rank of the group must call it at the same point of its program, even with
// nothing to send or receive. Counts that disagree between ranks raise the same ValueError on
// every rank through shared memory, and whatever the backend does otherwise.
void all_to_all_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const at::Tensor& out, const std::vector<RowRuns>& recv);

// Where received rows go instead of a tensor: `count` whole rows at `data` (in's width and dtype,
// contiguous), rows [first, first + count) of those rank `from` sends this rank.
using RowSink = c10::function_ref<void(int from, int64_t first, int64_t count, const char* data)>;

// The same for CPU tensors, recv_rows[s] rows from rank s handed to `sink` as they arrive (each
// sender's in order; through shared memory, straight from the senders' slots).
void all_to_all_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const std::vector<int64_t>& recv_rows, RowSink sink);

}  // namespace gmm_allreduce
