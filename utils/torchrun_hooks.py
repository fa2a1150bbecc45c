"""The trainer side of :mod:`utils.distributed`: the hook that joins ModelScope's trainer to the process
group torchrun started, and the gradient averaging that OFATrainer's train_step otherwise skips."""
from __future__ import annotations

import torch
import torch.distributed as dist
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.distributed.ddp_hook import DDPHook
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.optimizer.base import OptimizerHook, OptimizerProcessor
from modelscope.utils.constant import DistributedParallelType

from utils.distributed import HOOK_TYPE, init, local_rank

BUCKET_BYTES = 32 << 20


@HOOKS.register_module(module_name=HOOK_TYPE)
class TorchrunHook(DDPHook):
    """ModelScope's DDPHook for a process group that :func:`init` already joined, on GPUs or CPUs."""

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

    def register_processor(self, trainer):  # trainer.train() registers the OptimizerHook, then calls this
        for hook in trainer.get_hook(OptimizerHook):
            hook.set_processor(GradientSyncProcessor())

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


class GradientSyncProcessor(OptimizerProcessor):
    """ModelScope's OptimizerProcessor, with the gradients averaged over the ranks before clipping and the
    optimizer step, and rank 0's buffers sent to all after it (DDP's own all-reduce and buffer broadcast
    never run under OFATrainer: see utils.distributed)."""

    def backward(self, trainer, loss_keys, cumulative_iters, grad_clip):
        for k in loss_keys:
            trainer.train_outputs[k] /= cumulative_iters
            trainer.train_outputs[k].backward()
        if Hook.every_n_iters(trainer, cumulative_iters):
            average_gradients(trainer.model)
            if grad_clip is not None:
                self.clip_grads(trainer.model.parameters(), **grad_clip)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            broadcast_buffers(trainer.model)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank, as DDP's broadcast_buffers does in the
    forward that OFATrainer bypasses: the ranks end with the model that rank 0 saves."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean) every trainable parameter's gradient, in flat buckets. A parameter that got no
    gradient on some rank counts as zero there, as with DDP's find_unused_parameters."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
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
