"""`vtcompile serve`: the server's own flags and command live in vtcompile/serve/command.py; this adds the model
flags every command takes and hands over the CLI's compile function (serve never imports the CLI)."""
from __future__ import annotations

from .common import calibration_arg, compile_from_args, model_args, pass_args, target_arg


def register(sub) -> None:
    from ..serve import command

    p = sub.add_parser("serve", help=command.HELP, description=command.DESCRIPTION)
    command.add_arguments(p)
    model_args(p)
    pass_args(p)
    target_arg(p)
    calibration_arg(p)
    p.set_defaults(func=lambda args: command.main(args, compile_model=compile_from_args))
