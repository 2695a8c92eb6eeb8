"""Placeholder: implemented by its work item."""

import click

from jei_edge.errors import JeiEdgeError


@click.command(name="run", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
def run(args):
    """(not implemented yet)"""
    raise JeiEdgeError("this command is not implemented yet")
