"""Safe YAML loading that remembers the line of every key, for error messages."""

from __future__ import annotations

from typing import Any

import yaml

from mergekit_lite.errors import ManifestError

MAX_NODES = 10_000  # a manifest has a few dozen; this stops alias bombs
MAX_DEPTH = 64  # a manifest nests four levels deep; this stops recursion bombs
_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}

Loc = tuple[str | int, ...]


def load_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Parse YAML safely; return the data and a map from each key path to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestError(f"{source}{line}: YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ManifestError(f"{source}:{line}: YAML syntax error: character U+{char:04X} is not allowed") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested brackets exhaust the stack
        raise ManifestError(f"{source}: the YAML is nested too deeply (more than {MAX_DEPTH} levels)") from None
    if node is None:
        raise ManifestError(f"{source}: the manifest is empty; it needs at least `base`, `adapters` and `output`")
    lines: dict[Loc, int] = {}
    builder = _Builder(source, lines)
    return builder.build(node, ()), lines


class _Builder:
    def __init__(self, source: str, lines: dict[Loc, int]) -> None:
        self.source = source
        self.lines = lines
        self.count = 0
        self.constructor = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, message: str) -> ManifestError:
        return ManifestError(f"{self.source}:{node.start_mark.line + 1}: {message}")

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, f"the manifest expands to more than {MAX_NODES} YAML nodes (alias bomb?)")
        if len(loc) > MAX_DEPTH:
            raise self.fail(node, f"the manifest is nested more than {MAX_DEPTH} levels deep")
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.fail(node, f"YAML tag `{node.tag}` is not allowed in a manifest")
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail(key_node, "YAML merge keys (`<<`) are not allowed in a manifest")
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise self.fail(key_node, "mapping keys must be plain strings")
                key = key_node.value
                if key == "<<":
                    raise self.fail(key_node, "YAML merge keys (`<<`) are not allowed in a manifest")
                if key in out:
                    raise self.fail(key_node, f"duplicate key `{_dotted(loc + (key,))}`")
                self.lines[loc + (key,)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, loc + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(node, f"YAML tag `{node.tag}` is not allowed in a manifest")
            return [self.build(item, loc + (i,)) for i, item in enumerate(node.value)]
        if node.tag not in _SCALAR_TAGS:
            raise self.fail(node, f"YAML tag `{node.tag}` is not allowed in a manifest")
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError) as exc:  # e.g. `!!bool maybe`
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            why = " ".join(str(exc).split())[:200]
            raise self.fail(node, f"cannot read value {shown!r} as {node.tag.rpartition(':')[2]}: {why}") from None


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        if isinstance(part, str) and not (part.isprintable() and part.strip() == part and part):
            part = repr(part)[:40]  # a key with a newline, padding or nothing in it, shown as such
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


dotted = _dotted
