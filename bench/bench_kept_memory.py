"""Freed memory kept for reuse (utils/core/memory.py) against glibc's defaults: the Captioner at OFA-tiny size.

    python3 -m bench.bench_kept_memory [--passes 5]

Each setting runs in its own fresh process (the setting is process-wide): the random OFA-tiny-sized model of
bench_real_sizes, its 32 images, batch 16, beam 5, max_len 16, no-repeat 3, mask off; one untimed warm-up call on 2
images, then --passes passes over the 32 images. Printed per pass: seconds per caption, user and system CPU seconds
and minor page faults of the pass (getrusage), and the resident memory after it (/proc/self/statm). Captions of the
two processes' last passes are compared.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(keep: bool, passes: int) -> None:
    import resource
    sys.path.insert(0, ROOT)
    if keep:
        from utils.core.memory import keep_freed_memory
        assert keep_freed_memory(), 'not glibc: nothing to measure'
    from bench.bench_real_sizes import STYLE, build_assets
    from utils.captioning.captioner import Captioner
    from utils.core.conf import GenerationConf
    with tempfile.TemporaryDirectory() as root:
        model_dir, images = build_assets(root, 'tiny', 32)
        items = [{'image': i, 'style': STYLE} for i in images]
        captioner = Captioner(model_dir, GenerationConf(beam_size=5, max_len=16, no_repeat_ngram_size=3,
                                                        mask_image_tokens=False), device='cpu')
        captioner.caption(items[:2], batch_size=16, progress=False)
        rows = []
        for _ in range(passes):
            r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            captions = captioner.caption(items, batch_size=16, progress=False)
            seconds, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
            rows.append({'s_per_caption': seconds / len(items), 'user': r1.ru_utime - r0.ru_utime,
                         'sys': r1.ru_stime - r0.ru_stime, 'minflt': r1.ru_minflt - r0.ru_minflt,
                         'rss_mib': rss >> 20})
    print('RESULT ' + json.dumps({'rows': rows, 'captions': captions}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--passes', type=int, default=5)
    p.add_argument('--child', choices=['default', 'kept'], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child == 'kept', args.passes)
        return 0
    print(f'date: {datetime.datetime.now().isoformat(timespec="seconds")}; command: python3 -m bench.bench_kept_memory '
          f'--passes {args.passes}')
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load average '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}; C library {" ".join(platform.libc_ver())}')
    results = {}
    for setting in ('default', 'kept'):
        proc = subprocess.run([sys.executable, '-m', 'bench.bench_kept_memory', '--child', setting,
                               '--passes', str(args.passes)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results[setting] = json.loads(next(line for line in proc.stdout.splitlines()
                                           if line.startswith('RESULT '))[len('RESULT '):])
        print(f'\n{setting}: pass, s/caption, user s, sys s, minor faults, resident MiB')
        for i, r in enumerate(results[setting]['rows'], 1):
            print(f'  {i}  {r["s_per_caption"]:.4f}  {r["user"]:6.2f}  {r["sys"]:5.2f}  {r["minflt"]:7d}  {r["rss_mib"]}')
    best = {s: min(r['s_per_caption'] for r in results[s]['rows'][1:] or results[s]['rows']) for s in results}
    same = results['default']['captions'] == results['kept']['captions']
    print(f'\nbest pass after the first: default {best["default"]:.4f}, kept {best["kept"]:.4f} s/caption '
          f'({best["default"] / best["kept"]:.2f}x); captions identical: {same}')
    return 0 if same else 1


if __name__ == '__main__':
    sys.exit(main())
