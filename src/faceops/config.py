"""Typed configs loaded from YAML.

Every concern owns a small dataclass next to the code that uses it; this module only turns YAML
(and ``--set a.b=value`` overrides) into those dataclasses. A config file is one document of
sections (:data:`SECTIONS`), each checked against its dataclass wherever the file is read: an
unknown section or key (with a "did you mean"), a wrong type, a bad value or a YAML syntax error
raises :class:`ConfigError` naming the key and the file, so a typo fails at load, not late.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from faceops.errors import FaceopsError

T = TypeVar("T")

# The sections of a config document and the dataclass each one is read as. Import paths, not
# classes, so that reading one section does not import every stage at import time.
SECTIONS: dict[str, str] = {
    "synth": "faceops.data.synth:SynthConfig",
    "ingest": "faceops.data.ingest:IngestConfig",
    "recognizer": "faceops.train.recognizer:RecognizerTrainConfig",
    "dsr": "faceops.train.dsr:DSRTrainConfig",
    "finetune": "faceops.train.finetune:FinetuneConfig",
    "evaluate": "faceops.evaluate.runner:EvalConfig",
    "export": "faceops.export.config:ExportConfig",
    "promote": "faceops.export.promote:PromoteConfig",
    "registry": "faceops.export.model_registry:RegistryConfig",
    "launch": "faceops.train.cluster_job:JobConfig",
    "cluster": "faceops.pipelines.platform:ClusterConfig",
}


class ConfigError(FaceopsError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def section_class(name: str) -> type:
    """The dataclass that section ``name`` is read as."""
    if name not in SECTIONS:
        raise _unknown("<config>", "section", name, "", SECTIONS)
    module, _, cls = SECTIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _unknown(source: str, what: str, name: str, parent: str, allowed: Iterable[str]) -> ConfigError:
    """``unknown key 'a.b.c'`` with the closest allowed name (difflib), else the allowed names."""
    def dotted(n: str) -> str:
        return f"{parent}.{n}" if parent else n

    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        hint = f"did you mean '{dotted(close[0])}'?"
    else:
        hint = f"{what}s{f' under {parent!r}' if parent else ''}: {', '.join(allowed)}"
    return ConfigError(f"{source}: unknown {what} '{dotted(name)}' ({hint})")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other unions and types unchanged)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if _strip_optional(tp) is not tp:  # X | None: X's own message (e.g. the unknown key inside)
            return _coerce(value, _strip_optional(tp), key, source)
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            value = {False: "off", True: "on"}[value] if {"off", "on"} & set(args) else value
        if value not in args:
            raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: '{key}' must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' = {value!r} is not an int")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: '{key}' = {value!r} is not a string")
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    where = prefix.rstrip(".")
    if not isinstance(data, dict):
        what = f"'{where}'" if where else cls.__name__
        raise ConfigError(f"{source}: {what} must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise _unknown(source, "key", str(unknown[0]), where, fields)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(_over_default(fields[name], value), hints[name], prefix + name, source)
              for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ checks: the message names the key
        named = not where or where in str(exc)
        raise ConfigError(f"{source}: {exc}{'' if named else f' (in {where!r})'}") from None
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` laid onto ``base``, recursively, as a new mapping (neither input changes): a partial
    nested section changes only the keys it names and keeps the rest of ``base``."""
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A nested section given partially keeps the parent's defaults for it (a field's
    ``default_factory`` may hold a recipe that differs from the section class's own defaults)."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return deep_merge(to_dict(default), value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable form of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# -- --set overrides -------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML, so numbers and lists work)."""
    key, sep, raw = item.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, KEY the dotted path of a key as in the "
                          "config file, e.g. --set recognizer.engine.epochs=3")
    return path, load_yaml(raw, f"--set {item!r}: value")


def _in_section(source: str, section: str | None) -> str:
    return f"{source}, section '{section}'" if section else source


def _check_key(cls: type, path: list[str], item: str, section: str | None = None) -> None:
    """``path`` names a key of ``cls`` (read as ``section``): an override's typo fails naming the
    override, not as a puzzle about the merged config."""
    source = _in_section(f"--set {item}", section)
    tp: Any = cls
    for i, part in enumerate(path):
        parent = ".".join(path[:i])
        tp = _strip_optional(tp)
        if typing.get_origin(tp) is dict or tp is Any:
            return  # a free-form mapping (e.g. node selectors)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: '{parent}' holds a value ({_type_name(tp)}), not keys; set it whole")
        names = _field_names(tp)
        if part not in names:
            raise _unknown(source, "key", part, parent, names)
        tp = typing.get_type_hints(tp)[part]


