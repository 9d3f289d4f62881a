"""The embedded toy teacher's architecture: Stable-Diffusion-format parts built from config.

Same classes as SD (AutoencoderKL, CLIPTextModel + CLIPTokenizer, UNet2DConditionModel, DDPM/DDIM), so
every stage downstream runs one code path for the toy teacher and a real checkpoint. Layout chosen from
CPU measurements on a 2-core machine (about 0.2-0.3 s per training step at this size): 4x16x16 latents,
attention only at 8x8 and 4x4 with 2 heads, and GroupNorm with 8 groups so every width stays prunable
(a GroupNorm group never shrinks, so a width equal to the group count could not be pruned).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
MAX_TOKENS = 24  # longest toy prompt is ~14 tokens with BOS/EOS
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,  # as SD, so BK-SDM block removal has something to remove in every stage
    attention_head_dim=2,  # diffusers' legacy name: this is the number of heads (as in SD 1.x configs)
    cross_attention_dim=64,
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),  # one downsampling: 32x32 RGB <-> 16x16x4 latents
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
# The `dit` teacher's denoiser: an SD3-class MMDiT (SD3Transformer2DModel) on the same 4x16x16 latents, 2x2
# patches (64 image tokens), 6 joint blocks of width 96 (3 heads of 32): 2.0 M parameters, about the UNet's 2.4 M,
# 0.67 s per 64-image training step on one CPU thread (measured). Its text width is SD3's: CLIP-L and CLIP-G
# hidden states side by side (2 x 64), pooled outputs side by side (2 x 64).
DIT_CONFIG = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
                  num_attention_heads=3, joint_attention_dim=128, caption_projection_dim=96, pooled_projection_dim=128,
                  pos_embed_max_size=16)
DIT_SHIFT = 1.0  # flow-matching timestep shift: SD3 uses 3.0 at 1024 px; a 16x16 latent needs none (SD3 Sec. 5.3.2)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                   max_position_embeddings=MAX_TOKENS, projection_dim=64)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                        beta_end=0.012, steps_offset=1, clip_sample=False)


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word one token, in CLIP's format (word ends carry `</w>`).

    Hand-written: `tokenizers`' BpeTrainer breaks frequency ties in hash order, so two builds of the same
    word list gave different ids (a resumed run would no longer match its text encoder). Here ties break
    lexicographically, so the vocabulary is a pure function of the word list.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts = Counter(pair for seq in seqs for pair in zip(seq, seq[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def build_tokenizer(words: list[str], folder: str | Path):
    """Write a CLIP-format BPE (vocab.json + merges.txt) for the toy vocabulary and load it as CLIPTokenizer.

    Every toy word is one token; an unseen word still splits into characters instead of failing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _bpe_merges(words)
    tokens = list(SPECIAL) + list(ALPHABET) + [ch + "</w>" for ch in ALPHABET] + ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return load_tokenizer(folder)


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                         pad_token=SPECIAL[1])


def build_text_encoder(tokenizer):
    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[SPECIAL[0]], eos_token_id=vocab[SPECIAL[1]],
                         pad_token_id=vocab[SPECIAL[1]], **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def build_vae():
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(**overrides):
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_schedulers(prediction_type: str = "epsilon"):
    """(DDPM for training, DDIM for sampling), sharing one noise schedule."""
    train = DDPMScheduler(prediction_type=prediction_type, **SCHEDULER_CONFIG)
    sample = DDIMScheduler(prediction_type=prediction_type, set_alpha_to_one=False, **SCHEDULER_CONFIG)
    return train, sample


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A stock StableDiffusionPipeline without the safety checker (the toy world has nothing to check)."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_transformer(**overrides):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**{**DIT_CONFIG, **overrides})


def assemble_dit_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler=None):
    """A stock StableDiffusion3Pipeline without the optional T5 (the pipeline pads with zeros, as SD3 allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None,
                                    scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=DIT_SHIFT))


def build_pipeline(tokenizer_folder: str | Path, words: list[str], prediction_type: str = "epsilon", seed: int = 0):
    """A randomly initialised toy pipeline (tests and the start of `pretrain teacher`)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, tokenizer_folder)
    _, sampler = build_schedulers(prediction_type)
    return assemble_pipeline(build_vae(), build_text_encoder(tokenizer), tokenizer, build_unet(), sampler)
