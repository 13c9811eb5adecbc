"""QuantoConfig: fields, validation, equality, serialization and registration with both libraries."""

import json

import pytest

import quanto_backend
from quanto_backend import QuantoConfig, qint4
from quanto_backend.integrations import FORMAT_VERSION, register


def test_fields_and_defaults():
    config = QuantoConfig(weights="int4")
    assert config.to_dict() == {
        "quant_method": "quanto_backend",
        "weights": "int4",
        "activations": None,
        "activation_scales": "static",
        "group_size": 128,  # recorded as the number it resolves to
        "modules_to_not_convert": None,
        "format_version": FORMAT_VERSION,
    }
    assert QuantoConfig(weights=qint4, group_size=64).group_size == 64
    assert QuantoConfig(weights="float8").weights == "float8_e4m3fn"
    assert QuantoConfig(weights="int8", activations="float8").activations == "float8_e4m3fn"


def test_activation_scales():
    config = QuantoConfig(weights="int8", activations="int8", activation_scales="dynamic")
    assert config.activation_scales == "dynamic" and config != QuantoConfig(weights="int8", activations="int8")
    with pytest.raises(ValueError, match="activation_scales 'per_token'.*static, dynamic"):
        QuantoConfig(weights="int8", activations="int8", activation_scales="per_token")
    with pytest.raises(ValueError, match="needs int8 or float8 activations"):
        QuantoConfig(weights="int8", activation_scales="dynamic")


def test_diffusers_spelling_weights_dtype():
    assert QuantoConfig(weights_dtype="int4") == QuantoConfig(weights="int4")
    assert QuantoConfig(weights_dtype="int2").weights_dtype == "int2"
    with pytest.raises(ValueError, match="not both"):
        QuantoConfig(weights="int8", weights_dtype="int4")


def test_equal_only_when_all_fields_equal():
    base = QuantoConfig(weights="int4", group_size=64, modules_to_not_convert=["lm_head"])
    assert base == QuantoConfig(weights="int4", group_size=64, modules_to_not_convert=["lm_head"])
    assert base != QuantoConfig(weights="int4", group_size=32, modules_to_not_convert=["lm_head"])
    assert base != QuantoConfig(weights="int4", group_size=64)
    assert QuantoConfig(weights="int8") != QuantoConfig(weights="int8", activations="int8")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights="int3"), r"weights 'int3'.*int8"),
        (dict(weights="int8", activations="int4"), r"activations 'int4'.*float8"),
        (dict(weights="int4", group_size=12), r"group_size.*multiple of 8"),
        (dict(weights="int8", group_size=64), r"group_size=64 applies only to int4/int2"),
        (dict(weights="int8", format_version=FORMAT_VERSION + 1), r"format_version .* newer"),
    ],
)
def test_invalid_values_raise_listing_accepted(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantoConfig(**kwargs)


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="bits"):
        QuantoConfig(bits=8)


def test_round_trips_through_both_libraries_registries():
    from diffusers.quantizers.auto import DiffusersAutoQuantizer
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    config = QuantoConfig(weights="int4", group_size=32, activations="int8", modules_to_not_convert=["head"])
    as_json = json.loads(config.to_json_string())
    assert AutoQuantizationConfig.from_dict(as_json) == config
    assert DiffusersAutoQuantizer.from_dict(as_json) == config
    assert type(AutoHfQuantizer.from_config(config)).__name__ == "QuantoHfQuantizer"
    assert type(DiffusersAutoQuantizer.from_config(config)).__name__ == "QuantoDiffusersQuantizer"
    assert config.quant_method.value == "quanto_backend"  # diffusers reads .value


def test_registration_is_idempotent_and_leaves_builtin_quanto_alone():
    from diffusers.quantizers import auto as diffusers_auto
    from transformers.quantizers import auto as transformers_auto

    register()
    register()
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quanto_backend"] is quanto_backend.QuantoConfig
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quanto_backend"] is quanto_backend.QuantoConfig
    assert transformers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quanto"] is not quanto_backend.QuantoConfig
    assert diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quanto"] is not quanto_backend.QuantoConfig
