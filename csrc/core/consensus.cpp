#include "core/consensus.h"

#include <c10/util/irange.h>

#include <functional>

#include "comm/all_reduce.h"

namespace gmm_allreduce {
namespace {

enum Verdict : int32_t { kValid = 0, kValueError, kTypeError, kNotImplemented, kOtherError };

// One rank's record: verdict, a hash of its plan signature, then its message (error text or
// signature) as one byte per int32, truncated. int32 because every backend sums it.
constexpr int64_t kRecord = 512;
constexpr int64_t kHeader = 3;

struct Record {
  int32_t verdict = kValid;
  int64_t hash = 0;
  std::string text;
};

at::Tensor encode(const Record& r, int64_t rank, int64_t world, at::Device device) {
  at::Tensor all = at::zeros({world, kRecord}, at::kInt);
  int32_t* row = all.data_ptr<int32_t>() + rank * kRecord;
  row[0] = r.verdict;
  row[1] = static_cast<int32_t>(r.hash & 0xffffffff);
  row[2] = static_cast<int32_t>((r.hash >> 32) & 0xffffffff);
  const int64_t len = std::min<int64_t>(r.text.size(), kRecord - kHeader);
  for (const auto i : c10::irange(len)) row[kHeader + i] = static_cast<unsigned char>(r.text[i]);
  return all.to(device);
}

std::vector<Record> decode(const at::Tensor& all) {
  at::Tensor host = all.to(at::kCPU).contiguous();
  std::vector<Record> out(host.size(0));
  for (const auto r : c10::irange(out.size())) {
    const int32_t* row = host.const_data_ptr<int32_t>() + r * kRecord;
    out[r].verdict = row[0];
    out[r].hash =
        (static_cast<int64_t>(static_cast<uint32_t>(row[2])) << 32) | static_cast<uint32_t>(row[1]);
    for (int64_t i = kHeader; i < kRecord && row[i] != 0; ++i) out[r].text += char(row[i]);
  }
  return out;
}

[[noreturn]] void raise(int32_t verdict, const std::string& msg) {
  switch (verdict) {
    case kValueError:
      TORCH_CHECK_VALUE(false, msg);
    case kTypeError:
      TORCH_CHECK_TYPE(false, msg);
    case kNotImplemented:
      TORCH_CHECK_NOT_IMPLEMENTED(false, msg);
    default:
      TORCH_CHECK(false, msg);
  }
}

// Fingerprint: bits of the signature's hash.
constexpr int64_t kBits = 32;

// Integers up to this are exact in the dtype, so sums of world_size 0/1 values are exact.
int64_t exact_integers(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return int64_t{1} << 8;
    case at::kHalf:
      return int64_t{1} << 11;
    case at::kFloat:
      return int64_t{1} << 24;
    default:
      return int64_t{1} << 53;
  }
}

}  // namespace

std::string agree(const GroupPtr& group, at::Device device,
                  c10::function_ref<std::string()> check) {
  Record mine;
  try {
    mine.text = check();
    mine.hash = static_cast<int64_t>(std::hash<std::string>{}(mine.text));
  } catch (const c10::ValueError& e) {
    mine = {kValueError, 0, e.what_without_backtrace()};
  } catch (const c10::TypeError& e) {
    mine = {kTypeError, 0, e.what_without_backtrace()};
  } catch (const c10::NotImplementedError& e) {
    mine = {kNotImplemented, 0, e.what_without_backtrace()};
  } catch (const c10::Error& e) {
    mine = {kOtherError, 0, e.what_without_backtrace()};
  }

  at::Tensor all = encode(mine, group->getRank(), group->getSize(), device);
  AllReduce exchange(group, all);
  exchange.start(all);
  exchange.wait();
  const std::vector<Record> records = decode(all);

  for (const auto r : c10::irange(records.size())) {
    if (records[r].verdict != kValid) {
      raise(records[r].verdict,
            "check_ranks: rank " + std::to_string(r) + " rejected the call: " + records[r].text);
    }
  }
  for (const auto r : c10::irange(records.size())) {
    TORCH_CHECK_VALUE(records[r].hash == records[0].hash,
                      "check_ranks: ranks disagree on the call: rank 0 has ", records[0].text,
                      "; rank ", r, " has ", records[r].text);
  }
  return mine.text;
}

Plan make_plan_agreed(const OpArgs& args, const GroupPtr& group,
                      c10::function_ref<Plan(const OpArgs&)> planner) {
  std::optional<Plan> plan;
  // The exchange tensor lives where the op's data does (NCCL takes no CPU tensors).
  at::Device device = at::kCPU;
  if (args.mlp.hidden) {
    device = args.mlp.hidden->device();
  } else if (!args.x.empty() && args.x[0].defined()) {
    device = args.x[0].device();
  }
  agree(group, device, [&] {
    plan = planner(args);
    return plan->signature();
  });
  return *plan;
}

Fingerprint::Fingerprint(const Plan& plan, int64_t world_size, bool wanted)
    : begin_(plan.numel),
      size_(0),
      world_size_(world_size),
      options_(at::TensorOptions(plan.reduce_dtype).device(plan.device)) {
  const bool rides = wanted && plan.numel > 0 && world_size > 1 &&
                     world_size <= exact_integers(plan.reduce_dtype) && plan.device.is_cpu();
  if (!rides) return;
  size_ = kBits;
  signature_ = plan.signature();
}

at::Tensor Fingerprint::new_buffer() const {
  at::Tensor flat = at::empty({begin_ + size_}, options_);
  if (size_ == 0) return flat;
  const uint64_t hash = std::hash<std::string>{}(signature_);
  at::Tensor bits = at::empty({kBits}, at::kDouble);
  double* p = bits.data_ptr<double>();
  for (const auto b : c10::irange(kBits)) p[b] = static_cast<double>((hash >> b) & 1);
  flat.narrow(0, begin_, size_).copy_(bits);
  return flat;
}

void Fingerprint::check(const at::Tensor& flat) const {
  if (size_ == 0) return;
  const at::Tensor sums = flat.narrow(0, begin_, size_).to(at::kCPU, at::kDouble).contiguous();
  const double* p = sums.const_data_ptr<double>();
  for (const auto b : c10::irange(kBits)) {
    TORCH_CHECK_VALUE(p[b] == 0 || p[b] == static_cast<double>(world_size_),
                      "ranks disagree on the call: their plans (split_item, comm_turn, dtype, "
                      "output shapes, group rows) differ, so the all-reduced outputs would mix "
                      "unrelated elements; this rank has ",
                      signature_,
                      ". Pass check_ranks=True to have every rank name the one that differs, "
                      "before any data moves");
  }
}

}  // namespace gmm_allreduce
