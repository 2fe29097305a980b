"""The Containerfile builds and the agent in the image converges the bundled example.

Follows ../shared/CONTAINERS.md, the recipe that works on these machines (no registry, `podman run`
unavailable): a local Debian base image from debootstrap (built once, then reused), buildah with chroot
isolation and a containers.conf without default ulimits, pip's CA bundle mounted into the build, and
`buildah run` to run commands in a working container of the image.

Chroot isolation shares the host's network: the example's services would listen on the host's
127.0.0.1:8100-8102 and 8200, which a developer's own quickstart (or another test) may already use. The
test therefore moves them to free ports in its copy of the example; everything else is the example as
shipped, the shop included: its secret is decrypted in the image by Debian's `age` with the demo key
(the image makes that key readable by the agent's group), its venv comes from PyPI through pip.

Slow (a cold run: debootstrap ~1-3 min, build ~1-3 min, once ~1 min with the shop); `.ci/run` runs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/debian-local:bookworm"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_FALLBACK = "/etc/ssl/certs/ca-certificates.crt"

# Runs inside the container as the image's user (gitops): the example as a git repo, one reconcile,
# the services answering (the shop healthy: migrated), plan converged, then down. Markers on stdout
# for the test to check.
INNER = r"""
set -eu
P0=$1 P1=$2 P2=$3 P3=$4
EXAMPLE=/usr/share/gitops-agent/desired-state-example
export GITOPS_AGENT_AGE_IDENTITY=$EXAMPLE/keys/demo-host.agekey
cp -r $EXAMPLE /tmp/state
cd /tmp/state
sed -i "s/\b8100\b/$P0/g; s/\b8101\b/$P1/g; s/\b8102\b/$P2/g" apps/mandelbrot/app.yaml
sed -i "s/\b8200\b/$P3/g" apps/shop/app.yaml
git init -q -b main
git add -A
git -c user.email=ci@example.invalid -c user.name=ci commit -q -m "desired-state-example"
trap 'gitops-agent down --root /tmp/root >/dev/null 2>&1 || true' EXIT
gitops-agent once --repo file:///tmp/state --host localhost --root /tmp/root
echo "ONCE-OK"
python3 - "$P1" "$P2" "$P3" <<'EOF'
import json, sys, urllib.request
for port in sys.argv[1:]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5).read().decode()
    print("VERSION", port, json.loads(body)["version"])
