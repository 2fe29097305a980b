#!/usr/bin/env bash
# Build the mandelbrot releases 1.0.0 and 1.1.0 from this one source tree, reproducibly.
#
# A release is (version, default palette). For each, the tree is copied to a scratch directory,
# src/mandelbrot/_release.py is rewritten there with the release's values, and `python -m build`
# makes the wheel. SOURCE_DATE_EPOCH pins the zip timestamps and pyproject.toml pins setuptools,
# so the same tree gives byte-identical wheels (hence stable hashes in the lockfiles).
#
# Usage: build-wheels.sh [OUTDIR]   (default: ../../desired-state-example/wheelhouse)
#        PYTHON=python3.11 build-wheels.sh
# After a rebuild whose bytes changed, run relock.sh to refresh the lockfiles' hashes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "${1:-$here/../../desired-state-example/wheelhouse}" && cd "${1:-$here/../../desired-state-example/wheelhouse}" && pwd)
python=${PYTHON:-python3}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}  # 2024-01-01T00:00:00Z

releases=(
  "1.0.0 classic"
  "1.1.0 ember"
)

umask 022
for release in "${releases[@]}"; do
  read -r version palette <<<"$release"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -C "$here" --exclude=__pycache__ --exclude='*.egg-info' --exclude=build --exclude=dist \
      -cf - pyproject.toml src | tar -C "$work" -xf -
  sed -i -E "s/^__version__ = .*/__version__ = \"$version\"/; s/^PALETTE = .*/PALETTE = \"$palette\"/" \
      "$work/src/mandelbrot/_release.py"
  grep -qx "__version__ = \"$version\"" "$work/src/mandelbrot/_release.py"
  grep -qx "PALETTE = \"$palette\"" "$work/src/mandelbrot/_release.py"
  chmod -R u=rwX,go=rX "$work"
  "$python" -m build --wheel --outdir "$out" "$work" >"$work.log" 2>&1 || { cat "$work.log" >&2; exit 1; }
  rm -rf "$work" "$work.log"
  trap - EXIT
  echo "built $out/mandelbrot-$version-py3-none-any.whl (palette $palette)"
done
(cd "$out" && sha256sum mandelbrot-*.whl)
