"""Style accuracy: does a caption carry the requested style? A style classifier of caption text.

The classifier is scikit-learn's TF-IDF of word 1-2 grams followed by a linear model, trained on the
train split's captions (one caption, one style label). Captions are normalised as ModelScope's OFA
caption preprocessor normalises training targets (lower case, punctuation deleted), so generated captions
(which have no punctuation) and human references are read alike.

Figures (all 0-1, like the other metrics):

- ``style_accuracy_top1`` / ``_top5``: share of generated captions whose requested style is the
  classifier's first / among its first five guesses.
- ``reference_style_accuracy_top1`` / ``_top5``: the same for the human references of the same rows
  (every reference of a row counts, against the row's style): the ceiling, i.e. how recognisable the
  style is in human text for this classifier.
- ``style_chance_top1``: 1 / number of styles the classifier knows.

Storage is plain data, never a pickle (loading a pickle runs code): ``classifier.json`` (styles,
settings, the train data's hash), ``vocabulary.json`` (the TF-IDF terms in column order) and
``weights.npz`` (idf, coef, intercept; read with ``allow_pickle=False``). The predictor is rebuilt from
these (scikit-learn's ``CountVectorizer`` with the stored vocabulary, then idf and l2 norm), and the
freshly trained classifier predicts through the same rebuilt form, so a stored copy predicts exactly
as the original did.

Caching: ``{work_dir}/style_classifier/{hash}/`` where the hash covers the train rows' style and text
(in order) and the classifier settings; a copy goes to ``{model_dir}/style_classifier/`` so a trained
model carries the classifier it was judged with.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from utils.core.errors import BadInput
from utils.core.layout import CLASSIFIER_DIR
from utils.core.io import read_json

logger = logging.getLogger(__name__)

FORMAT = 1
# Classifier settings; part of the cache key, so changing one retrains.
SETTINGS = {
    'ngram_range': [1, 2],          # word unigrams and bigrams
    'max_features': 50000,          # most frequent terms kept (coef: n_styles x this, stored as float16)
    'sublinear_tf': True,           # 1 + log(tf)
    'token_pattern': r'(?u)\b\w+\b',  # single-letter words count ("i am so worried")
    'model': 'ComplementNB',
    'alpha': 0.3,
}
FIGURE_KEYS = ('style_accuracy_top1', 'style_accuracy_top5', 'reference_style_accuracy_top1',
               'reference_style_accuracy_top5', 'style_chance_top1')
_DELETE_PUNCTUATION = str.maketrans({c: None for c in string.punctuation})


def normalise(text: str) -> str:
    """Lower case, punctuation deleted: what ModelScope's OFA caption preprocessor does to targets."""
    return text.lower().translate(_DELETE_PUNCTUATION)


def data_hash(rows: Iterable[dict]) -> str:
    """sha256 of the classifier settings and the rows' (style, text), in order."""
    h = hashlib.sha256(json.dumps({'format': FORMAT, 'settings': SETTINGS}, sort_keys=True).encode())
    for row in rows:
        h.update(row['style'].encode('utf-8') + b'\x1f' + row['text'].encode('utf-8') + b'\x1e')
    return h.hexdigest()


