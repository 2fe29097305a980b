#!/usr/bin/env bash
# Regenerate desired-state-example/apps/shop/main.lock: django, gunicorn and the shop wheel in
# apps/shop/wheels/, exact versions, every file's sha256 (uv pip compile --generate-hashes), for
# Python 3.11 on Linux.
#
# Django and gunicorn (and their dependencies) come from PyPI with the hashes of all their files; shop
# comes from apps/shop/wheels/ with the hash of that one wheel (the script checks it: a project named
# "shop" exists on PyPI too, and the lock must only ever accept our wheel). No option line
# (--find-links, --index-url) is written: the agent passes find_links from app.yaml itself and rejects
# option lines in lockfiles. The machine's uv configuration is ignored (UV_NO_CONFIG).
#
# Usage: relock.sh                       (the pins below)
#        DJANGO_VERSION=5.2.20 relock.sh SHOP_VERSION=1.1.0 relock.sh (after build.py --version 1.1.0
#        --out ../../desired-state-example/apps/shop/wheels)
# Needs uv on PATH (pip install uv).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
app=$(cd "$here/../../desired-state-example/apps/shop" && pwd)
django=${DJANGO_VERSION:-5.2.19}      # 5.2 is the newest Django line that runs on Python 3.10/3.11
gunicorn=${GUNICORN_VERSION:-27.0.1}
shop=${SHOP_VERSION:-1.0.0}

wheel="wheels/shop-$shop-py3-none-any.whl"
cd "$app"      # so that --find-links wheels is the path app.yaml uses
[[ -f $wheel ]] || { echo "missing $app/$wheel: run build.py --version $shop --out $app/wheels" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'django==%s\ngunicorn==%s\nshop==%s\n' "$django" "$gunicorn" "$shop" >"$tmp/main.in"
for var in $(compgen -e); do [[ $var == UV_* ]] && unset "$var"; done
UV_NO_CONFIG=1 uv pip compile --quiet --generate-hashes --python-version 3.11 --python-platform linux \
    --find-links wheels --custom-compile-command "examples/shop/relock.sh" \
    --output-file "$tmp/main.lock" "$tmp/main.in"
# the "via -r <tmp>/main.in" annotations would name the scratch directory: say relock.sh
sed -e "s|-r $tmp/main.in|relock.sh|" "$tmp/main.lock" >main.lock

if grep -nE '^-|file:|/tmp/|/opt/|/work/|/root/|/home/' main.lock; then
  echo "main.lock has option lines or paths (shown above)" >&2; exit 1
fi
want=$(sha256sum "$wheel" | cut -d' ' -f1)
got=$(awk '/^shop==/{on=1; next} on && /--hash=/{print} on && !/--hash=/{on=0}' main.lock | grep -o 'sha256:[0-9a-f]*' | cut -d: -f2)
if [[ $got != "$want" ]]; then
  echo "main.lock: shop must have exactly the hash of $wheel ($want), has: ${got:-none}" >&2; exit 1
fi
echo "wrote $app/main.lock (shop $shop = $want, django $django, gunicorn $gunicorn)"
