"""Registration of quanto-backend with transformers and diffusers, done lazily.

Neither library discovers plugins: the quantization method ``"quanto_backend"`` exists only once :func:`register`
ran, so ``import quanto_backend`` must come before ``from_pretrained`` of a checkpoint saved with it (the import
hook of :mod:`.autoload`, which ``import torch`` installs, does that import).

Registering needs :class:`~quanto_backend.QuantoConfig`, whose bases come from both libraries (importing them
costs seconds, mostly diffusers pulling in ``torch._dynamo``). So ``import quanto_backend`` only calls
:func:`register_when_imported`: it registers at once if a library's quantizers are already imported, and
otherwise installs an import hook that registers right after ``transformers.quantizers`` or
``diffusers.quantizers`` is imported, which both libraries do before reading their quantization mappings.

This module imports nothing but the standard library at import time.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["finish_pending_registration", "register", "register_quanto_alias", "register_when_imported"]

# The packages whose import makes a library consult its quantization mappings (each imports its ``.auto``).
TRIGGER_MODULES = ("transformers.quantizers", "diffusers.quantizers")

_registering = False


def register() -> None:
    """Register :class:`QuantoConfig` and the two quantizers under ``"quanto_backend"``; safe to call again.

    Imports transformers and diffusers. Re-entrant calls (the import hook fires while this imports the other
    library) return at once: the outer call finishes the work.
    """
    global _registering
    if _registering:
        return
    _registering = True
    try:
        _register_quanto_backend()
    finally:
        _registering = False
    # Both libraries are imported and know "quanto_backend" now: the hook has nothing left to do.
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImportFinder)]


def _register_quanto_backend() -> None:
    from diffusers.quantizers import auto as diffusers_auto
    from transformers.quantizers import auto as transformers_auto

    from .config import QUANT_METHOD, QuantoConfig
    from .diffusers_quantizer import QuantoDiffusersQuantizer
    from .transformers_quantizer import QuantoHfQuantizer

    name = QUANT_METHOD.value
    # transformers' register_* raise on a second registration: check the mappings first.
    if name not in transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        transformers_auto.register_quantization_config(name)(QuantoConfig)
    if name not in transformers_auto.AUTO_QUANTIZER_MAPPING:
        transformers_auto.register_quantizer(name)(QuantoHfQuantizer)
    # diffusers has no registration API; its lookups read these dicts at call time.
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(name, QuantoConfig)
    diffusers_auto.AUTO_QUANTIZER_MAPPING.setdefault(name, QuantoDiffusersQuantizer)
    register_quanto_alias()


def register_quanto_alias() -> bool:
    """Load ``quant_method: "quanto"`` (optimum-quanto's) configs and diffusers checkpoints with this library,
    only when optimum-quanto is not installed (otherwise its own backends stay). Returns whether it did."""
    from diffusers.quantizers import auto as diffusers_auto
    from transformers.quantizers import auto as transformers_auto

    from .quanto_alias import (
        QUANTO_METHOD,
        QuantoAliasConfig,
        QuantoAliasDiffusersQuantizer,
        QuantoAliasHfQuantizer,
        optimum_quanto_installed,
    )

    if optimum_quanto_installed():
        return False
    # Both libraries ship entries for "quanto" that need optimum-quanto: these replace them.
    transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANTO_METHOD] = QuantoAliasConfig
    transformers_auto.AUTO_QUANTIZER_MAPPING[QUANTO_METHOD] = QuantoAliasHfQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANTO_METHOD] = QuantoAliasConfig
    diffusers_auto.AUTO_QUANTIZER_MAPPING[QUANTO_METHOD] = QuantoAliasDiffusersQuantizer
    return True


_pending = False


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


# Our modules that :func:`register` imports and uses at once. Each imports a library at its top, which may fire
# the hook while it is half-imported; each ends with :func:`finish_pending_registration`.
REGISTRATION_MODULES = tuple(
    f"{__package__}.{name}" for name in ("config", "transformers_quantizer", "diffusers_quantizer")
)


def _integration_module_initializing(caller: str | None = None) -> bool:
    """Whether one of :data:`REGISTRATION_MODULES` other than ``caller`` is half-imported."""
    return any(name != caller and _initializing(name) for name in REGISTRATION_MODULES)


def finish_pending_registration(caller: str) -> None:
    """Called at the end of each integration module that imports a library: if that import fired the hook while
    this module was half-imported, register now that it is complete."""
    if _pending:
        _register_after_import(caller)


def _register_after_import(caller: str | None = None) -> None:
    global _pending
    if _registering:
        return  # fired by register() itself importing the other library: it finishes the work
    _pending = False
    if _integration_module_initializing(caller):
        # One of our own modules imported the library (e.g. config.py its base classes): registering needs that
        # module whole, so its last line finishes the job.
        _pending = True
        return
    # A failure here must not break the user's `import transformers...`: say why loading will not find us.
    try:
        register()
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        warnings.warn(
            f"quanto_backend could not register with transformers/diffusers ({type(e).__name__}: {e}); "
            "call quanto_backend.integrations.register() to see the full error",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of a trigger module, then :func:`register`."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The real loader is put back first, so that reloads and resource readers see the library's own.
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _register_after_import()


class _RegisterOnImportFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder that answers only for :data:`TRIGGER_MODULES`: it asks the other finders for the real
    spec and wraps its loader in :class:`_RegisteringLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRIGGER_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _imported(name: str) -> bool:
    return name in sys.modules and not _initializing(name)


def register_when_imported(imported: str | None = None) -> None:
    """Register now if transformers' or diffusers' quantizers are already imported, else as soon as one is.

    ``imported``: a module whose code just ran (the import system flags it as initializing until its import
    returns), as the import hook of :mod:`quanto_backend.integrations.autoload` reports it."""
    if any(_imported(name) or name == imported for name in TRIGGER_MODULES):
        _register_after_import()
        return
    if not any(isinstance(finder, _RegisterOnImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImportFinder())
