"""Name → function registry so configs select losses by string and ablations swap them functionally.

Names are namespaced ``"<kind>/<name>"`` with kinds ``advantage``, ``policy_loss``, ``credit`` and
``aux_loss``::

    @register("advantage/grpo")
    def grpo_advantages(batch, cfg): ...

    fn = get("advantage/grpo")
"""

from __future__ import annotations

from typing import Callable, TypeVar

KINDS = ("advantage", "policy_loss", "credit", "aux_loss")

_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}

F = TypeVar("F", bound=Callable)


def _split(qualified_name: str) -> tuple[str, str]:
    kind, sep, name = qualified_name.partition("/")
    if not sep or not name:
        raise ValueError(f"loss registry names look like '<kind>/<name>' with kind in {KINDS}; "
                         f"got {qualified_name!r}")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r} in {qualified_name!r}; kinds are {KINDS}")
    return kind, name


def register(qualified_name: str) -> Callable[[F], F]:
    """Decorator registering ``fn`` under ``"<kind>/<name>"``; re-registering a taken name is an error."""
    kind, name = _split(qualified_name)

    def decorator(fn: F) -> F:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not fn and _origin(existing) != _origin(fn):
            raise ValueError(f"{qualified_name!r} is already registered to {existing.__module__}."
                             f"{existing.__qualname__}; pick another name")
        _REGISTRY[kind][name] = fn
        return fn

    return decorator


def _origin(fn: Callable) -> tuple:
    """Where ``fn`` was defined: a config file loaded twice (flags, then a test) re-registers the same
    function, which is not a clash."""
    code = getattr(fn, "__code__", None)
    return (getattr(fn, "__qualname__", None), getattr(code, "co_filename", None) or id(fn))


def get(qualified_name: str) -> Callable:
    """Look up ``"<kind>/<name>"``; unknown names raise listing what is registered for that kind."""
    kind, name = _split(qualified_name)
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(f"'{kind}/{n}'" for n in sorted(_REGISTRY[kind])) or "(none)"
        raise KeyError(f"no {kind} registered as {name!r}; registered: {known}") from None


def registered(kind: str) -> list[str]:
    """Sorted names registered under ``kind`` (without the kind prefix)."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; kinds are {KINDS}")
    return sorted(_REGISTRY[kind])
