"""Guidance modules by name: the built-ins plus the ``alignserve.guidance`` entry-point group.

A third-party package adds a module without forking by declaring, in its pyproject::

    [project.entry-points."alignserve.guidance"]
    mymodule = "mypackage.guidance:MyModule"   # a GuidanceModule subclass

Unknown names fail loudly; requests can only pick modules installed here.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from guidance.module import GuidanceModule
from guidance.modules.arm import ARM
from guidance.modules.cd import ControlledDecoding
from guidance.modules.contrast import Contrast
from guidance.modules.genarm import GenARM
from guidance.modules.qsharp import QSharp

ENTRY_POINT_GROUP = "alignserve.guidance"
BUILTIN_MODULES: tuple[type[GuidanceModule], ...] = (QSharp, ControlledDecoding, ARM, GenARM, Contrast)


class UnknownGuidanceModule(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"Unknown guidance type {name!r}; available: {', '.join(known)}"

    def __str__(self) -> str:
        return self.message


@cache
def available_modules() -> dict[str, GuidanceModule]:
    """Every installed module, built-ins first; a plug-in may not shadow a name."""
    modules = {cls.name: cls() for cls in BUILTIN_MODULES}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, GuidanceModule)):
            raise TypeError(f"entry point {entry.name!r} ({entry.value}) is not a GuidanceModule subclass")
        if cls.name in modules:
            raise ValueError(f"guidance module name {cls.name!r} from {entry.value} is already taken")
        modules[cls.name] = cls()
    return modules


def get_module(name: str) -> GuidanceModule:
    modules = available_modules()
    if name not in modules:
        raise UnknownGuidanceModule(name, sorted(modules))
    return modules[name]
