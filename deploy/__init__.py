# Makes deploy/ the package agent.deploy in the wheel (pyproject.toml), like schemas/: the agent reads
# its assets (bootstrap renders the systemd unit from systemd/gitops-agent.service) from the install.
