"""Reading the alerts plugin's YAML files (rules, and the roster through the same path): every
problem with its file and line, and a guess where one is close."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from alerts.notify.receivers import Problems
from alerts.rules import RuleSet
from gateway.errors import GatewayError


class FileProblemsError(GatewayError):
    """A YAML configuration file is invalid; `problems` are (line, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[int | None, str]]) -> None:
        lines = [f"{path}:{line}: {msg}" if line else f"{path}: {msg}" for line, msg in problems]
        super().__init__("\n".join(lines))
        self.problems = problems


class RulesError(FileProblemsError):
    """A rules file is invalid."""


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(text: str, path: str, model: type[M], required: str, error: type[FileProblemsError]) -> M:
    """Parse YAML and validate it as `model`; every problem is reported with its line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(path, [(mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise error(
            path, [(None, f"nested too deeply (more than {DEEPEST} levels) to be a rules or roster file")]
        ) from None
    if not isinstance(data, dict) or required not in data:
        raise error(path, [(1, f"the file must be a mapping with a `{required}:` list")])
    if _depth(node) > DEEPEST:
        raise error(path, [(None, f"nested too deeply (more than {DEEPEST} levels) to be a rules or roster file")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems: list[tuple[int | None, str]] = []
        for err in exc.errors():
            found = err.get("ctx", {}).get("error")
            said = _said(err["msg"])
            if err["type"] in ("literal_error", "enum") and isinstance(err.get("input"), str | int | float):
                said = f"{err['input']!r}: {said}"  # (which of several was wrong)
            places = found.problems if isinstance(found, Problems) else [((), said)]
            for place, msg in places:  # a whole-file check's problems, each at its own place
                loc = (*err["loc"], *place)
                problems.append((_line_of(node, loc), _where(loc) + msg))
        raise error(path, sorted(problems, key=lambda p: p[0] or 0)) from None


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) + ": " if loc else ""  # a whole-file problem has no path


def _said(msg: str) -> str:
    return msg.removeprefix("Value error, ")  # pydantic's prefix to our own words


def read_config_file(path: Path, error: type[FileProblemsError]) -> str:
    """The text of a configuration file, or `error` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(str(path), [(None, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise error(
            str(path), [(line, f"not UTF-8: byte 0x{exc.object[exc.start]:02x} (save the file as UTF-8)")]
        ) from None


def load_rules(text: str, path: str = "<rules>") -> RuleSet:
    """Parse and validate a rules file; every problem is reported with its line number."""
    twice = [*duplicate_names(text, "rules", "rule name"), *duplicate_names(text, "receivers", "receiver name")]
    return load_checked(text, path, RuleSet, "rules", RulesError, twice)


def load_checked(  # noqa: PLR0913, PLR0917 - as load_yaml_model, and the names used twice
    text: str, path: str, model: type[M], required: str, error: type[FileProblemsError],
    twice: list[tuple[int | None, str]],
) -> M:  # fmt: skip
    """`load_yaml_model`, with the names used twice (`duplicate_names`) and the keys written
    twice among the problems, in the same run as the rest and at their own lines (the model's
    own check says the names once the fields are valid, less exactly: it is left out then)."""
    names = bool(twice)
    twice = sorted([*duplicate_keys(text), *twice], key=lambda p: p[0] or 0)
    try:
        loaded = load_yaml_model(text, path, model, required, error)
    except FileProblemsError as exc:
        rest = [p for p in exc.problems if not (names and "is used twice" in p[1])]
        raise error(path, sorted([*twice, *rest], key=lambda p: p[0] or 0)) from None
    if twice:
        raise error(path, twice)
    return loaded


DEEPEST = 50  # levels of nesting: a rules or roster file has fewer than 10


def _depth(node: yaml.Node | None) -> int:
    """How deeply `node` nests (without recursion: the file may nest deeply)."""
    deepest, todo, seen = 0, [(node, 1)], set()
    while todo:
        n, depth = todo.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        deepest = max(deepest, depth)
        if deepest > DEEPEST:
            return deepest
        if isinstance(n, yaml.SequenceNode):
            todo += [(c, depth + 1) for c in n.value]
        elif isinstance(n, yaml.MappingNode):
            todo += [(v, depth + 1) for pair in n.value for v in pair]
    return deepest


def duplicate_keys(text: str) -> list[tuple[int | None, str]]:
    """Each key written twice in one mapping, at its second line (YAML keeps the last: the first
    would be ignored without a word)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return []  # said by load_yaml_model
    problems: list[tuple[int | None, str]] = []
    todo, seen = [root], set()
    while todo:
        n = todo.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            todo += n.value
        elif isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in n.value:
                todo.append(v)
                if not isinstance(k, yaml.ScalarNode) or k.value == "<<":
                    continue
                line = k.start_mark.line + 1
                if k.value in first:
                    msg = (
                        f"key {k.value!r} is written twice (first at line {first[k.value]}): the first would be ignored"
                    )
                    problems.append((line, msg))
                else:
                    first[k.value] = line
    return problems


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def duplicate_names(text: str, key: str, what: str, field: str = "name") -> list[tuple[int | None, str]]:
    """Each `field` in the `key` list used twice, at the line of its second use: as written, or
    through a YAML alias (`- *ops`) or merge (`- {<<: *ops}`)."""
    try:
        data = yaml.safe_load(text)
        lines = _item_lines(text, key)
    except (yaml.YAMLError, RecursionError):
        return []  # said by load_yaml_model
    items = data.get(key) if isinstance(data, dict) else None
    seen: dict[str, int] = {}
    problems: list[tuple[int | None, str]] = []
    for i, item in enumerate(items if isinstance(items, list) else []):
        name = item.get(field) if isinstance(item, dict) else None
        if not isinstance(name, str) or i >= len(lines):
            continue
        if name in seen:
            problems.append(
                (lines[i], f"{key}.{i}.{field}: {what} {name!r} is used twice (first at line {seen[name]})")
            )
        else:
            seen[name] = lines[i]
    return problems


def _item_lines(text: str, key: str) -> list[int]:
    """The line where each item of the top-level `key` list is written (an alias's own line,
    not its anchor's); of its last list where the key is written twice (YAML keeps the last)."""
    lines: list[int] = []
    depth, in_list, expect_key, found = 0, False, True, False
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        starts = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        ends = isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent)
        if in_list and depth == 2 and not ends:  # an item of the list
            lines.append(event.start_mark.line + 1 if event.start_mark else 0)
        elif depth == 1 and not ends and not in_list:  # the top-level mapping's keys and values
            if expect_key:
                found = isinstance(event, yaml.ScalarEvent) and event.value == key
            elif found:  # its value: a list, or not (an alias of one: no lines of its own)
                in_list, lines = isinstance(event, yaml.SequenceStartEvent), []
            expect_key = not expect_key
        if starts:
            depth += 1
        elif ends:
            depth -= 1
            if in_list and depth == 1:
                in_list = False
    return lines


def load_rules_file(path: Path) -> RuleSet:
    """`load_rules` on a file."""
    return load_rules(read_config_file(path, RulesError), str(path))


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest YAML node on the error's path."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            key = "for" if part == "for_" else part
            child = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        else:
            child = None
        if child is None:
            break
        node = child
        line = node.start_mark.line + 1
    return line
