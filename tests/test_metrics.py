"""utils.metrics: pycocoevalcap's exact numbers, all references counting, the SPICE fallback, the CLI.

METEOR's Java process takes ~10 s to load: the whole session shares one (tests/conftest.py, through
utils.evaluation.scoring.shared_meteor), and the expected values are computed with that same process.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import coco_scores
from utils import metrics
from utils.evaluation import scoring
from utils.evaluation.table import format_table

ROOT = Path(__file__).resolve().parents[1]
REAL_MISSING_SPICE_JARS = scoring.missing_spice_jars  # before the module fixture patches it
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
def no_spice():
    """SPICE's jars reported missing and Spice spied on."""
    mp = pytest.MonkeyPatch()
    mp.setattr(scoring, 'missing_spice_jars', lambda: list(scoring.spice_jar_paths()))
    mp.setattr(scoring, 'Spice', _SpiceSpy)
    yield
    mp.undo()


@pytest.fixture(scope='module')
def hand_case(meteor):
    """(our metrics, pycocoevalcap's) on the hand-made case, SPICE left on auto."""
    ours = scoring.score(PREDICTIONS, REFERENCES)
    return ours, coco_scores(PREDICTIONS, REFERENCES, meteor)


def write_inference(path, rows):
    path.write_text(json.dumps({'model_name': 'tiny', 'model_revision': None,
                                'n_eval_sample': len(rows), 'results': rows}))
    return str(path)


# ---------------------------------------------------------------- score()

@pytest.mark.integration
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


