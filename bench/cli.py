"""`rta bench ...`: each benchmark lives in its own module and prints one JSON object."""

from __future__ import annotations

import importlib

import click

BENCHES = {
    "inference": ("bench.inference:inference", "Teacher (M SWAG samples, torch) vs student (ONNX)."),
    "worker": ("bench.worker:worker", "Worker events/s vs a plain consume->produce passthrough."),
    "latency": ("bench.latency:latency", "Worker vs passthrough latency at one rate, fresh topics."),
    "controller": ("bench.controller:controller", "Ratio controller settling after steps of r."),
    "codec": ("bench.codec:codec", "Request decode and decision encode rates (hot-path codecs)."),
    "replay": ("bench.replay:replay", "rta replay rows/s end to end on a logged layout (200k rows)."),
    "soak": ("bench.soak:soak", "Worker fleet under kill -9, Redis restarts and malformed input."),
    "gate": ("bench.gate:gate", "Promotion gate: promote/refuse/inconclusive rates per candidate class."),
    "new-source": ("bench.new_source:new_source", "The loop offline on a world with a new source: retrain, gate, truth."),
}


class _LazyBench(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(BENCHES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in BENCHES:
            return None
        module_name, attr = BENCHES[name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, h) for n, (_, h) in BENCHES.items()])


@click.group(cls=_LazyBench)
def bench() -> None:
    """Benchmarks; each prints one JSON object with ratios measured in one run."""
