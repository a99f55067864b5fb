"""The public function: argument normalisation over the C++ op, and its fake kernel.

Validation, planning, compute and communication all happen in C++ (csrc/); this file only turns
Python conveniences (a ProcessGroup, a list or a tensor for group_list, bias=[]) into the op's
schema arguments.
"""

from __future__ import annotations

import inspect
import numbers
import weakref
from collections.abc import Sequence
from itertools import repeat

import torch
import torch.distributed as dist

from . import inductor
from ._schema import NAMES, arguments, positional
from .prepack import PackedWeights
from .quant import QUANTISED, is_quantised

# The fronts' keyword arguments, their defaults and types: the one Python list of the ops'
# arguments. Each front takes those its op's schema has (grouped_mat_mul: no collective's), and
# split_item None is the op's default (0, as MindSpeed's front reads None; 3 for the reduce-scatter
# op). The rest of the package reads arguments by the schema's names (_schema.py).
_KEYWORDS = (
    ("bias", None, "Sequence[torch.Tensor] | None"),
    ("group_list", None, "Sequence[int] | torch.Tensor | None"),
    ("split_item", None, "int | None"),
    ("reduce_op", "sum", "str"),
    ("comm_turn", 0, "int"),
    ("group_list_type", 0, "int"),
    ("world_size", 1, "int"),
    ("check_ranks", False, "bool"),
    ("reduce_dtype", None, "torch.dtype | None"),
    ("async_op", False, "bool"),
    ("combine_index", None, "torch.Tensor | None"),
    ("combine_weight", None, "torch.Tensor | None"),
    ("num_tokens", None, "int | None"),
    ("shared_input", None, "torch.Tensor | None"),
    ("scale", None, "Sequence[torch.Tensor] | None"),
    ("per_token_scale", None, "torch.Tensor | None"),
    ("antiquant_scale", None, "Sequence[torch.Tensor] | None"),
    ("antiquant_offset", None, "Sequence[torch.Tensor] | None"),
    ("output_dtype", None, "torch.dtype | None"),
)


def _front(name: str, default_split_item: int, doc: str):
    """The public function of the op `name`: x, weight (and for a collective op hcomm) by position
    or keyword, then its keywords of _KEYWORDS. Written without locals() or inspect's binding, which
    torch.compile cannot trace."""
    defaults = {k: v for k, v, _ in _KEYWORDS if k in NAMES[name]}
    collective = "group_name" in NAMES[name]

    def call(x, weight, *args, **kwargs) -> list[torch.Tensor]:
        if len(args) > (1 if collective else 0):
            raise TypeError(f"{name}() takes {3 if collective else 2} positional arguments but "
                            f"{2 + len(args)} were given")
        given = dict(defaults)
        for key, value in kwargs.items():
            if key not in defaults and not (collective and key == "hcomm" and not args):
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            given[key] = value
        given["x"], given["weight"] = x, weight
        if collective:
            given["hcomm"] = args[0] if args else kwargs.get("hcomm")
        return _call(name, default_split_item, given)

    positional = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation="Sequence[torch.Tensor]") for p in ("x", "weight")]
    if collective:
        positional.append(inspect.Parameter("hcomm", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=None,
                                            annotation="str | dist.ProcessGroup | None"))
    keywords = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, annotation=t,
                                  default=default_split_item if k == "split_item" else v)
                for k, v, t in _KEYWORDS if k in defaults]
    call.__signature__ = inspect.Signature(positional + keywords,
                                           return_annotation="list[torch.Tensor]")
    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc
    return call


