import click


@click.group()
def dev() -> None:
    """Not built yet."""
