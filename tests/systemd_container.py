"""A real systemd, booted as PID 1 of a throwaway Debian for tests (no systemd runs on the test machine itself).

How, with util-linux only (`podman run` cannot set up its OCI runtime in this sandbox: ../shared/CONTAINERS.md):

- **Root file system**: `debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,
  python3-venv,openssh-server bookworm` from Debian's mirror, made once per machine under /var/tmp (a lock
  keeps two runs from making it twice; a marker written last marks it complete). Each container mounts a
  fresh overlay over it, so a test writes nothing into the cache.
- **Namespaces**: `unshare --pid --fork --mount --uts --cgroup` (the network is the test machine's: servers
  inside bind 127.0.0.1 ports picked with free_port(), as every test server does). The process first moves
  into a cgroup of its own (`<hierarchy>/gitops-agent-test-<id>`) so that, inside the cgroup namespace,
  systemd's cgroup tree is that one, never the machine's. Fresh proc, sysfs, tmpfs /run and /tmp, the
  cgroup hierarchies mounted anew (hybrid: name=systemd v1 + cgroup2 at unified; or pure cgroup2), then
  `chroot` and exec `/lib/systemd/systemd` with `container=other`.
- **sshd inside** (the test's way in, as on a real host): Debian's, on 127.0.0.1:<free port>, root login by the
  test's key only, host keys made by the package.
- **Stop**: SIGKILL to the namespace's PID 1 (the kernel kills every process in it; the mount namespace and
  its overlay go with the last one), then the cgroups are removed.

Requires root, util-linux, debootstrap and a cgroup layout this knows (checked: the fixture skips otherwise).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from conftest import free_port
except ImportError:  # pragma: no cover
    from tests.conftest import free_port

__all__ = ["SystemdContainer", "start_systemd_container", "rootfs"]

MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,openssh-server"
CACHE = Path("/var/tmp/gitops-agent-systemd-rootfs-bookworm")
MARKER = ".gitops-agent-complete"
CGROUP = Path("/sys/fs/cgroup")


def skip_unless_possible() -> str:
    """The cgroup layout ("hybrid" or "unified"); skips the test when a systemd cannot be booted here."""
    if os.geteuid() != 0:
        pytest.skip("booting a systemd container needs root")
    missing = [t for t in ("unshare", "nsenter", "chroot", "debootstrap", "ssh", "ssh-keygen") if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (apt-get install util-linux debootstrap openssh-client)")
    mounts = Path("/proc/self/mounts").read_text()
    if f" {CGROUP} cgroup2 " in mounts:
        return "unified"
    if f" {CGROUP}/systemd cgroup " in mounts and f" {CGROUP}/unified cgroup2 " in mounts:
        return "hybrid"
    pytest.skip("unknown cgroup layout (neither cgroup2 at /sys/fs/cgroup nor systemd's hybrid one)")


def rootfs(timings: dict | None = None) -> Path:
    """The cached Debian root with systemd, python3-venv and sshd; made once per machine (about 2-4 min)."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{CACHE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (CACHE / MARKER).exists():
            return CACHE
        shutil.rmtree(CACHE, ignore_errors=True)
        start = time.monotonic()
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(CACHE),
                               MIRROR], capture_output=True, text=True, timeout=1500)
        if proc.returncode != 0:
            shutil.rmtree(CACHE, ignore_errors=True)
            raise AssertionError(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (CACHE / MARKER).write_text("")
        if timings is not None:
            timings["debootstrap"] = time.monotonic() - start
        return CACHE


@dataclass
class SystemdContainer:
    proc: subprocess.Popen            # `unshare`, whose child is the container's PID 1 (systemd)
    work: Path                        # overlay upper/work dirs and the launcher's files
    root: Path                        # the merged root as the container sees it (inside its mount namespace)
    cgroups: tuple[Path, ...]
    ssh_port: int
    ssh_key: Path                     # the client's private key (root@127.0.0.1:ssh_port)
    ssh_config: Path                  # Host 127.0.0.1, its own known_hosts

    @property
    def init_pid(self) -> int | None:
        """The host pid of the container's PID 1 (the child of `unshare`), once it runs."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A command inside the container (its namespaces and root), e.g. systemctl."""
        pid = self.init_pid
        assert pid is not None, "the container's systemd is not running"
        return subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "-u", "-C", "-r", "-w", *argv],
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        pid = self.init_pid
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)          # PID 1 of the namespace: everything in it goes too
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=60)
        for cgroup in self.cgroups:                   # deepest first; emptied by the kill above
            deadline = time.monotonic() + 30
            while cgroup.exists() and time.monotonic() < deadline:
                for d in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [cgroup]:
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                if cgroup.exists():
                    time.sleep(0.2)
        shutil.rmtree(self.work, ignore_errors=True)


