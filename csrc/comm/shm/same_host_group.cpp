#include "same_host_group.h"

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

#include "rank_sum.h"

namespace gmm_allreduce {
namespace {

constexpr uint64_t kMagic = 0x32726d6873'6d6d67;  // "gmmshmr2", the layout below
// Bytes of one buffer of a segment: a round moves at most this much per rank. Two buffers per
// rank: 8 MiB of /dev/shm per rank (reserved at setup: a /dev/shm too small refuses it there).
constexpr int64_t kSlotBytes = int64_t{4} << 20;
// Rounds up to this size are summed whole by every rank (one barrier); larger ones are
// reduce-scattered and all-gathered (two barriers, each rank reading 1/world of the data).
constexpr int64_t kSmallBytes = int64_t{256} << 10;

struct alignas(64) Slot {
  int64_t bytes;  // this round's size and type: ranks that disagree raise
  int32_t dtype;
  alignas(64) char data[kSlotBytes];
};

}  // namespace

// One rank's segment. Its sequence words are written by their owner only, read by all.
struct SameHostGroup::Segment {
  uint64_t magic;
  uint64_t nonce;  // the random number the segment's name carries
  int32_t rank;
  int32_t world;
  int32_t pid;
  int64_t start_time;  // of the owner process (/proc/PID/stat), to watch it safely
  uint64_t pid_ns;     // the owner's pid namespace (the inode of /proc/self/ns/pid)
  alignas(64) std::atomic<uint64_t> copied;   // the last round whose data the owner copied in
  alignas(64) std::atomic<uint64_t> reduced;  // the last round whose part the owner summed
  std::atomic<int32_t> aborted;               // the owner gave up (a timeout, a dead peer)
  Slot slot[2];                               // rounds alternate between them
};

namespace {

static_assert(std::atomic<uint64_t>::is_always_lock_free, "atomics across processes");

// The names of this user's segments in /dev/shm.
std::string segment_prefix() { return "gmm_allreduce." + std::to_string(getuid()) + "."; }

std::string segment_name(uint64_t nonce) {
  std::ostringstream s;
  s << "/" << segment_prefix() << std::hex << nonce;
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

bool enabled() {
  const char* v = std::getenv("GMM_ALLREDUCE_SHM");
  return v == nullptr || std::string(v) != "0";
}

// Maps the segment of `fd` (read-write); nullptr on failure.
SameHostGroup::Segment* map_segment(int fd) {
  void* p =
      mmap(nullptr, sizeof(SameHostGroup::Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return p == MAP_FAILED ? nullptr : static_cast<SameHostGroup::Segment*>(p);
}

void unmap(SameHostGroup::Segment* s) {
  if (s != nullptr) munmap(s, sizeof(SameHostGroup::Segment));
}

// Creates and maps this rank's segment, its memory reserved (posix_fallocate: a full /dev/shm
// fails here, not with SIGBUS on a later write). nullptr, and nothing left behind, on failure.
SameHostGroup::Segment* create_segment(uint64_t nonce, int rank, int world) {
  const std::string name = segment_name(nonce);
  const int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR);
  if (fd < 0) return nullptr;
  SameHostGroup::Segment* s = nullptr;
  if (posix_fallocate(fd, 0, sizeof(SameHostGroup::Segment)) == 0) s = map_segment(fd);
  close(fd);
  if (s == nullptr) {
    shm_unlink(name.c_str());
    return nullptr;
  }
  s->magic = kMagic;
  s->nonce = nonce;
  s->rank = rank;
  s->world = world;
  s->pid = static_cast<int32_t>(getpid());
  s->start_time = start_time_of(getpid());
  s->pid_ns = pid_namespace();
  s->copied.store(0);
  s->reduced.store(0);
  s->aborted.store(0);
  return s;
}

// Unlinks the segments of this user that a process of this pid namespace left behind when it died
// during a setup (between creating its segment and the end of setup, where it unlinks it).
void sweep_stale_segments() {
  const std::string prefix = segment_prefix();
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  const uint64_t ns = pid_namespace();
  while (const dirent* e = readdir(dir)) {
    const std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    const int fd = shm_open(("/" + name).c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    struct stat st{};
    void* p = nullptr;
    if (fstat(fd, &st) == 0 && st.st_size >= static_cast<off_t>(sizeof(SameHostGroup::Segment))) {
      p = mmap(nullptr, sizeof(SameHostGroup::Segment), PROT_READ, MAP_SHARED, fd, 0);
    }
    close(fd);
    if (p == nullptr || p == MAP_FAILED) continue;
    const auto* s = static_cast<const SameHostGroup::Segment*>(p);
    const bool stale =
        s->magic == kMagic && ns != 0 && s->pid_ns == ns && start_time_of(s->pid) != s->start_time;
    munmap(p, sizeof(SameHostGroup::Segment));
    if (stale) shm_unlink(("/" + name).c_str());
  }
  closedir(dir);
}

// Opens and maps rank `rank`'s segment, checking that it is the one that rank created.
SameHostGroup::Segment* open_segment(uint64_t nonce, int rank, int world) {
  if (nonce == 0) return nullptr;  // that rank failed to create one
  const int fd = shm_open(segment_name(nonce).c_str(), O_RDWR, 0);
  if (fd < 0) return nullptr;  // another host's /dev/shm (or container's)
  SameHostGroup::Segment* s = map_segment(fd);
  close(fd);
  if (s != nullptr &&
      (s->magic != kMagic || s->nonce != nonce || s->rank != rank || s->world != world)) {
    unmap(s);
    s = nullptr;
  }
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
  std::unique_ptr<SameHostGroup> shm(new SameHostGroup(rank, world, timeout));
  shm->segments_.assign(world, nullptr);  // unmapped by the destructor, whatever happens
  // This rank's segment's name goes when setup ends, whatever happens: by then every rank has
  // mapped every segment it could.
  struct Unlink {
    std::string name;
    ~Unlink() {
      if (!name.empty()) shm_unlink(name.c_str());
    }
  } own;
  // 1. This rank's segment, under a random name (0: none).
  uint64_t nonce = 0;
  if (enabled()) {
    sweep_stale_segments();
    std::random_device rd;
    nonce = ((uint64_t{rd()} << 32) ^ rd()) & ~(uint64_t{1} << 63);
    nonce = nonce == 0 ? 1 : nonce;
    shm->segments_[rank] = create_segment(nonce, rank, world);
    if (shm->segments_[rank] == nullptr) {
      nonce = 0;
    } else {
      own.name = segment_name(nonce);
    }
  }
  // 2. Every rank's name, exchanged.
  at::Tensor names = at::zeros({world}, at::kLong);
  names.data_ptr<int64_t>()[rank] = static_cast<int64_t>(nonce);
  group_sum(group, names);
  const int64_t* v = names.const_data_ptr<int64_t>();
  // 3. The others' segments, opened and checked: a segment found under its random name, holding
  // that name's nonce, proves one /dev/shm.
  bool ok = nonce != 0;
  for (int r = 0; r < world && ok; ++r) {
    if (r != rank) {
      shm->segments_[r] = open_segment(static_cast<uint64_t>(v[r]), r, world);
      ok = shm->segments_[r] != nullptr;
    }
  }
  // 4. All or nothing.
  at::Tensor agreed = at::full({1}, ok ? 1 : 0, at::kLong);
  if (group_sum(group, agreed).item<int64_t>() != world) return nullptr;
  // A peer is watched for death where its pid names its process here (the same pid namespace).
  shm->pids_.assign(world, 0);
  for (int r = 0; r < world; ++r) {
    const Segment* s = shm->segments_[r];
    if (r != rank && s->start_time >= 0 && start_time_of(s->pid) == s->start_time) {
      shm->pids_[r] = s->pid;
    }
  }
  return shm;
}

SameHostGroup::SameHostGroup(int rank, int world, std::chrono::milliseconds timeout)
    : rank_(rank), world_(world), timeout_(timeout) {}

SameHostGroup::~SameHostGroup() {
  for (Segment* s : segments_) unmap(s);
}

void SameHostGroup::fail(const std::string& why) {
  failed_ = why;
  // Tell the peers, so that they raise too rather than wait or sum a round this rank left.
  segments_[rank_]->aborted.store(1, std::memory_order_release);
  TORCH_CHECK(false, why);
}

void SameHostGroup::check_peers() {
  for (int r = 0; r < world_; ++r) {
    if (r != rank_ && segments_[r]->aborted.load(std::memory_order_acquire) != 0) {
      fail("shared-memory all-reduce: rank " + std::to_string(r) +
           " of the group gave up on the all-reduce (it timed out or lost a peer)");
    }
  }
}

void SameHostGroup::wait_for(uint64_t seq, bool reduced) {
  const auto start = std::chrono::steady_clock::now();
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
      if (spins % 1024 != 0) continue;
      check_peers();
      bool zombie = false;
      if (pids_[r] != 0 && (start_time_of(pids_[r], &zombie) < 0 || zombie)) {
        fail("shared-memory all-reduce: rank " + std::to_string(r) + " of the group (pid " +
             std::to_string(pids_[r]) + ") died during the all-reduce");
      }
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited > timeout_) {
        fail("shared-memory all-reduce: rank " + std::to_string(r) +
             " of the group did not reach the all-reduce within the process group's timeout (" +
             std::to_string(timeout_.count()) + " ms)");
      }
    }
  }
}

std::vector<const char*> SameHostGroup::exchange(uint64_t seq, int64_t bytes,
                                                 at::ScalarType dtype) {
  Slot& mine = segments_[rank_]->slot[seq % 2];
  mine.bytes = bytes;
  mine.dtype = static_cast<int32_t>(dtype);
  segments_[rank_]->copied.store(seq, std::memory_order_release);
  wait_for(seq, false);
  std::vector<const char*> in(world_);
  bool agree = true;
  for (int r = 0; r < world_; ++r) {
    const Slot& s = segments_[r]->slot[seq % 2];
    agree = agree && s.bytes == bytes && s.dtype == static_cast<int32_t>(dtype);
    in[r] = s.data;
  }
  if (!agree) {  // the same message on every rank
    std::string sizes;
    for (int r = 0; r < world_; ++r) {
      const Slot& s = segments_[r]->slot[seq % 2];
      sizes += (r ? ", " : "") + std::to_string(s.bytes) + " bytes of " +
               c10::toString(static_cast<at::ScalarType>(s.dtype));
    }
    fail("shared-memory all-reduce: ranks disagree on the buffer (per rank: " + sizes +
         "): their calls differ; check_ranks=True names the rank that differs");
  }
  check_peers();  // a peer that gave up after copying in
  return in;
}

void SameHostGroup::round(char* data, int64_t count, at::ScalarType dtype) {
  const uint64_t seq = ++seq_;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t bytes = count * elem;
  Slot& mine = segments_[rank_]->slot[seq % 2];
  std::memcpy(mine.data, data, bytes);
  const std::vector<const char*> in = exchange(seq, bytes, dtype);
  const std::vector<const void*> ins(in.begin(), in.end());
  auto sum = [&](char* out, int64_t begin, int64_t end) { rank_sum(out, ins, dtype, begin, end); };
  if (bytes <= kSmallBytes) {  // every rank sums it all, in the same order
    sum(data, 0, count);
    return;
  }
  // Reduce-scatter: rank r sums part r into its own slot (only rank r reads part r before the
  // barrier below), then all-gather: every rank copies each part from its owner's slot.
  auto part = [&](int r) { return std::make_pair(count * r / world_, count * (r + 1) / world_); };
  const auto [b, e] = part(rank_);
  sum(mine.data, b, e);
  segments_[rank_]->reduced.store(seq, std::memory_order_release);
  wait_for(seq, true);
  check_peers();
  for (int r = 0; r < world_; ++r) {
    const auto [pb, pe] = part(r);
    std::memcpy(data + pb * elem, in[r] + pb * elem, (pe - pb) * elem);
  }
}

void SameHostGroup::scatter_round(const std::vector<at::Tensor>& pieces, int64_t begin,
                                  int64_t count, char* out, at::ScalarType dtype) {
  const uint64_t seq = ++seq_;
  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  Slot& mine = segments_[rank_]->slot[seq % 2];
  for (int r = 0; r < world_; ++r) {  // part r of this rank's input, for rank r
    std::memcpy(mine.data + r * count * elem,
                static_cast<const char*>(pieces[r].const_data_ptr()) + begin * elem, count * elem);
  }
  const std::vector<const char*> in = exchange(seq, world_ * count * elem, dtype);
  std::vector<const void*> parts(world_);  // every rank's part for this rank
  for (int r = 0; r < world_; ++r) parts[r] = in[r] + rank_ * count * elem;
  rank_sum(out, parts, dtype, 0, count);
}

void SameHostGroup::reduce_scatter(const std::vector<at::Tensor>& pieces, const at::Tensor& out) {
  RECORD_FUNCTION("gmm_allreduce::shm_reduce_scatter", std::vector<c10::IValue>());
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
  const int64_t per_round = kSlotBytes / elem / world_;  // of each piece
  char* data = static_cast<char*>(out.data_ptr());
  for (int64_t done = 0; done < out.numel(); done += per_round) {
    scatter_round(pieces, done, std::min(per_round, out.numel() - done), data + done * elem,
                  out.scalar_type());
  }
}

void SameHostGroup::sum(const at::Tensor& flat) {
  RECORD_FUNCTION("gmm_allreduce::same_host_sum", std::vector<c10::IValue>());
  TORCH_CHECK(failed_.empty(), failed_,
              " (an earlier call failed; the group's shared-memory "
              "all-reduce is unusable)");
  TORCH_CHECK(flat.is_cpu() && flat.is_contiguous(),
              "shared-memory all-reduce: a contiguous CPU "
              "tensor expected");
  const int64_t elem = static_cast<int64_t>(flat.element_size());
  const int64_t per_round = kSlotBytes / elem;
  char* data = static_cast<char*>(flat.data_ptr());
  for (int64_t done = 0; done < flat.numel(); done += per_round) {
    round(data + done * elem, std::min(per_round, flat.numel() - done), flat.scalar_type());
  }
}

}  // namespace gmm_allreduce
