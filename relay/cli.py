import click


@click.command()
def relay() -> None:
    """Not built yet."""
