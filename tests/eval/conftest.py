"""Fixtures of the eval tests: a random-weight toy pipeline folder and the judge (the shipped one)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_pipe_dir(random_teacher_dir):
    """A randomly initialised toy StableDiffusionPipeline folder (the root conftest's)."""
    return random_teacher_dir


@pytest.fixture(scope="session")
def toy_pipe(toy_pipe_dir):
    from safeprune.sampling import load_model

    return load_model(toy_pipe_dir)


@pytest.fixture(scope="session")
def judge():
    from safeprune.eval.judge import load_judge

    return load_judge()


@pytest.fixture(scope="session")
def field_weights(tmp_path_factory):
    """Tiny random stand-ins, built from config, for the field metrics' weights (the real ones download):
    inception/ (a TorchScript net with clean-fid's Inception interface: `.layers` -> (N, 2048)), clip/ (a
    transformers CLIPModel + processor on the toy vocabulary) and csd/ (a CLIPVisionModel + style projection)."""
    import warnings

    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
        CLIPVisionModel,
    )

    from safeprune.data.toyworld import ToyWorld
    from safeprune.models import toy

    root = tmp_path_factory.mktemp("field_weights")

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 7, stride=8)
            self.fc = torch.nn.Linear(8, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    (root / "inception").mkdir()
    with warnings.catch_warnings():  # the real FID network is TorchScript, so the stand-in must be too
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(FakeInception()).save(str(root / "inception" / "inception-2015-12-05.pt"))
    tok = toy.build_tokenizer(ToyWorld().vocabulary(), root / "tok")
    v = tok.get_vocab()
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = CLIPTextConfig(vocab_size=len(v), max_position_embeddings=24, bos_token_id=v["<|startoftext|>"],
                          eos_token_id=v["<|endoftext|>"], pad_token_id=v["<|endoftext|>"], **tiny)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **tiny)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(root / "clip")
    CLIPVisionModel(vision).save_pretrained(root / "csd")
    image_proc.save_pretrained(root / "csd")
    save_file({"weight": torch.randn(32, 12)}, str(root / "csd" / "csd_style.safetensors"))
    return root