class StyleClassifier:
    """Caption text -> style scores. Build with :meth:`fit` or :meth:`load`."""

    def __init__(self, styles: List[str], vocabulary: List[str], idf: np.ndarray, coef: np.ndarray,
                 intercept: np.ndarray, meta: Optional[dict] = None):
        from sklearn.feature_extraction.text import CountVectorizer

        self.styles = list(styles)
        self.vocabulary = list(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float32)
        self.coef = np.asarray(coef, dtype=np.float16)            # (n_styles, n_features), as stored
        self.intercept = np.asarray(intercept, dtype=np.float32)  # (n_styles,)
        self.meta = dict(meta or {})
        if self.coef.shape != (len(self.styles), len(self.vocabulary)) or self.idf.shape != (len(self.vocabulary),) \
                or self.intercept.shape != (len(self.styles),):
            raise ValueError(f'style classifier arrays do not fit together: {len(self.styles)} styles, '
                             f'{len(self.vocabulary)} terms, coef {self.coef.shape}, idf {self.idf.shape}, '
                             f'intercept {self.intercept.shape}')
        self._index = {s: i for i, s in enumerate(self.styles)}
        self._weights = self.coef.astype(np.float32).T  # (n_features, n_styles) for X @ W
        self._counter = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                                        ngram_range=tuple(SETTINGS['ngram_range']),
                                        token_pattern=SETTINGS['token_pattern'], preprocessor=normalise,
                                        dtype=np.float32)

    # ---------------------------------------------------------------- training
    @classmethod
    def fit(cls, texts: Sequence[str], styles: Sequence[str], meta: Optional[dict] = None) -> 'StyleClassifier':
        """Train on (caption, style) pairs."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.naive_bayes import ComplementNB

        if len(texts) != len(styles) or not texts:
            raise ValueError(f'need one style per caption and at least one caption (got {len(texts)} captions, '
                             f'{len(styles)} styles)')
        start = time.time()
        vectorizer = TfidfVectorizer(ngram_range=tuple(SETTINGS['ngram_range']), max_features=SETTINGS['max_features'],
                                     sublinear_tf=SETTINGS['sublinear_tf'], token_pattern=SETTINGS['token_pattern'],
                                     preprocessor=normalise, dtype=np.float32)
        x = vectorizer.fit_transform(texts)
        labels = sorted(set(styles))
        index = {s: i for i, s in enumerate(labels)}
        y = np.array([index[s] for s in styles])
        model = ComplementNB(alpha=SETTINGS['alpha']).fit(x, y)
        vocabulary = [None] * len(vectorizer.vocabulary_)
        for term, i in vectorizer.vocabulary_.items():
            vocabulary[i] = term
        # ComplementNB's joint log likelihood is X @ feature_log_prob_.T (+ the class prior only when
        # there is a single class): a linear model, stored as coef/intercept.
        coef = model.feature_log_prob_
        intercept = model.class_log_prior_ if len(labels) == 1 else np.zeros(len(labels))
        meta = dict(meta or {}, n_train=len(texts), seconds=round(time.time() - start, 2))
        logger.info('style classifier: %d captions, %d styles, %d terms, trained in %.1f s',
                    len(texts), len(labels), len(vocabulary), time.time() - start)
        return cls(labels, vocabulary, vectorizer.idf_, coef, intercept, meta)

    # ---------------------------------------------------------------- prediction
    def features(self, texts: Sequence[str]):
        """TF-IDF rows (sparse, l2-normalised) as the trained TfidfVectorizer computes them."""
        from sklearn.preprocessing import normalize

        x = self._counter.transform(list(texts)).tocsr()
        if SETTINGS['sublinear_tf']:
            np.log(x.data, x.data)
            x.data += 1
        x = x.multiply(self.idf[None, :]).tocsr()
        return normalize(x, norm='l2', copy=False)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(n_texts, n_styles) scores; higher means more likely."""
        return np.asarray(self.features(texts) @ self._weights) + self.intercept[None, :]

    def top_k(self, texts: Sequence[str], k: int = 5) -> List[List[str]]:
        """The k most likely styles of each text, best first (ties broken by style order)."""
        s = self.scores(texts)
        order = np.argsort(-s, axis=1, kind='stable')[:, :k]
        return [[self.styles[j] for j in row] for row in order]

    def predict(self, texts: Sequence[str]) -> List[str]:
        return [ranked[0] for ranked in self.top_k(texts, 1)]

    def accuracy(self, texts: Sequence[str], styles: Sequence[str], ks: Tuple[int, ...] = (1, 5)
                 ) -> Dict[int, float]:
        """{k: share of texts whose style is among the classifier's k first guesses}. A style the
        classifier does not know counts as missed."""
        if not texts:
            return {k: float('nan') for k in ks}
        ranked = self.top_k(texts, max(ks))
        return {k: float(np.mean([s in r[:k] for s, r in zip(styles, ranked)])) for k in ks}

    # ---------------------------------------------------------------- plain-data storage
    def save(self, directory: str) -> str:
        """Write the three files into directory (created; replaced as a whole if it exists)."""
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix='.style_classifier.', dir=parent)
        try:
            with open(os.path.join(tmp, 'vocabulary.json'), 'w', encoding='utf-8') as f:
                json.dump(self.vocabulary, f, ensure_ascii=False)
            np.savez_compressed(os.path.join(tmp, 'weights.npz'), idf=self.idf, coef=self.coef,
                                intercept=self.intercept)
            info = dict(self.meta, format=FORMAT, settings=SETTINGS, styles=self.styles)
            with open(os.path.join(tmp, 'classifier.json'), 'w', encoding='utf-8') as f:
                json.dump(info, f, ensure_ascii=False, indent=1)
            if os.path.isdir(directory):
                old = directory + f'.old{os.getpid()}'
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str) -> 'StyleClassifier':
        """Rebuild from the plain-data files (no pickle). Raises ValueError for a broken or foreign dir."""
        try:
            with open(os.path.join(directory, 'classifier.json'), encoding='utf-8') as f:
                info = json.load(f)
            with open(os.path.join(directory, 'vocabulary.json'), encoding='utf-8') as f:
                vocabulary = json.load(f)
            with np.load(os.path.join(directory, 'weights.npz'), allow_pickle=False) as w:
                idf, coef, intercept = w['idf'], w['coef'], w['intercept']
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f'{directory}: not a readable style classifier ({exc})') from None
        if info.get('format') != FORMAT or info.get('settings') != SETTINGS:
            raise ValueError(f'{directory}: style classifier of another format or settings')
        meta = {k: v for k, v in info.items() if k not in ('format', 'settings', 'styles')}
        return cls(info['styles'], vocabulary, idf, coef, intercept, meta)


