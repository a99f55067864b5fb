// async_op=True: the op returns once its collectives are started, and the rest of the call (the
// waits, the fingerprint check, the outputs' copies or rounding) runs at the first wait on any of
// its outputs. That rest is a c10d::Work registered for every output (c10d::register_work), so
// that torch.ops._c10d_functional.wait_tensor(output) runs it, as for PyTorch's functional
// collectives: host-blocking on gloo and shared memory, stream-ordered on NCCL.
//
// After it ran: a later wait on any output is a no-op, or, if it failed, raises the same error
// again. A call whose outputs are all freed unwaited is released at the next async_op call: its
// buffer at once, its registrations once no view of an output is left (a wait on such a view
// raises).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace gmm_allreduce {

// Runs `finish(outputs)` and returns `outputs`; with async_op, returns `outputs` at once, `finish`
// left to the first wait_tensor on any of them. `finish` must not hold the outputs itself.
std::vector<at::Tensor> finish_or_defer(std::function<void(std::vector<at::Tensor>&)> finish,
                                        std::vector<at::Tensor> outputs, bool async_op);

// On a device with streams (CUDA): marks `t` as used by the current stream, so that the caching
// allocator does not hand its memory to another stream before the work queued here is done (a
// deferred finish runs on the waiting stream, which need not be the one `t` was allocated on). A
// no-op for CPU tensors.
void record_on_current_stream(const at::Tensor& t);

}  // namespace gmm_allreduce
