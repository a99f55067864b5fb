// The public ops' schemas: the only place they are written. Device kernels register in their own
// files (cpu/, cuda/); test-only ops live in testing/, built into another library for the tests
// alone. The Python module _C exists so that `import gmm_allreduce._C` loads this library.
#include <Python.h>
#include <torch/library.h>

// The ops' arguments, each written once: the operands, then what the collective ops or the
// comm-free op take, then the combine and the quantised inputs. The C++ reads them by name
// (core/args.cpp), the Python front, its fake kernels and autograd glue by the schema's names.
// No argument has a default: the Python front passes them all, and the autograd glue relies on
// the op's inputs arriving whole (the dispatcher drops trailing arguments equal to defaults).
#define GMM_OPERANDS                                                                            \
  "Tensor[] x, Tensor[] weight, Tensor[]? bias, int[]? group_list, Tensor? group_list_tensor, " \
  "int split_item, "
#define GMM_COLLECTIVE                                                                    \
  "str group_name, str reduce_op, int comm_turn, int group_list_type, bool check_ranks, " \
  "ScalarType? reduce_dtype, bool async_op, "
#define GMM_COMPUTE "int group_list_type, int world_size, "
#define GMM_COMBINE_AND_QUANT                                                              \
  "Tensor? combine_index, Tensor? combine_weight, int? num_tokens, Tensor? shared_input, " \
  "Tensor[]? scale, Tensor? per_token_scale, Tensor[]? antiquant_scale, "                  \
  "Tensor[]? antiquant_offset, ScalarType? output_dtype"

// The expert block's operands (core/mlp.h), then its collective's arguments.
#define GMM_MLP_OPERANDS                                                                    \
  "Tensor hidden_states, Tensor[] w13, Tensor[] w2, Tensor topk_ids, Tensor topk_weights, " \
  "str activation, Tensor[]? w13_bias, Tensor[]? w2_bias, Tensor? shared_input, "           \
  "Tensor[]? w13_antiquant_scale, Tensor[]? w2_antiquant_scale, Tensor[]? w13_scale, "      \
  "Tensor[]? w2_scale, "
#define GMM_MLP_COLLECTIVE \
  "str group_name, int comm_turn, bool check_ranks, ScalarType? reduce_dtype, bool async_op"

// The expert-parallel ops' operands (core/expert_parallel.cpp): this rank's rows, its e experts'
// weights, the group and the rows' counts per (rank, local expert), a shared expert's product.
#define GMM_EP_OPERANDS                                                               \
  "Tensor x, Tensor[] weight, str group_name, int[] send_counts, int[] recv_counts, " \
  "Tensor? shared_x, Tensor? shared_weight, "

