"""The `rta` command.

Verbs are loaded lazily from the module that owns them, so `rta serve` never imports torch
and a serving image without the `train` extra still runs its verbs. Every `RtaError` (and a
missing optional dependency) becomes a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from stream.errors import RtaError

# verb -> ("module:attribute" of a click command/group, one-line help, extra that provides it)
VERBS: dict[str, tuple[str, str, str]] = {
    "dev": ("infra.stack:dev", "Embedded Kafka-compatible broker + Redis on loopback.", "core"),
    "topics": ("infra.topics:topics", "Provision the topics on the configured cluster.", "core"),
    "world": ("training.world_cli:world", "Synthetic traffic: logged Parquet or live request events.", "train"),
    "train": ("training.pipeline:train", "Teacher + SWAG + student + ONNX bundle + report.", "train"),
    "eval": ("training.evaluate:eval_cmd", "Paper-style tables and plots for a bundle on a log set.", "train"),
    "serve": ("stream.worker:serve", "The scoring worker (one consumer-group member).", "core"),
    "log": ("stream.logger.cli:log_cmd", "Logger: requests + decisions + outcomes -> logged traffic (Parquet).", "log"),
    "ratio": ("stream.operators:ratio", "Target interception ratio: get, set, history.", "core"),
    "bench": ("bench.cli:bench", "Benchmarks (inference, worker, controller); JSON out.", "train"),
    "replay": ("training.replay:replay_cmd", "Analysts: logged traffic through the worker's engine, event time.",
               "train"),
    "logs": ("training.logs_sql:logs", "Analysts: SQL (DuckDB) over the logged layout.", "sql"),
    "demo": ("infra.demo:demo", "The whole loop on the embedded default, one command.", "train"),
    "model": ("training.model_cli:model", "Model registry: list, show, promote (gated), rollback, diff; audited.",
              "train"),
    "retrain": ("training.retrain:retrain", "One shot: recent logs -> train -> gate -> promote or refuse.", "train"),
    "control": ("control.cli:control", "Operator control plane: HTTP API with roles + live status page.", "control"),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        target, help_text, extra = VERBS[name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except ModuleNotFoundError as exc:
            missing = exc.name or "?"
            if missing.split(".")[0] in {"stream", "model", "training", "infra", "bench", "control"}:
                msg = f"{name}: not built yet ({missing} is missing)."
            else:
                msg = f"{name}: needs the '{extra}' extra (missing module {missing!r}); pip install 'rta-filter[{extra}]'."
            return _unavailable(name, help_text, msg)
        except AttributeError:
            return _unavailable(name, help_text, f"{name}: not built yet.")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help lists every verb without importing it.
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, h, _) in VERBS.items()])


def _unavailable(name: str, help_text: str, message: str) -> click.Command:
    @click.command(name=name, help=help_text, context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args: tuple[str, ...]) -> None:
        raise click.UsageError(message)

    return cmd


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rta-filter")
def cli() -> None:
    """rta-filter: uncertainty-aware RTA interception (DAUM) on Kafka + Redis."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning known errors into one line on stderr."""
    try:
        # Non-standalone click returns the code of `ctx.exit(n)` instead of exiting with it.
        code = cli.main(args=argv, prog_name="rta", standalone_mode=False)
        if type(code) is int and code != 0:
            sys.exit(code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("rta: aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"rta: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except RtaError as exc:
        click.echo(f"rta: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
