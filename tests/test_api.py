"""The top-level API stays what the README shows, even after every submodule is imported
(a submodule named like an API function would shadow it)."""

import importlib
import pkgutil

import spdy


def test_api_names_resolve_to_their_objects_after_every_import():
    skip = ("spdy.timing.deepsparse", "spdy.timing.cuda_semi", "spdy.runtime.semi_structured")
    for info in pkgutil.walk_packages(spdy.__path__, "spdy."):
        if info.name not in skip:
            importlib.import_module(info.name)
    for name, module in spdy._API.items():
        assert getattr(spdy, name) is getattr(importlib.import_module(module), name), name
    assert callable(spdy.verify) and callable(spdy.find_profile) and callable(spdy.load)
