"""Command lines generated from dataclasses (every entry point uses this).

A field's help text is `opt(default, "help")`; nested dataclass fields become flags
of their own (without a prefix). Flags are the field names with '-' for '_'.
Bad flags end in ONE line `prog: error: ...` and exit status 2 (argparse's usage
block is not printed: users see what is wrong and `--help`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def one_line(e: BaseException | str, limit: int = 400) -> str:
    """The first non-empty line of an error (or text), at most `limit` characters: what a user-facing
    message quotes of an exception (the exception's type when it says nothing)."""
    text = str(e).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first and isinstance(e, BaseException):
        first = type(e).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def opt(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
        choices: list[str] | None = None, flag: str | None = None, metavar: str | None = None,
        cli: bool = True) -> Any:
    """A dataclass field carrying its CLI help (and choices / explicit flag name)."""
    md = {"help": help, "choices": choices, "flag": flag, "metavar": metavar, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _parse_int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _converter(tp: Any) -> tuple[Callable[[str], Any] | None, dict[str, Any]]:
    """argparse `type` and extra kwargs for a field type."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _converter(args[0])
    if tp is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return tp, {}
    if origin is tuple:
        return (_parse_float_tuple if args and args[0] is float else _parse_int_tuple), {}
    if origin is list:
        inner = args[0] if args else str
        return inner, {"nargs": "+"}
    return str, {}


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any, tuple[str, ...]]]:
    """(field, type, path) for every CLI field, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(g, t, (f.name,) + p) for g, t, p in _fields(tp)]
        elif f.metadata.get("cli", True):
            out.append((f, tp, (f.name,)))
    return out


def build_parser(cls: type, prog: str, description: str, epilog: str | None = None) -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description, epilog=epilog,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f, tp, path in _fields(cls):
        if tp is bool and f.name.startswith("no_"):
            raise TypeError(f"{cls.__name__}.{f.name}: a bool field must not start with 'no_' "
                            f"(its flag would clash with --no-{f.name[3:].replace('_', '-')})")
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        conv, extra = _converter(tp)
        kw: dict[str, Any] = dict(extra)
        if conv is not None:
            kw["type"] = conv
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if isinstance(default, tuple) and default and conv in (_parse_int_tuple, _parse_float_tuple):
            help_default = ",".join(str(x) for x in default)
        else:
            help_default = default
        parser.add_argument(flag, dest="__".join(path), default=argparse.SUPPRESS,
                            help=(f.metadata.get("help") or "") + f" (default: {help_default})", **kw)
    # the DeepSpeed launcher adds --local_rank / --local-rank to every entry point
    parser.add_argument("--local_rank", "--local-rank", dest="_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser


def parse_into(cls: type[T], argv: list[str] | None, prog: str, description: str,
               epilog: str | None = None) -> T:
    """Parse argv into a `cls` instance (nested dataclasses filled), one-line errors.

    Values the user did not give keep the dataclass defaults; `__post_init__`
    ValueErrors become one-line CLI errors too.
    """
    parser = build_parser(cls, prog, description, epilog)
    ns = vars(parser.parse_args(argv))
    ns.pop("_local_rank", None)
    try:
        return _instantiate(cls, ns, ())
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _instantiate(cls: type, values: dict[str, Any], prefix: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = prefix + (f.name,)
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _instantiate(tp, values, path)
        elif "__".join(path) in values:
            kwargs[f.name] = values["__".join(path)]
    return cls(**kwargs)


def flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass as flat {"a.b": value} params (for logging the resolved config)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat_dict(v, prefix + f.name + "."))
        else:
            out[prefix + f.name] = list(v) if isinstance(v, tuple) else v
    return out


def parse_overrides(cls: type, argv: list[str] | None, prog: str, description: str,
                    epilog: str | None = None) -> tuple[dict[str, Any], OneLineParser]:
    """Only the flags the user gave, as {"a__b": value} (for applying over a preset)."""
    parser = build_parser(cls, prog, description, epilog)
    ns = vars(parser.parse_args(argv))
    ns.pop("_local_rank", None)
    return ns, parser


def apply_overrides(obj: T, values: dict[str, Any]) -> T:
    """A copy of dataclass `obj` with {"a__b": value} overrides applied (nested), re-validated."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        head, _, rest = key.partition("__")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            changes[head] = v
    for head, sub in nested.items():
        changes[head] = apply_overrides(getattr(obj, head), sub)
    return dataclasses.replace(obj, **changes)
