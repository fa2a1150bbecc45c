"""Validate a trained model dir once, alone or under torchrun; rank 0 writes OUT/val_metrics.jsonl.

    torchrun --nproc_per_node 2 tests/validation_probe.py CONF OUT

The conf's model_name is the trained model dir; the real trainer is built around it and the validation
hook is called once, as training calls it (each rank captions its shard, rank 0 scores)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    conf_path, out = sys.argv[1:3]
    from utils.core import distributed
    from utils.core.conf import apply_overrides, read_conf
    from utils.core.conf_checks import validate
    from utils.data.rows import load_split
    from utils.data.styles import StyleMap
    from utils.training import trainer as assembly
    from utils.data.rows import load_val_rows
    from utils.training.validation import ValidationHook

    if distributed.launched():
        distributed.init()
    conf = validate(apply_overrides(read_conf(conf_path), work_dir=out))
    style_map = StyleMap.load(conf.model.model_name)
    rows, _ = load_split(conf, 'train')
    trainer = assembly.build_trainer(conf, rows, style_map, conf.model.model_name)
    hook = ValidationHook(conf, load_val_rows(conf, style_map), style_map, resuming=False)
    hook.before_run(trainer)
    hook.validate(trainer, 1, 1)
    distributed.finish()
    return 0


if __name__ == '__main__':
    sys.exit(main())
