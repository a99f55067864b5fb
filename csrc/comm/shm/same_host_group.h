// The same-host group: the all-reduce and reduce-scatter through shared memory, for the ranks of
// one process group that share a /dev/shm: the gloo that torch bundles moves CPU tensors over
// loopback TCP, which is CPU work of its own; here each rank copies its part into its own segment,
// and the ranks sum them from there. Learnt from the designs of DeepSpeed (csrc/cpu/comm/shm.cpp)
// and upstream gloo (gloo/allreduce_shm.cc); our own code, behind the interface of all_reduce.h.
//
// Setup, once per process group and collective (every rank of the group takes part, through the
// process group itself): each rank creates a segment under a random name, the ranks exchange the
// names, each opens the others' and checks the nonce written inside (proof that they share one
// /dev/shm, which a hostname is not: two containers may share one and not the other), and all
// agree, all or nothing. Every rank then unlinks its own segment: nothing is left in /dev/shm once
// setup is done, even after kill -9.
//
// A sum, in rounds of at most kSlotBytes per rank: copy in, then for small rounds every rank sums
// all segments itself; for larger ones each rank sums its part of the elements (reduce-scatter)
// and copies the others' parts back (all-gather). Every sum runs over the ranks in rank order, in
// fp32 for 16-bit types (rounded once), so every rank returns the same bytes. Two buffers per
// segment alternate, so that a rank may copy in round k + 1 while others still read round k.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <memory>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace gmm_allreduce {

class SameHostGroup {
 public:
  // Sets up over `group` (every rank of it must call this, at the same point of its program) and
  // returns nullptr on every rank when any rank cannot take part: another host's /dev/shm, no room
  // in it, GMM_ALLREDUCE_SHM=0. Waits in a sum are bounded by `timeout`.
  static std::unique_ptr<SameHostGroup> create(c10d::ProcessGroup& group,
                                               std::chrono::milliseconds timeout);
  ~SameHostGroup();
  SameHostGroup(const SameHostGroup&) = delete;
  SameHostGroup& operator=(const SameHostGroup&) = delete;

  // flat = the sum of every rank's flat (a contiguous CPU tensor of a floating or integer type),
  // in place. Blocks until done; raises if a peer died, did not come within the timeout, or
  // called with another size or type (then this object refuses every later call).
  void sum(const at::Tensor& flat);

  // out = the sum over ranks of their pieces[r], r being this rank (pieces: one per rank, each
  // contiguous and like out). In rounds of at most kSlotBytes per rank: each rank copies its
  // pieces' next slices in, then sums the slices meant for it, in rank order as sum() does.
  void reduce_scatter(const std::vector<at::Tensor>& pieces, const at::Tensor& out);

  int rank() const { return rank_; }
  int world() const { return world_; }

  struct Segment;  // one rank's shared memory (same_host_group.cpp)

 private:
  SameHostGroup(int rank, int world, std::chrono::milliseconds timeout);
  void round(char* data, int64_t count, at::ScalarType dtype);
  void scatter_round(const std::vector<at::Tensor>& pieces, int64_t begin, int64_t count, char* out,
                     at::ScalarType dtype);
  // Publishes round `seq` (this rank's slot filled: `bytes` of `dtype`), waits for every rank's,
  // checks that they agree on size and type, and returns every rank's slot data.
  std::vector<const char*> exchange(uint64_t seq, int64_t bytes, at::ScalarType dtype);
  void wait_for(uint64_t seq, bool reduced);
  void check_peers();  // raises if a peer gave up
  [[noreturn]] void fail(const std::string& why);

  int rank_;
  int world_;
  std::chrono::milliseconds timeout_;
  std::vector<Segment*> segments_;  // every rank's, mapped; this rank's at rank_
  std::vector<int> pids_;           // each rank's pid, 0 where it cannot be watched from here
  uint64_t seq_ = 0;                // rounds done
  std::string failed_;              // why this object refuses further calls
};

}  // namespace gmm_allreduce