TORCH_LIBRARY(gmm_allreduce, m) {
  // The grouped products, summed over the group's ranks (core/collective.cpp has each op's
  // collective).
  m.def("grouped_mat_mul_all_reduce(" GMM_OPERANDS GMM_COLLECTIVE GMM_COMBINE_AND_QUANT
        ") -> Tensor[]");
  // The same products, summed and scattered by rows over the group's n ranks: rank r gets rows
  // [r * M / n, (r + 1) * M / n) of the one output (split_item 2 and 3).
  m.def("grouped_mat_mul_reduce_scatter(" GMM_OPERANDS GMM_COLLECTIVE GMM_COMBINE_AND_QUANT
        ") -> Tensor[]");
  // The same grouped matmul without the collective (bias divided by world_size): one rank's part.
  m.def("grouped_mat_mul(" GMM_OPERANDS GMM_COMPUTE GMM_COMBINE_AND_QUANT ") -> Tensor[]");
  // The expert block: an MoE MLP (gate_up, gated activation, down, routing weights) into token
  // rows, summed over the group's ranks, or scattered by rows, or (grouped_mlp) one rank's part.
  m.def("grouped_mlp_all_reduce(" GMM_MLP_OPERANDS GMM_MLP_COLLECTIVE ") -> Tensor");
  m.def("grouped_mlp_reduce_scatter(" GMM_MLP_OPERANDS GMM_MLP_COLLECTIVE ") -> Tensor");
  m.def("grouped_mlp(" GMM_MLP_OPERANDS "int world_size) -> Tensor");
  // The block's gradients of hidden_states, w13, w2, w13_bias, w2_bias and topk_weights
  // (output_mask picks which) with no collective: hidden_states' and topk_weights' are this rank's
  // parts in the accumulation dtype, for the caller to sum over the group (core/mlp_backward.cpp).
  m.def(
      "grouped_mlp_backward(Tensor grad, Tensor hidden_states, Tensor[] w13, Tensor[] w2, "
      "Tensor topk_ids, Tensor topk_weights, str activation, Tensor[]? w13_bias, "
      "Tensor[]? w2_bias, int world_size, bool[5] output_mask) -> (Tensor, Tensor[], Tensor[], "
      "Tensor[], Tensor[], Tensor)");
  // Gradients of x, weight, bias and combine_weight (output_mask picks which), with no
  // collective: the row-parallel convention, see backward.cpp. bias is passed for its dtypes (and,
  // with world_size, for this rank's partial products, which combine_weight's gradient needs:
  // this rank's part of it, in fp32, for the caller to sum over the group).
  m.def(
      "grouped_mat_mul_all_reduce_backward(Tensor[] grad, Tensor[] x, Tensor[] weight, "
      "Tensor[]? bias, int[]? group_list, Tensor? group_list_tensor, int split_item, "
      "int group_list_type, Tensor? combine_index, Tensor? combine_weight, int world_size, "
      "bool[4] output_mask) -> (Tensor[], Tensor[], Tensor[], Tensor)");
  // Expert parallelism: the rows dispatched to their experts' ranks by an all-to-all-v, then
  // multiplied (-> y expert-major, shared_x @ shared_weight, the received rows when
  // return_permuted; empty tensors for what is not asked) ...
  m.def("all_to_all_grouped_mat_mul(" GMM_EP_OPERANDS
        "bool return_permuted, bool check_ranks) -> (Tensor, Tensor, Tensor)");
  // ... and the inverse: the products returned to their senders in their original order,
  // combined there into token rows with combine_index (-> out, the shared product, and with the
  // combine and keep_rows the returned rows before it).
  m.def("grouped_mat_mul_all_to_all(" GMM_EP_OPERANDS
        "Tensor? combine_index, Tensor? combine_weight, int? num_tokens, bool keep_rows, "
        "bool check_ranks) -> (Tensor, Tensor, Tensor)");
  // Their all-to-all alone: x's rows moved as the dispatch (to_experts) or the return moves them.
  m.def(
      "_all_to_all_rows(Tensor x, str group_name, int[] send_counts, int[] recv_counts, int e, "
      "bool to_experts) -> Tensor");
  // The combine on rows already computed (core/combine_rows.cpp): out[token[p]] += weight[p] *
  // (rows[pick[p]] + bias[expert[p]]) for each p, plus the addends, rounded once (the front of
  // Ascend's npu_moe_finalize_routing).
  m.def(
      "_combine_rows(Tensor rows, Tensor pick, Tensor token, Tensor? weight, Tensor? bias, "
      "Tensor? expert, int num_tokens, Tensor[] addends) -> Tensor");
  // The combine's backward on given rows (core/combine.h): each row's gradient, and with `rows`
  // combine_weight's (fp32; fp64 for fp64), for expert parallelism's returned rows.
  m.def(
      "_combine_rows_backward(Tensor grad, Tensor combine_index, Tensor? combine_weight, "
      "Tensor? rows) -> (Tensor, Tensor)");
  // The op's all-reduce alone (comm/ops.cpp): the in-place sum of the contiguous `t` over the
  // group, the way the op sums its buffer (the benchmark's comm_op line).
  m.def("_all_reduce_(Tensor(a!) t, str group_name) -> ()");
  // The reduce-scatter op's backward all-gather: the ranks' t stacked along dim 0.
  m.def("_all_gather_rows(Tensor t, str group_name) -> Tensor");
  // Releases the shared memory of groups whose ProcessGroup objects are gone (the Python front
  // calls it when a group object it saw is freed).
  m.def("_release_destroyed_groups() -> ()");
  // The CPU engine's policy (cpu/kernels/isa.h) as (name, value) pairs, flattened: the host's tier,
  // the tier in use under GMM_CPU_ISA, and the kernel each dtype takes
  // (gmm_allreduce.cpu_capabilities()).
  m.def("_cpu_policy() -> str[]");
  // Packs the weights for the CPU engine at the current tier (cpu/prepack.h): one entry per
  // weight, None where the engine reads the weight as it is (gmm_allreduce.prepack_weights).
  m.def("_prepack_weights(Tensor[] weight) -> Tensor?[]");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
