"""The agent's supervisord, whichever it is: its own embedded one under the root, or an existing one by
socket (`--supervisor unix://...`). One object so the reconciler, `facts` and `down` agree on which."""

from __future__ import annotations

from agent.core.errors import SupervisorError
from agent.core.layout import Layout
from agent.drivers.supervisor import EmbeddedSupervisor, SupervisorClient, connect

__all__ = ["SupervisorHandle"]


class SupervisorHandle:
    def __init__(self, spec: str, layout: Layout, web: str | None = None):
        self.embedded = EmbeddedSupervisor(layout.root, web=web) if spec == "embedded" else None
        self.url = spec
        self._client: SupervisorClient | None = None

    def running_client(self) -> SupervisorClient | None:
        """A client if supervisord answers now; never starts anything (facts and plan must not)."""
        if self.embedded is not None:
            return self.embedded_client() if self.embedded.is_running() else None
        client = connect(self.url)
        try:
            client.state()
        except SupervisorError:
            return None
        return client

    def embedded_client(self) -> SupervisorClient:
        if self._client is None:
            self._client = SupervisorClient(self.embedded.socket_path)
        return self._client

    def ensure(self) -> SupervisorClient:
        if self.embedded is not None:
            self._client = self.embedded.ensure_running()
            return self._client
        client = connect(self.url)
        client.state()
        return client
