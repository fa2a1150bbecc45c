"""Scoring benchmark: utils.metrics.score on N synthetic predictions with 5 references each (BLEU-1..4,
METEOR, ROUGE-L, CIDEr; no SPICE), the size of the Personality-Captions test set.

    python3 -m bench.bench_metrics [--samples 10000] [--refs 5]

Prints the wall time and the per-metric values (pycocoevalcap's own scorers do the work).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ('a the dog cat man woman red blue green sky tree car street happy sad lovely old new big small '
         'running sitting under over near beautiful boring wow great another how original love worried').split()


def sentence(rng: random.Random) -> str:
    return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--samples', type=int, default=10000)
    p.add_argument('--refs', type=int, default=5)
    args = p.parse_args(argv)

    from utils.evaluation.scoring import score
    rng = random.Random(0)
    preds = [sentence(rng) for _ in range(args.samples)]
    refs = [[sentence(rng) for _ in range(args.refs)] for _ in range(args.samples)]
    t = time.perf_counter()
    metrics = score(preds, refs, spice=False)
    elapsed = time.perf_counter() - t
    print(f'machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus')
    print(f'{args.samples} predictions x {args.refs} references, no SPICE: {elapsed:.1f} s')
    print(', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if isinstance(v, float)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
