"""`POST /hooks/git`: a signed push webhook triggers a fetch at once (DESIGN §4, `--webhook-secret-file`).

Accepted signatures, each compared with `hmac.compare_digest` over the raw body as received:
GitHub, Gitea and Forgejo `X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`, Gitea's `X-Gitea-Signature:
<hex>` (Forgejo also sends `X-Forgejo-Signature`), GitLab's `X-Gitlab-Token: <secret>`. Anything else is
401 and triggers nothing; the body's content is never parsed (the agent fetches its own ref anyway), so
an attacker with no secret can only be refused. Over 1 MiB: 413, answered by the HTTP server before the
handler. The trigger goes to the daemon's single-flight runtime: a flood merges into one run at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Callable

from agent.core.errors import ConfigError

__all__ = ["verify", "read_secret", "webhook_routes", "PATH"]

log = logging.getLogger("gitops_agent.webhook")

PATH = "/hooks/git"
_HMAC_HEADERS = ("X-Hub-Signature-256", "X-Gitea-Signature", "X-Forgejo-Signature")


def read_secret(path: str | Path) -> bytes:
    """The webhook secret (one line; surrounding whitespace dropped). Refused when empty or unreadable."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"--webhook-secret-file: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"--webhook-secret-file: {path} is empty")
    return secret


def verify(headers, body: bytes, secret: bytes) -> str | None:
    """The scheme that proved the request (`hmac-sha256` / `gitlab-token`), or None."""
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    ok = None
    for name in _HMAC_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        given = value.strip()
        if name == "X-Hub-Signature-256":
            algo, _, given = given.partition("=")
            if algo.lower() != "sha256":
                continue
        if hmac.compare_digest(digest.encode(), given.lower().encode("ascii", "replace")):
            ok = "hmac-sha256"
    token = headers.get("X-Gitlab-Token")
    if token is not None and hmac.compare_digest(token.strip().encode("utf-8", "replace"), secret):
        ok = ok or "gitlab-token"
    return ok


def webhook_routes(secret: bytes, trigger: Callable[[], None], count: Callable[[str], None] | None = None):
    """{("POST", PATH): handler}: 202 and a trigger for a signed request, 401 and nothing else otherwise."""
    from agent.service.http import Response

    def hook(request) -> Response:
        scheme = verify(request.headers, request.body, secret)
        if scheme is None:
            if count:
                count("rejected")
            log.warning("webhook from %s refused: missing or wrong signature", request.client)
            return Response(401, b"missing or wrong signature\n")
        if count:
            count("accepted")
        log.info("webhook from %s (%s): fetching now", request.client, request.headers.get("X-GitHub-Event")
                 or request.headers.get("X-Gitea-Event") or request.headers.get("X-Gitlab-Event") or "push")
        trigger()
        return Response(202, b"accepted: fetching\n")

    return {("POST", PATH): hook}
