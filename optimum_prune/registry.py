"""A small name → entry registry shared by methods, allocations and adapters.

Registration is explicit (a decorator in the module that defines the entry) and every
lookup failure names the known entries, so a typo never degrades into a silent default.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, Entry] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, entry: Entry, origin: Callable[..., object]) -> None:
        """Register ``entry`` under ``name``; ``origin`` is the class (or function) that registers it. The same class
        registering again (its module reloaded, e.g. by a notebook's autoreload) replaces its entry."""
        qualified = f"{origin.__module__}.{origin.__qualname__}" if hasattr(origin, "__qualname__") else repr(origin)
        if name in self._entries and self._origins.get(name) != qualified:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._origins.get(name, 'another entry')})")
        self._entries[name] = entry
        self._origins[name] = qualified

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"{self.field} {name!r} is not a registered {self.kind}; known: {', '.join(self.names())}"
            ) from None

    @contextmanager
    def restored_after(self) -> Iterator[None]:
        """What is registered inside the block is forgotten after it (a plugin tried out in a notebook, a test's
        stand-in); what was registered before stays."""
        entries, origins = dict(self._entries), dict(self._origins)
        try:
            yield
        finally:
            self._entries, self._origins = entries, origins

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def registered_name(name: object, decorator: str) -> str:
    """The name a registering decorator was given. Used without its parentheses (``@register_method`` over a class),
    the decorator is given the class and returns its inner function in the class's place, registering nothing."""
    if not isinstance(name, str):
        raise TypeError(f"{decorator} takes the name to register: @{decorator}(\"my-name\"), got {name!r}")
    return name
