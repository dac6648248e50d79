"""docs/configuration.md's command reference is generated from the CLI; this keeps it true.

Regenerate after changing an option:  .venv/bin/python -m tests.unit.test_configuration_doc --write
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

from outbox.cli import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
MARKER = "<!-- generated from the CLI by tests/unit/test_configuration_doc.py: do not edit below -->"


def _commands(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in sorted(cmd.list_commands(ctx)):  # list_commands: lazily loaded ones too
            sub = cmd.get_command(ctx, name)
            assert sub is not None
            yield from _commands(sub, path + [name])
    else:
        yield path, cmd


def _default(p: click.Option) -> str:
    if p.name == "kafka_bootstrap":
        return "`$KAFKA_BOOTSTRAP_SERVERS`"
    value = p.default
    if callable(value) or value is None or value is False or value == () or type(value).__name__ == "Sentinel":
        return ""
    return f"`{value}`"


def render() -> str:
    out = [MARKER, ""]
    for path, cmd in _commands(cli, []):
        out.append(f"### `outbox {' '.join(path)}`")
        out.append("")
        out.append((cmd.help or "").strip().split("\n")[0])
        out.append("")
        rows = []
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or p.name == "help":
                continue
            names = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            env = p.envvar if isinstance(p.envvar, str) else (
                "OUTBOX_" + "_".join(path).upper().replace("-", "_") + "_" + (p.name or "").upper())
            key = f"`{p.opts[-1].lstrip('-')}`" if p.expose_value else ""
            help_text = " ".join((p.help or "").split()).replace("|", "\\|")
            rows.append(f"| {names}{' (required)' if p.required else ''} | `{env}` | {key} | {_default(p)} | {help_text} |")
        if rows:
            out.append(f"Config file table `[{'.'.join(path)}]`.")
            out.append("")
            out.append("| option | environment | config key | default | meaning |")
            out.append("|---|---|---|---|---|")
            out.extend(rows)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def test_reference_matches_the_cli() -> None:
    text = DOC.read_text()
    assert MARKER in text, f"{DOC} lost its generated-section marker"
    assert text[text.index(MARKER):] == render(), (
        "docs/configuration.md is out of date: run .venv/bin/python -m tests.unit.test_configuration_doc --write")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        head = DOC.read_text()
        head = head[:head.index(MARKER)] if MARKER in head else head.rstrip() + "\n\n"
        DOC.write_text(head + render())
    else:
        sys.stdout.write(render())
