// A same-host group's segment: its layout in shared memory (same_host_group.h), shared by the
// files that implement the group's collectives.
#pragma once

#include <atomic>
#include <cstdint>

#include "comm/shm/same_host_group.h"

namespace gmm_allreduce {
namespace shm {

constexpr uint64_t kMagic = 0x33726d6873'6d6d67;  // "gmmshmr3", the layout below
constexpr const char* kShmDir = "/dev/shm";
// The header's bytes; the two slots follow it.
constexpr int64_t kHeaderBytes = 4096;
// A segment's bytes at most unless GMM_ALLREDUCE_SHM_BYTES says otherwise, and at least.
constexpr int64_t kDefaultSegmentBytes = int64_t{8} << 20;
constexpr int64_t kMinSegmentBytes = int64_t{64} << 10;
// Slots are reserved in /dev/shm in steps of powers of two from this size.
constexpr int64_t kFirstReserve = int64_t{64} << 10;
// Rounds up to this size are summed whole by every rank (one barrier); larger ones are
// reduce-scattered and all-gathered (two barriers, each rank reading 1/world of the data).
constexpr int64_t kSmallBytes = int64_t{256} << 10;
// Entries under this user's prefix that one setup's sweep examines at most.
constexpr int kMaxSweep = 64;

}  // namespace shm

// Who made a segment, and its shape: the start of its header, read by the sweep with pread.
struct SegmentIdentity {
  uint64_t magic;
  uint64_t nonce;  // the random number the segment's name carries
  int32_t rank;
  int32_t world;
  int32_t pid;
  int32_t unused;
  int64_t start_time;  // of the owner process (/proc/PID/stat), to watch it safely
  uint64_t pid_ns;     // the owner's pid namespace (the inode of /proc/self/ns/pid)
  int64_t slot_bytes;  // each of its two slots' size
};

struct SegmentSlotHeader {
  int64_t bytes;  // this round's size and type: ranks that disagree raise
  int32_t dtype;
  int32_t room;  // 0: the owner found no room for this round; every rank refuses it
};

// One rank's segment's header; its two slots follow at kHeaderBytes. Its sequence words are
// written by their owner only, read by all.
struct SameHostGroup::Segment {
  SegmentIdentity id;
  alignas(64) std::atomic<uint64_t> copied;   // the last round whose data the owner copied in
  alignas(64) std::atomic<uint64_t> reduced;  // the last round whose part the owner summed
  std::atomic<int32_t> aborted;               // the owner gave up (a timeout, a dead peer)
  alignas(64) SegmentSlotHeader slot[2];      // rounds alternate between the two slots
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "atomics across processes");
static_assert(sizeof(SameHostGroup::Segment) <= shm::kHeaderBytes);

// The data of the slot that round `seq` uses, in segment `s`.
inline char* slot_data(SameHostGroup::Segment* s, uint64_t seq) {
  return reinterpret_cast<char*>(s) + shm::kHeaderBytes +
         static_cast<int64_t>(seq % 2) * s->id.slot_bytes;
}

}  // namespace gmm_allreduce
