// The same-host group: the all-reduce and reduce-scatter through shared memory, for the ranks of
// one process group that share a /dev/shm: the gloo that torch bundles moves CPU tensors over
// loopback TCP, which is CPU work of its own; here each rank copies its part into its own segment,
// and the ranks sum them from there. Learnt from the designs of DeepSpeed (csrc/cpu/comm/shm.cpp)
// and upstream gloo (gloo/allreduce_shm.cc); our own code, behind the interface of all_reduce.h.
//
// Setup, once per process group and collective (every rank of the group takes part, through the
// process group itself): each rank creates a segment, and gives it a random name only once its
// header is whole (an O_TMPFILE file linked into /dev/shm); the ranks exchange the names, each
// opens the others' and checks the nonce written inside (proof that they share one /dev/shm, which
// a hostname is not: two containers may share one and not the other), and all agree, all or
// nothing. Every rank then unlinks its own segment: nothing is left in /dev/shm once setup is
// done. A rank killed during setup leaves at most a named segment with a whole header, which the
// next setup of this user removes (its owner is dead); that sweep reads headers with pread, never
// mmap, and opens only what cannot block or redirect (O_NONBLOCK, O_NOFOLLOW, regular files of
// this user), so files planted by others under the prefix are skipped.
//
// Memory: a segment is its header (4 KiB) and two slots of GMM_ALLREDUCE_SHM_BYTES / 2 at most
// (8 MiB in all by default), of which only what the group's largest round needed so far is
// reserved in /dev/shm (tmpfs files are sparse). A round that finds no room in /dev/shm to grow is
// refused by every rank, and the caller takes the process group for that call. The memory goes
// when every rank of the group has destroyed its object.
//
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <chrono>
#include <memory>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <utility>
#include <vector>

namespace gmm_allreduce {

class SameHostGroup {
 public:
  // Sets up over `group` (every rank of it must call this, at the same point of its program) and
  // returns nullptr on every rank when any rank cannot take part: another host's /dev/shm, no room
  // in it, GMM_ALLREDUCE_SHM=0. Waits in a sum are bounded by `timeout`. Raises on every rank when
  // any rank's GMM_ALLREDUCE_SHM or GMM_ALLREDUCE_SHM_BYTES is not understood.
  static std::unique_ptr<SameHostGroup> create(c10d::ProcessGroup& group,
                                               std::chrono::milliseconds timeout);
  ~SameHostGroup();
  SameHostGroup(const SameHostGroup&) = delete;
  SameHostGroup& operator=(const SameHostGroup&) = delete;

  // flat = the sum of every rank's flat (a contiguous CPU tensor of a floating or integer type),
  // in place. Blocks until done; raises if a peer died, did not come within the timeout, or
  // called with another size or type (then this object refuses every later call). Returns false,
  // on every rank and with flat unchanged, when some rank found no room in /dev/shm for it.
  bool sum(const at::Tensor& flat);

  // out = the sum over ranks of their pieces[r], r being this rank (pieces: one per rank, each
  // contiguous and like out). In rounds of at most kSlotBytes per rank: each rank copies its
  // pieces' next slices in, then sums the slices meant for it, in rank order as sum() does.
  // Returns false as sum() does.
  bool reduce_scatter(const std::vector<at::Tensor>& pieces, const at::Tensor& out);

  // Rows of a contiguous tensor, as runs (first row, row count), in order.
  using Runs = std::vector<std::pair<int64_t, int64_t>>;
  // Where an all-to-all's received rows go: `count` whole rows at `data`, rows [first, first +
  // count) of those rank `from` sends this rank.
  using RowSink = c10::function_ref<void(int from, int64_t first, int64_t count, const char* data)>;

  // An all-to-all-v of rows (comm/all_to_all.h): this rank's rows send[r] of `in` (a contiguous
  // 2-D CPU tensor) go to rank r; recv_rows[s] rows come from rank s, handed to `sink` as they
  // arrive (rows of in's width and dtype). A first round exchanges every rank's row counts (sent
  // to, expected from each rank): when they disagree, every rank raises the same ValueError and
  // the object stays usable. Then rounds of at most the slot's bytes per rank: each rank copies
  // its rows for rank r (the next whole rows of them) into region r of its slot, regions sized to
  // the call's largest block, then hands every rank's region for it to the sink; its rows for
  // itself go to the sink from `in`. Returns false as sum() does (nothing handed to the sink).
  bool all_to_all(const at::Tensor& in, const std::vector<Runs>& send,
                  const std::vector<int64_t>& recv_rows, RowSink sink);

  int rank() const { return rank_; }
  int world() const { return world_; }
  // The /dev/shm this rank's segment holds now, and the calls refused for want of room.
  int64_t pinned_bytes() const;
  int64_t refused_calls() const { return refused_; }

  struct Segment;  // one rank's shared memory (same_host_group.cpp)

  // Test-only (the testing library sets it): a waiting rank checks its peers (gave up, died, the
  // timeout) once every this many spins, 1024 by default; 1 widens the race between a peer's
  // publishing its round and what it does next, for the tests of that race.
  static void set_peer_check_spins(int64_t spins);

 private:
  SameHostGroup(int rank, int world, std::chrono::milliseconds timeout);
  bool create_own(uint64_t nonce, int64_t slot_bytes);
  bool reserve(int64_t bytes);
  bool round(char* data, int64_t count, at::ScalarType dtype);
  bool scatter_round(const std::vector<at::Tensor>& pieces, int64_t begin, int64_t count, char* out,
                     at::ScalarType dtype);
  // Publishes round `seq` (this rank's slot filled: `bytes` of `dtype`, or no room for them),
  // waits for every rank's, and returns every rank's slot data; an empty vector when some rank
  // had no room. Raises when the ranks disagree on size or type.
  std::vector<const char*> exchange(uint64_t seq, int64_t bytes, at::ScalarType dtype, bool room);
  void wait_for(uint64_t seq, bool reduced);
  int peer_that_gave_up() const;  // a peer that gave up (set `aborted`), or -1
  [[noreturn]] void gave_up(int peer);
  void check_peers();  // raises if a peer gave up
  [[noreturn]] void fail(const std::string& why);

  int rank_;
  int world_;
  std::chrono::milliseconds timeout_;
  std::vector<Segment*> segments_;  // every rank's, mapped; this rank's at rank_
  std::vector<int64_t> mapped_;     // the bytes of each mapping
  std::vector<int> pids_;           // each rank's pid, 0 where it cannot be watched from here
  int fd_ = -1;                     // this rank's segment, to reserve more of it
  int64_t round_bytes_ = 0;         // the most one round moves per rank: the smallest slot
  int64_t reserved_ = 0;            // the bytes of each of this rank's slots reserved so far
  int64_t refused_ = 0;             // calls refused for want of room
  uint64_t seq_ = 0;                // rounds done
  std::string failed_;              // why this object refuses further calls
  const char* op_ = "all-reduce";   // the collective under way, for its errors
};

}  // namespace gmm_allreduce
