"""Lazy public names for package __init__ files (PEP 562), so `import stitchkit.cli` stays light.

A package lists its public names with the submodule that defines each; nothing is imported until a name
is first used, then it is cached on the package. `from stitchkit.zoo import build` and `import *` work
as with eager imports.

    __getattr__, __dir__ = lazy_exports(__name__, {"builder": ["build", "zoo_path"], "probe": [...]})

A public name must not equal a submodule's name: importing the submodule sets the package attribute to
the module, which would then hide the name (hence zoo/builder.py, world/captions.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, submodules: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, given {submodule name (relative): the public names it defines}."""
    exports = {name: submodule for submodule, names in submodules.items() for name in names}

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
