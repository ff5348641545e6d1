"""ImageClassifier: the paper's training recipe for any registered model and activation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from dynact.conversion import convert_like_state_dict
from dynact.experiments.models.vit import create_model

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Image classification with the paper's recipe (Appendix E, DeiT-style).

    - loss: cross-entropy; for a distilled model (``deit_tiny``) DeiT's hard distillation,
      ``0.5 * CE(cls_head, y) + 0.5 * CE(dist_head, argmax teacher(x))``. Without a teacher both
      heads learn from the labels (said once in the log). In evaluation the heads are averaged.
    - optimizer: AdamW; weight decay on weights only (no decay on tensors with ``ndim <= 1``:
      norms, biases, the activations' scalars, nor on the model's ``no_weight_decay()`` tokens).
    - schedule, per optimizer step: linear warm-up from ``warmup_lr`` to ``lr`` over
      ``warmup_epochs``, then cosine decay to ``min_lr`` at the end of ``epochs``::

          lr(t) = warmup_lr + (lr - warmup_lr) * t / W                          t < W
          lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2  W <= t < T

      with ``W`` and ``T`` the warm-up and total step counts. Gradient clipping is the Trainer's
      (``gradient_clip_val=1.0`` in the paper's configs).
    - logs: ``train/loss``, ``train/acc1``, ``val/loss`` (the mean negative log-likelihood per
      image), ``val/acc1`` and ``val/acc5`` (top-5 when ``num_classes >= 5``), with torchmetrics.
      Top-k is the fraction of images whose label is among the k highest logits, as in the
      paper's tables (torchmetrics' ``average="micro"``); ``val/acc1_macro`` is the mean over
      classes of each class's top-1, which differs when the classes are not equally large.

    The timm model is ``self.net``, so callbacks find its activation modules there.

    Args:
        arch: model name (``vit_tiny``, ``deit_tiny``, ``tnt_small``).
        num_classes: classes; must match the data module's.
        img_size: input side in pixels; must match the data module's.
        patch_size: patch side (4 for 32 px CIFAR, 16 for 224 px ImageNet).
        act: MLP activation name (``relu, gelu, elu, prelu, celu, silu, mish, crrelu, eafo``).
        act_kwargs: keyword arguments of the activation (e.g. ``{"eps": 0.01}``).
        lr: peak learning rate (2.5e-4 for batch 256).
        min_lr: learning rate at the end of the cosine decay.
        warmup_lr: learning rate at the first step.
        warmup_epochs: length of the linear warm-up in epochs (may be fractional).
        weight_decay: AdamW weight decay on weight matrices.
        epochs: length of the schedule in epochs; ``None`` uses ``trainer.max_epochs``
            (or ``trainer.max_steps`` when epochs are unbounded).
        teacher: timm model name of a distillation teacher (only for ``deit_tiny``).
        teacher_weights: local file with the teacher's ``state_dict`` (required with ``teacher``).
            The teacher is not saved in checkpoints; ``load_from_checkpoint(path, teacher=None,
            teacher_weights=None)`` reloads the student without it.
        teacher_kwargs: extra keyword arguments for ``timm.create_model`` of the teacher
            (e.g. ``in_chans``, ``img_size``).
        model_kwargs: extra keyword arguments for the model builder (e.g. ``in_chans``,
            ``embed_dim``, ``depth``, ``num_heads``).

    Example:
        >>> model = ImageClassifier("vit_tiny", num_classes=10, act="crrelu")
        >>> model.net.blocks[0].mlp.act
        CRReLU(eps=0.01, learnable=True)
    """

    def __init__(
        self,
        arch: str = "vit_tiny",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int = 4,
        act: str = "gelu",
        act_kwargs: Optional[dict[str, Any]] = None,
        lr: float = 2.5e-4,
        min_lr: float = 1e-5,
        warmup_lr: float = 1e-6,
        warmup_epochs: float = 20,
        weight_decay: float = 0.05,
        epochs: Optional[int] = None,
        teacher: Optional[str] = None,
        teacher_weights: Optional[str] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        _check_schedule(lr, min_lr, warmup_lr, warmup_epochs, weight_decay, epochs)
        self.save_hyperparameters()
        self.net = create_model(
            arch,
            num_classes=num_classes,
            img_size=img_size,
            patch_size=patch_size,
            act=act,
            act_kwargs=act_kwargs,
            **(model_kwargs or {}),
        )
        self.in_chans = int((model_kwargs or {}).get("in_chans", 3))
        self.distilled = hasattr(self.net, "set_distilled_training")
        if self.distilled:
            self.net.set_distilled_training(True)
        # The teacher stays outside the module tree: it is frozen, always in eval mode, and its
        # weights come from `teacher_weights`, not from this model's checkpoints.
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None or teacher_weights is not None:
            if not self.distilled:
                raise ValueError(
                    f"teacher={teacher!r} needs a model with a distillation head; "
                    f"use arch='deit_tiny' (got arch={arch!r}) or drop the teacher"
                )
            self._teacher = (_load_teacher(teacher, teacher_weights, num_classes, teacher_kwargs),)

        # torchmetrics' default is the macro average over classes; top-1 as users and the paper
        # mean it is the fraction of images classified correctly ("micro").
        self.train_acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_acc1_macro = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="macro")
        self.val_acc5 = (
            MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro") if num_classes >= 5 else None
        )

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen distillation teacher, or None."""
        return self._teacher[0] if self._teacher else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``; a distilled model returns both heads while training."""
        return self.net(x)

    @override
    def setup(self, stage: str) -> None:
        # The data module is set up before this hook, so its figures are known here.
        datamodule = getattr(self.trainer, "datamodule", None)
        mine = {"num_classes": self.hparams.num_classes, "img_size": self.hparams.img_size, "in_chans": self.in_chans}
        for attr, value in mine.items():
            theirs = getattr(datamodule, attr, None)
            if theirs is not None and theirs != value:
                where = "model_kwargs.in_chans" if attr == "in_chans" else attr
                raise ValueError(
                    f"the model has {attr}={value} but {type(datamodule).__name__} gives {attr}={theirs}; "
                    f"set the model's {where} to {theirs} (--model.{where} {theirs} on the command line)"
                )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved after EAFOCallback converted the activations holds their spline
        # buffers, while the hyper-parameters still name the original activation: convert the
        # same layers (keeping their settings) so that the weights load. A checkpoint saved
        # before conversion loads into a converted model by itself (see dynact.conversion.to_eafo).
        converted = convert_like_state_dict(self, checkpoint.get("state_dict", {}))
        if converted:
            rank_zero_info(
                f"ImageClassifier: the checkpoint holds {len(converted)} converted activation(s); "
                f"converted them to EAFOActivation to load it: {', '.join(converted)}"
            )

    @override
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.distilled:
            if self.teacher is None:
                rank_zero_info(
                    f"{self.hparams.arch}: no distillation teacher given; the class and distillation "
                    "heads both learn from the labels"
                )
            else:
                rank_zero_info(f"{self.hparams.arch}: hard distillation from teacher {self.hparams.teacher!r}")

    def _distillation_targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return y
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            return self.teacher(x).argmax(dim=-1)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if isinstance(out, tuple):
            logits, logits_dist = out
            loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(
                logits_dist, self._distillation_targets(x, y)
            )
            logits = (logits + logits_dist) / 2
        else:
            logits = out
            loss = F.cross_entropy(logits, y)
        self.train_acc1(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_acc1(logits, y)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.val_acc1_macro(logits, y)
        self.log("val/acc1_macro", self.val_acc1_macro)
        if self.val_acc5 is not None:
            self.val_acc5(logits, y)
            self.log("val/acc5", self.val_acc5)

    def schedule_steps(self) -> tuple[int, int]:
        """``(warmup_steps, total_steps)`` of the learning-rate schedule for the attached trainer."""
        trainer = self.trainer
        stepping = trainer.estimated_stepping_batches
        if trainer.train_dataloader is None:
            # An epoch-unbounded run (max_steps only) skips loading; warm-up is still in epochs.
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        epochs = self.hparams.epochs or (trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None)
        if math.isfinite(batches) and batches > 0:
            per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        elif epochs and math.isfinite(stepping):
            per_epoch = max(1, round(stepping / epochs))
        else:
            raise ValueError(
                "cannot size the learning-rate schedule: the train loader has no length and the run "
                "is unbounded; set trainer.max_steps or ImageClassifier's epochs"
            )
        total = epochs * per_epoch if epochs else int(stepping)
        warmup = round(self.hparams.warmup_epochs * per_epoch)
        if warmup >= total:
            rank_zero_warn(
                f"the warm-up ({warmup} steps) is not shorter than the schedule ({total} steps): "
                "the learning rate never reaches lr; lower warmup_epochs"
            )
        return warmup, max(total, warmup + 1)

    @override
    def configure_optimizers(self):
        no_decay = set(self.net.no_weight_decay()) if hasattr(self.net, "no_weight_decay") else set()
        groups = param_groups_weight_decay(self.net, self.hparams.weight_decay, no_weight_decay_list=no_decay)
        # foreach: one kernel per step for all tensors; torch picks it by itself only on CUDA, and on
        # the CPU the per-tensor loop cost about a fifth of a small model's optimizer step.
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, foreach=True)
        warmup, total = self.schedule_steps()
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=total - warmup,
            lr_min=self.hparams.min_lr,
            warmup_t=warmup,
            warmup_lr_init=self.hparams.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any) -> None:
        # timm's schedulers are indexed by the number of optimizer updates so far.
        scheduler.step_update(num_updates=self.global_step)


