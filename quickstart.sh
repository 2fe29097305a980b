#!/usr/bin/env bash
# Set up and converge this host to the bundled example: installs HAProxy if missing (apt), the agent
# (pip, editable), then runs one reconcile with the agent's own embedded supervisord under ./agent-root.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v haproxy >/dev/null 2>&1 || ! command -v age >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy age
fi
python3 -m pip install -q -e .
exec gitops-agent once --repo "file://$PWD" --path desired-state-example --host localhost --root ./agent-root \
  --age-identity desired-state-example/keys/demo-host.agekey "$@"
