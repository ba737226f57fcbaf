"""Reading the alerts plugin's YAML files (rules, and the roster through the same path): every
problem with its file and line, and a guess where one is close."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

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


def _parse(text: str, path: str, error: type[FileProblemsError]) -> tuple[yaml.Node | None, Any]:
    """The YAML's nodes (for lines) and its data, or `error` saying why it is no YAML to read."""
    deep = f"nested too deeply (more than {DEEPEST} levels) to be a rules or roster file"
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(path, [(mark.line + 1 if mark else None, f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise error(path, [(None, deep)]) from None
    if _depth(node) > DEEPEST:
        raise error(path, [(None, deep)])
    return node, data


def _validate(  # noqa: PLR0913, PLR0917
    node: yaml.Node | None, data: object, path: str, model: type[M], required: str, error: type[FileProblemsError]
) -> M:
    """`data` as `model`; every problem is reported with its line number."""
    if not isinstance(data, dict) or required not in data:
        raise error(path, [(1, f"the file must be a mapping with a `{required}:` list")])
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
    names = [("rules", "rule name", "name"), ("receivers", "receiver name", "name")]
    return load_checked(text, path, RuleSet, "rules", RulesError, names)


def load_checked(  # noqa: PLR0913, PLR0917 - the file, what it is, and its lists of named things
    text: str, path: str, model: type[M], required: str, error: type[FileProblemsError],
    names: Sequence[tuple[str, str, str]],
) -> M:  # fmt: skip
    """Parse and validate a YAML file as `model`, every problem with its line: the keys written
    twice and the names used twice in its `names` lists ((list, what it names, field)) in the
    same run as the fields' problems (the model's own check says the names once the fields are
    valid, less exactly: it is left out then)."""
    node, data = _parse(text, path, error)
    lines = _item_lines(text, [key for key, _, _ in names])
    twice = [p for key, what, field in names for p in duplicate_names(data, lines.get(key, []), key, what, field)]
    found = sorted([*duplicate_keys(node), *twice], key=lambda p: p[0] or 0)
    try:
        loaded = _validate(node, data, path, model, required, error)
    except FileProblemsError as exc:
        rest = [p for p in exc.problems if not (twice and "is used twice" in p[1])]
        raise error(path, sorted([*found, *rest], key=lambda p: p[0] or 0)) from None
    if found:
        raise error(path, found)
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


def duplicate_keys(root: yaml.Node | None) -> list[tuple[int | None, str]]:
    """Each key written twice in one mapping, at its second line (YAML keeps the last: the first
    would be ignored without a word)."""
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


def duplicate_names(data: object, lines: list[int], key: str, what: str, field: str) -> list[tuple[int | None, str]]:
    """Each `field` in the `key` list of `data` used twice, at the line of its second use
    (`lines`: where each item is written): as written, or through a YAML alias (`- *ops`) or
    merge (`- {<<: *ops}`)."""
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


def _item_lines(text: str, keys: Sequence[str]) -> dict[str, list[int]]:
    """For each of the top-level `keys` lists, the line where each item is written (an alias's
    own line, not its anchor's); of its last list where the key is written twice (YAML keeps
    the last)."""
    lines: dict[str, list[int]] = {}
    depth, expect_key, key, current = 0, True, None, None
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        starts = isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent)
        ends = isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent)
        if current is not None and depth == 2 and not ends:  # an item of the list
            current.append(event.start_mark.line + 1 if event.start_mark else 0)
        elif depth == 1 and not ends and current is None:  # the top-level mapping's keys and values
            if expect_key:
                key = event.value if isinstance(event, yaml.ScalarEvent) and event.value in keys else None
            elif key is not None:  # its value: a list, or not (an alias of one: no lines of its own)
                lines[key] = []
                current = lines[key] if isinstance(event, yaml.SequenceStartEvent) else None
            expect_key = not expect_key
        if starts:
            depth += 1
        elif ends:
            depth -= 1
            if depth == 1:
                current = None
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
