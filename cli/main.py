"""``dsgonnx`` entry point.

Sub-commands are looked up lazily by import path, so ``dsgonnx --help`` imports neither
torch nor onnxruntime. Library errors (:class:`dsgonnx.errors.DsgonnxError`) become one
line on stderr and their exit code; no traceback reaches the user.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from dsgonnx.errors import DsgonnxError

# name -> (module under dsgonnx_cli.commands, attribute, one-line help shown by --help)
_COMMANDS = {
    "inspect": ("inspect", "inspect_cmd", "Show a model's input, BN layers and torch parity."),
    "quantize": ("quantize", "quantize_cmd", "Quantize a model to QDQ ONNX, calibrated on synthetic or real data."),
    "synthesize": ("synthesize", "synthesize_cmd", "Synthesize calibration images from BN statistics (DSG, ZeroQ, noise)."),
    "validate": ("validate", "validate_cmd", "Compare an FP32 and a quantized model in ONNX Runtime; gate on accuracy."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(f"dsgonnx_cli.commands.{module}"), attr)

    def format_commands(self, ctx, formatter):
        # Short help comes from the table above: listing commands must not import them.
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DsgonnxError as exc:
            _fail(str(exc), exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug in dsgonnx or a dependency: still one line
            if os.environ.get("DSGONNX_DEBUG"):
                raise
            _fail(
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with DSGONNX_DEBUG=1 for the traceback and report it)",
                3,
            )


def _fail(message: str, code: int) -> None:
    message = " ".join(str(message).split())  # one line, always
    click.echo(f"dsgonnx: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsgonnx")
def cli():
    """Data-free quantization for ONNX image classifiers (Diverse Sample Generation)."""


def main() -> None:
    # onnx2torch's converted modules trip torch deprecation warnings on every forward pass;
    # they say nothing about the user's model.
    warnings.filterwarnings("ignore", module=r"onnx2torch\.")
    cli(prog_name="dsgonnx")
