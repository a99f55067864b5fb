"""Grouped matrix multiply fused with an all-reduce over a torch.distributed process group."""

from . import (
    autograd,  # noqa: F401  (registers the op's backward)
    nn,  # noqa: F401  (gmm_allreduce.nn after `import gmm_allreduce`, as torch.nn)
)
from .ascend import (
    npu_grouped_matmul,
    npu_grouped_matmul_finalize_routing,
    npu_moe_finalize_routing,
)
from .block import grouped_mlp, grouped_mlp_all_reduce, grouped_mlp_reduce_scatter
from .cpu import cpu_capabilities
from .expert_parallel import (
    all_to_all_grouped_mat_mul,
    grouped_mat_mul_all_to_all,
    npu_alltoallv_gmm,
    npu_gmm_alltoallv,
)
from .ops import (
    grouped_mat_mul,
    grouped_mat_mul_all_reduce,
    grouped_mat_mul_reduce_scatter,
    npu_grouped_mat_mul_all_reduce,
    wait,
)
from .prepack import PackedWeights, prepack_weights
from .quant import quantize_per_token, quantize_weights

__all__ = ["PackedWeights", "all_to_all_grouped_mat_mul", "cpu_capabilities", "grouped_mat_mul",
           "grouped_mat_mul_all_reduce", "grouped_mat_mul_all_to_all",
           "grouped_mat_mul_reduce_scatter", "grouped_mlp", "grouped_mlp_all_reduce",
           "grouped_mlp_reduce_scatter", "npu_alltoallv_gmm", "npu_gmm_alltoallv",
           "npu_grouped_mat_mul_all_reduce", "npu_grouped_matmul",
           "npu_grouped_matmul_finalize_routing", "npu_moe_finalize_routing", "prepack_weights",
           "quantize_per_token", "quantize_weights", "wait"]
