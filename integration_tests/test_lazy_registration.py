"""``import quanto_backend`` stays light (no transformers, diffusers or torch._dynamo) and still registers
``"quanto_backend"`` with whichever library is imported, before or after it; a checkpoint saved with it fails
loudly where the libraries allow when quanto_backend is never imported. Each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("transformers", "diffusers", "torch._dynamo", "accelerate", "safetensors")

BUILD_LLAMA = """
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(PATH)
"""

BUILD_PIXART = """
import torch
from diffusers import PixArtTransformer2DModel
torch.manual_seed(0)
PixArtTransformer2DModel(
    sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
    in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    use_additional_conditions=False,
).save_pretrained(PATH)
"""


def run_python(path, *pieces: str, autoload: bool = True) -> str:
    """Run the dedented ``pieces`` one after the other in a fresh interpreter, with ``PATH = path`` (and
    quanto_backend's import hook on or off)."""
    code = "\n".join([f"PATH = {str(path)!r}", *(textwrap.dedent(piece) for piece in pieces)])
    env = os.environ | {"QUANTO_BACKEND_AUTOLOAD": "1" if autoload else "0"}
    command = [sys.executable, "-W", "error::RuntimeWarning", "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_loads_no_hf_library(tmp_path):
    out = run_python(
        tmp_path,
        f"""
        import sys
        import quanto_backend
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """,
    )
    assert out.strip() == "[]"


FIRST_IMPORTS = {
    "quanto_backend first": "import quanto_backend",
    "transformers first": "from transformers import AutoModelForCausalLM\nimport quanto_backend",
    "QuantoConfig first": "from quanto_backend import QuantoConfig",
    "loading module first": "import quanto_backend.integrations.loading",
    "quantizer module first": "import quanto_backend.integrations.transformers_quantizer",
}


@pytest.mark.parametrize("order", list(FIRST_IMPORTS))
def test_transformers_from_pretrained_after_lazy_registration(tmp_path, order):
    first, second = FIRST_IMPORTS[order], "from transformers import AutoModelForCausalLM"
    run_python(
        tmp_path / "llama",
        f"{first}\n{second}",
        BUILD_LLAMA,
        """
        from quanto_backend import QLinear, QuantoConfig
        config = QuantoConfig(weights="int4", group_size=32)
        model = AutoModelForCausalLM.from_pretrained(PATH, quantization_config=config)
        assert isinstance(model.model.layers[0].mlp.up_proj, QLinear), type(model.model.layers[0].mlp.up_proj)
        model.save_pretrained(PATH + "-q")
        reloaded = AutoModelForCausalLM.from_pretrained(PATH + "-q")
        assert isinstance(reloaded.model.layers[0].mlp.up_proj, QLinear)
        """,
    )


def test_diffusers_from_pretrained_after_lazy_registration(tmp_path):
    run_python(
        tmp_path / "pixart",
        "import quanto_backend\nfrom diffusers import PixArtTransformer2DModel",
        BUILD_PIXART,
        """
        from quanto_backend import QLinear, QuantoConfig
        model = PixArtTransformer2DModel.from_pretrained(PATH, quantization_config=QuantoConfig(weights_dtype="int8"))
        assert isinstance(model.transformer_blocks[0].attn1.to_q, QLinear)
        from diffusers.quantizers import PipelineQuantizationConfig
        PipelineQuantizationConfig(quant_backend="quanto_backend", quant_kwargs={"weights_dtype": "int8"})
        """,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with ``pixart-q`` (int8), ``llama-q`` (int4) and ``llama8-q`` (int8, the kind a float model would
    load as raw codes), each with the inputs and outputs of the saved model (``*.pt``)."""
    tmp_path = tmp_path_factory.mktemp("saved")
    run_python(
        tmp_path / "pixart",
        "import quanto_backend",
        BUILD_PIXART,
        """
        from quanto_backend import QuantoConfig
        config = QuantoConfig(weights_dtype="int8")
        model = PixArtTransformer2DModel.from_pretrained(PATH, quantization_config=config)
        model.save_pretrained(PATH + "-q")
        """,
        PIXART_OUTPUT,
    )
    for name, weights in (("llama", "int4"), ("llama8", "int8")):
        run_python(
            tmp_path / name,
            "import quanto_backend",
            BUILD_LLAMA,
            f"""
            from quanto_backend import QuantoConfig
            config = QuantoConfig(weights={weights!r}, group_size=32 if {weights!r} == "int4" else None)
            model = AutoModelForCausalLM.from_pretrained(PATH, quantization_config=config)
            model.save_pretrained(PATH + "-q")
            """,
            LLAMA_OUTPUT,
        )
    return tmp_path


# Run after a model is loaded into ``model``: save its inputs and outputs next to ``PATH``.
LLAMA_OUTPUT = """
ids = torch.arange(12).view(1, 12)
torch.save({"ids": ids, "out": model(ids).logits.detach()}, PATH + ".pt")
"""
PIXART_OUTPUT = """
torch.manual_seed(1)
inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 3, 32),
              timestep=torch.tensor([10]))
torch.save({"inputs": inputs, "out": model(**inputs).sample.detach()}, PATH + ".pt")
"""


def test_import_torch_only_installs_the_hook(tmp_path):
    # The torch.backends entry point runs at `import torch`: it imports neither quanto_backend nor a library.
    out = run_python(
        tmp_path,
        f"""
        import sys
        import torch
        loaded = sorted(m for m in ("quanto_backend", *{HEAVY!r}) if m in sys.modules)
        print(loaded, "quanto_backend_autoload" in sys.modules)
        """,
    )
    assert out.strip() == "[] True"


@pytest.mark.parametrize("first", ["from transformers import AutoModelForCausalLM", "import transformers.quantizers"])
def test_prequantized_checkpoints_load_without_the_import(saved, first):
    # Saved with quanto_backend in one process; loaded in another that never imports it: the hook does.
    out = run_python(
        saved,
        first,
        """
        import torch
        from diffusers import PixArtTransformer2DModel
        from transformers import AutoModelForCausalLM
        for name in ("llama-q", "llama8-q"):
            model = AutoModelForCausalLM.from_pretrained(f"{PATH}/{name}")
            saved = torch.load(f"{PATH}/{name[:-2]}.pt")
            assert torch.equal(model(saved["ids"]).logits, saved["out"]), name
            print(name, type(model.model.layers[0].mlp.down_proj).__name__)
        model = PixArtTransformer2DModel.from_pretrained(PATH + "/pixart-q")
        saved = torch.load(PATH + "/pixart.pt")
        assert torch.equal(model(**saved["inputs"]).sample, saved["out"])
        print("pixart-q", type(model.transformer_blocks[0].ff.net[2]).__name__)
        """,
    )
    assert out.split() == ["llama-q", "QLinear", "llama8-q", "QLinear", "pixart-q", "QLinear"], out


def test_prequantized_checkpoints_fail_loudly_without_the_import_and_the_hook(saved):
    out = run_python(
        saved,
        """
        import sys
        from diffusers import PixArtTransformer2DModel
        from transformers import AutoModelForCausalLM
        for name, load in [("diffusers", lambda: PixArtTransformer2DModel.from_pretrained(PATH + "/pixart-q")),
                           ("transformers int4", lambda: AutoModelForCausalLM.from_pretrained(PATH + "/llama-q"))]:
            try:
                load()
            except (ValueError, RuntimeError) as e:
                print(name, type(e).__name__, str(e).replace("\\n", " ")[:200])
            else:
                print(name, "loaded")
        assert "quanto_backend" not in sys.modules
        """,
        autoload=False,
    )
    assert "diffusers ValueError Unknown quantization type, got quanto_backend" in out, out
    assert "transformers int4 RuntimeError" in out, out
