"""Makes checkpoints saved with quanto-backend load without ``import quanto_backend``.

transformers and diffusers discover no plugins, and transformers loads a checkpoint whose quantization method it
does not know as a float model, with only a log line: int8 and float8 weights would come out as raw codes. So the
distribution declares this package (as the top-level ``quanto_backend_autoload``) a ``torch.backends`` entry point,
which ``import torch`` calls. :func:`install` imports nothing; it adds an import hook that imports
``quanto_backend`` (which registers its quantization method) right after a module that loads checkpoints is
imported, before either library reads its quantization mappings.

``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` (every torch plugin) or ``QUANTO_BACKEND_AUTOLOAD=0`` (this one) turns it off;
then ``import quanto_backend`` must come before ``from_pretrained``.

Standard library only, and it never raises: an exception here would fail the user's ``import torch``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
import warnings

__all__ = ["TRIGGER_MODULES", "install"]

# Modules after whose import quanto_backend is imported. The quantizer packages are what quanto_backend's own
# registration waits for; the modeling modules are imported later on the way to from_pretrained, so they catch a
# process whose first torch import happened inside a half-imported quantizer package (which no hook can see end).
TRIGGER_MODULES = (
    "transformers.quantizers",
    "diffusers.quantizers",
    "transformers.modeling_utils",
    "diffusers.models.modeling_utils",
)


def _import_quanto_backend(imported: str) -> None:
    try:
        importlib.import_module("quanto_backend").integrations.register_when_imported(imported)
    except Exception as e:  # noqa: BLE001 - reported; the user's import of the library must go on
        warnings.warn(
            f"quanto_backend could not be imported after {sorted(set(TRIGGER_MODULES) & set(sys.modules))} "
            f"({type(e).__name__}: {e}); checkpoints saved with it will not load until it is imported",
            RuntimeWarning,
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """Runs a trigger module's own loader, then imports quanto_backend."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # reloads and resource readers see the real one
        self._loader.exec_module(module)
        if "quanto_backend" not in sys.modules:
            _import_quanto_backend(module.__name__)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]  # its work is done


class _Finder(importlib.abc.MetaPathFinder):
    """Answers only for :data:`TRIGGER_MODULES`, with the other finders' spec and its loader wrapped."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRIGGER_MODULES or "quanto_backend" in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """The ``torch.backends`` entry point: add the import hook (once), unless turned off."""
    try:
        if os.environ.get("QUANTO_BACKEND_AUTOLOAD", "1") == "0" or "quanto_backend" in sys.modules:
            return
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"quanto_backend's import hook was not installed ({e})", RuntimeWarning, stacklevel=2)
