"""The style map: built once, saved with the model, reloaded at inference, matched exactly."""
import pytest

from utils.core.conf import DEFAULT_PROMPT
from utils.data.styles import StyleMap
from utils.core.errors import UnknownStyleError

pytestmark = pytest.mark.unit

STYLES = ['Happy', 'Anxious (Nervous)', 'Old-fashioned', 'Money-minded', 'Sweet (Kind)', 'happy']


@pytest.mark.parametrize('tokenize', [True, False])
def test_round_trip(tmp_path, tokenize):
    sm = StyleMap.build(STYLES, tokenize, DEFAULT_PROMPT)
    sm.save(tmp_path)
    loaded = StyleMap.load(tmp_path)
    assert loaded == sm
    assert loaded.styles == STYLES
    for s in STYLES:
        assert loaded.prompt_for(s) == sm.prompt_for(s)


def test_tokens_are_distinct_code_tokens():
    sm = StyleMap.build(STYLES, True, DEFAULT_PROMPT)
    assert len(set(sm.tokens.values())) == len(STYLES)
    assert sm.prompt_for('Anxious (Nervous)') == ' what does the image describe? write a <code_1> reply.'


def test_style_words_in_prompt():
    sm = StyleMap.build(STYLES, False, 'caption in a {} voice')
    assert sm.prompt_for('Sweet (Kind)') == 'caption in a Sweet (Kind) voice'


def test_exact_match_no_case_folding():
    sm = StyleMap.build(STYLES, True, DEFAULT_PROMPT)
    assert sm.prompt_for('happy') != sm.prompt_for('Happy')  # both exist, as themselves
    with pytest.raises(UnknownStyleError) as e:
        sm.prompt_for('HAPPY')
    assert "'HAPPY'" in str(e.value)


def test_unknown_style_names_nearest():
    sm = StyleMap.build(STYLES, True, DEFAULT_PROMPT)
    with pytest.raises(UnknownStyleError) as e:
        sm.check('Anxious')
    assert "nearest known: 'Anxious (Nervous)'" in str(e.value)


def test_load_from_dir_without_map(tmp_path):
    with pytest.raises(FileNotFoundError, match='no style map'):
        StyleMap.load(tmp_path)
