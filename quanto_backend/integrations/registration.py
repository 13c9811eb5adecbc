"""Registration of quanto-backend with transformers and diffusers (done when ``quanto_backend`` is imported).

Neither library discovers plugins: the quantization method ``"quanto_backend"`` exists only once this module ran,
so ``import quanto_backend`` must come before ``from_pretrained`` of a checkpoint saved with it.
"""

from __future__ import annotations

from .config import QUANT_METHOD, QuantoConfig

__all__ = ["register", "register_quanto_alias"]


def register() -> None:
    """Register :class:`QuantoConfig` and the two quantizers under ``"quanto_backend"``; safe to call again."""
    from diffusers.quantizers import auto as diffusers_auto
    from transformers.quantizers import auto as transformers_auto

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
