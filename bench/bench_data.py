"""Data at Personality-Captions scale (186,858 train rows, 215 styles).

    python3 -m bench.bench_data [--rows 186858]                 # reading a split in each format
    python3 -m bench.bench_data --startup [--root DIR] [--rows 186858] [--workers 4]
    python3 -m bench.bench_data --pss [--root DIR] [--rows 186858] [--workers 4]

Formats: for each format (PCap .json list, .jsonl, .csv, .parquet) it prints the time to read the split into
rows (image checks off: this measures the file reading), and the peak of Python-allocated memory
(tracemalloc) while reading, next to the size of the rows that come out. The tabular formats go through
HF datasets: a first read converts the file to a memory-mapped Arrow table (timed separately), later reads
reuse it.

``--startup`` builds (once, in ``--root``) a PCap-format data set of that size with a JPEG file per row (64 px:
the check decodes each), 5,000 val and 10,000 test rows and a tiny OFA model, then times ``finetune.py train``
from the command to its first training iteration: a first run (it saves a checkpoint after iteration 1) and a
``-p latest`` resume of it, each step's share (timers around the functions of the start-up path, in the
command's own process), and the PSS of the command's processes (/proc/PID/smaps_rollup) at its 20th iteration
with ``-w 0`` and with ``-w N``.

``--pss`` isolates the rows: the train dataset over the same rows with a preprocessor that does nothing but
read the row, one full epoch through a DataLoader with N forked workers, then the PSS of the main process and
of each worker (workers still alive), for the rows held as the dataset holds them (packed) and as a list of
dicts (how it held them before).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from utils.data.rows import write_rows

N_STYLES = 215


def make_rows(n: int):
    styles = [f'Style{i}' for i in range(215)]
    return [{'personality': styles[i % 215], 'comment': f'a caption number {i} about the picture in front of me',
             'image_hash': f'{i:032x}'} for i in range(n)]


def measure(path: Path):
    """(seconds, peak MB while reading, MB held by the rows read) - memory from a second, traced read."""
    from utils.data.rows import read_split
    t = time.perf_counter()
    rows, stats = read_split(path, '/images', '.jpg', 'train', check_images=False)
    seconds = time.perf_counter() - t
    del rows
    tracemalloc.start()
    rows, _ = read_split(path, '/images', '.jpg', 'train', check_images=False)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, held, stats.kept


def machine() -> str:
    return (f'{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, '
            f'{os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30:.0f} GiB, Python {platform.python_version()}')


def header(argv) -> None:
    print(f'machine: {machine()}')
    print(f'command: python3 -m bench.bench_data {" ".join(argv)}')
    print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}')


# ---------------------------------------------------------------- a PCap-scale data set with image files

def build_pcap_scale(root: Path, n_train: int, n_val: int = 5000, n_test: int = 10_000) -> dict:
    """(Once per size) root/data/{train,val,test}.json + personalities.txt, root/images/*.jpg (one per row),
    root/model (a tiny OFA). Returns the conf's data and model keys."""
    import io
    import random

    from PIL import Image
    keys = {'model_name': str(root / 'model'), 'img_addr': str(root / 'images'), 'dataset_path': str(root / 'data'),
            'file_attr': '.jpg', 'train_json': 'train.json', 'val_json': 'val.json', 'test_json': 'test.json',
            'tokenize_style': True, 'patch_image_size': 32, 'max_image_size': 32}
    marker = root / 'data' / '.built'
    built = {'train': n_train, 'val': n_val, 'test': n_test, 'version': 1}
    if marker.is_file() and json.loads(marker.read_text()) == built:
        return keys
    from utils.demo.tiny_model import build_tiny_ofa
    rng = random.Random(0)
    styles = [f'Style{i}' for i in range(N_STYLES)]
    (root / 'data').mkdir(parents=True, exist_ok=True)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    blobs = []
    for k in range(64):  # distinct JPEGs, reused round robin (every file is still decoded by the check)
        out = io.BytesIO()
        Image.effect_noise((64, 64), 40 + k).convert('RGB').save(out, 'JPEG', quality=85)
        blobs.append(out.getvalue())
    words = 'the a dog cat sky tree happy sad old red blue green lovely great so very this that my your'.split()
    texts = []
    for split, n in (('train', n_train), ('val', n_val), ('test', n_test)):
        rows = []
        for i in range(n):
            name = f'{split[:2]}{i:030x}'
            (root / 'images' / f'{name}.jpg').write_bytes(blobs[i % len(blobs)])
            text = ' '.join(rng.choice(words) for _ in range(rng.randint(6, 14)))
            row = {'personality': styles[rng.randrange(N_STYLES)], 'comment': text, 'image_hash': name}
            if split != 'train':
                row['additional_comments'] = [' '.join(rng.choice(words) for _ in range(8)) for _ in range(4)]
            rows.append(row)
            if len(texts) < 2000:
                texts.append(text)
        (root / 'data' / f'{split}.json').write_text(json.dumps(rows))
    (root / 'data' / 'personalities.txt').write_text('\n'.join(styles) + '\n')
    build_tiny_ofa(str(root / 'model'), texts, image_size=32)
    marker.write_text(json.dumps(built))
    return keys


# ---------------------------------------------------------------- the start-up probe (inside the command)

TIMED = [  # (module, attribute path, step name): the start-up path, in call order
    ('finetune', 'validate', 'conf checks'),
    ('finetune', 'resolve_checkpoint', 'finding the checkpoint (-p)'),
    ('finetune', 'preload', 'imports (torch, ModelScope), beside the data'),
    ('utils.core.beside', 'Beside.result', 'waiting for the data read beside'),
    ('finetune', 'read_data', 'train rows'),
    ('utils.data.image_checks', 'ImageChecks.verdicts', 'image checks'),
    ('utils.data.image_checks', 'ImageChecks.save', 'saving image checks'),
    ('finetune', 'build_style_map', 'style map'),
    ('utils.data.rows', 'load_val_rows', 'val rows'),
    ('utils.training.trainer', 'build_trainer', 'building the trainer'),
    ('utils.captioning.preprocessor', 'OfaPreprocessorForStylishIC.__init__', 'preprocessors'),
    ('utils.data.dataset', 'StylishCaptionDataset.__init__', 'train dataset'),
    ('modelscope.trainers.multi_modal.ofa.ofa_trainer', 'OFATrainer.__init__', 'OFATrainer'),
    ('modelscope.models.base.base_model', 'Model.from_pretrained', 'loading the model'),
    ('modelscope.trainers.multi_modal.ofa.ofa_trainer', 'recursive_overwrite', 'copying the model dir'),
    ('modelscope.trainers.trainer', 'EpochBasedTrainer.__init__', 'EpochBasedTrainer.__init__'),
    ('modelscope.trainers.trainer', 'EpochBasedTrainer.train', 'trainer.train until iteration 1'),
    ('modelscope.trainers.trainer', 'EpochBasedTrainer.get_train_dataloader', 'train dataloader'),
    ('modelscope.trainers.hooks.checkpoint.load_checkpoint_hook', 'LoadCheckpointHook.load_checkpoint',
     'restoring the checkpoint'),
]


def pss_kb(pid: int) -> int:
    with open(f'/proc/{pid}/smaps_rollup') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('Pss:'))


def descendants(pid: int):
    out = []
    for task in os.listdir(f'/proc/{pid}/task'):
        try:
            children = Path(f'/proc/{pid}/task/{task}/children').read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out += [c, *descendants(c)]
    return out


def probe(out: str, stop_after: int, finetune_argv) -> None:
    """Run finetune.main(finetune_argv) in this process with timers on the start-up path; at iteration
    ``stop_after`` write the figures to ``out`` and end the process (os._exit: a kill, as a preemption)."""
    import functools
    import importlib
    import importlib.abc
    import importlib.util

    t_command = float(os.environ['BENCH_T0'])
    timings = {}  # step -> [seconds, calls]
    stack = []

    def timed(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            stack.append((name, time.perf_counter()))
            try:
                return fn(*args, **kwargs)
            finally:
                done(*stack.pop(), [n for n, _ in stack])
        return wrapper

    def done(name, t, inside):
        if state['first'] is not None and name in timings:
            return  # timed up to iteration 1 already
        entry = timings.setdefault(name, [0.0, 0, inside])
        entry[0] += time.perf_counter() - t
        entry[1] += 1

    def install(owner_module, attr, name):
        owner = owner_module
        *path, last = attr.split('.')
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, last):
            return  # (an older toolkit without this step)
        raw = owner.__dict__[last] if isinstance(owner, type) else getattr(owner, last)
        if isinstance(raw, (classmethod, staticmethod)):
            setattr(owner, last, type(raw)(timed(raw.__func__, name)))
        else:
            setattr(owner, last, timed(raw, name))

    # Timers go on each module of TIMED as it is imported, by the command itself and when it would import it: the
    # probe imports nothing ahead of the command (the command overlaps its imports with reading the data).
    pending, after_import = {}, {}
    for module, attr, name in TIMED:
        pending.setdefault(module, []).append((attr, name))

    class TimerFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in pending and fullname not in after_import:
                return None
            sys.meta_path.remove(self)  # the real finders find it
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_time(module):
                exec_module(module)
                for attr, name in pending.pop(fullname, []):
                    install(module, attr, name)
                if fullname in after_import:
                    after_import.pop(fullname)(module)
            spec.loader.exec_module = exec_and_time
            return spec

    sys.meta_path.insert(0, TimerFinder())
    import finetune
    for module in list(pending):  # those the command imported already (finetune's own imports)
        if module in sys.modules:
            for attr, name in pending.pop(module):
                install(sys.modules[module], attr, name)

    beside_figures = {}
    me = os.getpid()
    try:
        from utils.core import beside
        result = beside.Beside.result

        def result_and_record(self):
            try:
                return result(self)
            finally:
                beside_figures.update(child_s=self.seconds, waited_s=self.waited, forked=self.pid is not None,
                                      returned_at_s=time.time() - t_command)
                child = Path(f'{out}.child')
                if child.is_file():  # the steps timed in the child (reading the data)
                    beside_figures['child_steps'] = json.loads(child.read_text())
        beside.Beside.result = result_and_record
        read_inputs = finetune.read_inputs

        def read_inputs_and_record(*args, **kwargs):
            before = set(timings)  # (in a child: the parent's steps, copied by the fork)
            try:
                return read_inputs(*args, **kwargs)
            finally:
                if os.getpid() != me:  # the child: its steps go to a side file, its timers are not the parent's
                    Path(f'{out}.child').write_text(json.dumps(
                        {k: {'s': v[0], 'calls': v[1], 'inside': v[2]} for k, v in timings.items() if k not in before}))
        finetune.read_inputs = read_inputs_and_record
    except (ImportError, AttributeError):
        pass  # (an older toolkit: the data is read in the command's own process)

    t_main = time.time()  # python start, the probe and finetune.py's own (light) imports
    state = {'first': None}

    def stop_hook():  # built once the command has imported ModelScope (the probe imports nothing ahead of it)
        from modelscope.trainers.hooks.hook import Hook
        from modelscope.trainers.hooks.priority import Priority

        class Stop(Hook):
            PRIORITY = Priority.LOWEST  # after CheckpointHook: iteration 1's checkpoint is on disk

            def __init__(self):
                self.done = 0

            def before_train_iter(self, trainer):
                if state['first'] is None:
                    state['first'] = time.time()
                    self.start_iter = trainer.iter
                    for k in range(len(stack)):  # the steps still running (trainer.train): up to iteration 1
                        done(*stack[k], [n for n, _ in stack[:k]])

            def after_train_iter(self, trainer):
                self.done += 1
                if self.done < stop_after:
                    return
                kids = descendants(me)
                figures = {'to_first_iteration_s': state['first'] - t_command, 'start_s': t_main - t_command,
                           'beside': beside_figures, 'start_iter': self.start_iter,
                           'steps': {k: {'s': v[0], 'calls': v[1], 'inside': v[2]} for k, v in timings.items()},
                           'pss_main_kb': pss_kb(me), 'pss_children_kb': [pss_kb(k) for k in kids]}
                Path(out).write_text(json.dumps(figures))
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        return Stop()

    def hook_build_trainer(module):
        build = module.build_trainer

        def build_and_stop(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.register_hook(stop_hook())
            return trainer
        module.build_trainer = build_and_stop
    if 'utils.training.trainer' in sys.modules:  # (finetune.py's own imports bring it)
        hook_build_trainer(sys.modules['utils.training.trainer'])
    else:
        after_import['utils.training.trainer'] = hook_build_trainer
    sys.exit(finetune.main(finetune_argv))


def run_probe(argv, stop_after: int, tmp: Path) -> dict:
    out = tmp / f'probe_{time.time_ns()}.json'
    cmd = [sys.executable, '-m', 'bench.bench_data', '--probe', str(out), '--stop-after', str(stop_after), '--', *argv]
    env = dict(os.environ, BENCH_T0=repr(time.time()))  # the command starts now
    p = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if not out.is_file():
        raise SystemExit(f'probe failed ({p.returncode}):\n{p.stderr[-3000:]}')
    time.sleep(1)  # orphaned DataLoader workers notice their parent is gone
    return json.loads(out.read_text())


def print_steps(title: str, fig: dict) -> None:
    total = fig['to_first_iteration_s']
    print(f'{title}: first training iteration {total:.1f} s after the command (iteration {fig["start_iter"] + 1})')
    rows = [('python start, finetune.py\'s own imports', fig['start_s'], 0)]
    for _, _, name in TIMED:
        step = fig['steps'].get(name)
        if step is not None:
            rows.append((name, step['s'], len(step['inside'])))
    top = sum(s for name, s, depth in rows if depth == 0)
    for name, seconds, depth in rows:
        print(f'  {"  " * depth}{name:{44 - 2 * depth}s} {seconds:6.2f} s {100 * seconds / total:5.1f}%')
    print(f'  {"other (between the steps above)":44s} {total - top:6.2f} s {100 * (total - top) / total:5.1f}%')
    beside = fig.get('beside') or {}
    if beside.get('forked'):
        print(f'  beside the imports, in a child process: reading the data {beside["child_s"]:.2f} s (its value '
              f'handed over {beside["returned_at_s"]:.2f} s after the command; the command waited '
              f'{beside["waited_s"]:.2f} s for it, unpickling included)')
        for _, _, name in TIMED:
            step = beside.get('child_steps', {}).get(name)
            if step is not None:
                print(f'    {"  " * len(step["inside"])}{name:{42 - 2 * len(step["inside"])}s} {step["s"]:6.2f} s')
    elif beside:
        print(f'  the data was read in the command\'s own process ({beside["child_s"]:.2f} s; no fork)')


def startup(args, argv) -> None:
    root = Path(args.root)
    keys = build_pcap_scale(root, args.rows)
    tmp = root / 'runs'
    tmp.mkdir(exist_ok=True)
    work = tmp / f'work_{time.time_ns()}'
    conf = dict(keys, work_dir=str(work), batch_size=4, max_epochs=1, log_interval=1000, eval_interval=None,
                eval_every_epoch=False, checkpoint={'by_epoch': False, 'interval': 1, 'max_checkpoint_num': 2})
    path = tmp / 'conf.json'
    path.write_text(json.dumps(conf))
    header(argv)
    print(f'data: {args.rows} train rows, {N_STYLES} styles, 5000 val, 10000 test rows, a 64 px JPEG file each, '
          f'tiny OFA (d_model 64) at 32 px, batch 4; page cache warm (the files were read just before)')
    subprocess.run(['cat', *map(str, (root / 'data').glob('*.json'))], stdout=subprocess.DEVNULL)
    subprocess.run(f'find {root}/images -type f -exec cat {{}} + > /dev/null', shell=True)  # a warm page cache
    first = run_probe(['train', '--conf', str(path)], 1, tmp)
    print_steps('first run (no image checks remembered)', first)
    resume = run_probe(['train', '--conf', str(path), '-p', 'latest'], 1, tmp)
    print_steps('resume (-p latest)', resume)
    for workers in (0, args.workers):
        fig = run_probe(['train', '--conf', str(path), '-w', str(workers), '--work_dir', str(work) + f'_w{workers}'],
                        20, tmp)
        total = fig['pss_main_kb'] + sum(fig['pss_children_kb'])
        print(f'PSS at iteration 20, -w {workers}: main {fig["pss_main_kb"] / 1024:.0f} MiB + '
              f'{len(fig["pss_children_kb"])} workers {sum(fig["pss_children_kb"]) / 1024:.0f} MiB '
              f'({", ".join(f"{k / 1024:.0f}" for k in fig["pss_children_kb"])}) = {total / 1024:.0f} MiB')
        if workers == 0:
            single = total
    print(f'-w {args.workers} total / -w 0: {total / single:.2f}x')


# ---------------------------------------------------------------- the rows in forked DataLoader workers

class ReadRow:
    """A preprocessor that only reads its row (what a real one does with it, without the image work)."""

    def __call__(self, row):
        return len(row['text']) + len(row['image']) + len(row['style'])


def epoch_pss(rows, workers: int, packed: bool) -> dict:
    """PSS (KiB) of this process and of each of ``workers`` forked DataLoader workers after one epoch over a
    dataset of rows (packed: the toolkit's dataset; else a list of dicts, ModelScope's TorchCustomDataset as the
    dataset used before) and one full garbage collection in each worker."""
    import gc

    import torch
    from modelscope.msdatasets.dataset_cls.custom_datasets import TorchCustomDataset

    from utils.data.dataset import StylishCaptionDataset

    class Collected(torch.utils.data.Dataset):  # a full collection in each worker, as one comes in a long epoch
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            value = self.inner[i]
            self.n += 1
            if self.n == 1000:
                gc.collect()
            return value

    dataset = StylishCaptionDataset(rows, ReadRow()) if packed else TorchCustomDataset([rows], preprocessor=ReadRow())
    loader = torch.utils.data.DataLoader(Collected(dataset), batch_size=256, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, collate_fn=sum)
    before = pss_kb(os.getpid())
    it = iter(loader)
    n = sum(1 for _ in it)
    assert n == len(loader)
    kids = descendants(os.getpid())
    figures = {'main_kb': pss_kb(os.getpid()), 'before_kb': before, 'workers_kb': [pss_kb(k) for k in kids]}
    del it, loader
    return figures


def pss(args, argv) -> None:
    from utils.data.rows import read_split
    root = Path(args.root)
    keys = build_pcap_scale(root, args.rows)
    header(argv)
    rows, _ = read_split(Path(keys['dataset_path']) / 'train.json', keys['img_addr'], '.jpg', 'train',
                         check_images=False)
    print(f'{len(rows)} train rows; one epoch (batch 256, shuffled) through a DataLoader; a full gc.collect() in '
          f'each worker after its first 1000 rows; PSS with the workers still alive')
    for packed in (False, True):
        name = 'packed (StylishCaptionDataset now)' if packed else 'list of dicts (TorchCustomDataset, before)'
        single = epoch_pss(rows, 0, packed)
        multi = epoch_pss(rows, args.workers, packed)
        total = multi['main_kb'] + sum(multi['workers_kb'])
        print(f'{name}: -w 0 {single["main_kb"] / 1024:.0f} MiB; -w {args.workers}: main {multi["main_kb"] / 1024:.0f} '
              f'+ workers {" + ".join(f"{k / 1024:.0f}" for k in multi["workers_kb"])} = {total / 1024:.0f} MiB '
              f'({total / single["main_kb"]:.2f}x)')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if '--probe' in argv:
        split = argv.index('--')
        own = argparse.ArgumentParser()
        own.add_argument('--probe')
        own.add_argument('--stop-after', type=int, default=1)
        a = own.parse_args(argv[:split])
        return probe(a.probe, a.stop_after, argv[split + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=186_858)
    parser.add_argument('--startup', action='store_true', help='time finetune.py train to its first iteration')
    parser.add_argument('--pss', action='store_true', help='PSS of forked DataLoader workers over the rows')
    parser.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'bench_pcap_scale'),
                        help='where the PCap-scale data set is built (once) and the runs go')
    parser.add_argument('--workers', type=int, default=4)
    args = parser.parse_args(argv)
    if args.startup:
        return startup(args, argv)
    if args.pss:
        return pss(args, argv)
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ['HF_DATASETS_CACHE'] = os.path.join(tmp, 'hf_cache')
        print(f'{args.rows} rows; machine: {os.cpu_count()} CPUs')
        print(f'{"format":8} {"file MB":>8} {"1st read s":>10} {"read s":>7} {"peak MB":>8} {"rows MB":>8}')
        print('(peak MB: Python allocations while reading; rows MB: what the rows read hold afterwards)')
        for fmt in ('json', 'jsonl', 'csv', 'parquet'):
            path = Path(tmp) / f'train.{fmt}'
            write_rows(path, rows)
            first = measure(path)[0]
            seconds, peak, held, n = measure(path)
            assert n == args.rows
            print(f'{fmt:8} {path.stat().st_size / 1e6:8.1f} {first:10.2f} {seconds:7.2f} {peak / 1e6:8.0f} '
                  f'{held / 1e6:8.0f}')


if __name__ == '__main__':
    main()
