"""Command-line flags generated from a settings model, so every setting has its flag.

A hand-written flag list drifts from the model: error messages then name flags that do not
exist. Here each field ``some_name`` becomes ``--some-name`` (booleans also get
``--no-some-name``), typed from its annotation, with the field's description as its help
and its default shown. Absent flags leave the setting to the environment, the config file
or the default (argparse default ``None``).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "computed"
    if field.default is PydanticUndefined:
        return "required"
    if isinstance(field.default, tuple):
        return ",".join(map(str, field.default)) or "none"
    return "none" if field.default is None else str(field.default)


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings_cls: type[BaseSettings],
    helps: dict[str, str] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    helps = helps or {}
    for name, field in settings_cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = _unwrap(field.annotation)
        text = helps.get(name) or field.description or ""
        text = f"{text} (default: {_default_text(field)})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text}
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(annotation) is Literal:
            kwargs["choices"] = [str(choice) for choice in typing.get_args(annotation)]
        elif annotation in (int, float):
            kwargs["type"] = annotation
            kwargs["metavar"] = "N" if annotation is int else "X"
        elif annotation is Path:
            kwargs["type"] = Path
            kwargs["metavar"] = "PATH"
        elif annotation is SecretStr or typing.get_origin(annotation) is tuple:
            kwargs["metavar"] = "A,B" if annotation is not SecretStr else "SECRET"
        parser.add_argument(flag, **kwargs)
