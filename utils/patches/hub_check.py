"""The hub question ModelScope's trainer asks about a *local* model dir (``EpochBasedTrainer.__init__`` calls
``check_local_model_is_latest``): an advisory log line that costs ~20 s of retries with no network. For a
local model dir the toolkit skips it; hub ids are asked as usual."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def no_hub_check_for_local_model(model_is_local: bool):
    """While in the block, ModelScope's trainer does not ask the hub about a local model dir."""
    if not model_is_local:
        yield
        return
    import modelscope.trainers.trainer as trainer_module
    original = trainer_module.check_local_model_is_latest
    trainer_module.check_local_model_is_latest = lambda *a, **k: None
    try:
        yield
    finally:
        trainer_module.check_local_model_is_latest = original


