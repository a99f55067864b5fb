#include "util/env.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <string>

namespace gmm_allreduce {

std::optional<std::string> env_value(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) return std::nullopt;
  std::string v = raw;
  const auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  v.erase(v.begin(), std::find_if_not(v.begin(), v.end(), space));
  v.erase(std::find_if_not(v.rbegin(), v.rend(), space).base(), v.end());
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  if (v.empty()) return std::nullopt;
  return v;
}

std::optional<bool> env_flag(const char* name) {
  const std::optional<std::string> v = env_value(name);
  if (!v) return std::nullopt;
  if (*v == "1" || *v == "true" || *v == "on" || *v == "yes") return true;
  if (*v == "0" || *v == "false" || *v == "off" || *v == "no") return false;
  TORCH_CHECK_VALUE(false, name, ": expected 1/true/on/yes or 0/false/off/no, got \"",
                    std::getenv(name), "\"");
}

std::optional<int64_t> env_bytes(const char* name) {
  const std::optional<std::string> v = env_value(name);
  if (!v) return std::nullopt;
  size_t digits = 0;
  while (digits < v->size() && std::isdigit(static_cast<unsigned char>((*v)[digits]))) ++digits;
  const std::string suffix = v->substr(digits);
  const int shift = suffix.empty()  ? 0
                    : suffix == "k" ? 10
                    : suffix == "m" ? 20
                    : suffix == "g" ? 30
                                    : -1;
  int64_t n = 0;
  if (digits > 0 && digits <= 15) n = std::stoll(v->substr(0, digits));
  const bool fits = shift >= 0 && n > 0 && n <= (std::numeric_limits<int64_t>::max() >> shift);
  TORCH_CHECK_VALUE(fits, name,
                    ": expected a positive byte count (e.g. 8388608, 8192k, 8m), got \"",
                    std::getenv(name), "\"");
  return n << shift;
}

}  // namespace gmm_allreduce
