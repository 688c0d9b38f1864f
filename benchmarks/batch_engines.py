"""Throughput of ``evidencemap batch`` on the local engine and on Ray, on one folder of real photos.

    PYTHONPATH=src python benchmarks/batch_engines.py [--copies 4] [--batch-size 4] [--repeats 2]
        > benchmarks/results/batch_engines.md

The folder: scikit-image's real photos (chelsea, coffee, astronaut, rocket, …), ``--copies``
copies each, as JPEG. Every engine explains the whole folder with Grad-CAM on the built-in
EfficientNet-Lite0 and writes the overlay PNG, .npz and manifest of every photo.

Measured per engine: the wall time of the whole job (loading the model included: once for the
local engine, once per actor for Ray, whose cluster is already started but not its actors), the
time to the first finished batch, and the steady throughput from the first finished batch to
the last. The
per-photo overhead of the Ray engine is its steady time per photo minus the local engine's
with the same torch threads per model. Ray's start-up (``ray.init``) is timed separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from skimage import data as skdata

SRC = Path(__file__).resolve().parents[1] / "src"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "immunohistochemistry")


def make_folder(folder: Path, copies: int) -> list[Path]:
    """The real photos, ``copies`` of each, as JPEG quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        for i in range(copies):
            path = folder / f"{name}_{i}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return sorted(paths)


def timed(job: Callable[[Callable[[object], None]], None]) -> dict[str, float]:
    """Run ``job(on_done)``; wall time, time to the first result, steady throughput."""
    stamps: list[float] = []
    start = time.perf_counter()
    job(lambda _: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    first, last = stamps[0] - start, stamps[-1] - start
    # results arrive a batch at a time: the steady part starts after the first batch's results
    later = [s - start for s in stamps if s - start > first + 1e-3]
    steady = (len(later) / (last - first)) if later and last > first else float("nan")
    return {"wall": end - start, "first": first, "steady": steady, "done": len(stamps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    from evidencemap.distributed import BatchSpec, run_on_ray
    from evidencemap.engine import make_settings, output_bases, run_inputs
    from evidencemap.models.loading import load_model

    work = Path(tempfile.mkdtemp(prefix="batch_engines_"))
    try:
        paths = make_folder(work / "photos", args.copies)
        n = len(paths)

        def local(threads: int) -> Callable[[Callable[[object], None]], None]:
            def job(on_done: Callable[[object], None]) -> None:
                torch.set_num_threads(threads)
                out = work / f"local_{threads}_{time.monotonic_ns()}"
                bases = output_bases(paths, out, root=work / "photos")
                loaded = load_model("efficientnet-lite0")
                settings = make_settings(loaded, "gradcam")
                run_inputs(paths, bases, loaded, settings, args.batch_size, on_done, print)

            return job

        def on_ray(actors: int, cpus: float) -> Callable[[Callable[[object], None]], None]:
            def job(on_done: Callable[[object], None]) -> None:
                out = work / f"ray_{actors}_{time.monotonic_ns()}"
                bases = output_bases(paths, out, root=work / "photos")
                spec = BatchSpec(batch_size=args.batch_size, threads=max(1, int(cpus)))
                run_on_ray(paths, bases, spec, on_done, print, actors=actors, cpus_per_actor=cpus)

            return job

        env = {
            "env_vars": {
                "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
            }
        }
        starts = []
        rows: dict[str, list[dict[str, float]]] = {}
        engines = {
            "local, torch 2 threads": local(2),
            "local, torch 1 thread": local(1),
            "ray, 1 actor × 2 CPU (2 threads)": on_ray(1, 2.0),
            "ray, 2 actors × 1 CPU (1 thread each)": on_ray(2, 1.0),
        }
        for _ in range(args.repeats):
            t = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env=env)
            starts.append(time.perf_counter() - t)
            try:
                for name, job in engines.items():
                    rows.setdefault(name, []).append(timed(job))
            finally:
                ray.shutdown()

        def cell(name: str, key: str, fmt: str) -> str:
            values = [r[key] for r in rows[name]]
            return " / ".join(format(v, fmt) for v in values)

        print("# Batch engines: local vs Ray on one folder of real photos\n")
        print(
            f"`PYTHONPATH=src python benchmarks/batch_engines.py --copies {args.copies} "
            f"--batch-size {args.batch_size} --repeats {args.repeats}`: {n} photos "
            f"({len(PHOTOS)} scikit-image photos × {args.copies}), Grad-CAM on "
            f"EfficientNet-Lite0, --batch-size {args.batch_size}, PNG + .npz + manifest per "
            f"photo; {os.cpu_count()} CPU cores, torch {torch.__version__}, ray {ray.__version__}, "
            f"Python {platform.python_version()}. Each cell: one value per repeat.\n"
        )
        print(
            "Ray start-up (`ray.init(num_cpus=2)`, a local cluster): "
            + " / ".join(f"{s:.1f} s" for s in starts)
            + "\n"
        )
        print("| engine | job wall s | first photo s | steady photos/s | steady s/photo |")
        print("|---|---:|---:|---:|---:|")
        for name in engines:
            per = " / ".join(f"{1 / r['steady']:.3f}" for r in rows[name])
            print(
                f"| {name} | {cell(name, 'wall', '.1f')} | {cell(name, 'first', '.1f')} | "
                f"{cell(name, 'steady', '.2f')} | {per} |"
            )

        def best(name: str, key: str = "steady") -> float:
            """The least disturbed repeat: the fastest (others' load only ever slows a run)."""
            if key == "steady":
                return min(1 / r["steady"] for r in rows[name])
            return min(r[key] for r in rows[name])

        for threads, local_name, ray_name in (
            (2, "local, torch 2 threads", "ray, 1 actor × 2 CPU (2 threads)"),
            (1, "local, torch 1 thread", "ray, 2 actors × 1 CPU (1 thread each)"),
        ):
            base, other = best(local_name), best(ray_name)
            if threads == 1:
                other *= 2  # two actors at once: s/photo of one actor
            print(
                f"\nPer-photo overhead of the Ray engine at {threads} torch thread(s) per model "
                f"({ray_name} vs {local_name}; fastest repeat, steady s/photo"
                f"{', ×2 for one of the two actors' if threads == 1 else ''}): "
                f"{other - base:+.3f} s ({(other / base - 1) * 100:+.0f} %)."
            )
        print(
            "\nFixed cost per job on Ray: the actors' start, about the 'first photo' column "
            f"minus the local engine's ({best('ray, 1 actor × 2 CPU (2 threads)', 'first'):.1f} s "
            f"vs {best('local, torch 2 threads', 'first'):.1f} s, fastest repeat), plus "
            f"`ray.init` when the job starts its own cluster ({min(starts):.1f} s)."
        )
        load = os.getloadavg()
        print(
            f"\nLoad average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, "
            f"{load[2]:.1f} on {os.cpu_count()} cores: other work shared the cores, so single "
            "runs vary; compare the fastest repeats."
        )
        done = {name: {int(r["done"]) for r in rs} for name, rs in rows.items()}
        if any(d != {n} for d in done.values()):
            print(f"\nWARNING: not every engine finished all {n} photos: {done}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
