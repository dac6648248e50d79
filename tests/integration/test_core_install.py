"""The core install: ``pip install outbox-relay`` with no extras is all an application needs for outbox.emit().

A throw-away venv gets the project (not editable: built from a copy of the checkout) plus
SQLAlchemy as the application's own library, and nothing else; a subprocess run from outside the
checkout then imports ``outbox``, finds none of the extras' libraries nor our packages under
generic top-level names, and emits through psycopg and through SQLAlchemy into a real database
with the outbox installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import psycopg
import pytest

from outbox.config import InstallSettings
from outbox.install import install_outbox

CHECKOUT = Path(__file__).resolve().parents[2]
# what only the extras bring, and the folders that install under outbox.* (never as top-level names)
NOT_IMPORTABLE = ("click", "pydantic", "confluent_kafka", "aiokafka", "aiohttp", "alembic", "prometheus_client",
                  "psycopg_pool", "relay", "consumers", "migrations")
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache",
                                     ".mypy_cache", ".ruff_cache", "tests", "bench", "docs", "dashboards")

APP = textwrap.dedent("""
    import importlib.util, json, os, sys

    import outbox
    import psycopg
    import sqlalchemy as sa

    dsn = os.environ["OUTBOX_CORE_DSN"]
    found = {name: importlib.util.find_spec(name) is not None for name in sys.argv[1:]}
    with psycopg.connect(dsn) as conn:  # commits on leaving the block
        a = outbox.emit(conn, aggregate_type="customer", aggregate_id=1, event_type="customer.merged",
                        payload={"via": "psycopg"})
    engine = sa.create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    with engine.begin() as conn:  # the application's SQLAlchemy transaction
        b = outbox.emit(conn, aggregate_type="customer", aggregate_id=2, event_type="customer.merged",
                        payload={"via": "sqlalchemy"})
    engine.dispose()
    print(json.dumps({"outbox": outbox.__file__, "found": found, "ids": [str(a), str(b)]}))
""")


def _pip(target: Path, *args: str) -> None:
    """This venv's pip, installing into ``target``'s environment (pip's cache shared with ours)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(target), "--disable-pip-version-check",
                           "-q", *args], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_core_install_emits_without_the_extras(new_database: Callable[..., str], tmp_path: Path) -> None:
    dsn = new_database("core")
    install_outbox(InstallSettings(dsn=dsn))

    source = tmp_path / "src"
    shutil.copytree(CHECKOUT, source, ignore=_NOT_COPIED)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    _pip(python, "install", str(source), f"SQLAlchemy=={version('SQLAlchemy')}")  # no extras

    work = tmp_path / "app"  # outside the checkout: nothing of it on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"OUTBOX_CORE_DSN": dsn}
    proc = subprocess.run([str(python), "-I", "-c", APP, *NOT_IMPORTABLE], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert Path(got["outbox"]).is_relative_to(venv), got["outbox"]
    assert got["found"] == dict.fromkeys(NOT_IMPORTABLE, False)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id::text, aggregateid, payload->>'via' FROM outbox.events ORDER BY aggregateid"
                            ).fetchall()
    assert rows == [(got["ids"][0], "1", "psycopg"), (got["ids"][1], "2", "sqlalchemy")]


def test_the_image_installs_the_extras_its_commands_need() -> None:
    run_lines = [line for line in (CHECKOUT / "Dockerfile").read_text().splitlines() if line.startswith("RUN ")]
    assert any("pip install" in line and "'.[relay,consumers,admin]'" in line for line in run_lines), run_lines
