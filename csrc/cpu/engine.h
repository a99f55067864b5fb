// The ATen engine (engine.cpp): the CPU's, and that of any device with ATen matmuls and no engine
// of its own.
#pragma once

#include "core/engine.h"

namespace gmm_allreduce {

const Engine& cpu_engine();

}  // namespace gmm_allreduce
