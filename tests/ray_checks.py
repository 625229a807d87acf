"""Ray Train ``TorchTrainer`` runs on 2 CPU workers, many scenarios per launch.

``python tests/ray_checks.py OUT_DIR`` (with a Python that has ``ray[train]``) starts a local
Ray instance and fits one ``TorchTrainer(ScalingConfig(num_workers=2, use_gpu=False))`` per
scenario, or two where a scenario resumes. The train loop is the code users write: the model
through ``ray.train.torch.prepare_model`` (DDP over Ray's gloo process group), the class swap,
one ``scheduler.step(val_loss, weight=n)`` per epoch on the scripted uneven shards of
``tests/uneven_shards.py``, and ``ray.train.report(metrics, checkpoint=...)`` with the
scheduler's state in the checkpoint.

Every worker writes ``OUT_DIR/SCENARIO/rank{r}-from{epoch}.json`` (one file per attempt: the
learning rates and global metrics it saw from ``epoch`` on); the driver writes
``OUT_DIR/driver.json``: scenario name -> what the driver saw (wall time, the epoch of the
final checkpoint) or ``{"error": traceback}``. ``tests/test_ray.py`` compares them with
torch's ``ReduceLROnPlateau`` in one process. Importing this module starts nothing and imports
no Ray.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from distplateau import DistributedReduceLROnPlateau
from tests.uneven_shards import EPOCHS, FACTOR, LR, NAN_EPOCH, PATIENCE, RESUME_AT, local_val_loss

WORKERS = 2
CRASH_AT = NAN_EPOCH + 1  # worker_failure: rank 1 dies at the start of this epoch, once
FITS = ("class_swap_follows_global_mean", "resume_from_checkpoint", "worker_failure_restores_from_checkpoint")
SCENARIOS = ("import_distplateau_imports_no_ray", *FITS)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = DistributedReduceLROnPlateau(optimizer, factor=FACTOR, patience=PATIENCE)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"]

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25
    record: dict[str, Any] = {"start": start, "lrs": [], "metrics": [], "backend": None, "loop_s": 0.0}
    begin = time.monotonic()
    out = Path(config["out"]) / f"rank{rank}-from{start}.json"
    for epoch in range(start, config["stop"]):
        if epoch == config.get("crash_at") and rank == 1 and not Path(config["crash_marker"]).exists():
            Path(config["crash_marker"]).touch()
            os._exit(1)  # a worker process dies: no exception, no clean shutdown
        for i in range(rank * 4, len(x), world * 4):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[i:i + 4]).squeeze(-1), y[i:i + 4])
            loss.backward()
            optimizer.step()
        val_loss, count = local_val_loss(epoch, rank, world)
        scheduler.step(val_loss, weight=count)
        record["lrs"].append(optimizer.param_groups[0]["lr"])
        record["metrics"].append(scheduler.last_global_metric)
        record["backend"] = type(scheduler._gather).__name__
        record["loop_s"] = round(time.monotonic() - begin, 2)
        out.write_text(json.dumps(record))
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:  # every rank holds the same state: one copy is the checkpoint
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1}, Path(directory) / "state.pt")
                ray.train.report({"val_loss": scheduler.last_global_metric, "epoch": epoch},
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report({"val_loss": scheduler.last_global_metric, "epoch": epoch})


def fit(name: str, out: Path, stop: int = EPOCHS, **config: Any) -> Any:
    """One ``TorchTrainer`` run. A run of the same ``name`` and storage as an earlier one
    resumes from that run's latest checkpoint (Ray Train 2.x's restoration; its
    ``resume_from_checkpoint=`` argument is deprecated and raises)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    (out / name).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"out": str(out / name), "stop": stop, **config},
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False),
        run_config=RunConfig(name=name, storage_path=str(out / "storage"),
                             failure_config=FailureConfig(max_failures=1 if "crash_at" in config else 0)),
    )
    return trainer.fit()


def checkpoint_epoch(result: Any) -> int:
    with result.checkpoint.as_directory() as directory:
        return int(torch.load(Path(directory) / "state.pt", weights_only=True)["epoch"])


def import_distplateau_imports_no_ray(out: Path) -> dict[str, Any]:
    return {"ray_imported_before_ray_init": "ray" in sys.modules}


def class_swap_follows_global_mean(out: Path) -> dict[str, Any]:
    result = fit("class_swap_follows_global_mean", out)
    return {"checkpoint_epoch": checkpoint_epoch(result)}


def resume_from_checkpoint(out: Path) -> dict[str, Any]:
    first = fit("resume_from_checkpoint", out, stop=RESUME_AT)
    second = fit("resume_from_checkpoint", out)
    return {"first_checkpoint_epoch": checkpoint_epoch(first), "checkpoint_epoch": checkpoint_epoch(second)}


def worker_failure_restores_from_checkpoint(out: Path) -> dict[str, Any]:
    marker = out / "crashed-once"
    result = fit("worker_failure_restores_from_checkpoint", out, crash_at=CRASH_AT, crash_marker=str(marker))
    return {"crashed": marker.exists(), "checkpoint_epoch": checkpoint_epoch(result)}


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"import_distplateau_imports_no_ray": import_distplateau_imports_no_ray(out)}
    import ray

    begin = time.monotonic()
    # Workers import tests.uneven_shards, as the driver does.
    ray.init(num_cpus=WORKERS, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    results["ray_init"] = {"wall_s": round(time.monotonic() - begin, 1)}
    try:
        for name in FITS:
            begin = time.monotonic()
            try:
                results[name] = {**globals()[name](out), "wall_s": round(time.monotonic() - begin, 1)}
            except Exception:  # noqa: BLE001 - reported, the test shows the traceback
                results[name] = {"error": traceback.format_exc()}
            (out / "driver.json").write_text(json.dumps(results, indent=1))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
