"""utils.metrics: pycocoevalcap's exact numbers, all references counting, the SPICE fallback, the CLI.

METEOR's Java process takes ~10 s to load, so the whole module shares one (patched in for
utils.metrics' own), and the expected values are computed with that same process.
"""
import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from utils.evaluation import scoring as metrics

ROOT = Path(__file__).resolve().parents[1]
REAL_MISSING_SPICE_JARS = metrics.missing_spice_jars  # before the module fixture patches it
STANDARD = ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr')

# Several images with 1 to 5 references each; capitals and punctuation exercise the PTB tokenizer.
PREDICTIONS = [
    'A dog runs across the green grass.',
    'Two cats are sleeping on a sofa!',
    'a man rides a red bike down the street',
    'This sunset is so beautiful, I love it.',
    'A plate of food.',
]
REFERENCES = [
    ['A brown dog is running on the grass.'],
    ['Two cats sleep on the couch.', 'A pair of cats napping on a sofa.'],
    ['A man riding a red bicycle.', 'Someone cycles down a city street.', 'A man on a bike in the street.'],
    ['What a beautiful sunset!', 'I love how the sky glows.', 'The sunset makes me so happy.',
     'Gorgeous colours in the evening sky.'],
    ['A plate with food on it.', 'Some food on a white plate.', 'Dinner is served.',
     'A plate of pasta.', 'Food.'],
]


class _SpiceSpy:
    """Stands in for pycocoevalcap's Spice: records that someone tried to construct it."""
    created = []

    def __init__(self):
        _SpiceSpy.created.append(self)

    def compute_score(self, gts, res):
        raise AssertionError('SPICE must not run in these tests')


@pytest.fixture(scope='module', autouse=True)
def shared_meteor():
    """One METEOR process for the module; SPICE's jars reported missing and Spice spied on."""
    meteor = Meteor()

    @contextlib.contextmanager
    def reuse():
        yield meteor

    mp = pytest.MonkeyPatch()
    mp.setattr(metrics, '_meteor_scorer', reuse)
    mp.setattr(metrics, 'missing_spice_jars', lambda: list(metrics.spice_jar_paths()))
    mp.setattr(metrics, 'Spice', _SpiceSpy)
    yield meteor
    mp.undo()
    metrics._stop_meteor(meteor)


