"""CIDEr-D as a per-caption reward, with document frequencies computed once from the train references.

The arithmetic is ModelScope's ``modelscope/metrics/ciderD`` (the CIDEr-D of OFA's SCST stage, Vedantam et
al.'s code): n-grams 1..4, tf-idf vectors with idf ``log(N documents) - log(max(1, df))``, clipped cosine
similarity, a Gaussian length penalty (sigma 6), averaged over n and over the references, times 10. The
document frequencies are not taken from the batch being scored (as ``df='corpus'`` would) but from the
train references, as OFA's recipe does: a document is the reference set of one (image, style) pair.

Texts are normalised as ModelScope's caption preprocessor normalises training targets (and its
postprocess the generated captions): punctuation removed, lower-cased, split on white space.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter, defaultdict
from typing import Dict, List, Sequence, Tuple

from utils.core.io import write_json_atomic
from utils.evaluation.style_classifier import normalise

logger = logging.getLogger(__name__)
N = 4
SIGMA = 6.0

Ngram = Tuple[str, ...]


def words(text: str) -> List[str]:
    return normalise(text).split()  # the style classifier's normalisation: lower case, no punctuation


def ngram_counts(text: str, n: int = N) -> Counter:
    w = words(text)
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


class CiderD:
    """``CiderD(df, n_documents).scores(candidates, references)``: one CIDEr-D value per candidate."""

    def __init__(self, document_frequency: Dict[Ngram, float], n_documents: int, n: int = N, sigma: float = SIGMA):
        self.df, self.n, self.sigma = document_frequency, n, sigma
        self.ref_len = math.log(float(n_documents))

    @classmethod
    def from_references(cls, groups: Sequence[Sequence[str]]) -> 'CiderD':
        """Document frequencies of the n-grams of each reference set (one set = one document)."""
        df: Dict[Ngram, float] = defaultdict(float)
        for refs in groups:
            for gram in {g for ref in refs for g in ngram_counts(ref)}:
                df[gram] += 1
        return cls(dict(df), len(groups))

    @classmethod
    def cached(cls, work_dir: str, groups: Sequence[Sequence[str]]) -> 'CiderD':
        """As :meth:`from_references`, computed once and kept in ``work_dir/cider_df_{digest}.json`` (the digest of
        the references: other train data gets its own file)."""
        digest = hashlib.sha1(json.dumps([list(g) for g in groups]).encode()).hexdigest()[:16]
        path = os.path.join(work_dir, f'cider_df_{digest}.json')
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                saved = json.load(f)
            logger.info('CIDEr-D document frequencies from %s', path)
            return cls({tuple(k.split(' ')): v for k, v in saved['df'].items()}, saved['documents'])
        scorer = cls.from_references(groups)
        os.makedirs(work_dir, exist_ok=True)
        write_json_atomic(path, {'documents': len(groups), 'df': {' '.join(k): v for k, v in scorer.df.items()}})
        logger.info('CIDEr-D document frequencies of %d train reference sets written to %s', len(groups), path)
        return scorer

    def _vector(self, counts: Counter):
        vec = [dict() for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (self.ref_len - math.log(max(1.0, self.df.get(gram, 0.0))))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # as the reference code: the "length" is the number of bigrams
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def _sim(self, hyp, ref) -> List[float]:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma ** 2))
        out = []
        for k in range(self.n):
            val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
            if nh[k] != 0 and nr[k] != 0:
                val /= nh[k] * nr[k]
            out.append(val * penalty)
        return out

    def score(self, candidate: str, references: Sequence[str]) -> float:
        hyp = self._vector(ngram_counts(candidate, self.n))
        total = [0.0] * self.n
        for ref in references:
            for k, v in enumerate(self._sim(hyp, self._vector(ngram_counts(ref, self.n)))):
                total[k] += v
        return sum(total) / self.n / len(references) * 10.0

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> List[float]:
        return [self.score(c, refs) for c, refs in zip(candidates, references)]
