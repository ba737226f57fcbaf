"""MkDocs hook: the reference pages' tables are generated from the code when the docs are built
(the Settings fields, the argparse parser, the metrics registry), so they cannot drift from it.
A page asks for one with a marker line: `<!-- generated: settings -->`, `cli` or `metrics`."""

from __future__ import annotations

import argparse
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from gateway.cli import SETTING_FLAGS, build_parser
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.plugins import plugin_classes


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """Every setting: its variable, flag, default and description."""
    rows = ["| variable | flag | default | |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default.get_secret_value() if hasattr(field.default, "get_secret_value") else field.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        flag = f"`{SETTING_FLAGS[name]}`" if name in SETTING_FLAGS else ""
        rows.append(f"| `IOTGW_{name.upper()}` | {flag} | {_cell(shown)} | {_cell(field.description or '')} |")
    return "\n".join(rows)


Command = tuple[str, str, argparse.ArgumentParser]


def commands(parser: argparse.ArgumentParser | None = None, prefix: str = "iotgw") -> list[Command]:
    """(name, help, parser) of every command of the CLI, nested groups included (`iotgw devices provision`)."""
    parser = parser or build_parser()
    found: list[Command] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {c.dest: c.help or "" for c in action._choices_actions}  # noqa: SLF001
            for name, sub in action.choices.items():
                found.append((f"{prefix} {name}", sub.description or helps.get(name, ""), sub))
                found += commands(sub, f"{prefix} {name}")
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's own options and arguments (help and sub-command groups aside)."""
    return [
        a
        for a in parser._actions  # noqa: SLF001
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))  # noqa: SLF001
    ]


def cli_reference() -> str:
    """Every command with its description and a table of its options."""
    out: list[str] = []
    for name, about, parser in commands():
        out += [f"## `{name}`", "", about, ""]
        opts = options(parser)
        if opts:
            out += ["| option | |", "|---|---|"]
            for a in opts:
                flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.dest.upper()}`"
                text = (a.help or "") % {"default": a.default} if a.help else ""
                out.append(f"| {flag} | {_cell(text)} |")
            out.append("")
    return "\n".join(out)


def metric_families() -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, type, help, labels) of every metric the gateway exposes."""
    metrics = Metrics(CollectorRegistry())
    families = [metrics, *(cls.define_metrics(metrics.registry) for cls in plugin_classes().values())]
    wrappers = [w for f in families if f is not None for w in _wrappers(vars(f).values())]
    labels = {w._name: tuple(w._labelnames) for w in wrappers}  # noqa: SLF001 - the wrapper keeps its label names
    found = {}
    for family in metrics.registry.collect():
        found[family.name] = (family.name, family.type, family.documentation, labels.get(family.name, ()))
    return sorted(found.values())


def _wrappers(values: Any) -> list[MetricWrapperBase]:  # noqa: ANN401
    """The metric objects among an object's attributes (also inside dicts of them)."""
    found: list[MetricWrapperBase] = []
    for v in values:
        if isinstance(v, MetricWrapperBase):
            found.append(v)
        elif isinstance(v, dict):
            found += _wrappers(v.values())
    return found


def metrics_table() -> str:
    rows = ["| metric | type | labels | |", "|---|---|---|---|"]
    for name, kind, doc, labelnames in metric_families():
        shown = f"{name}_total" if kind == "counter" else name
        rows.append(f"| `{shown}` | {kind} | {', '.join(labelnames)} | {_cell(doc)} |")
    return "\n".join(rows)


GENERATED = {"settings": settings_table, "cli": cli_reference, "metrics": metrics_table}


def on_page_markdown(markdown: str, **_: Any) -> str:  # noqa: ANN401
    """Replace each `<!-- generated: NAME -->` line with its table."""
    for name, make in GENERATED.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
