#include "comm/shm/same_host_group.h"

#include <ATen/record_function.h>
#include <c10/util/irange.h>
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "comm/shm/rank_sum.h"
#include "comm/shm/segment.h"
#include "util/env.h"

namespace gmm_allreduce {
using namespace shm;  // NOLINT(google-build-using-namespace): the layout's constants
namespace {

// The names of this user's segments in /dev/shm.
std::string segment_prefix() { return "gmm_allreduce." + std::to_string(geteuid()) + "."; }

std::string segment_path(uint64_t nonce) {
  std::ostringstream s;
  s << kShmDir << "/" << segment_prefix() << std::hex << nonce;
  return s.str();
}

// Field 22 of /proc/PID/stat (the start time, in clock ticks since boot), and whether the process
// is a zombie (dead, not yet reaped); -1 when there is no such process here.
int64_t start_time_of(int pid, bool* zombie = nullptr) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(f, stat)) return -1;
  const size_t close = stat.rfind(')');  // the name may hold spaces and parentheses
  if (close == std::string::npos) return -1;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  int64_t start = -1;
  for (int i = 3; i <= 22 && rest >> field; ++i) {
    if (i == 3 && zombie != nullptr) *zombie = field == "Z" || field == "X";
    if (i == 22) start = std::stoll(field);
  }
  return start;
}

