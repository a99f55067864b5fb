// Expert parallelism: each of the group's n ranks owns e experts (global expert g = r * e + i), and
// the rows routed to an expert move to its owner and back by an all-to-all-v (comm/all_to_all.h).
//
// all_to_all_grouped_mat_mul (dispatch, then compute): x's rows are ordered by (destination rank
// r, its local expert i), send_counts[r * e + i] of them; the rows a rank receives,
// recv_counts[s * e + i] from rank s for its expert i, are placed expert-major (expert i's rows
// from rank 0, 1, ...) as they land, and multiplied by W_i.
//
// grouped_mat_mul_all_to_all (compute, then return): the inverse. x's rows are expert-major as the
// dispatch left them, send_counts[r * e + i] of expert i's rows going back to rank r; each rank
// receives its rows in their original (r, i) order, recv_counts[r * e + i] from rank r's expert i,
// and optionally combines them into token rows there: out[combine_index[j]] +=
// combine_weight[j] * row_j, in fp32 (fp64 for fp64), rounded once.
//
// The products are calls of the comm-free op gmm_allreduce::grouped_mat_mul, so they run on
// whichever engine serves the device, with its kernels for every dtype and weight layout. Every
// argument is checked before any data moves; with check_ranks the ranks first agree (one small
// all-reduce for the verdicts, one for the counts), so that one rank's bad call, or counts that
// disagree between ranks, raise the same error on every rank.
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <numeric>
#include <sstream>

#include "comm/all_reduce.h"
#include "comm/all_to_all.h"
#include "core/args.h"
#include "core/combine.h"
#include "core/consensus.h"

