"""The composition root: the one place that builds the agent's drivers and reconciler from `Settings`.

Everything below the CLI takes its collaborators as arguments, so a test can hand in other drivers
(a reconciler over temp dirs, a fixed clock) without touching the code that decides.
"""

from __future__ import annotations

from agent.core.errors import ConfigError
from agent.core.layout import Layout
from agent.settings import Settings

__all__ = ["world", "reconciler", "git_source"]


def git_source(settings: Settings):
    """The root's source (the mirror under <root>/source), for a run that may write under the root. Light to
    import: `once` builds it first and starts resolving (`GitSource.resolve_ahead`) while the rest loads."""
    from agent.drivers.git import GitSource
    from agent.service.prewarm import prewarm

    return GitSource(_repo(settings), settings.ref, Layout(settings.root).source, refs_url=settings.refs_url,
                     on_fetch=prewarm)


def _repo(settings: Settings) -> str:
    if not settings.repo:
        raise ConfigError("no state repo given: use --repo URL (or GITOPS_AGENT_REPO)")
    return settings.repo


def world(settings: Settings, read_only: bool = False, source=None):
    """Build the drivers a reconcile uses. Cheap: nothing is started, fetched or read here.

    `read_only` (plan): nothing may be written under the root (DESIGN §6), so the source fetches into a
    scratch dir borrowing the root mirror's objects, signatures are checked with a scratch GNUPGHOME,
    and the desired-state cache is only read. `World.close()` removes the scratch dir. `source`: one already
    built by `git_source` (ignored when read-only)."""
    from pathlib import Path

    from agent.drivers.git import GitSource
    from agent.drivers.lb import LoadBalancer
    from agent.drivers.supervisor_handle import SupervisorHandle
    from agent.drivers.venv import VenvManager
    from agent.service.desired_cache import DesiredCache
    from agent.service.reconciler import World

    layout = Layout(settings.root)
    scratch = None
    if read_only:
        import tempfile     # plan only: once and run make no scratch dir

        scratch = Path(tempfile.mkdtemp(prefix="gitops-agent-plan-"))
        source = GitSource.aside(_repo(settings), settings.ref, layout.source, scratch=scratch / "source")
    elif source is None:
        source = git_source(settings)
    verifier = None
    if settings.verify_signatures:
        from agent.drivers.signatures import SignatureVerifier

        verifier = SignatureVerifier(scratch or layout.root, settings.trusted_keys, settings.allowed_signers)
    return World(
        layout=layout,
        source=source,
        supervisor=SupervisorHandle(settings.supervisor, layout, web=settings.supervisor_web_address),
        venvs=VenvManager(layout.root, retention=settings.retention, installed_file=layout.state / "installed.json",
                          read_only=read_only),
        lb=LoadBalancer(settings.lb, layout.root, config=settings.lb_config, reload=settings.lb_reload,
                        metrics=settings.lb_metrics_address),
        desired_cache=DesiredCache(layout.state / "desired", read_only=read_only),
        verifier=verifier,
        scratch=scratch,
    )


def reconciler(settings: Settings, read_only: bool = False, source=None):
    """The reconciler `once`, `run` (read_only=False) and `plan` (read_only=True) use."""
    from agent.service.reconciler import Reconciler

    return Reconciler(settings, world(settings, read_only, source), read_only=read_only)
