"""Feature extractors behind the field metrics, each from local weights (a path or the Hugging Face cache):

  Inception  clean-fid's FID network (`inception-2015-12-05.pt`, TorchScript) behind clean-fid's own "clean" resizer
             (PIL bicubic to 299 on float, Parmar et al. 2022), so FIDs match published clean-fid figures;
  CLIP       a transformers CLIPModel folder: image / text embeddings (CLIP score with ViT-B/32 as the paper;
             CMMD with ViT-L/14@336, images bicubic-resized to the model's size as CMMD's reference code does);
  CSD        Somepalli et al. 2024's style descriptor: a CLIP ViT vision tower + its style projection, converted to
             safetensors (`csd_style.safetensors`, key `weight` (D_vision, D_style)), never the pickled checkpoint;
  NudeNet    NudeNet 3.x's ONNX detector (AGPL, optional extra `safeprune[nudenet]`; its weights ship in the wheel).
Nothing is downloaded unless `model.allow_download` is set; a missing weight is a one-line UserError naming the
config key, raised by `check_weights` before any image is generated.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import torch

from safeprune.errors import UserError, check

INCEPTION_FILE = "inception-2015-12-05.pt"


def resolve_weights(name: str, key: str, hint: str, allow_download: bool = False, file: str = "") -> Path:
    """A local file/folder, or a hub id's snapshot in the HF cache; otherwise a UserError naming `key`."""
    from safeprune.models.io import is_hub_id

    check(bool(name), f"{key} is not set; {hint}")
    path = Path(name).expanduser()
    if path.exists():
        return path
    if is_hub_id(name):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=not allow_download))
        except Exception as err:  # hub errors are many types; all mean "not available here"
            raise UserError(f"{key}={name!r} is not a local path and not in the Hugging Face cache; download it "
                            f"(hf download {name}) or pass --allow-download") from err
    raise UserError(f"{key}={name!r} not found; {hint}")


# ----------------------------------------------------------------------------- Inception (FID)


def _safetensors_only(cls, folder):
    """A transformers model from a local folder, safetensors weights only (a pytorch_model.bin is a pickle)."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except OSError as err:
        raise UserError(f"{str(folder)!r} holds no safetensors {cls.__name__} weights ({str(err).splitlines()[0][:120]}); "
                        "save the model with safetensors (save_pretrained does by default)") from err


class InceptionFeatures:
    """2048-d pool features of uint8 images (N, H, W, 3), clean-fid's preprocessing and network."""

    hint = "set eval.inception_path to clean-fid's `inception-2015-12-05.pt` (TorchScript) or its folder"

    def __init__(self, weights: str, device: str | torch.device = "cpu"):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        path = resolve_weights(weights, "eval.inception_path", self.hint)
        folder = path if path.is_dir() else path.parent
        check(path.is_dir() or path.name == INCEPTION_FILE,
              f"eval.inception_path={weights!r}: clean-fid loads a file named {INCEPTION_FILE}; rename it or pass "
              "its folder")
        check((folder / INCEPTION_FILE).is_file(), f"{folder / INCEPTION_FILE} not found; {self.hint}")
        try:
            with warnings.catch_warnings():  # the FID network ships as TorchScript; torch 2.13 flags jit.load
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = InceptionV3W(str(folder), download=False, resize_inside=False).eval().to(device)
        except RuntimeError as err:
            raise UserError(f"{folder / INCEPTION_FILE} is not a TorchScript file ({str(err).splitlines()[0]}); "
                            f"pass clean-fid's {INCEPTION_FILE}") from err
        self.resize = build_resizer("clean")  # clean-fid's resize and quantisation, not a reimplementation
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.stack([self.resize(np.asarray(img)) for img in images])  # (N, 299, 299, 3) float in [0, 255]
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float().to(self.device)
        return self.net(x).double().cpu().numpy()


# ----------------------------------------------------------------------------- CLIP


