"""Developer tooling: the local sandbox, the reference CRM and the demo.

Runtime code (relay, consumers, install, status) never imports this package; the import
contracts in pyproject.toml enforce it. Only outbox.cli names its commands (lazily, by string).
"""
