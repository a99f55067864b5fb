// The same-host group's all-to-all-v of rows (same_host_group.h). Each rank writes its outgoing
// rows once, into one region per receiver of its slot, and every receiver copies its own region
// out of every sender's slot: one copy in, one copy out, no sum. Rows a rank keeps for itself never
// enter shared memory.
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

// Copies the bytes [begin, end) of the rows `runs` of `base` (rows of row_bytes, the runs' rows
// taken in order) into `flat` (kGather) or from it.
template <bool kGather>
void copy_bytes(char* base, const Runs& runs, int64_t row_bytes, int64_t begin, int64_t end,
                char* flat) {
  int64_t at = 0;  // the bytes of the runs before this one
  for (const auto& [row, rows] : runs) {
    if (at >= end) break;
    const int64_t len = rows * row_bytes;
    const int64_t b = std::max(begin, at);
    const int64_t e = std::min(end, at + len);
    if (b < e) {
      char* p = base + row * row_bytes + (b - at);
      if constexpr (kGather) {
        std::memcpy(flat + (b - begin), p, e - b);
      } else {
        std::memcpy(p, flat + (b - begin), e - b);
      }
    }
    at += len;
  }
}

// The rows `from` of `src` copied to the rows `to` of `dst` (the same number of rows in all).
void copy_runs(const char* src, const Runs& from, char* dst, const Runs& to, int64_t row_bytes) {
  size_t f = 0, t = 0;
  int64_t f_done = 0, t_done = 0;  // rows done of the current run of each side
  while (f < from.size() && t < to.size()) {
    const int64_t n = std::min(from[f].second - f_done, to[t].second - t_done);
    if (n > 0) {
      std::memcpy(dst + (to[t].first + t_done) * row_bytes,
                  src + (from[f].first + f_done) * row_bytes, n * row_bytes);
    }
    f_done += n;
    t_done += n;
    if (f_done == from[f].second) f++, f_done = 0;
    if (t < to.size() && t_done == to[t].second) t++, t_done = 0;
  }
}

}  // namespace

bool SameHostGroup::all_to_all(const at::Tensor& in, const std::vector<Runs>& send,
                               const at::Tensor& out, const std::vector<Runs>& recv) {
  RECORD_FUNCTION("gmm_allreduce::shm_all_to_all", std::vector<c10::IValue>());
  TORCH_CHECK(failed_.empty(), failed_,
              " (an earlier call failed; the group's shared-memory collectives are unusable)");
  TORCH_CHECK(
      in.is_cpu() && out.is_cpu() && in.is_contiguous() && out.is_contiguous() && in.dim() == 2 &&
          out.dim() == 2 && in.size(1) == out.size(1) && in.scalar_type() == out.scalar_type() &&
          static_cast<int>(send.size()) == world_ && static_cast<int>(recv.size()) == world_,
      "shared-memory all-to-all: contiguous 2-D CPU rows of one width and dtype, and "
      "runs for every rank expected");
  const int64_t row_bytes = in.size(1) * static_cast<int64_t>(in.element_size());
  char* src = static_cast<char*>(in.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // A slot: every rank's counts first (bytes sent to each rank, then expected from each), then one
  // region per receiver.
  const int64_t prefix = (2 * world_ * static_cast<int64_t>(sizeof(int64_t)) + 63) / 64 * 64;
  const int64_t region = (round_bytes_ - prefix) / world_ / 64 * 64;
  TORCH_CHECK(region > 0, "shared-memory all-to-all: a slot of ", round_bytes_,
              " bytes is too small for ", world_, " ranks (raise GMM_ALLREDUCE_SHM_BYTES)");
  std::vector<int64_t> sent(world_), expected(world_);
  for (int r = 0; r < world_; ++r) {
    sent[r] = run_rows(send[r]) * row_bytes;
    expected[r] = run_rows(recv[r]) * row_bytes;
  }
  int64_t rounds = 1;  // every rank learns the others' counts in the first round
  for (int64_t k = 0; k < rounds; ++k) {
    const uint64_t seq = ++seq_;
    char* mine = slot_data(segments_[rank_], seq);
    const int64_t begin = k * region;
    int64_t need = prefix;
    for (int r = 0; r < world_; ++r) {
      if (r != rank_ && sent[r] > begin) {
        need = std::max(need, prefix + r * region + std::min(region, sent[r] - begin));
      }
    }
    const bool room = reserve(need);
    if (room) {
      if (k == 0) {
        auto* counts = reinterpret_cast<int64_t*>(mine);
        std::copy(sent.begin(), sent.end(), counts);
        std::copy(expected.begin(), expected.end(), counts + world_);
      }
      for (int r = 0; r < world_; ++r) {
        if (r != rank_ && sent[r] > begin) {
          copy_bytes<true>(src, send[r], row_bytes, begin, std::min(sent[r], begin + region),
                           mine + prefix + r * region);
        }
      }
    }
    const std::vector<const char*> slots = exchange(seq, row_bytes, in.scalar_type(), room);
    if (slots.empty()) {  // only the first round can find no room: nothing has moved
      TORCH_INTERNAL_ASSERT(k == 0, "shared-memory all-to-all: a later round found no room");
      return false;
    }
    if (k == 0) {
      // Every rank checks every pair, in one order: the same verdict and message on every rank.
      auto counts = [&](int r) { return reinterpret_cast<const int64_t*>(slots[r]); };
      for (int s = 0; s < world_; ++s) {
        for (int r = 0; r < world_; ++r) {
          const int64_t gives = counts(s)[r];
          const int64_t takes = counts(r)[world_ + s];
          TORCH_CHECK_VALUE(gives == takes,
                            "send_counts and recv_counts disagree between ranks: ", "rank ", s,
                            " sends ", gives / row_bytes, " rows to rank ", r, ", which expects ",
                            takes / row_bytes,
                            " from it (check_ranks=True checks every expert's count before any "
                            "data moves)");
          if (s != r) rounds = std::max(rounds, (gives + region - 1) / region);
        }
      }
    }
    for (int s = 0; s < world_; ++s) {
      if (s != rank_ && expected[s] > begin) {
        copy_bytes<false>(dst, recv[s], row_bytes, begin, std::min(expected[s], begin + region),
                          const_cast<char*>(slots[s]) + prefix + rank_ * region);
      }
    }
  }
  copy_runs(src, send[rank_], dst, recv[rank_], row_bytes);
  return true;
}

}  // namespace gmm_allreduce
