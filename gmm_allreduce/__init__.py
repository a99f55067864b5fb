"""Grouped matrix multiply fused with an all-reduce over a torch.distributed process group."""

from .ops import grouped_mat_mul, grouped_mat_mul_all_reduce, npu_grouped_mat_mul_all_reduce

__all__ = ["grouped_mat_mul", "grouped_mat_mul_all_reduce", "npu_grouped_mat_mul_all_reduce"]
