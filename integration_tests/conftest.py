"""Tiny-model fixtures for the Hugging Face integration tests (built from configs, saved to tmp dirs; no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quanto_backend  # noqa: F401  (registers "quanto_backend" with transformers and diffusers)
from quanto_backend.evaluate import default_model_dir, load_sentences, sentence_embeddings


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2: (path, tokenizer, the project's sentences, their float32 embeddings)."""
    from transformers import AutoModel, AutoTokenizer

    path = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = load_sentences()
    assert len(sentences) >= 100
    reference = sentence_embeddings(AutoModel.from_pretrained(path).eval(), tokenizer, sentences)
    return path, tokenizer, sentences, reference


def tiny_llama(tie: bool = False, seed: int = 0, **config_overrides):
    """A seeded random Llama of 2 layers (hidden 64 unless ``config_overrides`` say otherwise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config_overrides})).eval()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny untied Llama saved in float32."""
    path = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tied_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama_tied")
    tiny_llama(tie=True).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT: Linear and LayerNorm modules, for activation quantization."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("bert")
    BertModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    ).eval()


def pixart_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        timestep=torch.tensor([10]),
    )


@pytest.fixture(scope="session")
def pixart_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pixart")
    tiny_pixart().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    """A tiny PixArt-Sigma pipeline: a diffusers transformer, a VAE and a transformers T5 text encoder (with the
    real MiniLM WordPiece tokenizer, the only tokenizer available offline)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    t5 = T5Config(vocab_size=30522, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    pipe = PixArtSigmaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(default_model_dir()),
        text_encoder=T5EncoderModel(t5).eval(),
        vae=vae,
        transformer=tiny_pixart(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    path = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(path)
    return path


def run_pipeline(pipe) -> torch.Tensor:
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        max_sequence_length=16,
        use_resolution_binning=False,
        clean_caption=False,
    ).images


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
