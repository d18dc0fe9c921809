"""GPU training throughput: the engine (all features on) against a bare bf16 loop on the same model,
batch and in-memory data, and the data path alone (reader + augmentation) — where the time goes.

    python -m bench.train_gpu [--model edgeface_xs_gamma_06] [--batch 256] [--workers 8] [--steps 40]

Needs CUDA (run it on a GPU node). Figures are img/s measured in one run and their ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from faceops import config
from faceops.data.reader import BatchDataset, SplitData, make_loader
from faceops.train.engine import Engine
from faceops.train.recognizer import RecognizerTask, RecognizerTrainConfig


def fake_split(n: int, classes: int) -> SplitData:
    rng = np.random.default_rng(0)
    return SplitData(hr=rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8), vlr={},
                     labels=np.arange(n) % classes, identities=[str(i) for i in range(classes)],
                     image_ids=[str(i) for i in range(n)])


def loader_rate(ds: BatchDataset, batches: int) -> float:
    """Reader + transfer + on-device augmentation, no model."""
    dev = torch.device("cuda")
    it = iter(make_loader(ds))
    ds.to_device(next(it), dev)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(ds.to_device(next(it), dev)["label"])
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bare_rate(cfg: RecognizerTrainConfig, data: SplitData, steps: int) -> float:
    task = RecognizerTask(cfg, data, None, torch.device("cuda"))
    model, head = task.model.cuda(), task.head.cuda()
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    x = torch.rand(cfg.loader.batch_size, 3, 112, 112, device="cuda") * 2 - 1
    y = torch.randint(0, data.num_classes, (cfg.loader.batch_size,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, labels = head(model(x), y)
            loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * cfg.loader.batch_size / (time.perf_counter() - t0)


def engine_rate(cfg: RecognizerTrainConfig, data: SplitData, out: str) -> float:
    task = RecognizerTask(cfg, data, None, torch.device("cuda"))
    engine = Engine(task, BatchDataset(data, cfg.loader, 0), cfg.engine, out)
    t0 = time.perf_counter()
    result = engine.fit()
    return result.steps * cfg.loader.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="edgeface_xs_gamma_06")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="/tmp/faceops-bench-gpu")
    args = p.parse_args()
    data = fake_split(args.batch * (args.steps + 1), 1000)
    cfg = config.load(RecognizerTrainConfig, overrides=[
        f"model.name={args.model}", f"loader.batch_size={args.batch}", f"loader.workers={args.workers}",
        "engine.amp=bf16", "engine.epochs=1", "engine.progress=true", "engine.checkpoint_every_steps=20"])
    figures = {"model": args.model, "batch": args.batch, "workers": args.workers,
               "loader_img_s": loader_rate(BatchDataset(data, cfg.loader, 0), 10),
               "loader_1worker_img_s": loader_rate(BatchDataset(data, config.load(
                   RecognizerTrainConfig, overrides=[f"loader.batch_size={args.batch}"]).loader, 0), 3),
               "bare_bf16_img_s": bare_rate(cfg, data, args.steps),
               "engine_bf16_img_s": engine_rate(cfg, data, args.out)}
    figures["engine_over_bare"] = figures["engine_bf16_img_s"] / figures["bare_bf16_img_s"]
    figures["device"] = torch.cuda.get_device_name(0)
    for k, v in figures.items():
        print(f"{k:>22}: {v:.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    try:
        from bench._runner import save_result

        save_result("train_gpu", figures)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