grouped_mat_mul_all_reduce = _front("grouped_mat_mul_all_reduce", 0, doc="""\
Grouped matmul, summed over the ranks of a process group.

With n ranks, rank r holding x_i^r (its K-slice of the activations) and W_i^r (its K-slice of
the weights), every rank returns, for every group i::

    y_i = sum_r (x_i^r @ W_i^r + bias_i^r / n)

Args:
    x: the activations; G tensors (split_item 0, 2) or one [M, K] tensor (1, 3).
    weight: G tensors [K_i, N_i].
    hcomm: the process group: its name (``group.group_name``), the group, or None for the
        default group.
    bias: None, [] (no bias) or G 1-D tensors [N_i] of any floating dtype (int32 for int8 x:
        added to the int32 sums before dequantisation, as Ascend's npu_grouped_matmul).
    group_list: rows of x per group for split_item 1 and 3: cumulative end offsets
        (group_list_type=0) or counts (1); a list of ints or a 1-D int64/int32 tensor.
    split_item: 0: G x, G y; 1: one x, G y; 2: G x, one y; 3: one x, one y; None: the default
        (as code ported from MindSpeed passes it).
    reduce_op: "sum" only.
    comm_turn: 0: one all-reduce after all compute. k >= 1: the output rows cut into at most
        k chunks of about equal size (never an empty one); chunk c's all-reduce runs while
        chunk c + 1 is computed.
    group_list_type: 0 cumulative offsets, 1 counts.
    check_ranks: first agree across ranks that every call is valid and alike; on any
        disagreement every rank raises the same error (costs one small collective).
    reduce_dtype: None: each rank's partial products are rounded to x's dtype and summed in
        it (in fp32 between CPU ranks of one host). torch.float32: the partials stay in fp32,
        the ranks' sum runs in fp32, and each output is rounded once to x's dtype (for fp16
        and bf16 x: twice the bytes to sum; a no-op for fp32 x; refused for fp64 x). On
        CUDA it runs one cuBLAS GEMM per group, and a device group_list is read to the host.
    async_op: True: return once the collective(s) are started; the outputs must not be read
        before ``gmm_allreduce.wait(outputs)`` (or ``torch.ops._c10d_functional.wait_tensor``
        on each), which blocks the host on gloo and on shared memory (where the sums are done
        before the op returns) and orders the current stream on NCCL. Not under
        torch.compile (a RuntimeError): compiled code keeps the call synchronous.
    combine_index: None, or (split_item 2, 3) a 1-D int64/int32 tensor [M]: the token row that
        expert row j is added into, before the collective. The output is then [num_tokens, N]::

            out = zeros(T, N); out.index_add_(0, combine_index, y * combine_weight[:, None])
            out += shared_input; dist.all_reduce(out)

        summed in fp32 and rounded once. Values are checked on the host; a device tensor is not
        read (no sync), and its rows outside [0, num_tokens) are dropped.
    combine_weight: None (weights of 1) or a 1-D float tensor [M]: expert row j's routing weight.
    num_tokens: T, the combined output's rows; required with combine_index.
    shared_input: None or [T, N]: this rank's partial of a shared expert, added before the sum.

Returns:
    A list of tensors in x's dtype: G of them for split_item 0 and 1, one for 2 and 3 ([T, N]
    with combine_index).
""")

grouped_mat_mul_reduce_scatter = _front("grouped_mat_mul_reduce_scatter", 3, doc="""\
Grouped matmul, summed over the ranks of a process group and scattered by rows: the
row-parallel layer of sequence parallelism (Megatron-LM's ``--sequence-parallel``).

The same products as grouped_mat_mul_all_reduce (same arguments, checks and bias counted
once), for the single-output modes (split_item 2 and 3). With n ranks, the summed output Y
([M, N]) is cut into n blocks of M / n rows, and rank r returns block r, rows
``[r * M / n, (r + 1) * M / n)``: the layout of ``dist.reduce_scatter_tensor`` along dim 0.
One collective per call for comm_turn = 0; with comm_turn = k >= 1 each rank's block is cut
into at most k runs of rows, run c of every block computed and then reduce-scattered while
run c + 1 computes. M not divisible by n, or split_item 0 or 1, is a ValueError before any
communication.

Autograd (the sequence-parallel convention): backward all-gathers the output's gradient
along the rows once, then computes the same local grouped products as the all-reduce op's
backward. reduce_dtype, async_op and the combine (combine_index, combine_weight, num_tokens,
shared_input: then the [num_tokens, N] combined output is scattered, num_tokens divisible by n)
and the quantised inputs (scale, per_token_scale, antiquant_scale, antiquant_offset, output_dtype)
as for grouped_mat_mul_all_reduce.

Returns:
    A list of one tensor [M / n, N] in x's dtype ([num_tokens / n, N] with combine_index).
""")


