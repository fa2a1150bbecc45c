"""The conf is loaded into one typed object and validated before anything runs."""
import json
import os

import pytest

import finetune
from utils.core.conf import DEFAULT_PROMPT, Conf, apply_overrides, read_conf
from utils.core.conf_checks import validate
from utils.core.errors import ConfError

pytestmark = pytest.mark.unit


def load(path):
    return validate(read_conf(path))


def test_valid_conf_loads_with_defaults(make_conf):
    conf = load(make_conf())
    assert isinstance(conf, Conf)
    assert conf.model.prompt_template == DEFAULT_PROMPT  # "" means the default prompt
    assert conf.train.checkpoint.interval == 3 and conf.run.num_workers == 0
    assert conf.model.is_local


@pytest.mark.parametrize('overrides, key', [
    ({'img_addr': '__drop__'}, 'missing conf key "img_addr"'),
    ({'work_dir': '__drop__'}, 'missing conf key "work_dir"'),
    ({'batchsize': 8}, 'unknown conf key "batchsize"'),
    ({'checkpoint': {'interval': 5, 'every': 1}}, 'unknown conf key "checkpoint.every"'),
    ({'batch_size': '8'}, '"batch_size": expected int'),
    ({'tokenize_style': 'yes'}, '"tokenize_style": expected bool'),
    ({'max_epochs': True}, '"max_epochs": expected int'),
    ({'checkpoint': {'interval': 'often'}}, '"checkpoint.interval": expected int'),
    ({'checkpoint': 5}, '"checkpoint": expected an object'),
    ({'batch_size': -1}, '"batch_size" must be at least 1'),
    ({'num_workers': -2}, '"num_workers" must not be negative'),
    ({'lr': 0}, '"lr" must be positive'),
    ({'warmup': 1.5}, '"warmup"'),
    ({'patch_image_size': 64, 'max_image_size': 32}, '"patch_image_size" (64) must not exceed "max_image_size" (32)'),
    ({'prompt': 'describe the image'}, '"prompt" must hold exactly one "{}"'),
    ({'prompt': 'a {} and {}'}, '"prompt" must hold exactly one "{}"'),
    ({'prompt': 'a {style} reply'}, '"prompt" must hold exactly one "{}"'),
    ({'img_addr': '/nonexistent/images'}, '"img_addr": folder /nonexistent/images does not exist'),
    ({'dataset_path': '/nonexistent/pcap'}, '"dataset_path": folder /nonexistent/pcap does not exist'),
    ({'train_json': 'nope.json'}, '"train_json": file'),
    ({'model_name': '/nonexistent/model'}, '"model_name": local model dir /nonexistent/model does not exist'),
    ({'file_attr': ''}, '"file_attr" must not be empty'),
    ({'precision': 'fp8'}, '"precision" must be one of fp32, bf16, fp16'),
])
def test_bad_conf_names_the_key(make_conf, overrides, key):
    with pytest.raises(ConfError) as e:
        load(make_conf(**overrides))
    assert key in str(e.value)


def test_model_dir_without_configuration_json(make_conf, tmp_path):
    empty = tmp_path / 'not_a_model'
    empty.mkdir()
    with pytest.raises(ConfError, match='has no configuration.json'):
        load(make_conf(model_name=str(empty)))


def test_hub_id_is_not_a_local_dir(make_conf):
    conf = read_conf(make_conf(model_name='damo/ofa_image-caption_coco_distilled_en', model_revision='v1.0.1'))
    assert not conf.model.is_local
    validate(conf)  # no file-system check for a hub id: nothing is downloaded at validation


@pytest.mark.parametrize('text, message', [
    ('{"model_name": ', 'is not valid JSON'),
    ('[1, 2]', 'must be a JSON object, got list'),
])
def test_conf_file_not_json_or_not_object(tmp_path, text, message):
    path = tmp_path / 'bad.json'
    path.write_text(text)
    with pytest.raises(ConfError, match=message):
        read_conf(path)


def test_cli_override_replaces_conf_value_and_is_checked(make_conf):
    conf = read_conf(make_conf())
    assert apply_overrides(conf, batch_size=2, lr=None).run.batch_size == 2
    with pytest.raises(ConfError, match='"batch_size" must be at least 1'):
        validate(apply_overrides(conf, batch_size=0))