namespace gmm_allreduce {
namespace {

enum class Direction { kDispatch, kReturn };

// A call's arguments (the schemas in registration.cpp).
struct EpCall {
  Direction direction;
  const at::Tensor& x;
  const std::vector<at::Tensor>& weight;
  const std::vector<int64_t>& send;
  const std::vector<int64_t>& recv;
  const std::optional<at::Tensor>& shared_x;
  const std::optional<at::Tensor>& shared_weight;
  std::optional<at::Tensor> combine_index;
  std::optional<at::Tensor> combine_weight;
  std::optional<int64_t> num_tokens;
  int world = 1;
};

int64_t sum(c10::ArrayRef<int64_t> v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_counts(const char* arg, const std::vector<int64_t>& counts, int64_t world, int64_t e) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == world * e, arg,
                    ": expected one count per (rank, local expert), world_size * e = ", world,
                    " * ", e, " = ", world * e, " values, got ", counts.size());
  for (const auto j : c10::irange(counts.size())) {
    TORCH_CHECK_VALUE(counts[j] >= 0, arg, "[", j, "]: expected a count >= 0, got ", counts[j]);
  }
}

// Checks everything one rank can check alone; returns what the ranks must agree on.
std::string check(const EpCall& c) {
  const at::Tensor& x = c.x;
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [rows, K], got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(is_float(x.scalar_type()),
                   "x: expected float32, bfloat16, float16 or float64, got ", x.scalar_type());
  const int64_t e = static_cast<int64_t>(c.weight.size());
  TORCH_CHECK_VALUE(e >= 1, "weight: expected this rank's e >= 1 experts, got none");
  const int64_t k = x.size(1);
  const int64_t n = c.weight[0].dim() == 2 ? c.weight[0].size(1) : -1;
  for (const auto i : c10::irange(e)) {
    const at::Tensor& w = c.weight[i];
    TORCH_CHECK_VALUE(w.dim() == 2, "weight[", i, "]: expected a 2-D tensor [K, N], got ", w.dim(),
                      "-D");
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "weight[", i, "]: expected x's dtype ",
                     x.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == x.device(), "weight[", i, "]: expected x's device ", x.device(),
                      ", got ", w.device());
    TORCH_CHECK_VALUE(w.size(0) == k, "weight[", i, "]: expected ", k, " rows (x's K), got ",
                      w.size(0));
    TORCH_CHECK_VALUE(w.size(1) == n, "weight[", i, "]: expected ", n,
                      " columns (every expert's N alike), got ", w.size(1));
  }
  check_counts("send_counts", c.send, c.world, e);
  check_counts("recv_counts", c.recv, c.world, e);
  TORCH_CHECK_VALUE(sum(c.send) == x.size(0), "send_counts: expected counts that sum to x's ",
                    x.size(0), " rows, got a sum of ", sum(c.send));
  TORCH_CHECK_VALUE(c.shared_x.has_value() == c.shared_weight.has_value(),
                    c.shared_x ? "shared_weight" : "shared_x",
                    ": expected shared_x and shared_weight together, or neither");
  if (c.shared_x) {
    const at::Tensor& sx = *c.shared_x;
    const at::Tensor& sw = *c.shared_weight;
    TORCH_CHECK_VALUE(sx.dim() == 2 && sw.dim() == 2,
                      "shared_x, shared_weight: expected 2-D tensors [T, K'] and [K', N']");
    TORCH_CHECK_TYPE(sx.scalar_type() == x.scalar_type() && sw.scalar_type() == x.scalar_type(),
                     "shared_x, shared_weight: expected x's dtype ", x.scalar_type(), ", got ",
                     sx.scalar_type(), " and ", sw.scalar_type());
    TORCH_CHECK_VALUE(sx.device() == x.device() && sw.device() == x.device(),
                      "shared_x, shared_weight: expected x's device ", x.device());
    TORCH_CHECK_VALUE(sw.size(0) == sx.size(1), "shared_weight: expected ", sx.size(1),
                      " rows (shared_x's columns), got ", sw.size(0));
  }
  if (c.direction == Direction::kReturn) {
    const int64_t rows = sum(c.recv);
    TORCH_CHECK_VALUE(c.combine_index || !c.combine_weight,
                      "combine_weight: given without combine_index");
    TORCH_CHECK_VALUE(c.combine_index || !c.num_tokens, "num_tokens: given without combine_index");
    if (c.combine_index) {
      const at::Tensor& idx = *c.combine_index;
      TORCH_CHECK_VALUE(c.num_tokens && *c.num_tokens >= 0,
                        "num_tokens: expected the combined output's rows (>= 0) with "
                        "combine_index");
      TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                       "combine_index: expected int64 or int32, got ", idx.scalar_type());
      TORCH_CHECK_VALUE(
          idx.dim() == 1 && idx.size(0) == rows, "combine_index: expected a 1-D tensor of the ",
          rows, " rows this rank receives (the sum of recv_counts), got shape ", idx.sizes());
      if (idx.is_cpu() && rows > 0) {
        const int64_t lo = idx.min().item<int64_t>();
        const int64_t hi = idx.max().item<int64_t>();
        TORCH_CHECK_VALUE(lo >= 0 && hi < *c.num_tokens, "combine_index: expected values in [0, ",
                          *c.num_tokens, ") (num_tokens), got values in [", lo, ", ", hi, "]");
      }
      if (c.combine_weight) {
        const at::Tensor& w = *c.combine_weight;
        TORCH_CHECK_TYPE(is_float(w.scalar_type()), "combine_weight: expected a float dtype, got ",
                         w.scalar_type());
        TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == rows, "combine_weight: expected shape [",
                          rows, "] (one weight per received row), got ", w.sizes());
      }
    }
  }
  std::ostringstream s;
  s << "e=" << e << " K=" << k << " N=" << n << " dtype=" << x.scalar_type();
  return s.str();
}

