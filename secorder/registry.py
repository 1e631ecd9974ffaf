"""One small registry type for every table of extensions in secorder.

Curvatures, estimators, structured-engine rules (per module type and per ATen
operation), forward-Laplacian rules and composite operations are all tables
``{key: entry}`` that the library reads and users may extend. They share one
behaviour, given here once:

* :meth:`Registry.register` adds an entry (also as a decorator); registering a
  key twice is an error unless ``replace=True`` says it is meant;
* :meth:`Registry.register_lazy` adds an entry by import path, imported at its
  first lookup; :meth:`Registry.add_loader` names a module that registers the
  entries for the keys of one package (rules for BackPACK's modules, say),
  imported when a key of that package is first looked up. An import that fails
  raises at that lookup, naming the module: it never silently removes entries;
* :meth:`Registry.get` returns an entry or raises a ``ValueError`` that lists the
  valid names; :meth:`Registry.lookup` returns ``None`` for an absent key;
* :meth:`Registry.names` lists the keys in registration order (docs tables and
  the tests' settings lists read it).

Registration is thread-safe (one lock per registry); lookups of present keys take
no lock.

Example:
    >>> from secorder.registry import Registry
    >>> colours = Registry("colour")
    >>> colours.register("red", 0xFF0000)
    16711680
    >>> @colours.register("green")
    ... def green():
    ...     return 0x00FF00
    >>> colours.names()
    ('red', 'green')
    >>> colours.register("red", 1)
    Traceback (most recent call last):
    ...
    ValueError: colour 'red' is already registered; pass replace=True to replace it
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: unknown colour 'blue'; valid colours are 'red', 'green'
    >>> colours.register_lazy("pi", "math:pi")
    >>> round(colours.get("pi"), 4)
    3.1416
"""

from __future__ import annotations

import importlib
import threading
from types import MappingProxyType
from typing import Any, Callable, Dict, Generic, Hashable, Iterator, Mapping, Optional, Tuple, TypeVar

__all__ = ["Registry", "LazyEntryError"]

V = TypeVar("V")

_MISSING: Any = object()


class LazyEntryError(ImportError):
    """A lazily registered entry (or a package's loader module) failed to import."""


class _Lazy:
    """An entry given by ``"package.module:attribute"``, imported at first lookup."""

    __slots__ = ("target",)

    def __init__(self, target: str):
        self.target = target

    def load(self, kind: str, key: Any) -> Any:
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr) if attr else module
        except (ImportError, AttributeError) as err:
            raise LazyEntryError(
                f"{kind} {_describe(key)}: importing {self.target!r} failed: {type(err).__name__}: {err}"
            ) from err


def _describe(key: Any) -> str:
    """A key as error messages show it: a type or function by its qualified name, anything else by ``repr``."""
    if isinstance(key, type) or callable(key):
        module = getattr(key, "__module__", None)
        name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None)
        if name is not None:
            return f"{module}.{name}" if module and not module.startswith("builtins") else name
    return repr(key)


