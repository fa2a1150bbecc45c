"""What watching a run and the per-style figures cost, at Personality-Captions scale, on whatever CPU this runs:

- the style figures of an eval of 10,000 test rows x 5 references over 215 styles: before (overall figures only:
  the classifier's top-5 of the captions and of the references) and now (the same verdicts once, then the overall
  and the per-style figures and the confusions, :mod:`utils.evaluation.per_style`);
- the eval page's per-style section for 215 styles;
- the TensorBoard hook per optimizer step (collecting the log buffer, writing loss, lr, reward, baseline).

Synthetic captions from :func:`bench.bench_style_classifier.synthetic` (the times are the point).

    python -m bench.bench_watch_and_styles [--train 50000] [--test 10000] [--styles 215] [--steps 2000]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from types import SimpleNamespace

from bench.bench_style_classifier import synthetic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='python -m bench.bench_watch_and_styles')
    parser.add_argument('--train', type=int, default=50000)
    parser.add_argument('--test', type=int, default=10000)
    parser.add_argument('--styles', type=int, default=215)
    parser.add_argument('--steps', type=int, default=2000)
    args = parser.parse_args(argv)
    print(f'{time.strftime("%Y-%m-%d %H:%M")}; {platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, '
          f'Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}')
    print('command: python -m bench.bench_watch_and_styles ' + ' '.join(sys.argv[1:] if argv is None else argv))

    from utils.evaluation.per_style import per_style_figures
    from utils.evaluation.report import _per_style_section
    from utils.evaluation.style_classifier import StyleClassifier, judge, style_figures

    n_refs = 5
    texts, styles = synthetic(args.train + args.test * (1 + n_refs), args.styles)
    clf = StyleClassifier.fit(texts[:args.train], styles[:args.train])
    rest, rest_styles = texts[args.train:], styles[args.train:]
    captions, row_styles = rest[:args.test], rest_styles[:args.test]
    refs = [rest[args.test + i * n_refs: args.test + (i + 1) * n_refs] for i in range(args.test)]
    cider = [(i % 97) / 50 for i in range(args.test)]

    start = time.perf_counter()  # the figures as before: top-5 of the captions, accuracy of the references
    clf.top_k(captions, 5)
    clf.accuracy([t for r in refs for t in r], [s for s, r in zip(row_styles, refs) for _ in r])
    before = time.perf_counter() - start
    start = time.perf_counter()
    verdicts = judge(clf, row_styles, captions, refs)
    style_figures(clf, row_styles, captions, refs, verdicts=verdicts)
    shared = time.perf_counter() - start
    start = time.perf_counter()
    figures = per_style_figures(row_styles, cider, *verdicts)
    per_style = time.perf_counter() - start
    start = time.perf_counter()
    page = _per_style_section(figures)
    page_s = time.perf_counter() - start
    print(f'style figures of {args.test} rows x {n_refs} references, {args.styles} styles: before {before:.2f} s; '
          f'now {shared:.2f} s (verdicts + overall figures) + {per_style * 1000:.1f} ms (per style, confusions)')
    print(f'eval page per-style section ({len(figures["per_style"])} styles): {page_s * 1000:.1f} ms, '
          f'{len(page) / 1024:.0f} KiB; per_style in the JSON: {len(str(figures)) / 1024:.0f} KiB')

    import torch
    from modelscope.trainers.utils.log_buffer import LogBuffer
    from utils.training.tensorboard import TensorboardHook
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SimpleNamespace(iter=0, log_buffer=LogBuffer(), optimizer=optimizer)
        hook = TensorboardHook(os.path.join(tmp, 'run'), log_interval=1)
        hook.before_run(trainer)
        hook.before_train_epoch(trainer)
        start = time.perf_counter()
        for i in range(args.steps):
            trainer.iter = i
            hook.before_train_iter(trainer)
            trainer.log_buffer.update({'loss': 1.0 / (i + 1), 'reward': 0.5, 'baseline': 0.4, 'iter_time': 0.1})
            hook.after_train_iter(trainer)
        hook.after_run(trainer)
        per_step = (time.perf_counter() - start) / args.steps
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    print(f'TensorBoard hook, {args.steps} steps, 4 scalars each (log_interval 1): {per_step * 1e3:.3f} ms/step, '
          f'event files {size / 1024:.0f} KiB')


if __name__ == '__main__':
    main()
