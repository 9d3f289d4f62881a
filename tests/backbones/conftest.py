"""Tiny random-weight SDXL, SD3, Flux and PixArt pipelines built from config (no downloads), and magnitude-pruned
students.

Text encoders are CLIPs at width 32 over the toy world's CLIP-format BPE vocabulary, written by
safeprune.models.toy.build_tokenizer (every toy word is one token), and for Flux and PixArt a 2-layer T5 over a
Unigram vocabulary of the same words built here with `tokenizers`; the VAE is the toy one (32 px images <->
4x16x16 latents). SD3 runs without its optional T5 (the pipeline then pads with zeros, as SD3 allows). PixArt's
transformer has learned sigma (out_channels 8 = 2 x 4 latent channels), as the released checkpoints.
"""

import pytest
import torch

from safeprune.data.toyworld import ToyWorld
from safeprune.models import toy

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=toy.MAX_TOKENS, projection_dim=32)
TINY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=64, norm_num_groups=8,
    use_linear_projection=True, transformer_layers_per_block=(1, 1),
    addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8 + text_encoder_2's pooled width
)
TINY_SD3 = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                pos_embed_max_size=16)


def clip_encoder(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[toy.SPECIAL[0]], eos_token_id=vocab[toy.SPECIAL[1]],
                         pad_token_id=vocab[toy.SPECIAL[1]], **CLIP)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_sdxl(root):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer(ToyWorld().vocabulary(), root / "tok")
    _, sampler = toy.build_schedulers()
    return StableDiffusionXLPipeline(vae=toy.build_vae(), text_encoder=clip_encoder(tokenizer, False),
                                     text_encoder_2=clip_encoder(tokenizer, True), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=UNet2DConditionModel(**TINY_SDXL_UNET),
                                     scheduler=sampler, add_watermarker=False)


def build_sd3(root):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tokenizer = toy.build_tokenizer(ToyWorld().vocabulary(), root / "tok")
    vae = AutoencoderKL(**{**toy.VAE_CONFIG, "shift_factor": 0.0})  # SD3's pipeline decodes with a shift
    return StableDiffusion3Pipeline(transformer=SD3Transformer2DModel(**TINY_SD3),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip_encoder(tokenizer, True), tokenizer=tokenizer,
                                    text_encoder_2=clip_encoder(tokenizer, True), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))


def t5_tokenizer(words):
    """A T5 tokenizer (Unigram, one piece per toy word, letters as fallback) built locally: no sentencepiece file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -5.0) for c in toy.ALPHABET + "\u2581"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=512, extra_ids=0)


def t5_encoder(tokenizer):
    """A 2-layer, 32-wide T5 encoder over `tokenizer`'s vocabulary (random weights)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def build_flux(root):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    words = ToyWorld().vocabulary()
    tokenizer, tokenizer_2 = toy.build_tokenizer(words, root / "tok"), t5_tokenizer(words)
    t5 = t5_encoder(tokenizer_2)
    vae = AutoencoderKL(**{**toy.VAE_CONFIG, "shift_factor": 0.0})  # 4 latent channels: in_channels 16 packed
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                        text_encoder=clip_encoder(tokenizer, False), tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=FluxTransformer2DModel(**TINY_FLUX))


TINY_PIXART = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=4, attention_head_dim=8,
                   num_attention_heads=2, cross_attention_dim=16, caption_channels=32)


@pytest.fixture(scope="session")
def pixart_builder():
    """(TINY_PIXART, build_pixart) for tests that build their own variant (a fixture: every test folder has a
    conftest module, so `from conftest import` would find another folder's)."""
    return TINY_PIXART, build_pixart


def build_pixart(root, pipeline="PixArtAlphaPipeline"):
    import diffusers
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    tokenizer = t5_tokenizer(ToyWorld().vocabulary())
    text_encoder = t5_encoder(tokenizer)
    _, sampler = toy.build_schedulers()
    return getattr(diffusers, pipeline)(tokenizer=tokenizer, text_encoder=text_encoder, vae=toy.build_vae(),
                                        transformer=PixArtTransformer2DModel(**TINY_PIXART), scheduler=sampler)


def _family(tmp_path_factory, name, build):
    """(teacher pipeline folder, magnitude-pruned student model folder) of one family."""
    from safeprune.config import PruneConfig
    from safeprune.models.io import save_model
    from safeprune.pruning import prune

    root = tmp_path_factory.mktemp(name)
    pipe = build(root)
    pipe.save_pretrained(root / "teacher")
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    student, plan = prune(denoiser, "magnitude", PruneConfig(ratio=0.2))
    return root / "teacher", save_model(student, root / "student" / "model", plan, root / "teacher")


@pytest.fixture(scope="session")
def sdxl_family(tmp_path_factory):
    return _family(tmp_path_factory, "sdxl", build_sdxl)


@pytest.fixture(scope="session")
def sd3_family(tmp_path_factory):
    return _family(tmp_path_factory, "sd3", build_sd3)


@pytest.fixture(scope="session")
def flux_family(tmp_path_factory):
    return _family(tmp_path_factory, "flux", build_flux)


@pytest.fixture(scope="session")
def pixart_family(tmp_path_factory):
    return _family(tmp_path_factory, "pixart", build_pixart)
