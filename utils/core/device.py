"""Devices and numeric precision: where a model runs and the conf's ``precision`` as an autocast."""
from __future__ import annotations

import contextlib
from typing import Optional


def pick_device(requested: Optional[str] = None) -> str:
    import torch
    return requested or ('cuda' if torch.cuda.is_available() else 'cpu')


def autocast(precision: str, device_type: str):
    """The conf's ``precision`` as a context manager: nothing for fp32, else ``torch.autocast`` in bf16 or
    fp16 (weights stay fp32). Also usable as a decorator where precision is not fp32."""
    import torch
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[precision])