print("SHOP-HEALTHZ", urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[3]}/healthz", timeout=5).status)
EOF
gitops-agent plan --repo file:///tmp/state --host localhost --root /tmp/root
echo "PLAN-CONVERGED"
gitops-agent down --root /tmp/root
trap - EXIT
echo "DOWN-OK"
"""


def _skip_unless_possible():
    if os.geteuid() != 0:
        pytest.skip("building images with buildah here needs root (chroot isolation, debootstrap)")
    missing = [t for t in ("buildah", "podman", "debootstrap") if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install buildah podman debootstrap)")


def _run(cmd, env, timeout, check=True, **kw):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {out.returncode}\nstdout:\n{out.stdout[-6000:]}\n"
                    f"stderr:\n{out.stderr[-6000:]}")
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_with_marker(marker: str) -> list[int]:
    """Processes whose environment holds the marker: everything started inside our `buildah run`."""
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def timings():
    t: dict[str, float] = {}
    yield t
    print("\ncontainer test timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    _skip_unless_possible()
    conf = tmp_path_factory.mktemp("containers") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def base_image(podman_env, timings):
    """localhost/debian-local:bookworm from debootstrap, made once per machine (a lock keeps concurrent
    runs from bootstrapping twice)."""
    with open("/var/tmp/gitops-agent-debian-local.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _run(["podman", "image", "exists", BASE_IMAGE], podman_env, 60, check=False).returncode == 0:
            timings["debootstrap"] = 0.0
            return BASE_IMAGE
        start = time.monotonic()
        rootfs = tempfile.mkdtemp(prefix="debian-local-", dir="/var/tmp")
        try:
            _run(["debootstrap", "--variant=minbase", "bookworm", rootfs, MIRROR], podman_env, 1200)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=podman_env,
                                      capture_output=True, text=True, timeout=600)
            tar.stdout.close()
            assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        timings["debootstrap"] = time.monotonic() - start
        return BASE_IMAGE


@pytest.fixture(scope="module")
def pip_cert():
    cert = os.environ.get("PIP_CERT") or CA_FALLBACK
    if not Path(cert).is_file():
        pytest.skip(f"no CA bundle for pip at {cert} (set PIP_CERT)")
    return cert


@pytest.fixture(scope="module")
def image(podman_env, base_image, pip_cert, timings):
    # A tag of its own, so concurrent runs on one machine do not build over each other's image.
    tag = f"localhost/gitops-agent:test-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    _run(["buildah", "bud", "--isolation", "chroot",
          "-v", f"{pip_cert}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt",
          "--build-arg", f"BASE={base_image}", "--format", "docker",
          "-f", "Containerfile", "-t", tag, "."], podman_env, 1500, cwd=REPO)
    timings["build"] = time.monotonic() - start
    yield tag
    _run(["buildah", "rmi", tag], podman_env, 120, check=False)


@pytest.fixture
def container(podman_env, image):
    ctr = _run(["buildah", "from", image], podman_env, 120).stdout.strip().splitlines()[-1]
    yield ctr
    _run(["buildah", "rm", ctr], podman_env, 120, check=False)


def test_image_config(podman_env, image):
    """Entry point, command, user, port and health check as the Containerfile promises."""
    info = json.loads(_run(["buildah", "inspect", "--type", "image", image], podman_env, 60).stdout)
    config = info["Docker"]["config"]
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "gitops-agent"]
    assert config["Cmd"] == ["run", "--root", "/var/lib/gitops-agent", "--listen", "0.0.0.0:9400"]
    assert config["User"] == "gitops"
    assert "9400/tcp" in config["ExposedPorts"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


def test_once_converges_the_example_in_the_image(podman_env, container, pip_cert, tmp_path, timings):
    def run(*argv, timeout=120, volumes=(), env=()):
        cmd = ["buildah", "run", "--isolation", "chroot"]
        for v in volumes:
            cmd += ["-v", v]
        for e in env:
            cmd += ["--env", e]
        return _run(cmd + [container, "--", *argv], podman_env, timeout)

    out = run("gitops-agent", "--help")
    assert "once" in out.stdout and "validate" in out.stdout
    assert run("id", "-un").stdout.strip() == "gitops"  # the image's non-root user
    assert run("python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip() == "3.11"
    for tool in ("git", "haproxy", "nginx", "supervisord", "tini", "age"):
        run("sh", "-c", f"command -v {tool}")

    script = tmp_path / "inner.sh"
    script.write_text(INNER)
    marker = f"GITOPS_AGENT_CONTAINER_TEST={uuid.uuid4().hex}"
    p0, p1, p2, p3 = _free_ports(4)
    start = time.monotonic()
    try:
        out = run("sh", "/run/inner.sh", str(p0), str(p1), str(p2), str(p3), timeout=900,
                  volumes=[f"{script}:/run/inner.sh:ro", f"{pip_cert}:/run/host-ca.crt:ro"],
                  env=["PIP_CERT=/run/host-ca.crt", marker])
    finally:
        # The embedded supervisord daemonizes and would outlive `buildah run` if down never ran.
        leftovers = _pids_with_marker(marker)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    timings["once in the container"] = time.monotonic() - start
    assert "ONCE-OK" in out.stdout, out.stdout + out.stderr
    assert f"VERSION {p1} 1.0.0" in out.stdout and f"VERSION {p2} 1.1.0" in out.stdout, out.stdout
    assert f"VERSION {p3} 1.0.0" in out.stdout and "SHOP-HEALTHZ 200" in out.stdout, out.stdout
    assert "PLAN-CONVERGED" in out.stdout, out.stdout + out.stderr
    assert "DOWN-OK" in out.stdout and "embedded supervisord stopped" in out.stdout, out.stdout
    assert not leftovers, f"processes left running after down: {leftovers}"
