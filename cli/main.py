"""``dsgonnx`` entry point.

Sub-commands are looked up lazily by import path, so ``dsgonnx --help`` imports neither
torch nor onnxruntime. The commands translate flags into the public API's configuration
and print its results; they import nothing but the ``dsgonnx`` package's public names
(a test checks that).

Library errors (:class:`dsgonnx.DsgonnxError`) become one line on stderr and their exit
code; no traceback reaches the user. The library names parameters in backquotes
(```num_samples```); here they become the invoked command's flags (``--num-samples``), in
error messages and in progress lines alike.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
import warnings

import click

from dsgonnx import DsgonnxError

# name -> (module under dsgonnx_cli.commands, attribute, one-line help shown by --help)
_COMMANDS = {
    "analyze": ("analyze", "analyze_cmd", "Per-tensor sensitivity: which quantized tensors cost the accuracy."),
    "inspect": ("inspect", "inspect_cmd", "Show a model's input, BN layers and torch parity."),
    "quantize": ("quantize", "quantize_cmd", "Quantize a model to QDQ ONNX, calibrated on synthetic or real data."),
    "synthesize": ("synthesize", "synthesize_cmd", "Synthesize calibration images: DSG and ZeroQ from BN statistics, BN-free procedural and inversion, noise."),
    "validate": ("validate", "validate_cmd", "Compare an FP32 and a quantized model in ONNX Runtime; gate on accuracy."),
}
# library parameter -> the click parameter that sets it, where the names differ
_ALIASES = {"report_path": "report", "report": "report_path", "data": "val_data", "method": "calib",
            "preprocess": "preset", "refine_drop_prob": "refine_drop", "refine_reg_weight": "refine_reg",
            "generator": "synth_generator", "swing": "synth_swing", "mix_models": "synth_mix_models",
            "slack": "no_slack", "lse": "no_lse",
            "sci": "no_sci", "input_prior": "no_input_prior"}
_PARAM = re.compile(r"`([A-Za-z_][\w.]*)`")


def spell(text: str, command: click.Command | None) -> str:
    """``text`` with each backquoted library parameter written as ``command``'s flag."""
    params = {p.name: p for p in (command.params if command else [])}

    def flag(match: re.Match) -> str:
        name = match.group(1).replace(".", "_")
        # (``synth.lr``, a SynthOptions field, is quantize's --lr)
        param = params.get(name) or params.get(_ALIASES.get(name, "")) or params.get(name.removeprefix("synth_"))
        if isinstance(param, click.Option):
            return max(param.opts, key=len)
        if isinstance(param, click.Argument):
            return param.human_readable_name
        return match.group(1)

    return _PARAM.sub(flag, text)


class _Handler(logging.Handler):
    """Progress lines on stderr (click's, so that tests capture them), flags spelled."""

    command: click.Command | None = None

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(spell(record.getMessage(), self.command), err=True)


_HANDLER = _Handler()


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(f"dsgonnx_cli.commands.{module}"), attr)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        _HANDLER.command = command
        return name, command, rest

    def format_commands(self, ctx, formatter):
        # Short help comes from the table above: listing commands must not import them.
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:  # dsgonnx's own options or an unknown command
            _fail_usage(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DsgonnxError as exc:
            _fail(spell(str(exc), _HANDLER.command), exc.exit_code)
        except click.ClickException as exc:  # a sub-command's arguments (click's checks)
            _fail_usage(exc)
        except (click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug in dsgonnx or a dependency: still one line
            full = _disk_full(exc)
            if full is not None:
                _fail(f"no space left on the device{f' (writing {full.filename})' if full.filename else ''}; free some "
                      "space, or point TMPDIR at a larger disk, and rerun (nothing was replaced)", 2)
            if os.environ.get("DSGONNX_DEBUG"):
                raise
            _fail(
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with DSGONNX_DEBUG=1 for the traceback and report it)",
                3,
            )


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail_usage(exc: click.ClickException) -> None:
    """click's usage errors as one line too (click prints the usage and a hint on three)."""
    if isinstance(exc, _NO_ARGS_IS_HELP):  # bare `dsgonnx`: the help, as click shows it
        raise exc
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if isinstance(exc, click.UsageError) and ctx is not None else ""
    _fail(exc.format_message() + hint, exc.exit_code)


def _disk_full(exc: BaseException):
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself or a cause), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(message: str, code: int) -> None:
    message = " ".join(str(message).split())  # one line, always
    click.echo(f"dsgonnx: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsgonnx")
def cli():
    """Data-free quantization for ONNX image classifiers (Diverse Sample Generation)."""
    logger = logging.getLogger("dsgonnx")
    logger.setLevel(logging.INFO)  # --quiet raises it for this run
    logger.propagate = False  # a library that configures the root logger must not print our lines twice
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)


def main() -> None:
    # onnx2torch's converted modules trip torch deprecation warnings on every forward pass;
    # they say nothing about the user's model.
    warnings.filterwarnings("ignore", module=r"onnx2torch\.")
    cli(prog_name="dsgonnx")
