"""A tiny name -> builder registry (timm style), shared by backbones, embedding heads, margin heads
and super-resolution networks, so configs name a model by string and an unknown name fails early with
the list of valid ones instead of deep inside an if/elif chain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from faceops.config import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Builders registered by name.

    Example::

        BACKBONES = Registry("backbone")

        @BACKBONES.register
        def resnet34(cfg): ...

        BACKBONES.get("resnet34")(cfg)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, fn: F | None = None, *, name: str | None = None) -> F | Callable[[F], F]:
        """Decorator; the entry is named after the function unless ``name`` is given."""

        def add(f: F) -> F:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = f
            return f

        return add(fn) if fn is not None else add

    def alias(self, alias: str, target: str) -> None:
        """Register ``alias`` as a second name for the already registered ``target``."""
        self.register(self.get(target), name=alias)

    def get(self, name: str) -> F:
        """The builder for ``name``; raises :class:`ConfigError` listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {self.names()}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
