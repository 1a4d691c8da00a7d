"""``train_loop_per_worker`` for tabular regression and classification.

Runs inside each Ray Train worker: reads its own dataset shard, trains the DDP
module, averages losses across workers, checkpoints, and resumes from the latest
checkpoint after a restart.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from maas_ray.models.tabular import WEIGHTS, build_module

STATE = "train_state.json"
OPTIMIZER = "optimizer.pt"


def _global_sum(*values: float) -> list[float]:
    """Sum scalars over all workers (identity when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _make_optimizer(params: Any, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    lr, wd = cfg["learning_rate"], cfg["weight_decay"]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=wd)
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


class ShardBatches:
    """Batches of this worker's shard, epoch after epoch.

    Small shards (``cache`` on, decided by the driver from the data size) are read
    from Ray Data once and reshuffled in memory each epoch: re-streaming a few
    hundred rows every epoch costs more than the training step. Large shards
    stream from Ray Data every epoch with a local shuffle buffer.

    The cache belongs to one worker group: Ray Train tears the group down and
    starts a new one (new processes, new ``streaming_split`` for the new world
    size) on every resize or restart, so a cache never outlives its shard. The
    cache is also keyed by ``(world_size, rank)`` so that reusing an instance
    under a different split would re-read rather than serve a stale shard.
    """

    def __init__(self, shard: Any, batch_size: int, shuffle: bool, seed: int, cache: bool) -> None:
        self.shard, self.batch_size, self.shuffle, self.seed = shard, batch_size, shuffle, seed
        self.cache = cache
        self._tensors: dict[str, torch.Tensor] | None = None
        self._cached_for: tuple[int, int] | None = None

    def epoch(self, epoch: int) -> Any:
        if not self.cache:
            yield from self.shard.iter_torch_batches(
                batch_size=self.batch_size,
                local_shuffle_buffer_size=self.batch_size * 8 if self.shuffle else None,
                local_shuffle_seed=self.seed + epoch if self.shuffle else None,
            )
            return
        ctx = ray.train.get_context()
        split = (ctx.get_world_size(), ctx.get_world_rank())
        if self._tensors is None or self._cached_for != split:
            self._cached_for = split
            parts = list(self.shard.iter_torch_batches(batch_size=4096))
            self._tensors = {k: torch.cat([p[k] for p in parts]) for k in ("x", "y")} if parts else {}
        if not self._tensors:
            return
        n = len(self._tensors["y"])
        order = torch.arange(n)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {k: v[idx] for k, v in self._tensors.items()}


def _evaluate(model: nn.Module, batches: ShardBatches, epoch: int, cfg: dict[str, Any], loss_fn: nn.Module) -> dict[str, float]:
    model.eval()
    total, correct, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in batches.epoch(epoch):
            out = model(batch["x"])
            y = batch["y"]
            if cfg["task"] == "regression":
                total += loss_fn(out.squeeze(-1), y).item() * len(y)
            else:
                total += loss_fn(out, y).item() * len(y)
                correct += (out.argmax(-1) == y).sum().item()
            count += len(y)
    total, correct, count = _global_sum(total, correct, count)
    metrics = {"val_loss": total / count if count else float("nan")}
    if cfg["task"] == "classification":
        metrics["val_accuracy"] = correct / count if count else float("nan")
    return metrics


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One worker's loop; ``cfg`` is built by :func:`maas_ray.train.run.loop_config`."""
    torch.manual_seed(cfg["seed"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    module = build_module(cfg["module"])
    optimizer_state = None
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # restarted after a failure, or a resumed run
        with checkpoint.as_directory() as folder:
            module.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
            state = json.loads((Path(folder) / STATE).read_text())
            optimizer_state = torch.load(Path(folder) / OPTIMIZER, weights_only=True)
        start_epoch, history = state["epoch"] + 1, state["history"]

    model = ray.train.torch.prepare_model(module)
    optimizer = _make_optimizer(model.parameters(), cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    regression = cfg["task"] == "regression"
    loss_fn: nn.Module = nn.MSELoss() if regression else nn.CrossEntropyLoss()
    seed = cfg["seed"] + 1000 * rank
    train_batches = ShardBatches(
        ray.train.get_dataset_shard("train"), cfg["batch_size"], True, seed, cfg["cache_shards"]
    )
    val_batches = ShardBatches(
        ray.train.get_dataset_shard("validation"), 1024, False, seed, cfg["cache_shards"]
    )
    progress = cfg.get("progress")

    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        total, count = 0.0, 0.0
        started = time.perf_counter()
        for batch in train_batches.epoch(epoch):
            x, y = batch["x"], batch["y"]  # (B, F) float32, (B,) float32 | int64
            out = model(x)  # (B, n_outputs)
            loss = loss_fn(out.squeeze(-1), y) if regression else loss_fn(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        total, count = _global_sum(total, count)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(count, 1.0),
                                   "samples": int(count),  # all workers together
                                   "samples_per_s": count / max(time.perf_counter() - started, 1e-9)}
        # Elastic runs resize between epochs: the curve shows how many workers
        # trained each one. Ray's equal split gives each worker the same number
        # of rows, dropping at most world_size - 1 per epoch, never duplicating one.
        metrics["world_size"] = ctx.get_world_size()
        metrics.update(_evaluate(model, val_batches, epoch, cfg, loss_fn))
        history.append(dict(metrics))
        if rank == 0 and progress is not None:
            progress.push.remote(metrics)

        # Ray Train's controller takes one report per poll (2 s by default), so
        # reporting every epoch would stall tiny epochs; per-epoch metrics go to
        # the progress actor and reports come with checkpoints.
        last = epoch == cfg["epochs"] - 1
        if (epoch + 1) % cfg["checkpoint_every_epochs"] == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:  # every worker holds the same weights under DDP
                    raw = model.module if hasattr(model, "module") else model
                    state = {k: v.detach().cpu().contiguous() for k, v in raw.state_dict().items()}
                    save_file(state, str(Path(tmp) / WEIGHTS))
                    torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER)
                    (Path(tmp) / STATE).write_text(json.dumps({"epoch": epoch, "history": history}))
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
