"""timm (PyTorch Image Models) 1.0.31: ``PlateauLRScheduler`` on 2 torchrun CPU ranks (gloo).

What timm does with the metric: it is already global when the scheduler sees it. ``train.py``
(in the repository only: neither the wheel nor the sdist of 1.0.31 ships it; read at the
newest snapshot we have, commit aa4b5850, 1.0.29.dev0) steps the scheduler once per
validation with ``lr_scheduler.step(epoch_p_1, latest_metric)``, ``latest_metric =
eval_metrics[eval_metric]`` (main(), lines 1190-1201; ``--eval-metric top1`` by default). Its
``validate()`` all-reduces every batch's loss and accuracy with ``timm.utils.reduce_tensor``
(lines 1498-1501: an unweighted mean over ranks, per batch; ``OrderedDistributedSampler`` pads
the ranks to equal length). timm 1.0.31 ships, for that validation, ``timm/task/evaluator.py``
("dataset-level classification evaluation shared by training and validation"), which this case
uses: ``ClassificationEvaluator.compute(distributed=True)`` all-reduces the loss sum and the
counts, the sampler's padding left out (``evaluation_sample_limit``): the exact
sample-weighted global mean. Either way every rank steps on the same number, so torch's class
does not diverge under timm's own loop (BASELINE "synced"); a user's own loop that steps
``PlateauLRScheduler`` on a local metric does diverge, and that is where ours matters.

How the scheduler is built: ``timm/scheduler/scheduler_factory.py:create_scheduler_v2(
sched="plateau")`` builds ``timm/scheduler/plateau_lr.py:PlateauLRScheduler``, a wrapper (a
``timm.scheduler.Scheduler``, not a torch scheduler) whose ``__init__`` builds
``torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=, factor=, threshold=,
cooldown=, mode=, min_lr=)`` into ``self.lr_scheduler``, looked up on the torch module at call
time. Its ``step(epoch, metric)`` handles warmup and noise itself and calls
``self.lr_scheduler.step(metric)`` (positional, no epoch) only when a metric is given, on every
rank alike. There is no class argument, so the seam is the smallest patch a user would write:
``torch.optim.lr_scheduler.ReduceLROnPlateau`` replaced by ours only while
``create_scheduler_v2`` runs (``unittest.mock.patch.object``), which keeps timm's own mapping
of its arguments (``decay_rate`` -> ``factor``, ``patience_epochs`` -> ``patience``, ...).
Nothing in timm breaks with our class: no ``isinstance``/exact-class check, no keyword we lack.

Resume: none. timm 1.0.31 deprecates ``PlateauLRScheduler``; its ``state_dict`` keeps only
``best`` and ``last_epoch`` (not ``num_bad_epochs`` nor ``cooldown_counter``), and
``CheckpointSaver._save`` / ``resume_checkpoint`` save and restore no scheduler state at all
("a resumed run restarts the plateau logic, and checkpoint support will not be added").

The loop below is the minimum glue around timm's own pieces, in train.py's order: seeding
(``utils.random_seed(seed, rank)``), ``create_model``, ``create_optimizer_v2`` (train.py's
SGD defaults), ``ClassificationTask`` and ``prepare_distributed`` (DDP), ``create_dataset`` /
``create_loader(distributed=True)`` on a small synthetic PNG image folder written here,
``_set_loader_epoch`` (lines 1109, 478-484), the training step of ``train_one_epoch``
(``task(input, target)["loss"]``, backward, ``optimizer.step``, ``zero_grad``),
``utils.distribute_bn(..., reduce=True)`` (lines 1132-1135; ``--dist-bn reduce`` is the
default), validation with the task's evaluator, then the scheduler step above. ``device_ids``
stays ``None``: train.py passes ``[device]``, which DDP refuses for a CPU module. Scheduler
built in train.py at lines 1079-1084.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

LIBRARY = "timm"
FIELD = "vision"
SEAM = "`ReduceLROnPlateau` patched while `create_scheduler_v2` builds"
REQUIREMENTS = ["timm==1.0.31", "torchvision==0.29.1"]
EXTRAS = ""
LAUNCHER = "torchrun"
BASELINE = "synced"
RESUME = ""
TIMEOUT = 600
# torchvision (a timm requirement) has no build for the CPU torch 2.13.0 on disk; the CUDA
# builds of torch 2.14.1 and torchvision 0.29.1 on disk run on CPU.
TORCH = "torch==2.14.1"

EPOCHS = 10
CLASSES = 4
IMAGE = 16  # pixels a side
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = 5  # less one image of the last class: 19 samples, 10 and 9 per rank (timm pads rank 1 to 10)
BATCH = 8


def _write_images(root: Path) -> None:
    """A small image folder (``<root>/{train,validation}/<class>/*.png``), the same bytes on every
    rank and in every launch: a class is a colour, drowned in enough noise that top-1 accuracy
    climbs and then stalls within a few epochs, so the plateau logic has something to do."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.uniform(60, 200, size=(CLASSES, 3))
    for split, per_class in (("train", TRAIN_PER_CLASS), ("validation", VAL_PER_CLASS)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            count = per_class - (1 if split == "validation" and label == CLASSES - 1 else 0)
            for i in range(count):
                noise = rng.normal(0, 120, size=(IMAGE, IMAGE, 3))
                pixels = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _validate(task: Any, loader: Any) -> dict[str, float]:
    """timm 1.0.31's dataset-level validation: the task's evaluator, the sampler's padding left
    out, loss sum and counts all-reduced over the ranks (``compute(distributed=True)``)."""
    import torch
    from timm.task import evaluation_sample_limit

    model = task.get_eval_model()
    model.eval()
    evaluator = task.create_evaluator(max_samples=evaluation_sample_limit(loader))
    with torch.inference_mode():
        for images, target in loader:
            evaluator.update(model(images), target)
    return dict(evaluator.compute(distributed=True))


def main() -> None:
    variant, out = sys.argv[1], Path(sys.argv[2])
    from tests.clients import record

    record.install(out, variant)  # before timm builds the scheduler

    import unittest.mock
    from types import SimpleNamespace

    import torch
    from timm import create_model, utils
    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.task import ClassificationTask

    from distplateau import DistributedReduceLROnPlateau

    torch.set_num_threads(1)  # 2 ranks on 2 shared cores; also keeps the CPU kernels' sums in one order
    args = SimpleNamespace(device="cpu")  # the fields of train.py's argparse namespace that timm's helpers read
    device = utils.init_distributed_device(args)  # torchrun's env:// -> gloo on CPU
    assert args.distributed and args.world_size == 2, "launch with torchrun --nproc_per_node 2"
    utils.random_seed(42, args.rank)

    data = out / "data" / f"rank{args.rank}"  # each rank its own copy: no barrier needed before reading
    _write_images(data)

    model = create_model("test_resnet", num_classes=CLASSES)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=2e-5, momentum=0.9)
    task = ClassificationTask(model, device=device, verbose=False)
    task.prepare_distributed(device_ids=None)  # DDP broadcasts rank 0's initial weights

    config: dict[str, Any] = {"input_size": (3, IMAGE, IMAGE), "use_prefetcher": False, "num_workers": 0,
                              "distributed": True, "device": device, "crop_pct": 1.0}
    loader_train = create_loader(create_dataset("", root=str(data), split="train", is_training=True),
                                 batch_size=BATCH, is_training=True, no_aug=True, **config)
    loader_eval = create_loader(create_dataset("", root=str(data), split="validation"),
                                batch_size=BATCH, is_training=False, **config)

    def build() -> tuple[Any, int]:
        # train.py: create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=...)), with
        # --sched plateau and a short patience so that the learning rate does drop in a few epochs.
        return create_scheduler_v2(optimizer, sched="plateau", num_epochs=EPOCHS, decay_rate=0.5,
                                   patience_epochs=1, warmup_epochs=0, min_lr=0.0, plateau_mode="max",
                                   updates_per_epoch=len(loader_train))

    if variant == "torch":
        lr_scheduler, num_epochs = build()
    else:
        # The seam: timm's PlateauLRScheduler builds its inner scheduler as
        # torch.optim.lr_scheduler.ReduceLROnPlateau(...); ours is that name while it does.
        with unittest.mock.patch.object(torch.optim.lr_scheduler, "ReduceLROnPlateau", DistributedReduceLROnPlateau):
            lr_scheduler, num_epochs = build()
        assert isinstance(lr_scheduler.lr_scheduler, DistributedReduceLROnPlateau)

    for epoch in range(num_epochs):
        loader_train.sampler.set_epoch(epoch)  # train.py's _set_loader_epoch
        task.get_trainable_module().train()
        for images, target in loader_train:  # train_one_epoch, without AMP, accumulation or clipping
            loss = task(images, target)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        utils.distribute_bn(task.get_trainable_module(), args.world_size, True)
        eval_metrics = _validate(task, loader_eval)
        lr_scheduler.step(epoch + 1, eval_metrics["top1"])  # train.py: lr_scheduler.step(epoch_p_1, latest_metric)
        if args.rank == 0:
            lrs = [group["lr"] for group in optimizer.param_groups]
            print(f"epoch {epoch}: top1 {eval_metrics['top1']:.2f} loss {eval_metrics['loss']:.4f} lrs {lrs}",
                  flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
