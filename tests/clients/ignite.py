"""pytorch-ignite: ``ReduceLROnPlateauScheduler`` on an evaluator's metric, 2 ranks under torchrun.

How ignite builds and steps the scheduler (``ignite/handlers/param_scheduler.py``, 0.5.5):
``ReduceLROnPlateauScheduler.__init__`` builds torch's class itself,
``ReduceLROnPlateau(optimizer, **scheduler_kwargs)``, with the name it imported at module load
(``from torch.optim.lr_scheduler import ... ReduceLROnPlateau``), then replaces the instance's
``_reduce_lr`` with its own method. As a handler of the evaluator's ``COMPLETED`` event it calls
``scheduler.step(engine.state.metrics[metric_name])``. Its ``state_dict`` holds the inner
scheduler's ``state_dict()``, which ignite's ``Checkpoint`` saves with ``torch.save``.

The metric: ignite's ``Metric`` classes reduce across ranks in ``compute()``
(``@sync_all_reduce``); ``Loss`` all-reduces its sum of ``loss * n`` and its ``n``, so
``engine.state.metrics["loss"]`` is already the exact global mean on every rank. The baseline is
therefore "synced": torch's class gives every rank the same learning rates, and ours must give
exactly those (one more collective per evaluation, no other change). What ours adds under ignite:
a metric the user computes per rank (``engine.state.metrics[...] = ...`` without a ``Metric``), the
NaN policy, and a checkpoint that ``torch.load(weights_only=True)`` reads: torch's class copies
ignite's bound ``_reduce_lr`` (with ignite's scheduler and the optimizer behind it) into its
``state_dict``; ours leaves methods out.

Seam: none (ignite builds the class inside); the smallest patch, before the handler is built::

    import ignite.handlers.param_scheduler
    ignite.handlers.param_scheduler.ReduceLROnPlateau = DistributedReduceLROnPlateau
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.clients import record

LIBRARY = "pytorch-ignite"
FIELD = "general training"
SEAM = "patch `ignite.handlers.param_scheduler.ReduceLROnPlateau`"
REQUIREMENTS = ["pytorch-ignite==0.5.5"]
EXTRAS = ""
LAUNCHER = "torchrun"
BASELINE = "synced"
RESUME = "exact"
TIMEOUT = 180

EPOCHS = 6
STOP_AFTER = 3  # resume-1 stops here, resume-2 resumes from its checkpoint


def training(local_rank: int, variant: str, out: str) -> None:
    import ignite.distributed as idist
    import ignite.handlers.param_scheduler
    import torch
    from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.handlers import Checkpoint, DiskSaver, ReduceLROnPlateauScheduler
    from ignite.metrics import Loss

    from distplateau import DistributedReduceLROnPlateau

    record.install(out, variant)
    if variant != "torch":
        ignite.handlers.param_scheduler.ReduceLROnPlateau = DistributedReduceLROnPlateau  # type: ignore[misc]

    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.randn(96, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(96)
    data = list(zip(x, y.unsqueeze(1)))
    # ignite's auto_dataloader shards with a DistributedSampler (no shuffling here: a resumed run
    # must see the same batches as the uninterrupted one).
    train_loader = idist.auto_dataloader(data[:64], batch_size=8, shuffle=False)
    val_loader = idist.auto_dataloader(data[64:], batch_size=8, shuffle=False)
    model = idist.auto_model(torch.nn.Linear(4, 1))
    optimizer = idist.auto_optim(torch.optim.SGD(model.parameters(), lr=0.05))
    criterion = torch.nn.MSELoss()
    trainer = create_supervised_trainer(model, optimizer, criterion)
    evaluator = create_supervised_evaluator(model, metrics={"loss": Loss(criterion)})
    scheduler = ReduceLROnPlateauScheduler(optimizer, metric_name="loss", trainer=trainer, save_history=True,
                                           mode="min", factor=0.5, patience=0, threshold=0.05)
    evaluator.add_event_handler(Events.COMPLETED, scheduler)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda: evaluator.run(val_loader))

    folder = Path(out) / "ckpt"
    to_save: dict[str, Any] = {"model": model, "optimizer": optimizer, "trainer": trainer, "lr_scheduler": scheduler}
    if variant == "resume-1":  # after the evaluation (registered first), so the plateau step is in it
        saver = Checkpoint(to_save, DiskSaver(str(folder), require_empty=False), n_saved=1)
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=STOP_AFTER), saver)
    if variant == "resume-2":
        (path,) = folder.glob("*.pt")
        # weights_only=True: the checkpoint holds plain values only (with torch's class it would
        # hold ignite's bound _reduce_lr, and this load would refuse it).
        Checkpoint.load_objects(to_save, torch.load(path, weights_only=True))
    trainer.run(train_loader, max_epochs=STOP_AFTER if variant == "resume-1" else EPOCHS)


def main() -> None:
    import ignite.distributed as idist

    variant, out = sys.argv[1:3]
    with idist.Parallel(backend="gloo") as parallel:  # torchrun's environment: 2 processes
        parallel.run(training, variant, out)


if __name__ == "__main__":
    main()
