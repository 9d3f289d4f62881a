"""The judge: a small CNN that reads shape, colour and style off a toy image, or says "no recognisable object".

It is the toy world's stand-in for the paper's pixel-level concept detectors (CSD style similarity, CLIP,
NudeNet; method.md section 4): leakage, retention and adherence are read from its labels, and its penultimate
layer is the feature space of `fd`, our FID (Heusel et al. 2017). Besides ground-truth toy images it is trained
on "no object" negatives (noise, blank, cluttered, broken and half-denoised images): without them a judge guesses
a colour and a style on noise, and a model that draws nothing would look like a model that leaks. Its training
lives in safeprune.recipes.judge; this module is the model and its inference only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safeprune.data.toyworld import COLOURS, SHAPES, STYLES
from safeprune.errors import UserError, check
from safeprune.utils import load_safetensors, require_file

WEIGHTS_FILE = "judge.safetensors"
META_FILE = "judge.json"
ATTRIBUTES = ("shape", "colour", "style")


# ----------------------------------------------------------------------------- the network


def _stage(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers; BatchNorm runs in eval mode at inference, so image i ignores its batch."""
    layers = []
    for c in (cin, cout):
        layers += [nn.Conv2d(c, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class JudgeNet(nn.Module):
    """(N, 3, S, S) in [0, 1] -> feature (N, D) and logits per attribute + one "object present" logit.

    Three stages at S, S/2, S/4 (receptive field ~29 px at 32 px: the whole object), global average pooling,
    a D-dim feature layer (the Frechet-distance space) and one linear head per attribute.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), feature_dim: int = 64,
                 classes: tuple[int, ...] = (len(SHAPES), len(COLOURS), len(STYLES))):
        super().__init__()
        chans = (3, *widths)
        self.stages = nn.ModuleList(_stage(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.feature = nn.Sequential(nn.Linear(widths[-1], feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(feature_dim, k) for k in classes)
        self.object_head = nn.Linear(feature_dim, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) * 2.0  # [0, 1] -> [-1, 1]
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
        return self.feature(x.mean(dim=(2, 3)))  # (N, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        feat = self.embed(x)
        return feat, [head(feat) for head in self.heads], self.object_head(feat).squeeze(1)


# ----------------------------------------------------------------------------- the judge (inference)


class Judge:
    """A trained JudgeNet plus its label names and input size; `predict` and `features` take images as
    uint8 (N, H, W, 3), float in [0, 1] (N, H, W, 3) or (N, 3, H, W), numpy or torch."""

    def __init__(self, net: JudgeNet, meta: dict, device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.meta = meta
        self.size = int(meta["size"])
        self.names = {a: list(meta["labels"][a]) for a in ATTRIBUTES}
        self.device = torch.device(device)

    def _prepare(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        check(x.ndim == 4, f"judge: expected a batch of images (N, H, W, 3), got shape {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
        check(x.shape[1] == 3, f"judge: expected RGB images, got shape {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:  # the judge only knows its training size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0, 1).to(self.device)

    @torch.no_grad()
    def _run(self, images, batch_size: int = 512):
        x = self._prepare(images)
        feats, logits, obj = [], [[] for _ in ATTRIBUTES], []
        for i in range(0, len(x), batch_size):
            f, lg, o = self.net(x[i:i + batch_size])
            feats.append(f)
            obj.append(o)
            for j, part in enumerate(lg):
                logits[j].append(part)
        return torch.cat(feats), [torch.cat(lg) for lg in logits], torch.cat(obj)

    def predict(self, images, batch_size: int = 512) -> dict:
        """Per-image labels: {shape, colour, style: list[str | None] (None = no object), valid: bool (N,),
        p_valid: (N,), probs: {attribute: (N, classes)}}."""
        _, logits, obj = self._run(images, batch_size)
        p_valid = torch.sigmoid(obj).cpu().numpy()
        valid = p_valid >= 0.5
        out = {"valid": valid, "p_valid": p_valid, "probs": {}}
        for attr, lg in zip(ATTRIBUTES, logits):
            probs = lg.softmax(dim=1).cpu().numpy()
            names = self.names[attr]
            out["probs"][attr] = probs
            out[attr] = [names[k] if ok else None for k, ok in zip(probs.argmax(1), valid)]
        return out

    def features(self, images, batch_size: int = 512) -> np.ndarray:
        """Penultimate-layer features (N, D): the space of the Frechet distance `fd`."""
        return self._run(images, batch_size)[0].cpu().numpy().astype(np.float64)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        (folder / META_FILE).write_text(json.dumps(self.meta, indent=1))


def load_judge(path: str | Path | None = None, device: str = "cpu") -> Judge:
    """The judge in folder `path` (judge.safetensors + judge.json), or the shipped one when `path` is None.

    A missing or corrupt file is a one-line UserError that names it.
    """
    from safeprune.models.shipped import judge_path

    folder = Path(path) if path is not None else judge_path()
    if folder.suffix == ".safetensors":
        folder = folder.parent
    hint = "train one with `safeprune pretrain judge --out DIR`" + ("" if path else " or reinstall safeprune")
    meta_file = require_file(folder / META_FILE, "judge config", hint)
    require_file(folder / WEIGHTS_FILE, "judge weights", hint)
    try:
        meta = json.loads(meta_file.read_text())
        net = JudgeNet(tuple(meta["widths"]), meta["feature_dim"], tuple(len(meta["labels"][a]) for a in ATTRIBUTES))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"judge config {str(meta_file)!r} is corrupt ({type(err).__name__}: {err}); "
                        "re-create it with `safeprune pretrain judge`") from err
    state = load_safetensors(folder / WEIGHTS_FILE, "judge weights")
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise UserError(f"judge weights {str(folder / WEIGHTS_FILE)!r} do not match {str(meta_file)!r}; "
                        "re-create both with `safeprune pretrain judge`") from err
    return Judge(net, meta, device)