// check_ranks' second exchange: every rank's counts, so that each (sender, receiver, expert)
// pair is checked on every rank in one order (the same message everywhere).
void agree_on_counts(const GroupPtr& group, const EpCall& c) {
  const int64_t world = c.world;
  const int64_t per_rank = static_cast<int64_t>(c.send.size());  // world * e, agreed already
  const int64_t e = per_rank / world;
  at::Tensor all = at::zeros({world, 2, per_rank}, at::kLong);
  int64_t* mine = all.data_ptr<int64_t>() + group->getRank() * 2 * per_rank;
  std::copy(c.send.begin(), c.send.end(), mine);
  std::copy(c.recv.begin(), c.recv.end(), mine + per_rank);
  at::Tensor exchanged = all.to(c.x.device());
  AllReduce exchange(group, exchanged);
  exchange.start(exchanged);
  exchange.wait();
  all = exchanged.to(at::kCPU).contiguous();
  const int64_t* p = all.const_data_ptr<int64_t>();
  for (const auto s : c10::irange(world)) {
    for (const auto r : c10::irange(world)) {
      for (const auto i : c10::irange(e)) {
        // Dispatch: s sends send_s[r*e+i] rows to expert i of r, which expects recv_r[s*e+i].
        // Return: s sends send_s[r*e+i] rows of its expert i back to r, which expects
        // recv_r[s*e+i] from s's expert i. One rule both ways.
        const int64_t gives = p[(s * 2) * per_rank + r * e + i];
        const int64_t takes = p[(r * 2 + 1) * per_rank + s * e + i];
        TORCH_CHECK_VALUE(gives == takes,
                          "check_ranks: send_counts and recv_counts disagree "
                          "between ranks: rank ",
                          s, "'s send_counts[", r * e + i, "] is ", gives, " but rank ", r,
                          "'s recv_counts[", s * e + i, "] is ", takes);
      }
    }
  }
}

// The runs of rows for each rank of the dispatch layout (x ordered by (r, i)) and the
// expert-major layout (expert i's rows from rank 0, 1, ...), where counts[r * e + i] rows of the
// pair (r, i) are; and each expert's rows in the expert-major layout.
struct Layout {
  std::vector<RowRuns> by_rank;       // per rank r: its one run of the (r, i) layout
  std::vector<RowRuns> expert_major;  // per rank r: its rows for each expert, expert-major
  std::vector<int64_t> expert_rows;   // per expert: its rows
};

Layout layout(const std::vector<int64_t>& counts, int64_t world, int64_t e) {
  Layout l;
  l.expert_rows.assign(e, 0);
  for (const auto r : c10::irange(world)) {
    for (const auto i : c10::irange(e)) l.expert_rows[i] += counts[r * e + i];
  }
  std::vector<int64_t> next(e, 0);  // the next free row of each expert's block
  for (int64_t i = 1; i < e; ++i) next[i] = next[i - 1] + l.expert_rows[i - 1];
  int64_t row = 0;
  l.by_rank.resize(world);
  l.expert_major.resize(world);
  for (const auto r : c10::irange(world)) {
    int64_t rows = 0;
    for (const auto i : c10::irange(e)) {
      const int64_t n = counts[r * e + i];
      l.expert_major[r].emplace_back(next[i], n);
      next[i] += n;
      rows += n;
    }
    l.by_rank[r].emplace_back(row, rows);
    row += rows;
  }
  return l;
}

// The comm-free op's products of the expert-major rows `x`, expert i's rows times weight[i].
at::Tensor products(const at::Tensor& x, const std::vector<at::Tensor>& weight,
                    const std::vector<int64_t>& expert_rows) {
  return call_by_name("grouped_mat_mul", {{"x", std::vector<at::Tensor>{x}},
                                          {"weight", weight},
                                          {"group_list", expert_rows},
                                          {"split_item", 3},
                                          {"group_list_type", 1},
                                          {"world_size", 1}})[0]
      .toTensorVector()[0];
}

at::Tensor shared_products(const EpCall& c) {
  if (!c.shared_x) return at::empty({0}, c.x.options());
  return products(c.shared_x->contiguous(), {*c.shared_weight}, {c.shared_x->size(0)});
}

// Whether the rows stay here: one rank, unless the tests ask the collectives of one rank to run.
bool alone(int64_t world) { return world == 1 && !collectives_at_world_size_1(); }