@pytest.mark.parametrize('overrides, argv_extra, key', [
    ({'batch_size': '4'}, [], 'batch_size'),
    ({'prompt': 'no placeholder'}, [], 'prompt'),
    ({'unknown_knob': 1}, [], 'unknown_knob'),
    ({}, ['-b', '-3'], 'batch_size'),
    ({}, ['-p', '/nonexistent/iter_5'], '/nonexistent/iter_5'),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(make_conf, capsys, overrides, argv_extra, key):
    path = make_conf(**overrides)
    work_dir = json.loads(open(path).read())['work_dir']
    code = finetune.main(['train', '--conf', path] + argv_extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith('error: ') and key in err[0]
    assert not os.path.exists(work_dir)


def test_missing_conf_file(capsys, tmp_path):
    assert finetune.main(['train', '--conf', str(tmp_path / 'none.json')]) == 2
    assert 'does not exist' in capsys.readouterr().err


@pytest.mark.parametrize('name', ['demo.json', 'distilled_tokenized.json', 'base_tokenized.json'])
def test_shipped_confs_parse(name):
    conf = read_conf(os.path.join(os.path.dirname(__file__), '..', 'conf_examples', name))
    assert conf.model.prompt_template.count('{}') == 1
    if name != 'demo.json':
        assert not conf.model.is_local and conf.model.model_revision


# ---------------------------------------------------------------- flags generated from the Conf fields

def test_every_scalar_conf_key_is_a_train_flag_with_its_declared_help_and_default():
    import dataclasses

    import finetune
    from utils.core.conf import NESTED_SECTIONS, SECTIONS
    from utils.core.flags import conf_flags
    flags = conf_flags()
    scalar = [f.name for name, cls in SECTIONS.items() if name not in NESTED_SECTIONS
              for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.type)
              and f.name not in ('columns', 'checkpoint')]
    assert [f.name for f in flags] == scalar
    assert all(f.help for f in flags)
    help_of = {f.name: f.help for f in flags}
    assert help_of['lr'] == 'peak learning rate (AdamW)'
    assert {f.name: f.section for f in flags}['beam_size'] == 'generation'
    train_help = finetune.build_parser()._subparsers._group_actions[0].choices['train'].format_help()
    for name in scalar:
        assert f'--{name}' in train_help, name
    flat = ' '.join(train_help.split())  # argparse wraps lines
    assert 'peak learning rate (AdamW) (default: 5e-05)' in flat
    assert '(required in the conf)' in flat and '(default: null)' in flat


def test_captioning_commands_word_their_flags_for_captioning():
    import finetune
    import pre_inference
    for parser in (pre_inference.build_parser(), finetune.build_parser()._subparsers._group_actions[0].choices['eval']):
        text = ' '.join(parser.format_help().split())
        assert 'captions per batch (default: 4)' in text
        assert 'per device' not in text and 'loss scaler' not in text
    train = ' '.join(finetune.build_parser()._subparsers._group_actions[0].choices['train'].format_help().split())
    assert 'samples per training step, per device (default: 4)' in train


def test_unknown_key_names_the_likely_one(make_conf):
    import json
    path = make_conf()
    data = json.loads(open(path).read())
    data['max_epoch'] = 2
    with open(path, 'w') as f:
        json.dump(data, f)
    with pytest.raises(ConfError, match='unknown conf key "max_epoch" \\(did you mean "max_epochs"\\?'):
        read_conf(path)


def test_conf_round_trips_through_its_flat_file(make_conf):
    from utils.core.conf import conf_from_dict
    conf = read_conf(make_conf(lr=0.25, beam_size=2, scst={'candidates': 3}))
    flat = conf.to_dict()
    assert flat['lr'] == 0.25 and flat['beam_size'] == 2 and flat['scst']['candidates'] == 3
    assert 'model' not in flat and 'train' not in flat  # the file format stays flat
    assert conf_from_dict(flat) == conf


@pytest.mark.parametrize('argv, expected', [
    (['-b', '3', '--lr', '0.5', '-e', '2'], {'batch_size': 3, 'lr': 0.5, 'max_epochs': 2}),
    (['--max_epoches', '4', '--no-eval_every_epoch', '--strict'], {'max_epochs': 4, 'eval_every_epoch': False,
                                                                   'strict': True}),
    ([], {}),
])
def test_train_flags_override_only_what_is_given(argv, expected):
    import finetune
    from utils.core.flags import conf_overrides
    args = finetune.build_parser().parse_args(['train', '--conf', 'c.json', *argv])
    assert conf_overrides(args) == expected


def test_every_entry_point_takes_its_sections_keys_as_flags():
    import finetune
    import pre_inference
    import web_demo
    from utils import backup_model
    from utils.core.flags import conf_overrides
    caption = ['--conf', 'c.json', '--beam_size', '2', '--precision', 'bf16', '-b', '7']
    want = {'beam_size': 2, 'precision': 'bf16', 'batch_size': 7}
    assert conf_overrides(pre_inference.build_parser().parse_args(caption)) == want
    assert conf_overrides(web_demo.build_parser().parse_args(caption)) == want
    assert conf_overrides(finetune.build_parser().parse_args(['eval', *caption])) == want
    assert conf_overrides(backup_model.build_parser().parse_args(['--conf', 'c.json', '--work_dir', 'w'])) == \
        {'work_dir': 'w'}
    with pytest.raises(SystemExit):  # a training key is not a captioning flag
        pre_inference.build_parser().parse_args(['--conf', 'c.json', '--lr', '0.1'])


@pytest.mark.parametrize('prompt, ok', [
    (' what does the image describe? write a {} reply.', True),
    ('{{}} {}', True),                  # one placeholder, the braces before it escaped
    ('a {{literal}} brace and {}', True),
    ('{} and {}', False), ('no placeholder', False), ('{style}', False), ('{0}', False), ('{', False),
])
def test_prompt_takes_one_placeholder_and_escaped_braces(make_conf, prompt, ok):
    if ok:
        assert load(make_conf(prompt=prompt)).model.prompt == prompt
    else:
        with pytest.raises(ConfError, match='"prompt" must hold exactly one'):
            load(make_conf(prompt=prompt))


@pytest.mark.parametrize('text, key', [('"lr": 1e999', 'lr'), ('"weight_decay": NaN', 'weight_decay'),
                                       ('"warmup": -Infinity', 'warmup')])
def test_non_finite_numbers_are_refused_naming_the_key(make_conf, text, key):
    path = make_conf()
    body = open(path).read().rstrip().rstrip('}')
    with open(path, 'w') as f:
        f.write(body + ', ' + text + '}')
    with pytest.raises(ConfError, match=f'conf key "{key}" must be a finite number'):
        read_conf(path)
