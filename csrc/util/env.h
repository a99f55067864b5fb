// Switches read from the environment. A value that is set but not understood is an error naming
// the variable, never a silent default.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace gmm_allreduce {

// The variable's value, surrounding spaces trimmed and lower-cased; nullopt when unset or empty.
std::optional<std::string> env_value(const char* name);

// 1/true/on/yes or 0/false/off/no (any case, surrounding spaces ignored); nullopt when unset or
// empty. Raises c10::ValueError naming `name` for anything else.
std::optional<bool> env_flag(const char* name);

// A byte count: a positive integer, optionally followed by k, m or g (KiB, MiB, GiB); nullopt
// when unset or empty. Raises c10::ValueError naming `name` for anything else.
std::optional<int64_t> env_bytes(const char* name);

}  // namespace gmm_allreduce
