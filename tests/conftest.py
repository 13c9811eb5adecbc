import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_weight() -> torch.Tensor:
    """A real weight: the first FFN up-projection of all-MiniLM-L6-v2 ([1536, 384])."""
    from safetensors import safe_open

    from quanto_backend.evaluate import default_model_dir

    with safe_open(str(default_model_dir() / "model.safetensors"), "pt") as f:
        return f.get_tensor("encoder.layer.0.intermediate.dense.weight")
