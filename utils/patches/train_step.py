"""finetune.py's additions to ModelScope's trainer: the training step (mixed precision, gradients averaged
over torchrun's ranks) and the hook that joins the trainer to torchrun's process group.

* :class:`TrainStepProcessor` replaces ModelScope's ``OptimizerProcessor`` (the strategy object its
  ``OptimizerHook`` calls). Two stock behaviours it mends:

  - ``OFATrainer.train_step`` runs the criterion on ``model.module``, around DDP's forward, so DDP never
    arms its gradient all-reduce: under torchrun every rank would silently train its own model on its
    shard, and rank 0 would save only its own. The processor averages the gradients over the ranks
    before the optimizer step (what DDP would have done) and sends rank 0's buffers (BatchNorm
    statistics) to all after it (DDP's ``broadcast_buffers``).
  - ModelScope's fp16 path (``TorchAMPOptimizerProcessor``) puts autocast on ``OfaForAllTasks.forward``,
    but the OFA criterion calls ``model.model(...)`` (the inner ``OFAModel``) directly, so (reading the
    source; not run on a GPU here) its autocast would never reach the forward. The processor puts
    autocast on the inner model's forward, for bf16 as well as fp16.

* :class:`TorchrunHook` is ModelScope's ``DDPHook`` for a process group that ``utils.distributed.init``
  already joined, on GPUs (NCCL) or CPUs (gloo); it also calls ``DistributedSampler.set_epoch``, which
  ModelScope never does (every epoch would visit the shard in the same order).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.distributed.ddp_hook import DDPHook
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.optimizer.base import OptimizerHook, OptimizerProcessor
from modelscope.utils.constant import DistributedParallelType

from utils.core.distributed import HOOK_TYPE, init, local_rank
from utils.core.device import autocast

BUCKET_BYTES = 32 << 20


class TrainStepHook(Hook):
    """Installs :class:`TrainStepProcessor` on the OptimizerHook, which ``trainer.train()`` registers
    just before it calls every hook's ``register_processor``."""

    def __init__(self, precision: str = 'fp32', accumulate: int = 1, before_step=(), after_step=()):
        self.precision, self.accumulate = precision, accumulate
        self.before_step, self.after_step = list(before_step), list(after_step)

    def register_processor(self, trainer):
        for hook in trainer.get_hook(OptimizerHook):
            processor = TrainStepProcessor(self.precision, self.accumulate, self.before_step, self.after_step)
            processor.loss_keys = hook.loss_keys
            hook.set_processor(processor)
            trainer.step_processor = processor  # micro-batches: utils.training.recipe_trainer.RecipeTrainer


class TrainStepProcessor(OptimizerProcessor):
    """ModelScope's OptimizerProcessor (backward, clip, step, zero_grad every ``cumulative_iters``), with
    autocast in ``precision`` (bf16 or fp16; fp16 with a gradient scaler) and, under torchrun, the
    gradients averaged over the ranks before clipping and the step.

    ``accumulate`` > 1: an iteration is one optimizer step over several micro-batches (the trainer calls
    :meth:`add_micro_batch` after each but the last, whose backward is :meth:`backward`'s). Each micro-batch's
    loss is backpropagated times its criterion's sample size (ModelScope's cross-entropy is a mean over the
    batch's target tokens, SCST's over its candidates) and the summed gradients are divided by the window's
    total: the step is the one a single batch of all the micro-batches' samples gives.

    ``before_step`` callables run once the gradients are final (averaged, unscaled), before clipping and the step;
    ``after_step`` callables after the step (``utils.training.freeze``: the frozen rows of the token matrix)."""

    loss_keys = ('loss',)

    def __init__(self, precision: str = 'fp32', accumulate: int = 1, before_step=(), after_step=()):
        self.precision, self.accumulate = precision, accumulate
        self.before_step, self.after_step = list(before_step), list(after_step)
        self.scaler = None
        self.sample_size = None  # of the criterion's last call
        self.window = 0.0  # sample sizes of the micro-batches backpropagated since the last step

    def initialize_optimizer(self, trainer):
        trainer.optimizer.zero_grad()
        if self.accumulate > 1:
            trainer.criterion.register_forward_hook(self._record_sample_size)
        if self.precision == 'fp32':
            return
        inner = trainer.unwrap_module(trainer.model).model  # the OFAModel the criterion calls
        device = next(inner.parameters()).device.type
        inner.forward = autocast(self.precision, device)(inner.forward)
        if self.precision == 'fp16':
            self.scaler = torch.amp.GradScaler(device)

    def _record_sample_size(self, criterion, args, output):
        self.sample_size = output[1]

    def add_micro_batch(self, trainer, loss_keys=None):
        """Backpropagate the micro-batch just run (``trainer.train_outputs``), weighted by its sample size."""
        size = float(self.sample_size)
        for k in loss_keys or self.loss_keys:
            loss = trainer.train_outputs[k] * size
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.window += size

    def backward(self, trainer, loss_keys, cumulative_iters, grad_clip):
        if self.accumulate > 1:
            self.add_micro_batch(trainer, loss_keys)
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            if grads and self.window > 0:
                torch._foreach_div_(grads, self.window)
            self.window = 0.0
        else:
            for k in loss_keys:
                trainer.train_outputs[k] /= cumulative_iters
                loss = trainer.train_outputs[k]
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        if not Hook.every_n_iters(trainer, cumulative_iters):
            return
        average_gradients(trainer.model)  # before unscaling: an inf on any rank reaches every rank's check
        if self.scaler:
            self.scaler.unscale_(trainer.optimizer)
        for callback in self.before_step:
            callback()
        if grad_clip is not None:
            self.clip_grads(trainer.model.parameters(), **grad_clip)
        if self.scaler:
            self.scaler.step(trainer.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        for callback in self.after_step:
            callback()
        broadcast_buffers(trainer.model)


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean) every trainable parameter's gradient, in flat buckets. A parameter that got no
    gradient on some rank counts as zero there, as with DDP's find_unused_parameters."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = []
    for p, used in zip(params, has_grad.tolist()):
        if used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket, size = [], 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES:
            _all_reduce_mean(bucket, world)
            bucket, size = [], 0
    if bucket:
        _all_reduce_mean(bucket, world)


def _all_reduce_mean(grads, world: int) -> None:
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch._utils._flatten_dense_tensors(same)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(same, torch._utils._unflatten_dense_tensors(flat, same)):
            g.copy_(synced)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank, as DDP's broadcast_buffers does in the
    forward that OFATrainer bypasses: the ranks end with the model that rank 0 saves."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@HOOKS.register_module(module_name=HOOK_TYPE)
class TorchrunHook(DDPHook):
    """ModelScope's DDPHook for a process group that :func:`utils.distributed.init` already joined."""

    def __init__(self, launcher: str = 'pytorch'):
        super().__init__(launcher)

    def after_init(self, trainer):
        init()
        if torch.cuda.is_available():
            trainer.device = torch.device(f'cuda:{local_rank()}')
            trainer.model.to(trainer.device)
        else:
            trainer.device = torch.device('cpu')
        trainer.parallel_groups[DistributedParallelType.DP] = None  # -> trainer._dist, DistributedSampler

    def wrap_module(self, trainer):
        if self.wrapped:
            return
        if torch.cuda.is_available():
            return super().wrap_module(trainer)
        # CPU: DDP without device_ids; its constructor broadcasts rank 0's weights to every rank
        trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model, find_unused_parameters=True)
        self.wrapped = True

    def before_train_epoch(self, trainer):
        sampler = getattr(trainer.train_dataloader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(trainer.epoch)
