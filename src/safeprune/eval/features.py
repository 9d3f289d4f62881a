"""Maths on feature sets: Frechet distance (FID, Heusel et al. 2017, eq. 6), CMMD (Jayasumana et al. 2024,
eq. 3 with the reference code's constants) and CLIP score (Hessel et al. 2021, eq. 1 with torchmetrics' scale;
written here because torchmetrics 1.9's CLIPScore cannot read transformers 5's CLIP outputs, and tested against
torchmetrics' formula in tests/eval/test_field.py).

clean-fid's own `frechet_distance` lives in `cleanfid.fid`, which imports torchvision at module level (not
installable beside this torch), so the distance is written here and tested against clean-fid's code and
torchmetrics' to 1e-6 (tests/eval/test_features.py); clean-fid's resizer and Inception wrapper, which import
cleanly, are used as they are (safeprune.eval.extractors).
"""

from __future__ import annotations

import numpy as np
import torch

from safeprune.errors import check


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def feature_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), as clean-fid stores reference statistics."""
    x = _f64(x)
    check(x.ndim == 2 and len(x) > 1, f"feature statistics need (N>1, D) features, got {tuple(x.shape)}")
    return x.mean(0).numpy(), torch.cov(x.T).reshape(x.shape[1], -1).numpy()


def frechet_from_stats(mu_x, cov_x, mu_y, cov_y) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)).

    Tr((S_x S_y)^(1/2)) is computed as the sum of square roots of the eigenvalues of S_x^(1/2) S_y S_x^(1/2), a
    symmetric PSD matrix with the same spectrum, so `eigh` suffices (no scipy `sqrtm`, no complex round-off).
    """
    mu_x, mu_y, cov_x, cov_y = _f64(mu_x), _f64(mu_y), _f64(cov_x), _f64(cov_y)
    check(mu_x.shape == mu_y.shape and cov_x.shape == cov_y.shape,
          f"Frechet distance of features of different widths: {tuple(mu_x.shape)} and {tuple(mu_y.shape)}")
    w, v = torch.linalg.eigh(cov_x)
    root_x = (v * w.clamp(min=0).sqrt()) @ v.T  # S_x^(1/2)
    cross = torch.linalg.eigvalsh(root_x @ cov_y @ root_x).clamp(min=0).sqrt().sum()
    value = (mu_x - mu_y).square().sum() + cov_x.trace() + cov_y.trace() - 2 * cross
    return float(value.clamp(min=0))


def frechet_distance(x, y) -> float:
    """Frechet distance between features x (N, D) and y (M, D) (the FID formula on any feature space)."""
    x, y = _f64(x), _f64(y)
    check(x.ndim == 2 and y.ndim == 2 and x.shape[1] == y.shape[1] and len(x) > 1 and len(y) > 1,
          f"frechet_distance needs two (N>1, D) feature sets of one width, got {tuple(x.shape)} and {tuple(y.shape)}")
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    return frechet_from_stats(x.mean(0), cov_x, y.mean(0), cov_y)


def mmd(x, y, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """Squared MMD with a Gaussian kernel, CMMD's estimator (all pairs, diagonal included) and its constants."""
    x, y = _f64(x), _f64(y)
    gamma = 1.0 / (2 * sigma**2)

    def k(a, b):
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))


def l2_normalise(x) -> torch.Tensor:
    x = _f64(x)
    return x / torch.linalg.norm(x, dim=-1, keepdim=True)


def cmmd(x, y) -> float:
    """CMMD: the MMD (sigma 10, scale 1000) of L2-normalised CLIP embeddings, as the reference code computes it."""
    return mmd(l2_normalise(x), l2_normalise(y))


def clip_score(image_embeddings, text_embeddings) -> float:
    """100 * mean(max(cos(image_i, text_i), 0)) over matched rows (Hessel et al. 2021, torchmetrics' scaling)."""
    a, b = _f64(image_embeddings), _f64(text_embeddings)
    check(a.shape == b.shape, f"clip_score needs one text per image, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(100 * torch.nn.functional.cosine_similarity(a, b, dim=1).clamp(min=0).mean())


def clip_similarity(image_embeddings, text_embeddings) -> np.ndarray:
    """Per-row 100 * cos(image_i, text_i) (N,); torchmetrics' CLIPScore is max(mean of these, 0)."""
    a, b = _f64(image_embeddings), _f64(text_embeddings)
    check(a.shape == b.shape, f"clip_score needs one text per image, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (100 * torch.nn.functional.cosine_similarity(a, b, dim=1)).numpy()


def torchmetrics_clip_score(similarities) -> float:
    """torchmetrics' CLIPScore from per-image similarities: the mean, clamped at 0 (Hessel et al. clamp each image;
    with real CLIP models cosines are positive and both agree)."""
    return float(max(float(np.mean(similarities)), 0.0))
