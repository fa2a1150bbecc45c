"""utils.core.memory: the commands that caption keep freed memory for reuse instead of page-faulting it in again
at every batch. Measured in a fresh process (the setting is process-wide, and this one may have set it already)."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch

def faults_of_a_batch():
    """Minor page faults of one captioning-like batch: a ResNet stage's activations at batch 16, 256 px (64 MiB
    each), a residual sum, the vocabulary's log-probabilities of 80 rows (19 MiB), all written and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    stem, stage = torch.ones(16, 64, 128, 128), torch.ones(16, 256, 64, 64)
    out = stem + 1
    del stem, stage
    lprobs = torch.ones(80, 59457)
    del out, lprobs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

from utils.core.memory import keep_freed_memory
stock = [faults_of_a_batch() for _ in range(12)]
kept = keep_freed_memory()
print(json.dumps({'stock': stock, 'kept': kept, 'then': [faults_of_a_batch() for _ in range(12)],
                  'again': keep_freed_memory()}))
'''


@pytest.mark.e2e
@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason="glibc's malloc only")
def test_later_batches_reuse_the_first_ones_memory():
    proc = subprocess.run([sys.executable, '-c', PROBE, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['kept'] is True and out['again'] is True  # glibc here; a second call is harmless
    # stock glibc maps the large blocks afresh at every batch: a fault per 4 KiB page (fewer with transparent huge pages)
    assert sum(out['stock'][-4:]) >= 4 * 16, out
    # kept: once the first batches have grown the heap, a batch finds its memory resident
    assert sum(out['then'][-4:]) * 10 <= sum(out['stock'][-4:]), out


@pytest.mark.integration
def test_the_commands_that_caption_keep_freed_memory(trained, tmp_path, monkeypatch):
    """pre_inference.py (and eval and the web demo, through the same load_captioner) turn the setting on in their
    process: checked in-process around a real captioning run, from "not set"."""
    import pre_inference
    from utils.core import memory
    monkeypatch.setattr(memory, '_kept', None)
    assert pre_inference.main(['--conf', trained[0], '-n', '2', '-o', str(tmp_path)]) == 0
    assert json.loads(next(tmp_path.glob('inference_*.json')).read_text())['results']
    assert memory._kept is (platform.libc_ver()[0] == 'glibc')
