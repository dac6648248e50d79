"""The Prometheus tools the dashboard and alert tests run (Debian's ``prometheus`` package)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.support.servers import ROOT

DASHBOARDS = ROOT / "dashboards"


def tool(name: str) -> str:
    """Path of a Prometheus binary; fails under CI (CI=true), skips elsewhere."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        message = f"{name} not found: install the Debian package 'prometheus' (.ci/setup does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path