def _check_schedule(
    lr: float, min_lr: float, warmup_lr: float, warmup_epochs: float, weight_decay: float, epochs: Optional[int]
) -> None:
    checks = {
        "lr": (lr, lr > 0),
        "min_lr": (min_lr, 0 <= min_lr <= lr),
        "warmup_lr": (warmup_lr, 0 <= warmup_lr <= lr),
        "warmup_epochs": (warmup_epochs, warmup_epochs >= 0),
        "weight_decay": (weight_decay, weight_decay >= 0),
        "epochs": (epochs, epochs is None or epochs > 0),
    }
    for name, (value, ok) in checks.items():
        if not ok:
            raise ValueError(
                f"ImageClassifier: invalid {name}={value!r}; need lr > 0, 0 <= min_lr <= lr, "
                "0 <= warmup_lr <= lr, warmup_epochs >= 0, weight_decay >= 0 and epochs None or > 0"
            )


def _load_teacher(
    name: Optional[str], weights: Optional[str], num_classes: int, kwargs: Optional[dict[str, Any]]
) -> nn.Module:
    """Build timm model ``name`` (no download), load ``weights`` from a local file, freeze it."""
    if name is None or weights is None:
        raise ValueError(
            "distillation needs both teacher (a timm model name) and teacher_weights (a local file "
            f"with its state_dict); got teacher={name!r}, teacher_weights={weights!r}"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher_weights file {str(path)!r} does not exist; put the {name!r} teacher's state_dict "
            "there (torch.save(model.state_dict(), path)) or drop the teacher"
        )
    try:
        teacher = timm.create_model(name, pretrained=False, num_classes=num_classes, **(kwargs or {}))
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"teacher {name!r} is not a timm model name ({err}); see timm.list_models()") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept a bare state_dict or the usual wrappers (timm/DeiT's "model", Lightning's "state_dict").
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    teacher.load_state_dict(state)
    teacher.requires_grad_(False)
    return teacher.eval()