class CLIPEncoder:
    """Image and text embeddings of a local transformers CLIP model (projected, not normalised)."""

    def __init__(self, weights: str, key: str = "eval.clip_path", resize_square: bool = False,
                 device: str | torch.device = "cpu", allow_download: bool = False):
        from transformers import CLIPModel, CLIPProcessor

        hint = (f"set {key} to a local transformers CLIP folder (e.g. a saved openai/clip-vit-base-patch32) or a "
                "hub id in the HF cache")
        folder = resolve_weights(weights, key, hint, allow_download)
        check((folder / "config.json").is_file(), f"{key}={weights!r} has no config.json; {hint}")
        self.model = _safetensors_only(CLIPModel, folder).eval().to(device)
        self.proc = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.resize_square, self.device = resize_square, device

    @staticmethod
    def _projected(out) -> torch.Tensor:  # transformers 5 wraps the projected embedding in `pooler_output`
        return out if torch.is_tensor(out) else out.pooler_output

    @torch.no_grad()
    def images(self, images: np.ndarray) -> np.ndarray:
        from PIL import Image

        if self.resize_square:  # CMMD: bicubic resize of the whole image to the model's size, no crop
            pil = [Image.fromarray(np.asarray(i)).resize((self.size, self.size), Image.BICUBIC) for i in images]
            pixels = self.proc(images=pil, return_tensors="pt", do_resize=False, do_center_crop=False)["pixel_values"]
        else:
            pixels = self.proc(images=list(images), return_tensors="pt")["pixel_values"]
        return self._projected(self.model.get_image_features(pixel_values=pixels.to(self.device))).double().cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        tok = self.proc(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return self._projected(out).double().cpu().numpy()


def clip_embeddings(folder: str | Path, images: np.ndarray | None = None, texts: list[str] | None = None):
    """(image embeddings, text embeddings) of a local transformers CLIP folder (config.json + weights)."""
    enc = CLIPEncoder(str(folder or ""))
    return (enc.images(images) if images is not None else None), (enc.texts(texts) if texts is not None else None)


# ----------------------------------------------------------------------------- CSD


CSD_FILE = "csd_style.safetensors"


class CSDEncoder:
    """L2-normalised CSD style embeddings: CLIP vision tower's pooled output @ the CSD style projection."""

    hint = (f"set eval.csd_path to a folder with a transformers CLIPVisionModel (config.json + weights) and "
            f"{CSD_FILE} (key `weight`, shape (vision width, style dim)) converted from the CSD checkpoint")

    def __init__(self, weights: str, device: str | torch.device = "cpu", allow_download: bool = False):
        from transformers import CLIPImageProcessor, CLIPVisionModel

        from safeprune.utils import load_safetensors

        folder = resolve_weights(weights, "eval.csd_path", self.hint, allow_download)
        check((folder / "config.json").is_file() and (folder / CSD_FILE).is_file(),
              f"eval.csd_path={weights!r} lacks config.json or {CSD_FILE}; {self.hint}")
        self.model = _safetensors_only(CLIPVisionModel, folder).eval().to(device)
        self.proj = load_safetensors(folder / CSD_FILE, "CSD style projection")["weight"].double().to(device)
        self.proc = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        pixels = self.proc(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        pooled = self.model(pixel_values=pixels).pooler_output.double()  # (N, D_vision), post-layernorm CLS
        style = pooled @ self.proj
        return torch.nn.functional.normalize(style, dim=1).cpu().numpy()


# ----------------------------------------------------------------------------- NudeNet


NUDENET_EXPOSED = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED",
                   "BUTTOCKS_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_EXPOSED", "ARMPITS_EXPOSED")


def nudenet_version() -> str:
    try:
        return importlib.metadata.version("nudenet")
    except importlib.metadata.PackageNotFoundError as err:
        raise UserError("the nudity protocol needs NudeNet 3.x (AGPL, an optional extra): "
                        "pip install 'safeprune[nudenet]' (or pip install nudenet)") from err


class NudeNetDetector:
    """NudeNet 3.x detections per image file: [{class, score, box}], as the package returns them."""

    def __init__(self):
        version = nudenet_version()
        check(version.split(".")[0] == "3", f"NudeNet {version} is installed; the nudity protocol needs NudeNet 3.x")
        from nudenet import NudeDetector

        self.version = version
        self.detector = NudeDetector()

    def __call__(self, files: list[Path]) -> list[list[dict]]:
        return [self.detector.detect(str(f)) for f in files]
