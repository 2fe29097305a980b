"""gitops-agent: converge a host's venvs, supervisord programs and traffic to a Git repository."""

__version__ = "0.1.0"