@pytest.mark.integration
def test_figures_pinned_to_an_independent_pycocoevalcap_run(hand_case):
    ours, _ = hand_case
    for name, value in PINNED.items():
        assert ours[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.integration
def test_spice_unavailable_without_jars(hand_case):
    ours, _ = hand_case
    assert ours['SPICE'] is None
    assert ours['spice_status'].startswith('SPICE unavailable')
    assert scoring.SPICE_INSTALL_COMMAND in ours['spice_status']
    assert 'get_stanford_models()' in ours['spice_status']
    assert _SpiceSpy.created == []  # never constructed, so no download attempt
    assert all(isinstance(ours[name], float) for name in STANDARD)
    assert list(ours)[:8] == list(scoring.METRIC_NAMES)


@pytest.mark.unit
def test_install_command_calls_pycocoevalcaps_jar_download(monkeypatch):
    """The command the SPICE status line gives, run as the shell would (its Python code executed), calls
    pycocoevalcap's own download function: here a spy, so nothing is downloaded."""
    import shlex

    from pycocoevalcap.spice import get_stanford_models as module
    argv = shlex.split(scoring.SPICE_INSTALL_COMMAND)
    assert argv[:2] == ['python', '-c'] and len(argv) == 3
    calls = []
    monkeypatch.setattr(module, 'get_stanford_models', lambda *a, **k: calls.append((a, k)))
    exec(compile(argv[2], '<SPICE_INSTALL_COMMAND>', 'exec'), {})
    assert calls == [((), {})]


@pytest.mark.unit
def test_missing_jar_detection(tmp_path, monkeypatch):
    import pycocoevalcap.spice.spice as spice
    # where SPICE (spice-1.0.jar, run from its own folder) finds CoreNLP: lib/ beside it
    lib = Path(spice.__file__).parent / 'lib'
    assert scoring.spice_jar_paths() == [str(lib / 'stanford-corenlp-3.6.0.jar'),
                                         str(lib / 'stanford-corenlp-3.6.0-models.jar')]
    jars = [str(tmp_path / 'stanford-corenlp-3.6.0.jar'), str(tmp_path / 'stanford-corenlp-3.6.0-models.jar')]
    monkeypatch.setattr(scoring, 'spice_jar_paths', lambda: jars)
    real_missing = REAL_MISSING_SPICE_JARS  # the module fixture patches scoring.missing_spice_jars
    assert real_missing() == jars
    Path(jars[0]).write_bytes(b'')
    assert real_missing() == jars[1:]
    Path(jars[1]).write_bytes(b'')
    assert real_missing() == []


@pytest.mark.unit
def test_spice_runtime_failure_is_reported_not_raised(monkeypatch):
    class Broken:
        def compute_score(self, gts, res):
            raise RuntimeError('java exploded\nsecond line of the trace')

    monkeypatch.setattr(scoring, 'missing_spice_jars', lambda: [])
    monkeypatch.setattr(scoring, 'Spice', Broken)
    value, status = scoring._spice_score({0: ['a b']}, {0: ['a b']}, None)
    assert value is None
    assert status.startswith('SPICE unavailable') and 'java exploded' in status
    assert 'second line' not in status


@pytest.mark.unit
def test_spice_paths_when_present_or_skipped(monkeypatch):
    class Fake:
        value = 0.25

        def compute_score(self, gts, res):
            return Fake.value, []

    monkeypatch.setattr(scoring, 'missing_spice_jars', lambda: [])
    monkeypatch.setattr(scoring, 'Spice', Fake)
    assert scoring._spice_score({0: ['a']}, {0: ['a']}, None) == (0.25, scoring.SPICE_COMPUTED)
    assert scoring._spice_score({0: ['a']}, {0: ['a']}, False) == (None, scoring.SPICE_SKIPPED)
    Fake.value = math.nan
    value, status = scoring._spice_score({0: ['a']}, {0: ['a']}, True)
    assert value is None and status.startswith('SPICE unavailable')


@pytest.mark.integration
def test_all_references_count():
    preds = ['a small boat floats on a calm lake', 'a child plays with a ball', 'an old red barn in a field']
    refs = [['people swim at the beach', 'a large ship in the harbour', 'a small boat floats on a calm lake'],
            ['a kid playing with a ball'], ['a red barn in a green field']]
    with_all = scoring.score(preds, refs, spice=False)
    first_only = scoring.score(preds, [refs[0][:1]] + refs[1:], spice=False)
    assert with_all['Bleu_4'] > first_only['Bleu_4']
    assert with_all['CIDEr'] > first_only['CIDEr']
    assert with_all['METEOR'] > first_only['METEOR']
    assert with_all['SPICE'] is None and with_all['spice_status'] == scoring.SPICE_SKIPPED


@pytest.mark.integration
def test_line_breaks_inside_captions_do_not_shift_samples():
    # pycocoevalcap only replaces '\n'; a '\r' or '\u2028' would split the caption for Java's
    # tokenizer and move every later caption onto the wrong sample.
    gts, res = scoring.tokenize(['two\rcats', 'x\u2028y', 'A dog.'], [['a\r\nb'], ['c'], ['d', 'e']])
    assert res == {0: ['two cats'], 1: ['x y'], 2: ['a dog']}
    assert gts == {0: ['a b'], 1: ['c'], 2: ['d', 'e']}


@pytest.mark.parametrize('predictions, references, message', [
    (['a', 'b'], [['a']], '2 predictions but 1'),
    (['a', 'b'], [['a'], []], 'references[1] is empty'),
    ([], [], 'no samples'),
])
@pytest.mark.unit
def test_bad_arguments_raise_value_error(predictions, references, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        scoring.score(predictions, references)


# ---------------------------------------------------------------- format_table()

@pytest.mark.unit
def test_format_table():
    table = format_table({'Bleu_1': 0.61234, 'Bleu_4': 0.05, 'CIDEr': 0.9, 'SPICE': None,
                          'n_samples': 3, 'spice_status': 'SPICE unavailable: because'})
    lines = table.splitlines()
    assert 'x100' in lines[0]
    assert any(line.split() == ['Bleu_1', '61.2'] for line in lines)
    assert any(line.split() == ['CIDEr', '90.0'] for line in lines)
    assert any(line.split() == ['SPICE', 'n/a'] for line in lines)
    assert lines[-1] == 'SPICE unavailable: because'
    assert 'unavailable' not in format_table({'Bleu_1': 0.5, 'SPICE': 0.2, 'spice_status': 'SPICE computed'})


# ---------------------------------------------------------------- command line

@pytest.mark.integration
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
    caplog.set_level('INFO', logger='utils.evaluation.results')
    assert metrics.main([path]) == 0
    out = tmp_path / 'infer_test_metrics.json'
    payload = json.loads(out.read_text())
    assert payload['input'] == path and payload['n_scored'] == 3 and payload['n_skipped'] == 2
    expected = scoring.score([rows[0]['caption'], rows[1]['caption'], rows[3]['caption']],
                             [[rows[0]['reference']], rows[1]['reference'], rows[3]['reference']])
    style = {k: payload['metrics'].pop(k) for k in list(payload['metrics']) if 'style' in k}
    assert payload['metrics'] == expected
    assert payload['metrics']['SPICE'] is None
    # no style classifier anywhere (no --conf, no model dir): the style figures are null, with the reason
    assert style['style_accuracy_top1'] is None and '--conf' in style['style_status']
    stdout = capsys.readouterr().out
    assert 'x100' in stdout and 'SPICE' in stdout and 'n/a' in stdout
    assert 'skipped 2' in caplog.text
    logged = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert any(name == 'utils.evaluation.results' and level == 'WARNING' and 'skipped 2 of 5 rows' in m
               for name, level, m in logged), logged
    assert any(name == 'utils.metrics' and level == 'INFO' and m.startswith('scored 3 rows (2 skipped')
               and str(out) in m for name, level, m in logged), logged
    assert sorted(p.name for p in tmp_path.iterdir()) == ['infer_test.json', 'infer_test_metrics.json']


@pytest.mark.integration
def test_cli_output_option(tmp_path, capsys):
    rows = [{'style': 's', 'image': str(i), 'caption': f'a photo of thing {i}', 'reference': [f'a picture of thing {i}']}
            for i in range(3)]
    path = write_inference(tmp_path / 'infer.json', rows)
    out = tmp_path / 'sub_metrics.json'
    assert metrics.main([path, '-o', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload['n_scored'] == 3 and payload['n_skipped'] == 0
    assert set(scoring.METRIC_NAMES) <= set(payload['metrics'])
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
@pytest.mark.unit
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


@pytest.mark.e2e
def test_cli_missing_file_as_a_process(tmp_path):
    """The real entry point: exit 2, one error line, no traceback, nothing written."""
    missing = tmp_path / 'nope.json'
    proc = subprocess.run([sys.executable, '-m', 'utils.metrics', str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: ') and str(missing) in proc.stderr
    assert proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr
    assert proc.stdout == '' and list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_import_does_not_pull_in_torch_or_modelscope():
    code = "import sys, utils.metrics; print(sorted(m for m in ('torch', 'modelscope') if m in sys.modules))"
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'