uint64_t pid_namespace() {
  struct stat st{};
  return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

// Opens `name` in the directory `dir` without blocking (a FIFO) or following a link, and reads
// the identity at its start if it is a regular file of this user at least `min_size` long: no
// mapping, so a file another process truncates cannot fault this one. -1 otherwise.
int open_checked(int dir, const char* name, int flags, SegmentIdentity* id, struct stat* st) {
  const int fd = openat(dir, name, flags | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return -1;
  const bool ok =
      fstat(fd, st) == 0 && S_ISREG(st->st_mode) && st->st_uid == geteuid() &&
      st->st_size >= kHeaderBytes &&
      pread(fd, id, sizeof(SegmentIdentity), 0) == static_cast<ssize_t>(sizeof(SegmentIdentity));
  if (!ok) {
    close(fd);
    return -1;
  }
  return fd;
}

SameHostGroup::Segment* map_segment(int fd, int64_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return p == MAP_FAILED ? nullptr : static_cast<SameHostGroup::Segment*>(p);
}

// Unlinks the segments of this user that a process of this pid namespace left behind when it died
// during a setup (between naming its segment and the end of setup, where it unlinks it).
void sweep_stale_segments() {
  const std::string prefix = segment_prefix();
  DIR* dir = opendir(kShmDir);
  if (dir == nullptr) return;
  const uint64_t ns = pid_namespace();
  int examined = 0;
  while (const dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    if (++examined > kMaxSweep) break;
    SegmentIdentity id{};
    struct stat st{};
    const int fd = open_checked(dirfd(dir), name.c_str(), O_RDONLY, &id, &st);
    if (fd < 0) continue;
    close(fd);
    const bool stale =
        id.magic == kMagic && ns != 0 && id.pid_ns == ns && start_time_of(id.pid) != id.start_time;
    if (stale) unlinkat(dirfd(dir), name.c_str(), 0);
  }
  closedir(dir);
}

// Opens and maps rank `rank`'s segment, checking that it is the one that rank created; nullptr
// otherwise, and `bytes` the mapping's size.
SameHostGroup::Segment* open_segment(uint64_t nonce, int rank, int world, int64_t* bytes) {
  if (nonce == 0) return nullptr;  // that rank failed to create one
  SegmentIdentity id{};
  struct stat st{};
  const int fd = open_checked(AT_FDCWD, segment_path(nonce).c_str(), O_RDWR, &id, &st);
  if (fd < 0) return nullptr;  // another host's /dev/shm (or container's)
  SameHostGroup::Segment* s = nullptr;
  if (id.magic == kMagic && id.nonce == nonce && id.rank == rank && id.world == world &&
      id.slot_bytes > 0 && st.st_size == kHeaderBytes + 2 * id.slot_bytes) {
    s = map_segment(fd, st.st_size);
    *bytes = st.st_size;
  }
  close(fd);
  return s;
}

// A sum over the process group, for setup: int64 values, exact.
at::Tensor group_sum(c10d::ProcessGroup& group, at::Tensor t) {
  std::vector<at::Tensor> tensors{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  group.allreduce(tensors, opts)->wait();
  return t;
}

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

std::unique_ptr<SameHostGroup> SameHostGroup::create(c10d::ProcessGroup& group,
                                                     std::chrono::milliseconds timeout) {
  const int rank = group.getRank();
  const int world = group.getSize();
  // This rank's settings. One it does not understand is raised on every rank, once all have
  // said so below: no rank is left waiting for one that raised.
  bool on = false;
  int64_t slot_bytes = 0;
  std::string env_error;
  try {
    on = env_flag("GMM_ALLREDUCE_SHM").value_or(true);
    const int64_t cap = env_bytes("GMM_ALLREDUCE_SHM_BYTES").value_or(kDefaultSegmentBytes);
    TORCH_CHECK_VALUE(cap >= kMinSegmentBytes, "GMM_ALLREDUCE_SHM_BYTES: expected at least 64k (",
                      kMinSegmentBytes, " bytes), got \"", std::getenv("GMM_ALLREDUCE_SHM_BYTES"),
                      "\"");
    slot_bytes = (cap - kHeaderBytes) / 2 / kHeaderBytes * kHeaderBytes;
  } catch (const c10::Error& e) {
    env_error = e.what_without_backtrace();
    on = false;
  }
  std::unique_ptr<SameHostGroup> shm(new SameHostGroup(rank, world, timeout));
  shm->segments_.assign(world, nullptr);  // unmapped by the destructor, whatever happens
  shm->mapped_.assign(world, 0);
  // This rank's segment's name goes when setup ends, whatever happens: by then every rank has
  // mapped every segment it could.
  struct Unlink {
    std::string path;
    ~Unlink() {
      if (!path.empty()) unlink(path.c_str());
    }
  } own;
  // 1. This rank's segment, under a random name (0: none).
  uint64_t nonce = 0;
  if (on) {
    sweep_stale_segments();
    std::random_device rd;
    nonce = ((uint64_t{rd()} << 32) ^ rd()) & ~(uint64_t{1} << 63);
    nonce = nonce == 0 ? 1 : nonce;
    if (shm->create_own(nonce, slot_bytes)) {
      own.path = segment_path(nonce);
    } else {
      nonce = 0;
    }
  }
  // 2. Every rank's name, slot size and whether its settings were understood, exchanged.
  at::Tensor said = at::zeros({3, world}, at::kLong);
  auto at = [&](int row, int r) -> int64_t& { return said.data_ptr<int64_t>()[row * world + r]; };
  at(0, rank) = static_cast<int64_t>(nonce);
  at(1, rank) = slot_bytes;
  at(2, rank) = env_error.empty() ? 0 : 1;
  group_sum(group, said);
  for (int r = 0; r < world; ++r) {
    TORCH_CHECK_VALUE(at(2, r) == 0 || r != rank, env_error);
    TORCH_CHECK_VALUE(at(2, r) == 0, "rank ", r, " of the group could not read its settings of ",
                      "the shared-memory all-reduce (GMM_ALLREDUCE_SHM, GMM_ALLREDUCE_SHM_BYTES); ",
                      "its error names the variable");
  }
  // 3. The others' segments, opened and checked: a segment found under its random name, holding
  // that name's nonce, proves one /dev/shm.
  bool ok = nonce != 0;
  shm->round_bytes_ = slot_bytes;
  for (int r = 0; r < world && ok; ++r) {
    shm->round_bytes_ = std::min(shm->round_bytes_, at(1, r));
    if (r != rank) {
      shm->segments_[r] = open_segment(static_cast<uint64_t>(at(0, r)), r, world, &shm->mapped_[r]);
      ok = shm->segments_[r] != nullptr;
    }
  }
  // 4. All or nothing.
  at::Tensor agreed = at::full({1}, ok ? 1 : 0, at::kLong);
  if (group_sum(group, agreed).item<int64_t>() != world) return nullptr;
  // A peer is watched for death where its pid names its process here (the same pid namespace).
  shm->pids_.assign(world, 0);
  for (int r = 0; r < world; ++r) {
    const SegmentIdentity& id = shm->segments_[r]->id;
    if (r != rank && id.start_time >= 0 && start_time_of(id.pid) == id.start_time) {
      shm->pids_[r] = id.pid;
    }
  }
  return shm;
}

// Creates and maps this rank's segment: an unnamed file in /dev/shm, its header reserved and
// written, then linked under its name. A kill at any moment leaves either nothing or a named
// segment whose header names its dead owner (the sweep's to remove). False, and nothing left
// behind, on failure (no O_TMPFILE, no room, no /proc).
bool SameHostGroup::create_own(uint64_t nonce, int64_t slot_bytes) {
  const int fd = open(kShmDir, O_TMPFILE | O_RDWR | O_CLOEXEC, S_IRUSR | S_IWUSR);
  if (fd < 0) return false;
  const int64_t bytes = kHeaderBytes + 2 * slot_bytes;
  Segment* s = nullptr;
  if (ftruncate(fd, bytes) == 0 && posix_fallocate(fd, 0, kHeaderBytes) == 0) {
    s = map_segment(fd, bytes);
  }
  if (s != nullptr) {
    s->id = SegmentIdentity{.magic = kMagic,
                            .nonce = nonce,
                            .rank = rank_,
                            .world = world_,
                            .pid = static_cast<int32_t>(getpid()),
                            .unused = 0,
                            .start_time = start_time_of(getpid()),
                            .pid_ns = pid_namespace(),
                            .slot_bytes = slot_bytes};
    s->copied.store(0);
    s->reduced.store(0);
    s->aborted.store(0);
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    if (linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, segment_path(nonce).c_str(), AT_SYMLINK_FOLLOW) !=
        0) {
      munmap(s, bytes);
      s = nullptr;
    }
  }
  if (s == nullptr) {
    close(fd);
    return false;
  }
  segments_[rank_] = s;
  mapped_[rank_] = bytes;
  fd_ = fd;
  return true;
}

// Reserves `bytes` of each of this rank's slots in /dev/shm (posix_fallocate: a full /dev/shm
// answers here, not with SIGBUS at a write), growing by powers of two; false when there is no
// room.
bool SameHostGroup::reserve(int64_t bytes) {
  if (bytes <= reserved_) return true;
  const int64_t slot = segments_[rank_]->id.slot_bytes;
  int64_t want = std::max(reserved_, kFirstReserve);
  while (want < bytes) want *= 2;
  want = std::min(want, slot);
  if (posix_fallocate(fd_, kHeaderBytes, want) != 0 ||
      posix_fallocate(fd_, kHeaderBytes + slot, want) != 0) {
    return false;
  }
  reserved_ = want;
  return true;
}

int64_t SameHostGroup::pinned_bytes() const { return kHeaderBytes + 2 * reserved_; }

SameHostGroup::SameHostGroup(int rank, int world, std::chrono::milliseconds timeout)
    : rank_(rank), world_(world), timeout_(timeout) {}

SameHostGroup::~SameHostGroup() {
  for (size_t r = 0; r < segments_.size(); ++r) {
    if (segments_[r] != nullptr) munmap(segments_[r], mapped_[r]);
  }
  if (fd_ >= 0) close(fd_);
}

void SameHostGroup::fail(const std::string& why) {
  failed_ = why;
  // Tell the peers, so that they raise too rather than wait or sum a round this rank left.
  segments_[rank_]->aborted.store(1, std::memory_order_release);
  TORCH_CHECK(false, why);
}

int SameHostGroup::peer_that_gave_up() const {
  for (int r = 0; r < world_; ++r) {
    if (r != rank_ && segments_[r]->aborted.load(std::memory_order_acquire) != 0) return r;
  }
  return -1;
}

void SameHostGroup::gave_up(int r) {
  fail("shared-memory " + std::string(op_) + ": rank " + std::to_string(r) +
       " of the group gave up on the " + op_ + " (it timed out or lost a peer)");
}

void SameHostGroup::check_peers() {
  if (const int r = peer_that_gave_up(); r >= 0) gave_up(r);
}

namespace {
std::atomic<uint64_t> peer_check_spins{1024};
}  // namespace

void SameHostGroup::set_peer_check_spins(int64_t spins) {
  TORCH_CHECK_VALUE(spins >= 1, "peer check spins: expected at least 1, got ", spins);
  peer_check_spins.store(static_cast<uint64_t>(spins));
}

void SameHostGroup::wait_for(uint64_t seq, bool reduced) {
  const auto start = std::chrono::steady_clock::now();
  const uint64_t check_every = peer_check_spins.load(std::memory_order_relaxed);
  for (int r = 0; r < world_; ++r) {
    if (r == rank_) continue;
    const std::atomic<uint64_t>& word = reduced ? segments_[r]->reduced : segments_[r]->copied;
    for (uint64_t spins = 0; word.load(std::memory_order_acquire) < seq; ++spins) {
      if (spins < 256) {
        cpu_relax();
        continue;
      }
      // Ranks may outnumber cores: let the others run.
      if (spins < 4096) {
        sched_yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      if (spins % check_every != 0) continue;
      const int quitter = peer_that_gave_up();
      bool zombie = false;
      const bool dead = pids_[r] != 0 && (start_time_of(pids_[r], &zombie) < 0 || zombie);
      const bool late = std::chrono::steady_clock::now() - start > timeout_;
      // Each counts only if the word is still short after the checks: between the load above and
      // them, the peer may have published and then finished its call and exited, or given up on
      // what followed (a disagreement on the round, which this rank finds next).
      if ((quitter < 0 && !dead && !late) || word.load(std::memory_order_acquire) >= seq) continue;
      if (quitter >= 0) gave_up(quitter);
      if (dead) {
        fail("shared-memory " + std::string(op_) + ": rank " + std::to_string(r) +
             " of the group (pid " + std::to_string(pids_[r]) + ") died during the " + op_);
      }
      fail("shared-memory " + std::string(op_) + ": rank " + std::to_string(r) +
           " of the group did not reach the " + op_ + " within the process group's timeout (" +
           std::to_string(timeout_.count()) + " ms)");
    }
  }
}

std::vector<const char*> SameHostGroup::exchange(uint64_t seq, int64_t bytes, at::ScalarType dtype,
                                                 bool room) {
  SegmentSlotHeader& mine = segments_[rank_]->slot[seq % 2];
  mine.bytes = bytes;
  mine.dtype = static_cast<int32_t>(dtype);
  mine.room = room ? 1 : 0;
  segments_[rank_]->copied.store(seq, std::memory_order_release);
  wait_for(seq, false);
  std::vector<const char*> in(world_);
  bool agree = true;
  for (int r = 0; r < world_; ++r) {
    const SegmentSlotHeader& s = segments_[r]->slot[seq % 2];
    if (s.room == 0) {  // every rank sees it, and refuses the round
      ++refused_;
      return {};
    }
    agree = agree && s.bytes == bytes && s.dtype == static_cast<int32_t>(dtype);
    in[r] = slot_data(segments_[r], seq);
  }
  if (!agree) {  // the same message on every rank
    std::string sizes;
    for (int r = 0; r < world_; ++r) {
      const SegmentSlotHeader& s = segments_[r]->slot[seq % 2];
      sizes += (r ? ", " : "") + std::to_string(s.bytes) + " bytes of " +
               c10::toString(static_cast<at::ScalarType>(s.dtype));
    }
    fail("shared-memory " + std::string(op_) + ": ranks disagree on the buffer (per rank: " +
         sizes + "): their calls differ; check_ranks=True names the rank that differs");
  }
  check_peers();  // a peer that gave up after copying in
  return in;
}

bool SameHostGroup::round(char* data, int64_t count, at::ScalarType dtype) {
  const uint64_t seq = ++seq_;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t bytes = count * elem;
  char* mine = slot_data(segments_[rank_], seq);
  const bool room = reserve(bytes);
  if (room) std::memcpy(mine, data, bytes);
  const std::vector<const char*> in = exchange(seq, bytes, dtype, room);
  if (in.empty()) return false;
  const std::vector<const void*> ins(in.begin(), in.end());
  auto sum = [&](char* out, int64_t begin, int64_t end) { rank_sum(out, ins, dtype, begin, end); };
  if (bytes <= kSmallBytes) {  // every rank sums it all, in the same order
    sum(data, 0, count);
    return true;
  }
  // Reduce-scatter: rank r sums part r into its own slot (only rank r reads part r before the
  // barrier below), then all-gather: every rank copies each part from its owner's slot.
  auto part = [&](int r) { return std::make_pair(count * r / world_, count * (r + 1) / world_); };
  const auto [b, e] = part(rank_);
  sum(mine, b, e);
  segments_[rank_]->reduced.store(seq, std::memory_order_release);
  wait_for(seq, true);
  check_peers();
  for (int r = 0; r < world_; ++r) {
    const auto [pb, pe] = part(r);
    std::memcpy(data + pb * elem, in[r] + pb * elem, (pe - pb) * elem);
  }
  return true;
}

bool SameHostGroup::scatter_round(const std::vector<at::Tensor>& pieces, int64_t begin,
                                  int64_t count, char* out, at::ScalarType dtype) {
  const uint64_t seq = ++seq_;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  char* mine = slot_data(segments_[rank_], seq);
  const bool room = reserve(world_ * count * elem);
  for (int r = 0; r < world_ && room; ++r) {  // part r of this rank's input, for rank r
    std::memcpy(mine + r * count * elem,
                static_cast<const char*>(pieces[r].const_data_ptr()) + begin * elem, count * elem);
  }
  const std::vector<const char*> in = exchange(seq, world_ * count * elem, dtype, room);
  if (in.empty()) return false;
  std::vector<const void*> parts(world_);  // every rank's part for this rank
  for (int r = 0; r < world_; ++r) parts[r] = in[r] + rank_ * count * elem;
  rank_sum(out, parts, dtype, 0, count);
  return true;
}

namespace {

// Runs `round(begin, count)` over [0, numel) in rounds of at most `per_round` elements. Only the
// first round, the largest, can find no room (the reservation never shrinks): then nothing has
// changed, and false goes back to the caller.
template <typename Round>
bool in_rounds(int64_t numel, int64_t per_round, Round round) {
  for (int64_t done = 0; done < numel; done += per_round) {
    if (!round(done, std::min(per_round, numel - done))) {
      TORCH_INTERNAL_ASSERT(done == 0, "shared-memory all-reduce: a later round found no room");
      return false;
    }
  }
  return true;
}

}  // namespace

bool SameHostGroup::reduce_scatter(const std::vector<at::Tensor>& pieces, const at::Tensor& out) {
  RECORD_FUNCTION("gmm_allreduce::shm_reduce_scatter", std::vector<c10::IValue>());
  op_ = "all-reduce";  // the reduce-scatter op's, which the op's all-reduce settings govern
  TORCH_CHECK(failed_.empty(), failed_,
              " (an earlier call failed; the group's shared-memory "
              "all-reduce is unusable)");
  TORCH_CHECK(out.is_cpu() && out.is_contiguous() && static_cast<int>(pieces.size()) == world_,
              "shared-memory reduce-scatter: a contiguous CPU output and one piece per rank "
              "expected");
  for (const at::Tensor& p : pieces) {
    TORCH_CHECK(p.is_cpu() && p.is_contiguous() && p.numel() == out.numel() &&
                    p.scalar_type() == out.scalar_type(),
                "shared-memory reduce-scatter: contiguous pieces like the output expected");
  }
  const int64_t elem = static_cast<int64_t>(out.element_size());
  char* data = static_cast<char*>(out.data_ptr());
  return in_rounds(out.numel(), round_bytes_ / elem / world_, [&](int64_t begin, int64_t count) {
    return scatter_round(pieces, begin, count, data + begin * elem, out.scalar_type());
  });
}

bool SameHostGroup::sum(const at::Tensor& flat) {
  RECORD_FUNCTION("gmm_allreduce::same_host_sum", std::vector<c10::IValue>());
  op_ = "all-reduce";
  TORCH_CHECK(failed_.empty(), failed_,
              " (an earlier call failed; the group's shared-memory "
              "all-reduce is unusable)");
  TORCH_CHECK(flat.is_cpu() && flat.is_contiguous(),
              "shared-memory all-reduce: a contiguous CPU "
              "tensor expected");
  const int64_t elem = static_cast<int64_t>(flat.element_size());
  char* data = static_cast<char*>(flat.data_ptr());
  return in_rounds(flat.numel(), round_bytes_ / elem, [&](int64_t begin, int64_t count) {
    return round(data + begin * elem, count, flat.scalar_type());
  });
}

}  // namespace gmm_allreduce
