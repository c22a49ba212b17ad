"""Methods, allocations and adapters that other installed packages register.

A package declares an entry point in the ``optimum_prune.plugins`` group, naming the module whose
``register_method`` / ``register_structured_method`` / ``register_allocation`` / ``register_adapter``
decorators register its entries::

    [project.entry-points."optimum_prune.plugins"]
    my_method = "my_package.pruning"

``import optimum_prune`` imports each such module, so the plugin's entries reach everything that
reads the registries: ``prune``, ``PruningConfig``, the console scripts (``optimum-prune``,
``optimum-cli prune``, ``llamafactory-prune``), a reload of a checkpoint pruned with them.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)
GROUP = "optimum_prune.plugins"


def load_plugins() -> list[str]:
    """Import every module the ``optimum_prune.plugins`` entry points name; return their names. A plugin
    that fails to import is logged and skipped: it must not break ``import optimum_prune`` for everyone."""
    loaded = []
    for entry in entry_points(group=GROUP):
        try:
            entry.load()
        except Exception as error:  # any failure of third-party code
            logger.warning("optimum-prune plugin %r (%s) could not be imported and is skipped: %s: %s", entry.name, entry.value, type(error).__name__, error)
            continue
        loaded.append(entry.name)
    return loaded