class Registry(Generic[V]):
    """A table ``{key: entry}`` of one kind of extension (see the module docstring).

    Args:
        kind: what an entry is, singular, for messages (``"curvature"``, ``"rule"``).
        describe: how a key is shown in messages (default: a type or function by its
            qualified name, anything else by ``repr``).
    """

    def __init__(self, kind: str, *, describe: Optional[Callable[[Any], str]] = None):
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"kind must be a non-empty str, got {kind!r}")
        self.kind = kind
        self._describe = describe or _describe
        self._entries: Dict[Hashable, Any] = {}
        self._loaders: Dict[str, str] = {}  # package: module that registers that package's keys
        self._lock = threading.RLock()

    # -- adding entries --------------------------------------------------------------------

    def register(self, key: Hashable, entry: Any = _MISSING, *, replace: bool = False) -> Any:
        """Add ``entry`` under ``key``; without ``entry``, a decorator that adds what it decorates.

        Args:
            key: the name users pass (a str) or the object looked up (a type, a function).
            entry: the entry.
            replace: allow replacing an existing entry (otherwise ``ValueError``).

        Returns:
            ``entry`` (or the decorator, which returns what it decorates).

        Example:
            >>> r = Registry("method")
            >>> r.register("a", 1), r.register("a", 2, replace=True), r.get("a")
            (1, 2, 2)
        """
        if not isinstance(replace, bool):
            raise TypeError(f"replace must be a bool, got {type(replace).__name__}")
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"a {self.kind} key must be hashable, got {type(key).__name__}") from None

        def add(value: Any) -> Any:
            with self._lock:
                if key in self._entries and not replace:
                    raise ValueError(
                        f"{self.kind} {self._describe(key)} is already registered; pass replace=True to replace it"
                    )
                self._entries[key] = value
            return value

        return add if entry is _MISSING else add(entry)

    def register_lazy(self, key: Hashable, target: str, *, replace: bool = False) -> None:
        """Add an entry by its import path ``"package.module:attribute"``, imported at its first lookup.

        An import that fails raises :class:`LazyEntryError` at that lookup (and at
        every later one), naming ``target``.

        Example:
            >>> r = Registry("estimator")
            >>> r.register_lazy("broken", "secorder.no_such_module:thing")
            >>> r.get("broken")
            Traceback (most recent call last):
            ...
            secorder.registry.LazyEntryError: estimator 'broken': importing 'secorder.no_such_module:thing' failed: ModuleNotFoundError: No module named 'secorder.no_such_module'
        """
        if not isinstance(target, str) or not target:
            raise TypeError(f"target must be a 'module:attribute' str, got {target!r}")
        self.register(key, _Lazy(target), replace=replace)

    def add_loader(self, package: str, module: str) -> None:
        """Import ``module`` (which registers entries) when a key from ``package`` is first looked up.

        A key's package is the top-level package of its ``__module__`` (a module
        type of BackPACK: ``"backpack"``). If ``module`` fails to import, that
        lookup raises :class:`LazyEntryError` naming it.

        Example:
            >>> r = Registry("rule")
            >>> r.add_loader("backpack", "secorder.structured.rules.backpack")
        """
        if not isinstance(package, str) or not isinstance(module, str):
            raise TypeError(
                f"package and module must be str, got {type(package).__name__}, {type(module).__name__}"
            )
        with self._lock:
            self._loaders[package] = module

    # -- reading -----------------------------------------------------------------------------

    def lookup(self, key: Hashable) -> Optional[Any]:
        """The entry for ``key``, or ``None`` (lazy entries and package loaders are imported here).

        Example:
            >>> r = Registry("rule")
            >>> r.register(int, "int rule")
            'int rule'
            >>> r.lookup(int), r.lookup(float)
            ('int rule', None)
        """
        try:
            entry = self._entries.get(key, _MISSING)
        except TypeError:  # unhashable: never registered
            return None
        if entry is _MISSING and self._loaders:
            package = (getattr(key, "__module__", None) or "").split(".")[0]
            if package in self._loaders:
                self._run_loader(package)
                entry = self._entries.get(key, _MISSING)
        if entry is _MISSING:
            return None
        if isinstance(entry, _Lazy):
            with self._lock:
                entry = self._entries.get(key)
                if isinstance(entry, _Lazy):
                    value = entry.load(self.kind, key)
                    self._entries[key] = value
                    entry = value
        return entry

    def get(self, key: Hashable) -> Any:
        """The entry for ``key``, or a ``ValueError`` listing the registered names.

        Example:
            >>> r = Registry("curvature")
            >>> _ = r.register("hessian", 1)
            >>> r.get("ggn")
            Traceback (most recent call last):
            ...
            ValueError: unknown curvature 'ggn'; valid curvatures are 'hessian'
        """
        entry = self.lookup(key)
        if entry is None:
            valid = ", ".join(self._describe(k) for k in self._entries)
            raise ValueError(f"unknown {self.kind} {self._describe(key)}; valid {self.kind}s are {valid or '(none)'}")
        return entry

    def load(self, package: str) -> None:
        """Run ``package``'s loader now (see :meth:`add_loader`); nothing if it has none or it ran.

        Example:
            >>> r = Registry("rule")
            >>> r.add_loader("backpack", "secorder.no_such_rules")
            >>> r.load("backpack")
            Traceback (most recent call last):
            ...
            secorder.registry.LazyEntryError: rules for 'backpack': importing 'secorder.no_such_rules' failed: ModuleNotFoundError: No module named 'secorder.no_such_rules'
        """
        if package in self._loaders:
            self._run_loader(package)

    def _run_loader(self, package: str) -> None:
        with self._lock:
            module = self._loaders.get(package)
            if module is None:  # another thread loaded it
                return
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise LazyEntryError(
                    f"{self.kind}s for {package!r}: importing {module!r} failed: {type(err).__name__}: {err}"
                ) from err
            del self._loaders[package]

    def names(self) -> Tuple[Hashable, ...]:
        """The registered keys, in registration order.

        Example:
            >>> r = Registry("x")
            >>> _ = r.register("b", 1); _ = r.register("a", 2)
            >>> r.names()
            ('b', 'a')
        """
        return tuple(self._entries)

    def items(self) -> Iterator[Tuple[Hashable, Any]]:
        """``(key, entry)`` pairs in registration order (lazy entries are imported)."""
        for key in self.names():
            yield key, self.lookup(key)

    def view(self) -> Mapping[Hashable, Any]:
        """A read-only view of the table as stored (lazy entries not yet imported)."""
        return MappingProxyType(self._entries)

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._entries
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