def wait(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Waits for the outputs of a call made with async_op=True (any of them finishes the call);
    returns them. A no-op for outputs of a synchronous call."""
    for t in outputs:
        torch.ops._c10d_functional.wait_tensor(t)
    return list(outputs)


def _async(arg: str, async_op) -> bool:
    _bool(arg, async_op)
    if async_op and torch.compiler.is_compiling():
        raise RuntimeError("async_op=True is not supported under torch.compile: compiled code "
                           "calls the op synchronously (pass async_op=False, and let the compiler "
                           "overlap)")
    return async_op


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):  # "False", [0] or 2 would silently count as True
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


# The Ascend op's name: code written for it changes only its import and its device.
npu_grouped_mat_mul_all_reduce = grouped_mat_mul_all_reduce


grouped_mat_mul = _front("grouped_mat_mul", 0, doc="""\
One rank's part of the op, with no collective: x_i @ W_i + bias_i / world_size (combined into
token rows with combine_index, as the collective ops do before their sum).

Same arguments, checks and outputs as grouped_mat_mul_all_reduce (same C++ plan and engine), with
world_size (1 unless given) in place of the collective's.
""")


def _call(op: str, default_split_item: int, given: dict) -> list[torch.Tensor]:
    """The op `op` on a public function's arguments (`given`, by name): each normalised into the
    schema's form and type-checked by its rule in _RULES, in that order (their values are checked
    in C++)."""
    a = dict(given)
    if type(a["weight"]) is PackedWeights:
        a["weight"].check()
    a["x"], a["weight"] = _tensors("x", a["x"]), _tensors("weight", a["weight"])
    a["bias"] = (_tensors("bias", a["bias"]) if a["bias"] is not None else []) or None
    a["group_list"], a["group_list_tensor"] = _group_list(a["group_list"])
    a["split_item"] = default_split_item if a["split_item"] is None else a["split_item"]
    for arg, rule in _RULES:
        if arg is None:
            rule(a)
        elif arg in a:
            a[arg] = rule(arg, a[arg])
    a["group_name"] = a.get("hcomm")
    return getattr(torch.ops.gmm_allreduce, op)(*positional(op, a))


def _optional(rule):
    return lambda arg, value: None if value is None else rule(arg, value)


def _tensor(arg: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg}: expected None or a tensor, got {type(value).__name__}")
    return value


def _refuse_grad(a: dict) -> None:
    """A quantised call whose inputs require grad is refused before any communication."""
    lists = (a["scale"], a["antiquant_scale"], a["antiquant_offset"])
    if torch.is_grad_enabled() and is_quantised((*a["x"], *a["weight"]),
                                                (*lists, a["per_token_scale"])):
        inputs = [*a["x"], *a["weight"], *(a["bias"] or []), *(a["scale"] or []),
                  *(a["antiquant_scale"] or []), *(a["antiquant_offset"] or []),
                  a["per_token_scale"]]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            raise RuntimeError("quantised calls (int8 or float8 x or weight) are inference-only: "
                               "an input requires grad (call under torch.no_grad(), or detach it)")


def _tensors(arg: str, value) -> list[torch.Tensor]:
    if type(value) is not list:  # a list (the usual case) skips the slower ABC check
        if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
            raise TypeError(f"{arg}: expected a list of tensors, got {type(value).__name__}")
        value = list(value)
    if not all(map(isinstance, value, repeat(torch.Tensor))):
        i, t = next((i, t) for i, t in enumerate(value) if not isinstance(t, torch.Tensor))
        raise TypeError(f"{arg}[{i}]: expected a tensor, got {type(t).__name__}")
    return value


_INT64 = (-(2**63), 2**63 - 1)


def _int(arg: str, value) -> int:
    if type(value) is int and _INT64[0] <= value <= _INT64[1]:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg}: expected an int, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{arg}: expected a value that fits in int64, got {value}")
    return int(value)


def _dtype(arg: str, value) -> torch.dtype | None:
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{arg}: expected None or a torch.dtype, got {type(value).__name__}")
    return value


def _str(arg: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{arg}: expected a str, got {type(value).__name__}")
    return value


def _group_list(value) -> tuple[list[int] | None, torch.Tensor | None]:
    if value is None:
        return None, None
    if isinstance(value, torch.Tensor):
        return None, value
    if type(value) is list or isinstance(value, Sequence):
        value = list(value)
        # Plain ints within int64 (the usual list) pass at once; anything else is checked one by one.
        if set(map(type, value)) <= {int} and (not value or _INT64[0] <= min(value) and max(value) <= _INT64[1]):
            return value, None
        return [_int(f"group_list[{i}]", v) for i, v in enumerate(value)], None
    raise TypeError(f"group_list: expected a list of ints or a tensor, got {type(value).__name__}")


def _group_name(arg: str, hcomm) -> str:
    if isinstance(hcomm, str):
        if not torch.compiler.is_compiling():
            try:
                _watch(dist.distributed_c10d._resolve_process_group(hcomm))
            except (RuntimeError, ValueError):
                pass  # no such group: the op names hcomm in its error
        return hcomm
    if isinstance(hcomm, dist.ProcessGroup):
        _watch(hcomm)
        return hcomm.group_name
    if hcomm is None:
        if not dist.is_initialized():
            raise ValueError(
                "hcomm: None means the default process group, but torch.distributed is not "
                "initialized (call torch.distributed.init_process_group first)"
            )
        _watch(dist.group.WORLD)
        return dist.group.WORLD.group_name
    raise TypeError(f"hcomm: expected a group name, a ProcessGroup or None, got {type(hcomm).__name__}")


_watched: weakref.WeakSet = weakref.WeakSet()  # the groups whose freeing _watch hooks


def _watch(group: dist.ProcessGroup) -> None:
    """Once `group` is freed (destroy_process_group, and no reference left), releases the
    shared memory the op took for it at once, rather than at the op's next call."""
    if torch.compiler.is_compiling() or group in _watched:
        return
    _watched.add(group)
    weakref.finalize(group, _release_destroyed_groups)


