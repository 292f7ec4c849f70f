"""The `latprune` command: engine verbs, latency verbs and service verbs, each registered from its module."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="latprune: prune CNNs to fit a latency, FLOPs or params budget on real devices.")


def _register() -> None:
    # Each verb module imports its heavy dependencies (torch, the DB) inside the commands,
    # so `latprune --help` and the API process stay light.
    from service import cli_cohort, cli_engine, cli_latency, cli_service

    for module in (cli_engine, cli_latency, cli_service, cli_cohort):
        module.register(app)


_register()


def main() -> None:
    app()
