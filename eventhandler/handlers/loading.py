"""Which projections a worker runs: the built-in example (devices) and the user's modules
(`EVENTHANDLER_HANDLERS`). Apart from the handler API in `eventhandler.handlers`, which the
projections themselves import."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from eventhandler.errors import ConfigError
from eventhandler.example.devices import DeviceProjection
from eventhandler.handlers import Registry


def load_registry(module_paths: Sequence[str], *, builtin: bool = True) -> Registry:
    """The built-in device projection plus the projections of the user's modules.

    A module path is `package.module` (its `projections` attribute: one projection or a list) or
    `package.module:attribute`.
    """
    registry = Registry()
    if builtin:
        registry.add(DeviceProjection())
    for path in module_paths:
        module_name, _, attribute = path.partition(":")
        try:
            module = importlib.import_module(module_name)
            found = getattr(module, attribute or "projections")
            for projection in found if isinstance(found, list | tuple) else [found]:
                registry.add(projection)
        except Exception as exc:
            raise ConfigError("EVENTHANDLER_HANDLERS", f"cannot load {path!r}: {exc}") from exc
    return registry
