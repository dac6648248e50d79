"""The ``outbox`` command: it only assembles the commands each package owns."""
from __future__ import annotations

import logging
import sys
from typing import Any

import click

from outbox.config import default_map_for, load_file
from outbox.errors import OutboxError
from outbox.lazy import LazyGroup

# each package owns its commands; a command's module is imported only when it runs (outbox/lazy.py)
COMMANDS = {
    "dev": "outbox.dev.sandbox:dev",
    "install": "outbox.install:install",
    "uninstall": "outbox.install:uninstall",
    "grant": "outbox.install:grant",
    "doctor": "outbox.doctor:doctor",
    "status": "outbox.status:status",
    "relay": "outbox.relay.cli:relay",
    "consume": "outbox.consumers.cli:consume",
    "backfill": "outbox.backfill:backfill",
    "replay": "outbox.consumers.cli:replay",
    "republish-parked": "outbox.relay.cli:republish_parked",
    "demo": "outbox.dev.demo:demo",
}


class CliError(click.ClickException):
    """An :class:`OutboxError` at the CLI edge: click prints ``Error: <message>`` and exits with its code."""

    def __init__(self, error: OutboxError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code


class OutboxGroup(LazyGroup):
    """The root group: the one place where a domain error becomes one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OutboxError as exc:
            raise CliError(exc) from None


@click.group(cls=OutboxGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="OUTBOX_CONFIG",
              help="TOML file with one table per command ([relay], [install], [consume.readstore], ...). "
                   "Command-line options and OUTBOX_* environment variables override it.")
@click.option("-v", "--verbose", count=True, help="More log output: -v debug for outbox-relay, -vv for every library too.")
@click.version_option(package_name="outbox-relay")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """outbox-relay: every change in your PostgreSQL store databases, as ordered events on Kafka.

    \b
    Quick start on this machine:
      outbox dev up && eval "$(outbox dev env)"
      outbox demo
    """
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose == 1:
        logging.getLogger("outbox").setLevel(logging.DEBUG)
    if verbose < 2:
        # the Kafka client logs every reconnect and first-seen topic as errors; our own messages
        # say what matters in one line, so its log shows with -v (warnings) or -vv (everything)
        for client in ("aiokafka", "librdkafka"):
            logging.getLogger(client).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    if config_path:
        assert isinstance(ctx.command, click.Group)
        ctx.default_map = default_map_for(ctx.command, load_file(config_path), config_path)


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="outbox", auto_envvar_prefix="OUTBOX")
    except OutboxError as exc:  # raised while parsing, before the root group's invoke
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: say so in one line; -v shows the traceback
        if logging.getLogger("outbox").isEnabledFor(logging.DEBUG):
            raise
        from outbox.dsn import redact

        click.echo(f"Error: unexpected {type(exc).__name__}: {redact(str(exc)).splitlines()[0] if str(exc) else ''} "
                   "(a bug in outbox-relay: run again with -v for the traceback and report it)", err=True)
        sys.exit(70)


if __name__ == "__main__":  # pragma: no cover
    main()