def _set(data: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = data
    for part in path[:-1]:
        if node.get(part) is None:  # absent, or an empty section ("dsr:")
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: '{part}' is not a section in the config")
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` of ``overrides`` in a whole config document (keys checked)."""
    for item in overrides:
        path, value = parse_override(item)
        if path[0] not in SECTIONS:
            raise _unknown(f"--set {item}", "section", path[0], "", SECTIONS)
        _check_key(section_class(path[0]), path[1:], item, path[0])
        _set(data, path, value, item)
    return data


# -- reading YAML ----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated key (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """One line: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return ConfigError(f"{where}: not valid YAML: {problem}")


def load_yaml(text: str, source: str = "<config>") -> Any:
    """The value of YAML ``text``: the one YAML reader of faceops, so every config file, config text
    and ``--set`` value refuses a repeated key and reports a syntax error with its line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def parse_yaml(text: str, source: str = "<config>") -> dict[str, Any]:
    """YAML text of a config -> its top-level mapping (syntax errors give the line)."""
    data = load_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {data!r}")
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is a folder, not a config file" if path.is_dir()
                          else f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    return parse_yaml(text, str(path))


def _section_body(data: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    body = data.get(name)
    if body is None:  # absent, or "name:" with nothing under it
        return {}
    if not isinstance(body, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {body!r}")
    return body


def check_document(data: dict[str, Any], source: str, skip: str | None = None) -> dict[str, Any]:
    """Every section of a config document read as its dataclass (all but ``skip``): a typo in a
    section this command does not use still fails now, not in a later pipeline step."""
    out = {}
    for name in data:
        if name not in SECTIONS:
            raise _unknown(source, "section", str(name), "", SECTIONS)
        if name != skip:
            out[name] = from_dict(section_class(name), _section_body(data, name, source), _in_section(source, name))
    return out


def read_document(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A whole config file plus ``--set section.key=value`` overrides, every section checked;
    returns the plain mapping (what a pipeline run carries as its config text)."""
    data = read_yaml(path)
    if not overrides:
        check_document(data, str(path))
        return data
    merged = apply_overrides(copy.deepcopy(data), overrides)
    try:
        check_document(merged, f"{path} (with --set)")
    except ConfigError:
        check_document(data, str(path))  # raises when the file alone is wrong
        raise
    return merged


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         section: str | None = None, *, text: str | None = None, source: str | None = None) -> T:
    """Load ``cls`` from a YAML file (or YAML ``text``), optionally one ``section`` of it, plus
    ``--set`` overrides.

    With a ``section`` the file's other sections are checked too, and an override may name the
    section or leave it out (``recognizer.engine.epochs=3`` is ``engine.epochs=3`` there). An error
    the file makes on its own names the file alone; one only the overrides cause says so.
    """
    if text is not None:
        source = source or "<config>"
        body = parse_yaml(text, source)
    else:
        source = source or (str(path) if path else "<defaults>")
        body = read_yaml(path) if path else {}
    if section is not None:
        check_document(body, source, skip=section)
        body = _section_body(body, section, source)
    data = copy.deepcopy(body)
    for item in overrides or []:
        path_, value = parse_override(item)
        if section is not None and path_[0] not in _field_names(cls):
            if path_[0] == section and len(path_) > 1:
                path_ = path_[1:]
            elif path_[0] in SECTIONS:
                raise ConfigError(f"--set {item}: this command reads section '{section}', not '{path_[0]}'")
        _check_key(cls, path_, item, section)
        _set(data, path_, value, item)
    if not overrides:
        return from_dict(cls, data, _in_section(source, section))
    merged = f"{source} (with --set)" if path or text is not None else "--set"
    try:
        return from_dict(cls, data, _in_section(merged, section))
    except ConfigError:
        from_dict(cls, body, _in_section(source, section))  # raises when the file alone is wrong
        raise


def packaged_config(name: str) -> Path:
    """Path of a ready config shipped with faceops (``configs/<name>.yaml``)."""
    import faceops.configs

    path = Path(faceops.configs.__file__).parent / f"{name}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no packaged config '{name}' (available: {', '.join(avail)})")
    return path


def check(cond: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError(message) unless ``cond``."""
    if not cond:
        raise ConfigError(message)
