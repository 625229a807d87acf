"""Hugging Face Transformers ``Trainer``: a callback that stops, at the start of training, a run
whose ``TrainingArguments`` would not step a plateau scheduler on the metric meant.

``Trainer`` steps a scheduler passed as ``optimizers=(optimizer, scheduler)`` that is a
``ReduceLROnPlateau`` (ours is one) once per evaluation, on every process, with
``metrics["eval_" + args.metric_for_best_model]``, a value already gathered across processes
(``Trainer._evaluate``, read in transformers 4.57.6, 5.0.0, 5.24.0 and 5.25.0). Three settings
go wrong only later, or silently: ``metric_for_best_model=None`` (the default) fails the first
evaluation, after a whole epoch of training, with ``AttributeError: 'NoneType' object has no
attribute 'startswith'``; ``greater_is_better`` is never handed to the scheduler's ``mode``;
and with ``eval_strategy="no"`` (the default) the scheduler is never stepped.

Importing this module imports transformers; ``import distplateau`` does not.
"""

from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["PlateauArgumentsCheck"]


class PlateauArgumentsCheck(TrainerCallback):
    """Raise at the start of ``Trainer.train()`` when the ``TrainingArguments`` cannot drive the
    Trainer's ``ReduceLROnPlateau`` (a :class:`~distplateau.DistributedReduceLROnPlateau` or
    torch's own) the way the scheduler's settings say.

    The check runs in ``on_train_begin``: after the model, optimizer and a checkpoint to resume
    from are loaded, before the first training step and the first evaluation (also before
    ``eval_on_start``). It reads only the arguments and the scheduler's ``mode``, which are the
    same on every process, so every process raises the same error and none is left waiting in
    a collective. It does nothing when the Trainer's scheduler is not a ``ReduceLROnPlateau``.

    Raises:
        ValueError: from ``on_train_begin``, when ``args.metric_for_best_model`` is ``None``;
            when ``args.eval_strategy`` is ``"no"``; or when ``args.greater_is_better``
            disagrees with the scheduler's ``mode`` (``True`` needs ``mode="max"``; ``False``
            and ``None``, which ``Trainer`` also reads as "lower is better", need ``"min"``).

    Example:
        >>> import torch
        >>> from transformers import TrainerControl, TrainerState, TrainingArguments
        >>> from distplateau import DistributedReduceLROnPlateau
        >>> from distplateau.transformers import PlateauArgumentsCheck
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> scheduler = DistributedReduceLROnPlateau(optimizer, mode="min", patience=2)
        >>> args = TrainingArguments("out", eval_strategy="epoch", metric_for_best_model="accuracy")
        >>> args.greater_is_better  # derived by TrainingArguments: the name does not end in "loss"
        True
        >>> check = PlateauArgumentsCheck()
        >>> check.on_train_begin(args, TrainerState(), TrainerControl(), lr_scheduler=scheduler)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: TrainingArguments(greater_is_better=True) says a higher eval_accuracy is better, but the ...

        In a script: ``Trainer(..., optimizers=(optimizer, scheduler), callbacks=[PlateauArgumentsCheck()])``.
    """

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")
        if not isinstance(scheduler, ReduceLROnPlateau):
            return
        name = type(scheduler).__name__
        if args.metric_for_best_model is None:
            raise ValueError(
                f"TrainingArguments(metric_for_best_model=None): Trainer steps its {name} with "
                "metrics['eval_' + metric_for_best_model] after each evaluation, and with None the first "
                "evaluation fails with AttributeError: 'NoneType' object has no attribute 'startswith'. "
                "Pass metric_for_best_model='loss' to TrainingArguments to step on eval_loss (or the name of "
                "another metric your evaluation returns)."
            )
        if args.eval_strategy == "no":
            raise ValueError(
                f"TrainingArguments(eval_strategy='no'): Trainer steps its {name} only after the evaluations it "
                "runs during train(), so with no evaluation it never steps it. Pass eval_strategy='epoch' (or "
                "'steps' with eval_steps) to TrainingArguments."
            )
        metric = args.metric_for_best_model
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        wanted = "max" if args.greater_is_better else "min"
        if scheduler.mode != wanted:
            better, worse = ("higher", "lower") if wanted == "max" else ("lower", "higher")
            raise ValueError(
                f"TrainingArguments(greater_is_better={args.greater_is_better}) says a {better} {metric} is "
                f"better, but the scheduler has mode={scheduler.mode!r} and would cut the learning rate while "
                f"{metric} improves: pass mode={wanted!r} to {name}, or greater_is_better="
                f"{wanted == 'min'} to TrainingArguments if {worse} is better."
            )
