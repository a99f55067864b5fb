// The collective a call ends with, as a strategy: each op names one (all-reduce, reduce-scatter,
// or none for the comm-free op), and the driver (op.cpp) runs the call through it without knowing
// which. A new collective (an all-to-all) is a new CollectiveStrategy and its line in the table of
// collective.cpp, plus its op's schema.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <vector>

#include "comm/group.h"
#include "core/engine.h"
#include "core/plan.h"

namespace gmm_allreduce {

struct CollectiveStrategy {
  Collective kind;
  const char* op;      // the op (registration.cpp) whose calls end with it
  const char* mlp_op;  // the expert block's op (core/mlp.h) that ends with it
  // Its rules on a planned call (the output's shape, args.collective.ranks set), raised before any
  // communication, and its chunks: by default make_plan's, cut by comm_turn.
  void (*plan)(Plan& plan, const OpArgs& args);
  // The plan's chunks computed by the engine, each one's collective started as soon as it is
  // computed, while the next computes; returns the outputs, or with async_op returns them once
  // the collectives are started, the rest deferred to the first wait (comm/deferred.h).
  std::vector<at::Tensor> (*run)(const Engine& engine, Plan plan, const OpArgs& args,
                                 const GroupPtr& group);
};

// The strategy of a collective, or of the op of that name (none for an unknown op).
const CollectiveStrategy& collective_strategy(Collective kind);
const CollectiveStrategy* collective_strategy(std::string_view op);

// The ops that end with a strategy, by name (the grouped products', then the expert block's).
std::vector<const char*> strategy_ops();

// The whole plan of a call: make_plan, then its collective's rules and chunks.
Plan plan_call(const OpArgs& args);

}  // namespace gmm_allreduce
