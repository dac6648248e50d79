import click


@click.command()
def demo() -> None:
    """Not built yet."""
