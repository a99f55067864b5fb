#!/usr/bin/env bash
# Brings DIR to the working tree's files (tracked and new, as git sees them), for the builds that
# must not replace the in-tree extension of .venv: the sanitizer build, the CUDA build. A file
# whose content changed is rewritten (so that its time is now, and a build there recompiles what
# depends on it); an unchanged one is left alone; files gone from the tree go, except DIR's build/
# folder and the extension built there (*.so).
#
#     bash tools/stage_tree.sh DIR
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
dir="$1"
mkdir -p "$dir"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\n' "$f"; done >"$list"
# Remove what the tree no longer has.
(cd "$dir" && find . -type f ! -path './build/*' ! -name '*.so' | sed 's|^\./||') \
  | { grep -vxF -f "$list" || true; } | while IFS= read -r f; do rm -f "$dir/$f"; done
while IFS= read -r f; do
  if ! cmp -s "$f" "$dir/$f"; then
    mkdir -p "$dir/$(dirname "$f")"
    cp "$f" "$dir/$f"
  fi
done <"$list"
