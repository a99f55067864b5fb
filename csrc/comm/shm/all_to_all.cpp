// The same-host group's all-to-all-v of rows (same_host_group.h). Each rank writes its outgoing
// rows once, into one region per receiver of its slot, and every receiver takes its own region out
// of every sender's slot: one copy in, none out but the sink's own (it may combine the rows where
// they lie). Rows a rank keeps for itself never enter shared memory.
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "comm/shm/same_host_group.h"
#include "comm/shm/segment.h"

namespace gmm_allreduce {
namespace {

using Runs = SameHostGroup::Runs;

int64_t run_rows(const Runs& runs) {
  int64_t rows = 0;
  for (const auto& run : runs) rows += run.second;
  return rows;
}

// Copies the rows [begin, end) of the runs `runs` of `base` (their rows taken in order) to `flat`.
void gather_rows(const char* base, const Runs& runs, int64_t row_bytes, int64_t begin, int64_t end,
                 char* flat) {
  int64_t at = 0;  // the rows of the runs before this one
  for (const auto& [row, rows] : runs) {
    if (at >= end) break;
    const int64_t b = std::max(begin, at);
    const int64_t e = std::min(end, at + rows);
    if (b < e) {
      std::memcpy(flat + (b - begin) * row_bytes, base + (row + b - at) * row_bytes,
                  (e - b) * row_bytes);
    }
    at += rows;
  }
}

}  // namespace

bool SameHostGroup::all_to_all(const at::Tensor& in, const std::vector<Runs>& send,
                               const std::vector<int64_t>& recv_rows, RowSink sink) {
  RECORD_FUNCTION("gmm_allreduce::shm_all_to_all", std::vector<c10::IValue>());
  op_ = "all-to-all";
  TORCH_CHECK(failed_.empty(), failed_,
              " (an earlier call failed; the group's shared-memory collectives are unusable)");
  TORCH_CHECK(in.is_cpu() && in.is_contiguous() && in.dim() == 2 &&
                  static_cast<int>(send.size()) == world_ &&
                  static_cast<int>(recv_rows.size()) == world_,
              "shared-memory all-to-all: contiguous 2-D CPU rows, and counts for every rank "
              "expected");
  const int64_t row_bytes = std::max<int64_t>(in.size(1) * in.element_size(), 1);
  const char* src = static_cast<const char*>(in.const_data_ptr());
  // A slot: every rank's counts first (rows sent to each rank, then expected from each), in the
  // first round alone; then, in the rounds that follow, one region per receiver, of whole rows,
  // sized to the call's largest block, so that a small call reserves little of /dev/shm.
  const int64_t prefix = (2 * world_ * static_cast<int64_t>(sizeof(int64_t)) + 63) / 64 * 64;
  const int64_t most_rows = round_bytes_ / world_ / 64 * 64 / row_bytes;
  TORCH_CHECK(most_rows > 0, "shared-memory all-to-all: rows of ", row_bytes,
              " bytes do not fit a slot's region for ", world_,
              " ranks (raise GMM_ALLREDUCE_SHM_BYTES, or set GMM_ALLREDUCE_SHM=0)");
  std::vector<int64_t> sent(world_);
  for (int r = 0; r < world_; ++r) sent[r] = run_rows(send[r]);

  // Round 0: the counts. Every rank checks every pair, in one order: the same verdict and message
  // on every rank.
  uint64_t seq = ++seq_;
  const bool room = reserve(prefix);
  if (room) {
    auto* counts = reinterpret_cast<int64_t*>(slot_data(segments_[rank_], seq));
    std::copy(sent.begin(), sent.end(), counts);
    std::copy(recv_rows.begin(), recv_rows.end(), counts + world_);
  }
  std::vector<const char*> slots = exchange(seq, row_bytes, in.scalar_type(), room);
  if (slots.empty()) return false;
  int64_t largest = 0;  // the most rows one rank sends another
  for (int s = 0; s < world_; ++s) {
    const auto* from = reinterpret_cast<const int64_t*>(slots[s]);
    for (int r = 0; r < world_; ++r) {
      const int64_t gives = from[r];
      const int64_t takes = reinterpret_cast<const int64_t*>(slots[r])[world_ + s];
      TORCH_CHECK_VALUE(gives == takes,
                        "send_counts and recv_counts disagree between ranks: ", "rank ", s,
                        " sends ", gives, " rows to rank ", r, ", which expects ", takes,
                        " from it (check_ranks=True checks every expert's count before any data "
                        "moves)");
      if (s != r) largest = std::max(largest, gives);
    }
  }
  const int64_t per_round = std::min(most_rows, largest);  // rows of one region
  const int64_t region = (per_round * row_bytes + 63) / 64 * 64;
  const int64_t rounds = per_round > 0 ? (largest + per_round - 1) / per_round : 0;

  // The rows, in rounds; this rank's own go to the sink once the first round has found room
  // (until then the caller may still take the process group for the whole call).
  auto own_rows = [&] {
    int64_t first = 0;
    for (const auto& [row, rows] : send[rank_]) {
      if (rows > 0) sink(rank_, first, rows, src + row * row_bytes);
      first += rows;
    }
  };
  for (int64_t k = 0; k < rounds; ++k) {
    seq = ++seq_;
    char* mine = slot_data(segments_[rank_], seq);
    const int64_t begin = k * per_round;
    int64_t need = 0;
    for (int r = 0; r < world_; ++r) {
      if (r != rank_ && sent[r] > begin) {
        need = std::max(need, r * region + std::min(per_round, sent[r] - begin) * row_bytes);
      }
    }
    const bool fits = reserve(need);
    for (int r = 0; r < world_ && fits; ++r) {
      if (r != rank_ && sent[r] > begin) {
        gather_rows(src, send[r], row_bytes, begin, std::min(sent[r], begin + per_round),
                    mine + r * region);
      }
    }
    slots = exchange(seq, row_bytes, in.scalar_type(), fits);
    if (slots.empty()) {  // only the first, the largest, can find no room: nothing has moved
      TORCH_INTERNAL_ASSERT(k == 0, "shared-memory all-to-all: a later round found no room");
      return false;
    }
    if (k == 0) own_rows();
    for (int s = 0; s < world_; ++s) {
      if (s != rank_ && recv_rows[s] > begin) {
        sink(s, begin, std::min(per_round, recv_rows[s] - begin), slots[s] + rank_ * region);
      }
    }
  }
  if (rounds == 0) own_rows();
  return true;
}

}  // namespace gmm_allreduce
