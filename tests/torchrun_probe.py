"""Run finetune.py's train under torchrun with a recorder attached; each rank writes what it saw.

    torchrun --nproc_per_node 2 tests/torchrun_probe.py OUT_DIR train --conf CONF

Per rank, OUT_DIR/rank{R}.json: the dataset indices the rank's sampler gave in each epoch, the number of
iterations it ran, and a digest of its model weights at the end (equal on all ranks iff they trained
one model)."""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune  # noqa: E402
from utils.training import trainer as assembly  # noqa: E402


def recorder(out_dir):
    from modelscope.trainers.hooks.hook import Hook
    from modelscope.trainers.hooks.priority import Priority

    class Recorder(Hook):
        PRIORITY = Priority.LOWEST  # sees the sampler after every other hook's before_train_epoch
        def __init__(self):
            self.epochs, self.iters = [], 0

        def before_train_epoch(self, trainer):
            self.epochs.append(list(iter(trainer.train_dataloader.sampler)))

        def after_train_iter(self, trainer):
            self.iters += 1

        def after_run(self, trainer):
            model = trainer.unwrap_module(trainer.model)
            digests = {}
            for what, named in (('weights', model.named_parameters()), ('buffers', model.named_buffers())):
                digest = hashlib.sha256()
                for name, tensor in sorted(named):
                    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
                digests[what] = digest.hexdigest()
            rank = int(os.environ['RANK'])
            Path(out_dir, f'rank{rank}.json').write_text(json.dumps({
                'rank': rank, 'world_size': int(os.environ['WORLD_SIZE']), 'epochs': self.epochs,
                'iterations': self.iters, 'dataset_len': len(trainer.train_dataset), **digests,
                'sampler': type(trainer.train_dataloader.sampler).__name__}))

    return Recorder()


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    build = assembly.build_trainer

    def build_with_recorder(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.register_hook(recorder(out_dir))
        return trainer

    assembly.build_trainer = build_with_recorder
    return finetune.main(argv)


if __name__ == '__main__':
    sys.exit(main())
