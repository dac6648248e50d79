"""docker-compose.yml, checked without a Docker engine: pinned images, real CLI commands, files
that exist, ports on 127.0.0.1 only, and a Prometheus config that scrapes what compose runs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from outbox.cli import cli
from outbox.errors import OutboxError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def outbox_commands() -> list[tuple[str, list[str]]]:
    return [(name, s["command"]) for name, s in SERVICES.items()
            if isinstance(s.get("command"), list) and s["command"][:1] == ["outbox"]]


def parse_cli(args: list[str]) -> click.Context:
    """Resolve and parse ``outbox ARGS`` as click would (unknown options fail), without running anything."""
    ctx = click.Context(cli, info_name="outbox")
    command: click.Command = cli
    while isinstance(command, click.Group):
        assert args, f"{ctx.command_path} needs a subcommand"
        name, args = args[0], args[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"{ctx.command_path} has no command {name!r}"
        ctx = sub.make_context(name, list(args), parent=ctx)
        command = sub
    return ctx


def test_every_image_is_pinned() -> None:
    for name, s in SERVICES.items():
        image = s.get("image")
        assert image or "build" in s, f"{name} has neither image nor build"
        if image and "build" not in s:
            repo, sep, tag = image.rpartition(":")
            assert sep and "/" not in tag and tag and tag != "latest", f"{name}: image {image} is not pinned by tag"
            assert re.search(r"\d", tag), f"{name}: tag {tag} names no version"
    assert SERVICES["kafka"]["image"] == "apache/kafka:4.1.1"
    assert SERVICES["store1"]["image"].startswith("postgres:15.")


def test_store_databases_have_logical_wal() -> None:
    for name in ("store1", "store2"):
        assert "wal_level=logical" in SERVICES[name]["command"], name


def test_every_outbox_command_parses() -> None:
    commands = outbox_commands()
    assert {n for n, _ in commands} >= {"install-store1", "install-store2", "relay-store1", "relay-store2",
                                        "consumer-readstore"}
    for name, command in commands:
        try:
            parse_cli(command[1:])
        except click.ClickException as exc:
            pytest.fail(f"service {name}: outbox {' '.join(command[1:])}: {exc.format_message()}")
        except OutboxError as exc:
            pytest.fail(f"service {name}: outbox {' '.join(command[1:])}: {exc.message}")


def test_an_unknown_option_fails_the_parse() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_cli(["relay", "--dsn", "dbname=x", "--source-id", "s", "--kafka-bootstrap", "k:9092", "--no-such"])


def test_mounted_host_paths_exist() -> None:
    missing = []
    for name, s in SERVICES.items():
        for volume in s.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith((".", "/")) and not (ROOT / host).exists():
                missing.append(f"{name}: {host}")
    for name, c in COMPOSE.get("configs", {}).items():
        if "file" in c and not (ROOT / c["file"]).exists():
            missing.append(f"config {name}: {c['file']}")
    assert not missing, "mounted paths missing from the repository: " + ", ".join(missing)


def test_ports_are_bound_to_localhost() -> None:
    for name, s in SERVICES.items():
        for port in s.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, \
                f"{name}: port {port!r} must be published as 127.0.0.1:HOST:CONTAINER"


def test_prometheus_scrapes_what_compose_runs() -> None:
    prometheus = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    exporters = {f"{name}:{cmd[cmd.index('--metrics-port') + 1]}" for name, cmd in outbox_commands()
                 if "--metrics-port" in cmd}
    assert targets == exporters
    for name, cmd in outbox_commands():  # a container's 127.0.0.1 is not reachable from Prometheus's
        if "--metrics-port" in cmd:
            assert cmd[cmd.index("--metrics-host") + 1] == "0.0.0.0", name


def test_dockerfile_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "pip install" in text
