"""``dsgonnx inspect MODEL``."""

from __future__ import annotations

import json

import click

from dsgonnx_cli.options import input_shape_option


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@input_shape_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def inspect_cmd(model: str, input_shape: str | None, as_json: bool) -> None:
    """Show MODEL's input, classes, ops, BatchNorm layers and torch-vs-ORT parity."""
    from dsgonnx import format_inspection, inspect

    info = inspect(model, input_shape)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))