_LAUNCH = r"""
set -eu
for cg in "$@"; do echo $$ > "$cg/cgroup.procs"; done
exec unshare --pid --fork --mount --uts --cgroup --propagation private sh -eu -c '
W="$1" LOWER="$2" LAYOUT="$3"
R="$W/merged"
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$W/upper,workdir=$W/ovwork" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
if [ "$LAYOUT" = unified ]; then
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
else
  mount -t tmpfs tmpfs "$R/sys/fs/cgroup"
  mkdir -p "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
  mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
fi
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mount --rbind /dev "$R/dev"
hostname gitops-agent-systemd-test
cd "$R"
exec chroot "$R" /usr/bin/env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system --log-target=console
' launcher "$W" "$LOWER" "$LAYOUT"
"""


def start_systemd_container(request: pytest.FixtureRequest, timings: dict | None = None,
                            boot_timeout_s: float = 300) -> SystemdContainer:
    """Boot a container (stopped by a finalizer of `request`, even if the boot fails); returns once systemd
    says `running` (or `degraded`) and its sshd answers."""
    layout = skip_unless_possible()
    lower = rootfs(timings)
    work = Path(tempfile.mkdtemp(prefix="systemd-ct-", dir="/var/tmp"))
    upper = work / "upper"
    for d in (upper, work / "ovwork", work / "merged"):
        d.mkdir()
    # What the test adds on top of the cached root: sshd on a 127.0.0.1 port, the test's key for root.
    port = free_port()
    key = work / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "systemd-test", "-f", str(key)], check=True)
    (upper / "etc" / "ssh" / "sshd_config.d").mkdir(parents=True)
    (upper / "etc" / "ssh" / "sshd_config.d" / "test.conf").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    (upper / "root" / ".ssh").mkdir(parents=True, mode=0o700)
    (upper / "root" / ".ssh" / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    (upper / "root" / ".ssh" / "authorized_keys").chmod(0o600)
    config = work / "ssh_config"
    config.write_text(f"Host 127.0.0.1\n  Port {port}\n  User root\n  UserKnownHostsFile {work}/known_hosts\n"
                      f"  StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 30\n")

    name = f"gitops-agent-test-{uuid.uuid4().hex[:12]}"
    hierarchies = [CGROUP] if layout == "unified" else [CGROUP / "systemd", CGROUP / "unified"]
    cgroups = tuple(h / name for h in hierarchies)
    for cg in cgroups:
        cg.mkdir()
    log = open(work / "console.log", "wb")
    proc = subprocess.Popen(["sh", "-c", _LAUNCH, "launch", *map(str, cgroups)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "W": str(work), "LOWER": str(lower),
                                 "LAYOUT": layout})
    log.close()
    container = SystemdContainer(proc, work, work / "merged", cgroups, port, key, config)
    request.addfinalizer(container.stop)
    start = time.monotonic()
    deadline = start + boot_timeout_s
    state = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the container exited {proc.returncode}:\n{(work / 'console.log').read_text()[-3000:]}")
        if container.init_pid is not None:
            state = container.run("systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                ssh = subprocess.run(["ssh", "-F", str(config), "-i", str(key), "127.0.0.1", "true"],
                                     capture_output=True, text=True, timeout=60)
                if ssh.returncode == 0:
                    if timings is not None:
                        timings["boot"] = time.monotonic() - start
                    return container
        time.sleep(0.5)
    raise AssertionError(f"systemd did not come up in {boot_timeout_s:.0f}s (last state {state!r}):\n"
                         f"{(work / 'console.log').read_text()[-3000:]}")
