"""Style classifier at Personality-Captions scale: training time and scoring speed on a synthetic set of
186k captions x 215 styles (the real train split's size), on whatever CPU this runs.

Synthetic captions: 6-15 words drawn from a Zipf vocabulary of 20k words, plus 1-3 "marker" words of
the caption's style (30% of captions take their markers from a random style instead: label noise), so
accuracy figures say only that the classifier learns; the times are the point.

    python -m bench.bench_style_classifier [--rows 186000] [--styles 215]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from utils.evaluation.style_classifier import StyleClassifier


def synthetic(rows: int, styles: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = 20000
    zipf = 1 / np.arange(1, vocab + 1)
    zipf /= zipf.sum()
    markers = rng.integers(0, vocab, size=(styles, 40))
    labels = rng.integers(0, styles, size=rows)
    words = rng.choice(vocab, size=(rows, 15), p=zipf)
    lengths = rng.integers(6, 16, size=rows)
    source = np.where(rng.random(rows) < 0.3, rng.integers(0, styles, size=rows), labels)
    picked = markers[source[:, None], rng.integers(0, 40, size=(rows, 3))]
    n_markers = rng.integers(1, 4, size=rows)
    texts = []
    for i in range(rows):
        ws = [f'w{w}' for w in words[i, :lengths[i]]] + [f'w{m}' for m in picked[i, :n_markers[i]]]
        rng.shuffle(ws)
        texts.append(' '.join(ws))
    return texts, [f'Style{y}' for y in labels]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='python -m bench.bench_style_classifier')
    parser.add_argument('--rows', type=int, default=186000)
    parser.add_argument('--styles', type=int, default=215)
    args = parser.parse_args(argv)
    start = time.time()
    texts, styles = synthetic(args.rows + 10000, args.styles)
    print(f'synthetic set: {args.rows} + 10000 held-out captions, {args.styles} styles ({time.time() - start:.1f} s)')
    start = time.time()
    clf = StyleClassifier.fit(texts[:args.rows], styles[:args.rows])
    fit = time.time() - start
    start = time.time()
    acc = clf.accuracy(texts[args.rows:], styles[args.rows:])
    score = time.time() - start
    print(f'fit (TF-IDF 1-2 grams + ComplementNB): {fit:.1f} s; {len(clf.vocabulary)} terms')
    print(f'scoring 10000 captions (top-1 and top-5): {score:.2f} s')
    print(f'held-out accuracy top-1 {acc[1]:.3f}, top-5 {acc[5]:.3f} (chance {1 / args.styles:.4f})')


if __name__ == '__main__':
    main()
