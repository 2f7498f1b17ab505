"""One coverage-guided fuzz target under atheris: ``python -m tests.fuzz.atheris_main NAME
[libFuzzer flags] [corpus dirs]`` (``scripts/fuzz`` runs every target this way)."""

from __future__ import annotations

import sys


def main() -> None:
    import atheris

    name = sys.argv.pop(1)
    from tests.fuzz.targets import TARGETS

    # Coverage feedback from our own code (not numpy's or pydantic's Python parts):
    # instrument every function of the edgefleet modules the targets loaded.
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith(("edgefleet.", "tests.fuzz.")) and mod is not None:
            for obj in list(vars(mod).values()):
                _instrument(atheris, obj, mod_name)

    target = TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


def _instrument(atheris: object, obj: object, mod_name: str) -> None:
    import inspect

    if inspect.isfunction(obj) and obj.__module__ == mod_name:
        atheris.instrument_func(obj)  # type: ignore[attr-defined]
    elif inspect.isclass(obj) and obj.__module__ == mod_name:
        for name, member in list(vars(obj).items()):
            fn = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            if inspect.isfunction(fn):
                setattr(obj, name, type(member)(atheris.instrument_func(fn))  # type: ignore[attr-defined]
                        if isinstance(member, classmethod | staticmethod)
                        else atheris.instrument_func(fn))  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
