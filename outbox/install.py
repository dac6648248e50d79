import click


@click.command()
def install() -> None:
    """Not built yet."""


@click.command()
def uninstall() -> None:
    """Not built yet."""
