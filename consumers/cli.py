import click


@click.group()
def consume() -> None:
    """Not built yet."""
