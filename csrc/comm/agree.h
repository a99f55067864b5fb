// check_ranks=True: before the real all-reduce, every rank tells the others whether its call is
// valid and what it would produce, so that one rank's bad call becomes the same clear error on
// every rank instead of a hang or a silently mismatched sum.
#pragma once

#include "../plan.h"
#include "group.h"

namespace gmm_allreduce {

// make_plan(args) on every rank, then one small all-reduce that exchanges each rank's verdict.
// Raises on all ranks alike if any rank's call is invalid or the ranks' plans disagree.
Plan make_plan_agreed(const OpArgs& args, const GroupPtr& group);

}  // namespace gmm_allreduce