def _release_destroyed_groups() -> None:
    try:
        torch.ops.gmm_allreduce._release_destroyed_groups()
    except Exception:  # noqa: BLE001  (at interpreter exit the op may be gone: nothing to free)
        pass


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul_all_reduce")
def _fake(*args, **kwargs):
    inductor.register_lowering()  # a graph with the op is being traced: Inductor may lower it
    return _fake_outputs(arguments("grouped_mat_mul_all_reduce", args, kwargs))


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul_reduce_scatter")
def _fake_scatter(*args, **kwargs):
    inductor.register_lowering()
    a = arguments("grouped_mat_mul_reduce_scatter", args, kwargs)
    if a["split_item"] not in (2, 3):  # the C++ plan's checks, for a traced call
        raise ValueError("split_item: the reduce-scatter returns one tensor, scattered by rows: "
                         f"expected 2 or 3, got {a['split_item']}")
    (y,) = _fake_outputs(a)
    ranks = dist.distributed_c10d._resolve_process_group(a["group_name"]).size()
    if y.shape[0] % ranks != 0:
        arg = "x" if a["combine_index"] is None else "num_tokens"
        raise ValueError(f"{arg}: the output's {y.shape[0]} rows cannot be scattered evenly over "
                         f"the group's {ranks} ranks")
    return [y.new_empty((y.shape[0] // ranks, y.shape[1]))]


@torch.library.register_fake("gmm_allreduce::_all_gather_rows")
def _fake_gather(t, group_name):
    ranks = dist.distributed_c10d._resolve_process_group(group_name).size()
    return t.new_empty((t.shape[0] * ranks, *t.shape[1:]))


@torch.library.register_fake("gmm_allreduce::grouped_mat_mul")
def _fake_compute(*args, **kwargs):
    return _fake_outputs(arguments("grouped_mat_mul", args, kwargs))


def _fake_outputs(a: dict):
    """The outputs' shapes and dtype, as the C++ plan gives them, from the call's arguments by
    name; group_list None means a tensor one."""
    dtype = a["x"][0].dtype
    if dtype in QUANTISED:  # W8A8: output_dtype, bf16 when None
        dtype = a["output_dtype"] or torch.bfloat16
    return [t.to(dtype) if t.dtype != dtype else t for t in _fake_shapes(
        a["x"], a["weight"], a["bias"], a["group_list"], a["group_list_tensor"], a["split_item"],
        a["group_list_type"], a["combine_index"], a["num_tokens"])]


def _fake_shapes(x, weight, bias, group_list, group_list_tensor, split_item, group_list_type,
                 combine_index, num_tokens):
    # A call mixing meta and real tensors dispatches here, not to the C++ kernel that checks this.
    for arg, tensors in (("x", x), ("weight", weight), ("bias", bias or [])):
        for i, t in enumerate(tensors):
            if t.device != x[0].device:
                raise ValueError(f"{arg}[{i}]: expected a tensor on {x[0].device} like x[0], "
                                 f"got one on {t.device}")
    if group_list_tensor is not None and group_list_tensor.device not in (x[0].device,
                                                                          torch.device("cpu")):
        raise ValueError(f"group_list: expected a tensor on cpu or on {x[0].device} like x[0], "
                         f"got one on {group_list_tensor.device}")
    n = [w.shape[1] for w in weight]
    if combine_index is not None:  # the C++ plan's checks of what decides the shape
        if split_item not in (2, 3):
            raise ValueError("combine_index: the combine sums expert rows into token rows of one "
                             f"output: expected split_item 2 or 3, got {split_item}")
        if num_tokens is None:
            raise ValueError("num_tokens: required with combine_index (the combined output's rows)")
        return [x[0].new_empty((num_tokens, n[0]))]
    if split_item == 2:
        return [x[0].new_empty((sum(xi.shape[0] for xi in x), n[0]))]
    if split_item == 3:
        return [x[0].new_empty((x[0].shape[0], n[0]))]
    if split_item == 0:
        shapes = [(*xi.shape[:-1], ni) for xi, ni in zip(x, n)]
    elif group_list is None:  # split_item 1 with a tensor group_list: sizes known only at run time
        ctx = torch.library.get_ctx()
        shapes = [(ctx.new_dynamic_size(), ni) for ni in n]
    elif group_list_type == 0:
        shapes = [(end - start, ni) for start, end, ni in zip([0, *group_list[:-1]], group_list, n)]
    else:
        shapes = [(m, ni) for m, ni in zip(group_list, n)]
    return [x[0].new_empty(shape) for shape in shapes]


# The public arguments' rules, in the order they are checked (None: a check of the whole call).
# split_item None is the op's default (0, as MindSpeed's front reads None; 3 for the
# reduce-scatter op).
_RULES = (
    ("scale", _optional(_tensors)),
    ("antiquant_scale", _optional(_tensors)),
    ("antiquant_offset", _optional(_tensors)),
    ("per_token_scale", _optional(_tensor)),
    (None, _refuse_grad),
    ("output_dtype", _dtype),
    ("split_item", _int),
    ("hcomm", _group_name),
    ("reduce_op", _str),
    ("comm_turn", _int),
    ("group_list_type", _int),
    ("world_size", _int),
    ("check_ranks", _bool),
    ("reduce_dtype", _dtype),
    ("async_op", _async),
    ("combine_index", _optional(_tensor)),
    ("combine_weight", _optional(_tensor)),
    ("shared_input", _optional(_tensor)),
    ("num_tokens", _optional(_int)),
)