// Runs the checks (agreed between ranks with check_ranks): raises before any data moves.
void check_call(const GroupPtr& group, const EpCall& c, bool check_ranks) {
  if (!check_ranks || c.world == 1) {
    check(c);
    return;
  }
  agree(group, c.x.device(), [&] { return check(c); });
  agree_on_counts(group, c);
}

// The rows moved: from `in` (runs `send`) to a new [rows, width] tensor (runs `recv`).
at::Tensor move_rows(const GroupPtr& group, const at::Tensor& in, const std::vector<RowRuns>& send,
                     const std::vector<RowRuns>& recv, int64_t rows) {
  at::Tensor out = at::empty({rows, in.size(1)}, in.options());
  all_to_all_rows(group, in.contiguous(), send, out, recv);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_op(
    const at::Tensor& x, std::vector<at::Tensor> weight, c10::string_view group_name,
    std::vector<int64_t> send_counts, std::vector<int64_t> recv_counts,
    const std::optional<at::Tensor>& shared_x, const std::optional<at::Tensor>& shared_weight,
    bool return_permuted, bool check_ranks) {
  const GroupPtr group = resolve_group(std::string(group_name));
  EpCall c{Direction::kDispatch, x, weight, send_counts, recv_counts, shared_x, shared_weight};
  c.world = group->getSize();
  check_call(group, c, check_ranks);
  const int64_t e = static_cast<int64_t>(weight.size());
  const Layout sent = layout(send_counts, c.world, e);
  const Layout received = layout(recv_counts, c.world, e);
  // One rank: x's (0, i) order is expert-major already.
  const at::Tensor permuted =
      alone(c.world) ? x.contiguous()
                     : move_rows(group, x, sent.by_rank, received.expert_major, sum(recv_counts));
  at::Tensor y = products(permuted, weight, received.expert_rows);
  return {y, shared_products(c),
          return_permuted ? (permuted.is_same(x) ? permuted.clone() : permuted)
                          : at::empty({0}, x.options())};
}

// The received rows combined into token rows in the accumulation dtype, rounded once: on the
// CPU by the combine's row kernel (core/combine.h) as the rows arrive, each sender's in order (out
// of the senders' shared-memory slots where they lie there); elsewhere by an index_add_ once they
// are all here. With keep_rows, the rows too (autograd's, for combine_weight's gradient).
struct Combined {
  at::Tensor out, rows;
};

Combined return_and_combine(const GroupPtr& group, const at::Tensor& y, const EpCall& c,
                            const Layout& sent, const Layout& received, bool keep_rows) {
  const int64_t rows = sum(c.recv);
  const int64_t tokens = *c.num_tokens;
  const at::ScalarType acc_type = at::toOpMathType(y.scalar_type());
  const at::Tensor index = c.combine_index->to(y.device(), at::kLong).contiguous();
  const std::optional<at::Tensor> weight =
      c.combine_weight ? std::optional(c.combine_weight->to(y.device(), acc_type).contiguous())
                       : std::nullopt;
  if (!y.is_cpu()) {
    const at::Tensor moved =
        alone(c.world) ? y : move_rows(group, y, sent.expert_major, received.by_rank, rows);
    at::Tensor scaled = moved.to(acc_type);
    if (weight) scaled = scaled.mul(weight->unsqueeze(1));
    at::Tensor out = at::zeros({tokens, y.size(1)}, y.options().dtype(acc_type))
                         .index_add_(0, index, scaled)
                         .to(y.scalar_type());
    return {out, keep_rows ? moved : at::empty({0}, y.options())};
  }
  at::Tensor acc = at::zeros({tokens, y.size(1)}, y.options().dtype(acc_type));
  at::Tensor kept = keep_rows ? at::empty({rows, y.size(1)}, y.options()) : at::empty({0});
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const auto* w = weight ? static_cast<const char*>(weight->const_data_ptr()) : nullptr;
  const int64_t w_bytes = static_cast<int64_t>(c10::elementSize(acc_type));
  auto sink = [&](int from, int64_t first, int64_t count, const char* data) {
    const int64_t j = received.by_rank[from][0].first + first;  // the first row's place
    const at::Tensor block =
        at::from_blob(const_cast<char*>(data), {count, y.size(1)}, y.options());
    add_rows_into(
        acc, block,
        {.count = count, .token = idx + j, .weight = w != nullptr ? w + j * w_bytes : nullptr});
    if (keep_rows) kept.narrow(0, j, count).copy_(block);
  };
  if (alone(c.world)) {
    sink(0, 0, y.size(0), static_cast<const char*>(y.const_data_ptr()));
  } else {
    std::vector<int64_t> recv_rows(c.world);
    for (const auto s : c10::irange(c.world)) recv_rows[s] = received.by_rank[s][0].second;
    all_to_all_rows(group, y, sent.expert_major, recv_rows, sink);
  }
  return {acc.scalar_type() == y.scalar_type() ? acc : acc.to(y.scalar_type()), kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> return_op(
    const at::Tensor& x, std::vector<at::Tensor> weight, c10::string_view group_name,
    std::vector<int64_t> send_counts, std::vector<int64_t> recv_counts,
    const std::optional<at::Tensor>& shared_x, const std::optional<at::Tensor>& shared_weight,
    const std::optional<at::Tensor>& combine_index, const std::optional<at::Tensor>& combine_weight,
    std::optional<int64_t> num_tokens, bool keep_rows, bool check_ranks) {
  const GroupPtr group = resolve_group(std::string(group_name));
  EpCall c{Direction::kReturn, x,         weight,        send_counts,
           recv_counts,        shared_x,  shared_weight, combine_index,
           combine_weight,     num_tokens};
  c.world = group->getSize();
  check_call(group, c, check_ranks);
  const int64_t e = static_cast<int64_t>(weight.size());
  const Layout sent = layout(send_counts, c.world, e);
  const Layout received = layout(recv_counts, c.world, e);
  const at::Tensor y = products(x.contiguous(), weight, sent.expert_rows);
  if (!combine_index) {
    const at::Tensor rows =
        alone(c.world) ? y
                       : move_rows(group, y, sent.expert_major, received.by_rank, sum(recv_counts));
    return {rows, shared_products(c), at::empty({0}, y.options())};
  }
  Combined done = return_and_combine(group, y, c, sent, received, keep_rows);
  return {done.out, shared_products(c), keep_rows ? done.rows : at::empty({0}, y.options())};
}

// The rows alone, moved as the dispatch (to_experts) or the return moves them (the autograd glue's
// and the benchmark's).
at::Tensor rows_op(const at::Tensor& x, c10::string_view group_name,
                   std::vector<int64_t> send_counts, std::vector<int64_t> recv_counts, int64_t e,
                   bool to_experts) {
  const GroupPtr group = resolve_group(std::string(group_name));
  const int64_t world = group->getSize();
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected a 2-D tensor [rows, K], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(e >= 1, "e: expected >= 1 local experts, got ", e);
  check_counts("send_counts", send_counts, world, e);
  check_counts("recv_counts", recv_counts, world, e);
  TORCH_CHECK_VALUE(sum(send_counts) == x.size(0), "send_counts: expected counts that sum to x's ",
                    x.size(0), " rows, got a sum of ", sum(send_counts));
  if (alone(world)) return x.clone();
  const Layout sent = layout(send_counts, world, e);
  const Layout received = layout(recv_counts, world, e);
  return to_experts ? move_rows(group, x, sent.by_rank, received.expert_major, sum(recv_counts))
                    : move_rows(group, x, sent.expert_major, received.by_rank, sum(recv_counts));
}

}  // namespace

TORCH_LIBRARY_IMPL(gmm_allreduce, CompositeExplicitAutograd, m) {
  m.impl("all_to_all_grouped_mat_mul", &dispatch_op);
  m.impl("grouped_mat_mul_all_to_all", &return_op);
  m.impl("_all_to_all_rows", &rows_op);
}

}  // namespace gmm_allreduce