def coco_scores(predictions, references, meteor):
    """The numbers pycocoevalcap itself gives (COCOEvalCap.evaluate's flow, without SPICE)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{'caption': r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{'caption': p}] for i, p in enumerate(predictions)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = dict(zip(('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4'), bleu))
    out['METEOR'], _ = meteor.compute_score(gts, res)
    out['ROUGE_L'], _ = Rouge().compute_score(gts, res)
    out['CIDEr'], _ = Cider().compute_score(gts, res)
    return out


@pytest.fixture(scope='module')
def hand_case(shared_meteor):
    """(our metrics, pycocoevalcap's) on the hand-made case, SPICE left on auto."""
    ours = metrics.score(PREDICTIONS, REFERENCES)
    return ours, coco_scores(PREDICTIONS, REFERENCES, shared_meteor)


def write_inference(path, rows):
    path.write_text(json.dumps({'model_name': 'tiny', 'model_revision': None,
                                'n_eval_sample': len(rows), 'results': rows}))
    return str(path)


# ---------------------------------------------------------------- score()

def test_matches_pycocoevalcap_exactly(hand_case):
    ours, expected = hand_case
    for name in STANDARD:
        assert ours[name] == pytest.approx(expected[name], rel=1e-9, abs=0), name
        assert type(ours[name]) is float
    assert ours['n_samples'] == len(PREDICTIONS)
    assert 0 < ours['Bleu_4'] < ours['Bleu_1'] <= 1 and ours['CIDEr'] > 0


# pycocoevalcap 1.2's own figures for PREDICTIONS/REFERENCES, computed once outside this toolkit (PTBTokenizer,
# then Bleu(4), Meteor, Rouge, Cider .compute_score on the tokenized captions, in a separate process) and
# pinned here, so a change in how the toolkit calls pycocoevalcap cannot move both sides of the comparison.
PINNED = {'Bleu_1': 0.7428571428359184, 'Bleu_2': 0.47207747546705403, 'Bleu_3': 0.26123950274223867,
          'Bleu_4': 3.072710449898625e-05, 'METEOR': 0.328526289864485, 'ROUGE_L': 0.5881045791640312,
          'CIDEr': 1.4168952697765236}


def test_figures_pinned_to_an_independent_pycocoevalcap_run(hand_case):
    ours, _ = hand_case
    for name, value in PINNED.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name


def test_spice_unavailable_without_jars(hand_case):
    ours, _ = hand_case
    assert ours['SPICE'] is None
    assert ours['spice_status'].startswith('SPICE unavailable')
    assert metrics.SPICE_INSTALL_COMMAND in ours['spice_status']
    assert 'get_stanford_models()' in ours['spice_status']
    assert _SpiceSpy.created == []  # never constructed, so no download attempt
    assert all(isinstance(ours[name], float) for name in STANDARD)
    assert list(ours)[:8] == list(metrics.METRIC_NAMES)


def test_install_command_names_a_real_function():
    from pycocoevalcap.spice.get_stanford_models import get_stanford_models
    assert callable(get_stanford_models)
    assert 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models' in metrics.SPICE_INSTALL_COMMAND


def test_missing_jar_detection(tmp_path, monkeypatch):
    jars = [str(tmp_path / 'stanford-corenlp-3.6.0.jar'), str(tmp_path / 'stanford-corenlp-3.6.0-models.jar')]
    monkeypatch.setattr(metrics, 'spice_jar_paths', lambda: jars)
    real_missing = REAL_MISSING_SPICE_JARS  # the module fixture patches metrics.missing_spice_jars
    assert real_missing() == jars
    Path(jars[0]).write_bytes(b'')
    assert real_missing() == jars[1:]
    Path(jars[1]).write_bytes(b'')
    assert real_missing() == []
    assert [os.path.basename(p) for p in metrics.spice_jar_paths()] == [
        'stanford-corenlp-3.6.0.jar', 'stanford-corenlp-3.6.0-models.jar']


def test_spice_runtime_failure_is_reported_not_raised(monkeypatch):
    class Broken:
        def compute_score(self, gts, res):
            raise RuntimeError('java exploded\nsecond line of the trace')

    monkeypatch.setattr(metrics, 'missing_spice_jars', lambda: [])
    monkeypatch.setattr(metrics, 'Spice', Broken)
    value, status = metrics._spice_score({0: ['a b']}, {0: ['a b']}, None)
    assert value is None
    assert status.startswith('SPICE unavailable') and 'java exploded' in status
    assert 'second line' not in status


def test_spice_paths_when_present_or_skipped(monkeypatch):
    class Fake:
        value = 0.25

        def compute_score(self, gts, res):
            return Fake.value, []

    monkeypatch.setattr(metrics, 'missing_spice_jars', lambda: [])
    monkeypatch.setattr(metrics, 'Spice', Fake)
    assert metrics._spice_score({0: ['a']}, {0: ['a']}, None) == (0.25, metrics.SPICE_COMPUTED)
    assert metrics._spice_score({0: ['a']}, {0: ['a']}, False) == (None, metrics.SPICE_SKIPPED)
    Fake.value = math.nan
    value, status = metrics._spice_score({0: ['a']}, {0: ['a']}, True)
    assert value is None and status.startswith('SPICE unavailable')


def test_all_references_count():
    preds = ['a small boat floats on a calm lake', 'a child plays with a ball', 'an old red barn in a field']
    refs = [['people swim at the beach', 'a large ship in the harbour', 'a small boat floats on a calm lake'],
            ['a kid playing with a ball'], ['a red barn in a green field']]
    with_all = metrics.score(preds, refs, spice=False)
    first_only = metrics.score(preds, [refs[0][:1]] + refs[1:], spice=False)
    assert with_all['Bleu_4'] > first_only['Bleu_4']
    assert with_all['CIDEr'] > first_only['CIDEr']
    assert with_all['METEOR'] > first_only['METEOR']
    assert with_all['SPICE'] is None and with_all['spice_status'] == metrics.SPICE_SKIPPED


def test_line_breaks_inside_captions_do_not_shift_samples():
    # pycocoevalcap only replaces '\n'; a '\r' or '\u2028' would split the caption for Java's
    # tokenizer and move every later caption onto the wrong sample.
    gts, res = metrics.tokenize(['two\rcats', 'x\u2028y', 'A dog.'], [['a\r\nb'], ['c'], ['d', 'e']])
    assert res == {0: ['two cats'], 1: ['x y'], 2: ['a dog']}
    assert gts == {0: ['a b'], 1: ['c'], 2: ['d', 'e']}


@pytest.mark.parametrize('predictions, references, message', [
    (['a', 'b'], [['a']], '2 predictions but 1'),
    (['a', 'b'], [['a'], []], 'references[1] is empty'),
    ([], [], 'no samples'),
])
def test_bad_arguments_raise_value_error(predictions, references, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        metrics.score(predictions, references)


# ---------------------------------------------------------------- format_table()

def test_format_table():
    table = metrics.format_table({'Bleu_1': 0.61234, 'Bleu_4': 0.05, 'CIDEr': 0.9, 'SPICE': None,
                                  'n_samples': 3, 'spice_status': 'SPICE unavailable: because'})
    lines = table.splitlines()
    assert 'x100' in lines[0]
    assert any(line.split() == ['Bleu_1', '61.2'] for line in lines)
    assert any(line.split() == ['CIDEr', '90.0'] for line in lines)
    assert any(line.split() == ['SPICE', 'n/a'] for line in lines)
    assert lines[-1] == 'SPICE unavailable: because'
    assert 'unavailable' not in metrics.format_table({'Bleu_1': 0.5, 'SPICE': 0.2, 'spice_status': 'SPICE computed'})


# ---------------------------------------------------------------- command line

def test_cli_beside_input_string_and_list_references_and_skips(tmp_path, capsys, caplog):
    rows = [
        {'style': 'happy', 'image': '1', 'caption': 'A dog runs on the grass.', 'reference': 'A dog running on grass.'},
        {'style': 'sad', 'image': '2', 'caption': 'two cats on a sofa', 'reference': ['Two cats sleep.', 'Cats on a couch.']},
        {'style': 'sad', 'image': '3', 'caption': 'no reference here'},
        {'style': 'sad', 'image': '4', 'caption': 'a red car', 'reference': ['a red car parked', 'the car is red']},
        {'style': 'odd', 'image': '5', 'caption': 'null reference', 'reference': None},
    ]
    path = write_inference(tmp_path / 'infer_test.json', rows)
    caplog.set_level('INFO', logger='utils.metrics')
    assert metrics.main([path]) == 0
    out = tmp_path / 'infer_test_metrics.json'
    payload = json.loads(out.read_text())
    assert payload['input'] == path and payload['n_scored'] == 3 and payload['n_skipped'] == 2
    expected = metrics.score([rows[0]['caption'], rows[1]['caption'], rows[3]['caption']],
                             [[rows[0]['reference']], rows[1]['reference'], rows[3]['reference']])
    style = {k: payload['metrics'].pop(k) for k in list(payload['metrics']) if 'style' in k}
    assert payload['metrics'] == expected
    assert payload['metrics']['SPICE'] is None
    # no style classifier anywhere (no --conf, no model dir): the style figures are null, with the reason
    assert style['style_accuracy_top1'] is None and '--conf' in style['style_status']
    stdout = capsys.readouterr().out
    assert 'x100' in stdout and 'SPICE' in stdout and 'n/a' in stdout
    assert 'skipped 2' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['infer_test.json', 'infer_test_metrics.json']


def test_cli_output_option(tmp_path, capsys):
    rows = [{'style': 's', 'image': str(i), 'caption': f'a photo of thing {i}', 'reference': [f'a picture of thing {i}']}
            for i in range(3)]
    path = write_inference(tmp_path / 'infer.json', rows)
    out = tmp_path / 'sub_metrics.json'
    assert metrics.main([path, '-o', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload['n_scored'] == 3 and payload['n_skipped'] == 0
    assert set(metrics.METRIC_NAMES) <= set(payload['metrics'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['infer.json', 'sub_metrics.json']
    assert 'x100' in capsys.readouterr().out


GOOD_ROW = {'style': 's', 'image': '1', 'caption': 'a cat', 'reference': 'a cat'}


@pytest.mark.parametrize('content, needles', [
    ('{"results": [', ['not valid JSON']),
    (json.dumps({'model_name': 'm', 'n_eval_sample': 0}), ['"results" list']),
    (json.dumps([GOOD_ROW]), ['"results" list']),
    (json.dumps({'results': [GOOD_ROW, dict(GOOD_ROW, caption=7)]}), ['row 2', '"caption"']),
    (json.dumps({'results': [GOOD_ROW, ['not', 'an', 'object']]}), ['row 2', 'object']),
    (json.dumps({'results': [GOOD_ROW, dict(GOOD_ROW, reference=3)]}), ['row 2', '"reference"']),
    (json.dumps({'results': [{'caption': 'a cat'}]}), ['no', 'reference']),
])
def test_cli_bad_file(tmp_path, capsys, content, needles):
    path = tmp_path / 'bad.json'
    path.write_text(content)
    assert metrics.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert str(path) in err
    for needle in needles:
        assert needle in err
    assert [p.name for p in tmp_path.iterdir()] == ['bad.json']


def test_cli_missing_file_as_a_process(tmp_path):
    """The real entry point: exit 2, one error line, no traceback, nothing written."""
    missing = tmp_path / 'nope.json'
    proc = subprocess.run([sys.executable, '-m', 'utils.metrics', str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: ') and str(missing) in proc.stderr
    assert proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr
    assert proc.stdout == '' and list(tmp_path.iterdir()) == []


def test_import_does_not_pull_in_torch_or_modelscope():
    code = "import sys, utils.metrics; print(sorted(m for m in ('torch', 'modelscope') if m in sys.modules))"
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'