# -------------------------------------------------------------------- cache

def _try_load(directory: str, want_hash: Optional[str]) -> Optional[StyleClassifier]:
    if not os.path.isfile(os.path.join(directory, 'classifier.json')):
        return None
    try:
        clf = StyleClassifier.load(directory)
    except ValueError as exc:
        logger.warning('%s', exc)
        return None
    if want_hash is not None and clf.meta.get('data_hash') != want_hash:
        return None
    return clf


def _carried_hash(directory: str) -> Optional[str]:
    """The data hash of a stored classifier of this format and settings, read from its small
    classifier.json only (None: no such classifier there)."""
    try:
        info = read_json(os.path.join(directory, 'classifier.json'), 'style classifier')
    except (BadInput, OSError):
        return None
    if not isinstance(info, dict) or info.get('format') != FORMAT or info.get('settings') != SETTINGS:
        return None
    return info.get('data_hash')


def classifier_for_rows(rows: Sequence[dict], work_dir: str, model_dir: Optional[str] = None) -> StyleClassifier:
    """The style classifier of these train rows: from the cache in work_dir, else the copy in model_dir
    (when trained on the same data), else trained now and cached. A copy is kept in model_dir."""
    digest = data_hash(rows)
    cached = os.path.join(work_dir, CLASSIFIER_DIR, digest[:16])
    carried = os.path.join(model_dir, CLASSIFIER_DIR) if model_dir else None
    carried_ok = False  # the model dir already holds this classifier
    clf = _try_load(cached, digest)
    if clf is not None:
        logger.info('style classifier from the cache: %s', cached)
        carried_ok = bool(carried) and _carried_hash(carried) == digest  # its classifier.json only
    elif carried and (clf := _try_load(carried, digest)) is not None:
        logger.info('style classifier from the model dir: %s', carried)
        clf.save(cached)
        carried_ok = True
    else:
        clf = StyleClassifier.fit([r['text'] for r in rows], [r['style'] for r in rows],
                                  meta={'data_hash': digest})
        clf.save(cached)
        logger.info('style classifier cached in %s', cached)
    if carried and not carried_ok:
        try:
            clf.save(carried)
            logger.info('style classifier copied to the model dir: %s', carried)
        except OSError as exc:
            logger.warning('could not keep a copy of the style classifier in %s: %s', carried, exc)
    return clf


