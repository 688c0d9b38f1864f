"""Shared fixtures: the real pretrained model and real photos (all offline)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def lite0():
    """The built-in ImageNet EfficientNet-Lite0 (eval mode)."""
    from evidencemap import models

    return models.load("efficientnet-lite0")


@pytest.fixture(scope="session")
def photos(lite0):
    """chelsea (a cat) and coffee (an espresso) as a preprocessed batch (2, 3, 224, 224)."""
    from skimage import data

    return torch.stack([lite0.preprocess(data.chelsea()), lite0.preprocess(data.coffee())])
