"""Ingest and training-reader benchmark on LFW devtrain: images/s, per core, against plain JPEG decoding.

Figures (written to bench/results/ingest.json):

* ``source``: the JPEG folder measured: ``../shared/data/lfw_devtrain``, or where that is absent (or with
  ``--synthetic``) synthetic faces (:mod:`faceops.data.synth`) written as 250x250 JPEGs like LFW's.
* ``ingest``: images/s of ``faceops ingest`` on the source (centre crop 128, every
  core, into a temporary local store): decode, prepare, VLR degradation, shards, manifest.
* ``reader``: the training reader in ONE process with ONE torch thread (a DataLoader worker's share):
  ``BatchDataset`` batches of 256 gathered and turned into augmented float input on the CPU
  (``to_device``) with the recognizer recipe's augmentation, for ``--seconds``.
  ``reader_no_augment``: the same without augmentation; ``reader_gather_only``: the uint8 gather alone
  (what a DataLoader worker does when augmentation runs on the GPU).
* ``jpeg_baseline``: the same process decoding the same source files with PIL (decode + resize to
  112 + to a float tensor), one by one: what a reader that keeps JPEGs would pay.
* ``reader_vs_jpeg``: reader images/s divided by baseline images/s, measured in this run.
* ``augment_profile``: where the reader's time goes (share of CPU time per op group, torch profiler).

Each rate is given per wall second and per CPU second of the process (``*_per_cpu_s``); on a shared
machine the CPU-second figure is the per-core rate. Targets (issue): reader >= 2,000 images/s per
core with augmentation, and >= 3x the JPEG baseline. Run from the repository root:
``python -m bench.ingest [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceops.data.ingest import IngestConfig, ingest
from faceops.data.prepare import PrepareConfig
from faceops.data.reader import BatchDataset, LoaderConfig, SplitData, load_split
from faceops.train.recognizer import RecognizerTrainConfig

from ._runner import data_root, save_result

REPO = Path(__file__).resolve().parents[1]
HR_SIZE = 112
LFW_SIZE = 250  # side of an LFW deep-funneled JPEG: synthetic stand-ins are written at it
LFW_JPEG_QUALITY = 90
SYNTH_IMAGES_PER_IDENTITY = 10  # within the default training-class rule (8-150 images a person)
TARGET_PER_CORE = 2000.0
TARGET_RATIO = 3.0


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timed_rate(work: Callable[[], int], seconds: float) -> dict:
    """Call ``work`` (returns images done) until ``seconds`` pass; images per wall and per CPU second."""
    images, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        images += work()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images": images, "img_per_s": images / wall, "img_per_cpu_s": images / max(cpu, 1e-9),
            "wall_s": wall, "cpu_s": cpu}


def synthetic_source(folder: Path, identities: int, images_per_identity: int) -> Path:
    """Synthetic faces as LFW-like JPEG identity folders (250x250), for a machine without LFW."""
    from faceops.data.synth import make_identity, render

    for i in range(identities):
        ident = make_identity(np.random.default_rng([0, i]))
        (folder / f"id_{i:04d}").mkdir(parents=True)
        for k in range(images_per_identity):
            face = render(ident, np.random.default_rng([0, i, k + 1]), LFW_SIZE)
            face.save(folder / f"id_{i:04d}" / f"{k:04d}.jpg", quality=LFW_JPEG_QUALITY)
    return folder


def bench_ingest(source: Path, store: str, crop: int, workers: int) -> tuple[dict, str]:
    cfg = IngestConfig(prepare=PrepareConfig(center_crop=crop), workers=workers)
    t0 = time.perf_counter()
    result = ingest(str(source), "bench", store, cfg, progress=False)
    seconds = time.perf_counter() - t0
    cores = workers or usable_cores()
    scanned = result.summary["scanned"]
    figures = {"images": scanned, "seconds": seconds, "img_per_s": scanned / seconds,
               "img_per_s_per_core": scanned / seconds / cores, "cores": cores,
               "accepted": result.summary["accepted"], "center_crop": crop}
    return figures, result.uri


def reader_work(ds: BatchDataset, convert: bool = True) -> Callable[[], int]:
    """One batch per call, walking epochs so the order and augmentation draws keep changing:
    the gather of uint8 bytes (a DataLoader worker's part) and, with ``convert``, the conversion to
    float input + augmentation on the CPU (``BatchDataset.to_device``, the training process's part)."""
    state = {"b": 0}
    cpu = torch.device("cpu")

    def work() -> int:
        if state["b"] >= len(ds):
            ds.set_epoch(ds.epoch + 1)
            state["b"] = 0
        batch = ds[state["b"]]
        if convert:
            batch = ds.to_device(batch, cpu)
        state["b"] += 1
        return len(batch["label"])

    return work


def jpeg_work(paths: list[Path]) -> Callable[[], int]:
    """The baseline: PIL decode + resize to 112 + float tensor in [0, 1], one file per call."""
    state = {"i": 0}

    def work() -> int:
        path = paths[state["i"] % len(paths)]
        state["i"] += 1
        with Image.open(path) as img:
            face = img.convert("RGB").resize((HR_SIZE, HR_SIZE), Image.Resampling.BILINEAR)
        torch.from_numpy(np.array(face)).permute(2, 0, 1).float().div_(255.0)
        return 1

    return work


def augment_profile(ds: BatchDataset, batches: int) -> dict:
    """Share of the reader's CPU time per op (self time), for the ops that matter."""
    from torch.profiler import ProfilerActivity, profile

    work = reader_work(ds)
    work()  # warm-up: the noise bank and the scratch buffers are made once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(batches):
            work()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    groups = {  # the ops of Augment's chunked pass (faceops.data.augment)
        "grid_sample": ("aten::grid_sampler_2d",),
        "grid": ("aten::bmm",),  # each chunk's sampling grid, one small matmul
        "noise_bank": ("aten::index_select",),  # each sample's window of the noise bank
        "colour": ("aten::baddbmm", "aten::addcmul", "aten::mean", "aten::clamp_"),
        # uint8 -> float, baddbmm's copy of its input into the output: where the output's pages are first touched
        "to_float_and_first_touch": ("aten::_to_copy", "aten::copy_", "aten::add_"),
    }
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key in ops) / total
              for name, ops in groups.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    shares["top_ops"] = [f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in top]
    return shares


def source_paths(source: Path, data: SplitData) -> list[Path]:
    return [source / image_id for image_id in data.image_ids]


def run(source: Path, seconds: float, batch: int, crop: int, workers: int, work_dir: str) -> dict:
    figures: dict = {}
    figures["ingest"], uri = bench_ingest(source, f"{work_dir}/store", crop, workers)
    torch.set_num_threads(1)  # one DataLoader worker = one process, one thread
    train = load_split(uri, "train", views=["hr"])
    aug = RecognizerTrainConfig().loader.augment  # the recognizer recipe's augmentation
    ds = BatchDataset(train, LoaderConfig(batch_size=batch, augment=aug), seed=0)
    plain = BatchDataset(train, LoaderConfig(batch_size=batch, augment=type(aug)(enabled=False)), seed=0)
    paths = source_paths(source, train)
    for w in (reader_work(ds), reader_work(plain)):  # warm-up: allocator, page cache, kernels
        w()
    timed_rate(jpeg_work(paths), 1.0)
    rounds = 2  # interleaved, so a noisy neighbour hits every measurement alike
    parts: dict[str, list[dict]] = {"reader": [], "reader_no_augment": [], "reader_gather_only": [],
                                    "jpeg_baseline": []}
    for _ in range(rounds):
        parts["reader"].append(timed_rate(reader_work(ds), seconds / rounds))
        parts["reader_no_augment"].append(timed_rate(reader_work(plain), seconds / (4 * rounds)))
        parts["reader_gather_only"].append(timed_rate(reader_work(ds, convert=False), seconds / (4 * rounds)))
        parts["jpeg_baseline"].append(timed_rate(jpeg_work(paths), seconds / rounds))
    for name, runs in parts.items():
        figures[name] = merge(runs)
    figures["reader"]["batch_size"] = batch
    r, j, g = figures["reader"], figures["jpeg_baseline"], figures["reader_gather_only"]
    figures["reader_vs_jpeg"] = {"ratio": r["img_per_s"] / j["img_per_s"],
                                 "ratio_per_cpu_s": r["img_per_cpu_s"] / j["img_per_cpu_s"],
                                 "gather_only_ratio_per_cpu_s": g["img_per_cpu_s"] / j["img_per_cpu_s"]}
    figures["targets"] = {
        "reader_img_per_cpu_s_ge_2000": r["img_per_cpu_s"] >= TARGET_PER_CORE,
        "reader_vs_jpeg_ge_3x": figures["reader_vs_jpeg"]["ratio_per_cpu_s"] >= TARGET_RATIO,
        "gather_only_img_per_cpu_s_ge_2000": g["img_per_cpu_s"] >= TARGET_PER_CORE,
        "gather_only_vs_jpeg_ge_3x": figures["reader_vs_jpeg"]["gather_only_ratio_per_cpu_s"] >= TARGET_RATIO,
    }
    figures["augment_profile"] = augment_profile(ds, batches=8)
    return figures


def merge(runs: list[dict]) -> dict:
    images = sum(r["images"] for r in runs)
    wall, cpu = sum(r["wall_s"] for r in runs), sum(r["cpu_s"] for r in runs)
    return {"images": images, "img_per_s": images / wall, "img_per_cpu_s": images / max(cpu, 1e-9),
            "cpu_share": cpu / wall}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=None, help="identity folders (default: $FACEOPS_DATA/"
                   "lfw_devtrain, FACEOPS_DATA defaulting to ../shared/data)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of reader and of baseline timing")
    p.add_argument("--batch", type=int, default=256, help="reader batch size")
    p.add_argument("--center-crop", type=int, default=128, help="ingest centre crop (px of 250)")
    p.add_argument("--workers", type=int, default=0, help="ingest processes (0 = all cores)")
    p.add_argument("--synthetic", action="store_true", help="measure synthetic JPEG faces even where LFW is "
                   "present (the fallback where it is absent)")
    p.add_argument("--synthetic-identities", type=int, default=300, help="synthetic people (10 images each)")
    p.add_argument("--name", default="ingest", help="result name (bench/results/<name>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    source = args.source or data_root() / "lfw_devtrain"
    if args.source is not None and not source.is_dir():
        raise SystemExit(f"{source} not found")
    synthetic = args.synthetic or not source.is_dir()
    with tempfile.TemporaryDirectory(prefix="faceops-bench-ingest-") as tmp:
        if synthetic:
            print(f"source: synthetic JPEG faces ({'--synthetic' if args.synthetic else f'{source} not found'})")
            source = synthetic_source(Path(tmp) / "faces", args.synthetic_identities, SYNTH_IMAGES_PER_IDENTITY)
        else:
            print(f"source: {source}")
        kind = "synthetic" if synthetic else "lfw_devtrain" if args.source is None else "folder"
        figures = {"source": {"kind": kind, "path": "(temporary)" if synthetic else str(source)}}
        figures |= run(source, args.seconds, args.batch, args.center_crop, args.workers, tmp)
    notes = (f"Source: {figures['source']['kind']}. "
             f"Reader: one process, one torch thread, batch {args.batch}: uint8 gather + BatchDataset.to_device "
             "on the CPU (float conversion + recognizer-recipe augmentation); gather_only = a DataLoader "
             "worker's part when augmentation runs on the GPU. Baseline: PIL decode + bilinear resize to 112 "
             "+ float tensor of the same train files. *_per_cpu_s = per core (process CPU time).")
    save_result(args.name, figures, notes)
    return figures


if __name__ == "__main__":
    main()
