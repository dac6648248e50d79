"""Secrets the runtime reads (CRM token, webhook secret) and the webhook signature both sides share.

A secret comes from a file (its first line) or an environment variable, never from argv. The
CRM signs a webhook body with HMAC-SHA256 in :data:`SIGNATURE_HEADER`; the receiver checks it.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from outbox.errors import ConfigError

SIGNATURE_HEADER = "X-CRM-Signature"  # sha256=<hex HMAC of the body> when a webhook secret is set


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def read_secret(env: str, path: str | None, what: str) -> str | None:
    """A secret from a file (first line) or the environment; never from argv."""
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.readline().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"the {what} file {path} is empty")
        return value
    return os.environ.get(env) or None
