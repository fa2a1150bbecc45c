"""finetune.py under torchrun (gloo on this CPU): per-rank data shards, one model across the ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

import finetune


def torchrun(nproc, out_dir, conf, *extra):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(ROOT / 'tests' / 'torchrun_probe.py'), str(out_dir), 'train', '--conf', conf, *extra]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.parametrize('nproc', [2, 1])
def test_torchrun_shards_data_and_trains_one_model(nproc, make_conf, tmp_path):
    conf = make_conf(batch_size=4, max_epochs=2, checkpoint={'by_epoch': False, 'interval': 3})
    work = Path(json.loads(Path(conf).read_text())['work_dir'])
    proc = torchrun(nproc, tmp_path, conf)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(nproc)]
    n = ranks[0]['dataset_len']
    per_rank_iters = 2 * (n // nproc // 4)
    for r in ranks:
        assert r['world_size'] == nproc
        assert r['sampler'] == ('DistributedSampler' if nproc > 1 else 'RandomSampler')  # ModelScope's choice
        assert r['iterations'] == per_rank_iters
        assert len(r['epochs']) == 2
    for epoch in range(2):
        shards = [set(r['epochs'][epoch]) for r in ranks]
        assert sum(len(s) for s in shards) == n  # n divides evenly: no padding
        assert set().union(*shards) == set(range(n))  # disjoint shards that cover the split
    for r in ranks:  # set_epoch: each epoch visits the shard in a new order
        assert r['epochs'][0] != r['epochs'][1]
    # gradients averaged over the ranks (and rank 0's buffers sent to all): one model, not nproc models
    assert len({r['weights'] for r in ranks}) == 1
    assert len({r['buffers'] for r in ranks}) == 1
    # rank 0 alone writes: one summary, the checkpoints and output/
    summaries = list(work.glob('train_*.json'))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary['world_size'] == nproc and summary['iterations'] == per_rank_iters
    assert (work / 'output' / 'pytorch_model.bin').is_file()
    assert sorted(int(p.stem.split('_')[1]) for p in work.glob('iter_*_trainer_state.pth'))[-1] == per_rank_iters
    assert len(list(work.glob('train_*.log'))) == 1


@pytest.mark.unit
def test_eval_refuses_several_processes(make_conf, monkeypatch, capsys):
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert finetune.main(['eval', '--conf', make_conf()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: eval runs in one process; start it with python3, not torchrun']
