"""Score-CAM's chunk size and Ablation-CAM against pytorch-grad-cam's algorithm, side by side.

On the built-in EfficientNet-Lite0 (224×224, the cat photo ``skimage.data.chelsea`` repeated to
the batch), 2 threads (``--threads``), the same channels for every contender:

* Score-CAM on the 64 channels of highest variance of the default layer (``top_k=64``) with
  ``internal_batch_size`` 8 / 16 / 32 / 64, at batch 1 and 8, beside pytorch-grad-cam's
  algorithm on the same 64 channels: per image, its masked copies through the model in chunks
  of 16 (its default), the target logit read per output, a softmax over channels.
* Ablation-CAM on the same 64 channels (``top_k=64``) beside pytorch-grad-cam's algorithm: per
  image, chunks of 32 copies (its default) through the *whole* model with the layer's output
  replaced by the cached activations with one channel zeroed per copy.

pytorch-grad-cam imports torchvision and OpenCV, which do not import here: its algorithms are
re-implemented faithfully below (same loops, same chunk sizes, same arithmetic), not imported.
Every time is the minimum over rounds (each round runs every contender once, in turn) and is also given as a ratio to one plain inference
forward of the same batch.

Run: ``python benchmarks/cam_variants_speed.py [--quick] [--threads 1 --clock cpu] > benchmarks/results/cam_variants_speed.md``
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import evidencemap as em
from evidencemap import models
from evidencemap.methods.registry import build

CHANNELS = 64


def top_channels(acts: Tensor, k: int) -> Tensor:
    """Indices ``(N, k)`` of the ``k`` channels of highest spatial variance per image."""
    return acts.flatten(2).var(2).argsort(dim=1, descending=True)[:, :k]


def layer_acts(model: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    box: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: box.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return box[0]


def pgc_scorecam(model: nn.Module, layer: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """pytorch-grad-cam's ``ScoreCAM.get_cam_weights`` on the top-64 channels (its loop)."""
    acts = layer_acts(model, layer, x)
    idx = top_channels(acts, CHANNELS)
    acts = acts.gather(1, idx[:, :, None, None].expand(-1, -1, *acts.shape[2:]))
    with torch.no_grad():
        up = F.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=True)
        maxs = up.flatten(2).max(-1)[0][:, :, None, None]
        mins = up.flatten(2).min(-1)[0][:, :, None, None]
        up = (up - mins) / (maxs - mins + 1e-8)
        inputs = x[:, None] * up[:, :, None]
        scores = []
        for c, tensor in zip(classes.tolist(), inputs, strict=True):
            for i in range(0, tensor.size(0), 16):
                scores.extend(o[c].item() for o in model(tensor[i : i + 16]))
        return torch.tensor(scores).view(acts.shape[:2]).softmax(-1)


def pgc_ablationcam(model: nn.Module, layer: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """pytorch-grad-cam's ``AblationCAM.get_cam_weights`` on the top-64 channels (its loop:
    per image, the whole model on 32 copies, the layer's output swapped for ablated copies)."""
    acts = layer_acts(model, layer, x)
    idx = top_channels(acts, CHANNELS)
    with torch.no_grad():
        original = model(x).gather(1, classes[:, None])[:, 0]
    state: dict[str, Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _a, _out: state["ablated"])
    try:
        weights = []
        with torch.no_grad():
            for b, c in enumerate(classes.tolist()):
                batch = x[b].repeat(32, 1, 1, 1)
                chans = idx[b].tolist()
                new = []
                for i in range(0, len(chans), 32):
                    part = chans[i : i + 32]
                    out = acts[b : b + 1].clone().repeat(len(part), 1, 1, 1)
                    for j, ch in enumerate(part):
                        out[j, ch] = 0 if out.min() == 0 else out.min() - 1e7
                    state["ablated"] = out
                    new.extend(o[c].item() for o in model(batch[: len(part)]))
                weights.append((original[b] - torch.tensor(new)) / original[b])
    finally:
        handle.remove()
    return torch.stack(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, batch 1 only")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (minimum kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU time of the calling thread (with --threads 1 all of torch's work runs on "
        "it, so other processes on a shared machine barely move the numbers)",
    )
    parser.add_argument(
        "--channels8", type=int, default=16, help="channels per image at batch 8 (64 at batch 1)"
    )
    args = parser.parse_args()
    from skimage import data

    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    loaded = models.load("efficientnet-lite0")
    model = loaded.module.eval()
    photo = loaded.preprocess(data.chelsea())
    rounds = 1 if args.quick else args.rounds
    rows: list[tuple[str, int, int, float, float]] = []
    for batch in (1,) if args.quick else (1, 8):
        global CHANNELS
        CHANNELS = 64 if batch == 1 else args.channels8
        x = photo.unsqueeze(0).repeat(batch, 1, 1, 1)
        probe = em.explain(model, x, "gradcam")
        layer = model.get_submodule(str(probe.layer))
        classes = probe.targets
        assert classes is not None

        def forward(x: Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        contenders: dict[str, Callable[[], object]] = {"forward (inference)": forward}
        for chunk in (8, 16, 32, 64):
            method = build("scorecam", model, top_k=CHANNELS, internal_batch_size=chunk)
            contenders[f"scorecam, chunk {chunk}"] = lambda m=method, x=x: m(x)
        contenders["pytorch-grad-cam ScoreCAM algorithm (chunk 16)"] = (
            lambda x=x, m=layer, c=classes: pgc_scorecam(model, m, x, c)
        )
        ablation = build("ablationcam", model, top_k=CHANNELS)
        contenders["ablationcam (default chunk)"] = lambda m=ablation, x=x: m(x)
        contenders["pytorch-grad-cam AblationCAM algorithm (chunk 32)"] = (
            lambda x=x, m=layer, c=classes: pgc_ablationcam(model, m, x, c)
        )
        forward()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):  # round-robin: a changing machine load hits every contender
            for name, fn in contenders.items():
                start = clock()
                fn()
                times[name].append(clock() - start)
        t_fwd = min(times["forward (inference)"])
        for name, ts in times.items():
            rows.append((name, batch, CHANNELS, min(ts), min(ts) / t_fwd))

    print(f"# CAM variants on EfficientNet-Lite0, 224×224, {torch.get_num_threads()} threads")
    print(f"clock: {'CPU time of the calling thread' if args.clock == 'cpu' else 'wall'}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}; the same")
    print(f"channels of the default layer (top variance) for every contender; {rounds} rounds\n")
    print("| method | batch | channels per image | seconds | × one forward |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, channels, t, ratio in rows:
        print(f"| {name} | {batch} | {channels} | {t:.3f} | {ratio:.1f}× |")


if __name__ == "__main__":
    main()
