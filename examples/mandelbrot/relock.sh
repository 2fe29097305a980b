#!/usr/bin/env bash
# Regenerate desired-state-example/apps/mandelbrot/{blue,green}.lock from the wheelhouse.
#
#   blue.lock  = mandelbrot==1.0.0 + Pillow   green.lock = mandelbrot==1.1.0 + Pillow
#
# pip-compile --generate-hashes records the sha256 of the mandelbrot wheel found in the wheelhouse
# and the PyPI hashes of every Pillow file of the pinned release. The machine's pip config (extra
# indexes, find-links, constraints) is ignored so only PyPI and the wheelhouse are consulted, and no
# option line (--find-links, --index-url) is written: the agent passes find_links itself and
# rejects option lines in lockfiles.
#
# Usage: relock.sh            PILLOW_VERSION=11.3.0 relock.sh
# Needs pip-tools (pip-compile) on PATH.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
state=$(cd "$here/../../desired-state-example" && pwd)
pillow=${PILLOW_VERSION:-11.3.0}  # has cp310/cp311/cp312 manylinux wheels

locks=(
  "blue 1.0.0"
  "green 1.1.0"
)

export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX || true
export CUSTOM_COMPILE_COMMAND="examples/mandelbrot/relock.sh"

cd "$state/apps/mandelbrot"   # so that --find-links ../../wheelhouse is the path app.yaml uses
for lock in "${locks[@]}"; do
  read -r env version <<<"$lock"
  wheel="../../wheelhouse/mandelbrot-$version-py3-none-any.whl"
  [[ -f $wheel ]] || { echo "missing $wheel: run build-wheels.sh" >&2; exit 1; }
  tmp=$(mktemp -d)
  printf 'mandelbrot==%s\npillow==%s\n' "$version" "$pillow" >"$tmp/$env.in"
  pip-compile --quiet --strip-extras --generate-hashes --rebuild --no-emit-find-links --no-emit-index-url \
      --no-emit-trusted-host --no-emit-options --find-links ../../wheelhouse \
      --output-file "$tmp/$env.lock" "$tmp/$env.in"
  # The "via -r <tmp>/<env>.in" annotations would name the scratch directory: say relock.sh.
  sed -e "s|-r $tmp/$env.in|relock.sh|" "$tmp/$env.lock" >"$env.lock"
  rm -rf "$tmp"
  if grep -nE '^-|file:|/tmp/|/opt/|/work/' "$env.lock"; then
    echo "$env.lock has option lines or paths (shown above)" >&2; exit 1
  fi
  echo "wrote $PWD/$env.lock"
done