def classifier_for_conf(conf, model_dir: Optional[str] = None) -> Tuple[Optional[StyleClassifier], str]:
    """(classifier or None, status line) for a conf: trained on (or cached for) its train split; when the
    train split cannot be read, the copy kept in model_dir, whatever data it was trained on."""
    from utils.core.errors import DataError
    from utils.data.rows import load_split

    try:
        rows, _ = load_split(conf, 'train', check_images=False)
    except DataError as exc:
        carried = os.path.join(model_dir, CLASSIFIER_DIR) if model_dir else None
        clf = _try_load(carried, None) if carried else None
        if clf is not None:
            logger.warning('train split unreadable (%s); using the style classifier kept in %s', exc, carried)
            return clf, f'style classifier kept with the model ({carried}); the train split was unreadable'
        return None, f'style accuracy unavailable: the train split is needed to train the style classifier ({exc})'
    clf = classifier_for_rows(rows, conf.run.work_dir, model_dir)
    return clf, f'style classifier trained on {len(rows)} train captions, {len(clf.styles)} styles'


def find_carried_classifier(candidates: Iterable[Optional[str]]) -> Tuple[Optional[StyleClassifier], str]:
    """The first readable ``style_classifier/`` inside one of the candidate model dirs."""
    tried = []
    for model_dir in candidates:
        if not model_dir or not os.path.isdir(model_dir):
            continue
        directory = os.path.join(model_dir, CLASSIFIER_DIR)
        tried.append(directory)
        clf = _try_load(directory, None)
        if clf is not None:
            return clf, f'style classifier kept with the model ({directory})'
    where = ', '.join(tried) if tried else 'no local model dir named in the file'
    return None, f'style accuracy unavailable: no style classifier found ({where}); pass --conf C to train one from the conf\'s train split'


# -------------------------------------------------------------------- the figures

def reference_hits(clf: StyleClassifier, styles: Sequence[str], references: Sequence[Sequence[str]]
                   ) -> List[Tuple[int, int, int]]:
    """For each row: (its references the classifier ranks first for the row's style, ... among its first five,
    its number of references)."""
    ref_texts = [t for refs in references for t in refs]
    ranked = clf.top_k(ref_texts, 5) if ref_texts else []
    out, start = [], 0
    for style, refs in zip(styles, references):
        mine = ranked[start:start + len(refs)]
        start += len(refs)
        out.append((sum(r[0] == style for r in mine), sum(style in r for r in mine), len(refs)))
    return out


def judge(clf: StyleClassifier, styles: Sequence[str], captions: Sequence[str], references: Sequence[Sequence[str]],
          ref_hits: Optional[List[Tuple[int, int, int]]] = None) -> Tuple[List[List[str]], List[Tuple[int, int, int]]]:
    """The classifier's verdicts on each row: (its five first guesses for the generated caption, best first;
    :func:`reference_hits`). ``ref_hits``: the rows' reference verdicts when already known (they do not change
    between two validations)."""
    unknown = sorted(set(styles) - set(clf.styles))
    if unknown:
        logger.warning('%d requested style(s) never seen in the train split count as misses: %s',
                       len(unknown), ', '.join(unknown[:5]))
    return clf.top_k(captions, 5), ref_hits if ref_hits is not None else reference_hits(clf, styles, references)


def style_figures(clf: Optional[StyleClassifier], styles: Sequence[str], captions: Sequence[str],
                  references: Sequence[Sequence[str]], status: str = '', verdicts=None
                  ) -> Tuple[dict, List[Optional[str]]]:
    """(metrics dict with FIGURE_KEYS and ``style_status``, the predicted style of each caption).

    Generated captions are judged against their row's requested style; every reference of a row against
    that row's style. Without a classifier every figure is None (never a silent 0). ``verdicts``: what
    :func:`judge` returned for these rows, when the caller has it."""
    if clf is None:
        return {**{k: None for k in FIGURE_KEYS}, 'style_status': status}, [None] * len(captions)
    ranked, ref_hits = verdicts if verdicts is not None else judge(clf, styles, captions, references)
    gen = {k: float(np.mean([s in r[:k] for s, r in zip(styles, ranked)])) if captions else None for k in (1, 5)}
    n_refs = sum(h[2] for h in ref_hits)
    ref = {k: sum(h[i] for h in ref_hits) / n_refs if n_refs else None for i, k in ((0, 1), (1, 5))}
    figures = {
        'style_accuracy_top1': gen[1], 'style_accuracy_top5': gen[5],
        'reference_style_accuracy_top1': ref[1], 'reference_style_accuracy_top5': ref[5],
        'style_chance_top1': 1.0 / len(clf.styles),
        'style_status': status,
    }
    return figures, [r[0] for r in ranked]
