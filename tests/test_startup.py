"""Start-up at scale: the image checks remembered in work_dir (checked again when a file changes, ignored when the
cache file is damaged or from another version), the train dataset's rows packed (same samples as a list of dicts,
shared with forked DataLoader workers instead of copied into each)."""
import json
import logging
import os
import shutil

import pytest
from PIL import Image

from utils.data import image_checks, images
from utils.data.image_checks import CHECKS_FILE, ImageChecks
from utils.data.rows import read_split


def counting(monkeypatch):
    """The paths the real image check decodes, in order."""
    seen = []
    check = images.check_image

    def counted(path):
        seen.append(path)
        return check(path)
    monkeypatch.setattr(images, 'check_image', counted)
    return seen


@pytest.fixture
def data(tmp_path):
    """(train file, img_addr, work_dir): 6 rows, 5 good JPEGs and a truncated one."""
    d = tmp_path / 'imgs'
    d.mkdir()
    for i in range(6):
        Image.effect_noise((48, 40), 30 + i).convert('RGB').save(d / f'i{i}.jpg', quality=90)
    raw = (d / 'i5.jpg').read_bytes()
    (d / 'i5.jpg').write_bytes(raw[:len(raw) // 2])
    rows = [{'personality': f'S{i % 2}', 'comment': f'caption {i}', 'image_hash': f'i{i}'} for i in range(6)]
    f = tmp_path / 'train.json'
    f.write_text(json.dumps(rows))
    return f, str(d), str(tmp_path / 'work')


def read(data, **kwargs):
    f, img_addr, _ = data
    return read_split(f, img_addr, '.jpg', 'train', **kwargs)


def remembered(data) -> ImageChecks:
    """A first run's checks, saved in work_dir."""
    os.makedirs(data[2], exist_ok=True)
    checks = ImageChecks(data[2])
    read(data, checks=checks)
    assert checks.save() == os.path.join(data[2], CHECKS_FILE)
    return checks


@pytest.mark.unit
def test_unchanged_files_are_not_checked_again(data, monkeypatch):
    seen = counting(monkeypatch)
    first = remembered(data)
    assert len(seen) == 6 and first.checked == 6
    rows_before, stats_before = read(data, checks=ImageChecks(None))  # what a run without the cache keeps
    seen.clear()
    again = ImageChecks(data[2])
    rows, stats = read(data, checks=again)
    assert seen == [] and again.checked == 0 and again.reused == 6
    assert rows == rows_before and stats.skipped == stats_before.skipped == {'image truncated': 1}
    assert again.save() is None  # nothing new: the file is left as it is


@pytest.mark.unit
@pytest.mark.parametrize('change', ['size', 'mtime', 'replaced'])
def test_a_changed_file_is_checked_again(data, monkeypatch, change):
    seen = counting(monkeypatch)
    remembered(data)
    img = os.path.join(data[1], 'i2.jpg')
    st = os.stat(img)
    if change == 'size':  # a truncated download of the same file: now refused
        raw = open(img, 'rb').read()
        open(img, 'wb').write(raw[:len(raw) // 2])
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == 'mtime':
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    else:  # another file of the same size and mtime moved into its place (cp -p / rsync -t, then mv)
        other = os.path.join(data[1], 'other.jpg')
        Image.effect_noise((48, 40), 99).convert('RGB').save(other, quality=90)
        with open(other, 'r+b') as f:
            f.truncate(st.st_size)
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, img)
        assert (os.stat(img).st_size, os.stat(img).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    seen.clear()
    checks = ImageChecks(data[2])
    rows, stats = read(data, checks=checks)
    assert seen == [img] and checks.checked == 1 and checks.reused == 5
    if change == 'size':
        assert stats.skipped == {'image truncated': 2} and 'caption 2' not in [r['text'] for r in rows]
    checks.save()
    seen.clear()
    read(data, checks=ImageChecks(data[2]))
    assert seen == []  # the new verdict is remembered


def damage_body(path):
    raw = bytearray(open(path, 'rb').read())
    raw[-3] ^= 0xFF
    open(path, 'wb').write(raw)


def truncate(path):
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[:len(raw) * 2 // 3])


def other_version(path):
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw.replace(json.dumps(image_checks.check_signature()['toolkit']).encode(), b'"0.0.0"', 1))


def garbage(path):
    open(path, 'wb').write(b'\x00' * 100)


def empty(path):
    open(path, 'wb').write(b'')


@pytest.mark.unit
@pytest.mark.parametrize('spoil', [damage_body, truncate, other_version, garbage, empty])
def test_a_damaged_or_foreign_cache_is_ignored_and_rebuilt(data, monkeypatch, caplog, spoil):
    seen = counting(monkeypatch)
    remembered(data)
    path = os.path.join(data[2], CHECKS_FILE)
    spoil(path)
    seen.clear()
    checks = ImageChecks(data[2])
    with caplog.at_level(logging.WARNING):
        rows, stats = read(data, checks=checks)
    assert len(seen) == 6 and checks.reused == 0  # nothing trusted
    assert len(rows) == 5 and stats.skipped == {'image truncated': 1}
    if spoil is not empty:  # (an empty file is no cache at all: nothing to say)
        assert f'ignoring {path}' in caplog.text
    checks.save()
    seen.clear()
    read(data, checks=ImageChecks(data[2]))
    assert seen == []  # rebuilt


@pytest.mark.unit
def test_a_verdict_is_not_kept_from_another_check_version(data, monkeypatch):
    seen = counting(monkeypatch)
    remembered(data)
    monkeypatch.setattr(images, 'CHECK_VERSION', images.CHECK_VERSION + 1)
    seen.clear()
    read(data, checks=ImageChecks(data[2]))
    assert len(seen) == 6


@pytest.mark.unit
def test_save_merges_what_another_run_wrote_and_leaves_no_temporary(data, tmp_path):
    remembered(data)
    extra = tmp_path / 'extra'
    extra.mkdir()
    shutil.copy(os.path.join(data[1], 'i0.jpg'), extra / 'x.jpg')
    other = ImageChecks(data[2])
    other.verdicts([str(extra / 'x.jpg')])
    other.save()
    known = ImageChecks(data[2]).known()
    assert len(known) == 7 and known[str(extra / 'x.jpg')][3] is None
    assert known[os.path.join(data[1], 'i5.jpg')][3] == 'image truncated'
    assert sorted(os.listdir(data[2])) == [CHECKS_FILE]


@pytest.mark.unit
def test_a_missing_image_is_not_remembered(data, monkeypatch):
    seen = counting(monkeypatch)
    os.remove(os.path.join(data[1], 'i1.jpg'))
    remembered(data)
    seen.clear()
    rows, stats = read(data, checks=ImageChecks(data[2]))
    assert seen == [os.path.join(data[1], 'i1.jpg')] and stats.skipped['image missing'] == 1


# ---------------------------------------------------------------- the train dataset's rows

def rows_of(pcap, n=None):
    from pathlib import Path
    rows, _ = read_split(Path(pcap[0]) / 'train.json', pcap[1], '.jpg', 'train', check_images=False)
    return rows[:n]


@pytest.mark.unit
def test_the_dataset_yields_the_samples_a_list_of_rows_gave(tiny_model, pcap):
    import torch
    from modelscope.msdatasets.dataset_cls.custom_datasets import TorchCustomDataset

    from preprocessors import OfaPreprocessorForStylishIC
    from utils.data.dataset import StylishCaptionDataset
    from utils.data.rows import read_styles
    from utils.data.styles import StyleMap
    rows = rows_of(pcap)
    rows[3] = dict(rows[3], text='ünïcödé text ✓')
    style_map = StyleMap.build(read_styles(pcap[0], rows), True, ' what does the image describe? write a {} reply.')
    pre = OfaPreprocessorForStylishIC(tiny_model, mode='train', style_map=style_map, no_collate=True)
    before = TorchCustomDataset([rows], preprocessor=pre)  # how the dataset held its rows before: a list of dicts
    now = StylishCaptionDataset(rows, pre)
    assert len(now) == len(before) == len(rows)
    for i in range(len(rows)):
        a, b = before[i], now[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], (i, k)
    assert now._inner_dataset[3] == rows[3] and list(now._inner_dataset[3]) == list(rows[3])
    with_ids = StylishCaptionDataset(rows, pre, with_ids=True)
    assert [with_ids[i]['id'] for i in range(len(rows))] == list(range(len(rows)))
    with pytest.raises(IndexError):
        now._inner_dataset[len(rows)]


@pytest.mark.unit
def test_the_dataset_holds_its_rows_packed_not_as_python_objects(pcap):
    import gc

    from utils.data.dataset import PackedRows, StylishCaptionDataset
    rows = rows_of(pcap)
    dataset = StylishCaptionDataset(rows, preprocessor=None)
    inner = dataset._inner_dataset
    assert isinstance(inner, PackedRows) and not isinstance(inner, list)
    # everything it holds is one bytes buffer and one numpy array: no per-row object for fork to copy
    assert isinstance(inner.buffer, bytes) and inner.offsets.dtype.kind == 'i' and vars(inner).keys() == {'buffer', 'offsets'}
    assert not gc.is_tracked(inner.buffer) and not gc.is_tracked(inner.offsets)  # nothing the collector walks


BATCH = 500


def private_kb(pid):
    with open(f'/proc/{pid}/smaps_rollup') as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(('Private_Dirty:', 'Private_Clean:')))


class Touch:
    """A dataset over a dataset that, in a worker, reads every row it is given and at the end of the epoch
    runs a full garbage collection (as a long epoch does), then reports the worker's private memory."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        import gc

        self.inner[i]
        if i == len(self.inner) - 1:
            gc.collect()
        return private_kb(os.getpid()) if i % BATCH == BATCH - 1 or i == len(self.inner) - 1 else 0


@pytest.mark.integration
@pytest.mark.skipif(not os.path.exists('/proc/self/smaps_rollup'), reason='needs Linux /proc smaps_rollup')
def test_forked_workers_do_not_copy_the_rows():
    """40k rows (about 30 MB as dicts) read by 2 forked DataLoader workers over an epoch, with a full collection:
    held as a list of dicts, each worker copies them (refcounts, the collector); held by the dataset, not."""
    import torch
    from modelscope.msdatasets.dataset_cls.custom_datasets import TorchCustomDataset

    from utils.data.dataset import StylishCaptionDataset
    n = 40_000
    rows = [{'style': f'Style{i % 215}', 'text': f'a caption number {i} about the picture in front of me',
             'references': [f'a caption number {i} about the picture in front of me'],
             'image': f'/data/images/{i:032x}.jpg', 'row': i} for i in range(n)]

    def worker_growth(dataset):
        loader = torch.utils.data.DataLoader(Touch(dataset), batch_size=BATCH, num_workers=2, shuffle=False,
                                             collate_fn=lambda kb: max(kb))
        return max(loader)  # the most private memory a worker had, at the end of its part of the epoch

    as_dicts = worker_growth(TorchCustomDataset([rows], preprocessor=lambda r: r))
    packed = worker_growth(StylishCaptionDataset(rows, preprocessor=lambda r: r))
    assert as_dicts - packed > 15_000, (as_dicts, packed)  # KiB: the copy a worker made of the dicts' pages
    assert packed < as_dicts / 2


@pytest.mark.integration
def test_a_training_run_remembers_its_image_checks(trained, monkeypatch):
    """finetune.py train saves the verdicts in work_dir once it holds it; a resume reads the train split without
    decoding any of its images."""
    from utils.core.conf import read_conf
    from utils.data.rows import load_split
    conf = read_conf(trained[0])
    assert (trained[1] / CHECKS_FILE).is_file()
    seen = counting(monkeypatch)
    checks = ImageChecks(str(trained[1]))
    rows, _ = load_split(conf, 'train', checks=checks)
    assert seen == [] and checks.reused == len({r['image'] for r in rows}) > 0


class _Counted:
    """A dataset whose items are their indices, counting the loads (what a real one pays: images decoded)."""

    def __init__(self, n):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return i


class _Resumed:
    def __init__(self, inner_iter):
        self.inner_iter = inner_iter


@pytest.mark.unit
@pytest.mark.parametrize('skip, workers', [(0, 0), (1, 0), (7, 0), (12, 0), (99, 0), (7, 2)])
def test_a_resumed_epoch_skips_its_trained_batches_without_loading_them(skip, workers):
    """The batches ModelScope's train_loop trains after `if i < inner_iter: continue` are the ones the stock loader
    gives (same shuffled order, same RNG draws), but none of the skipped batches is loaded."""
    import torch
    from torch.utils.data import DataLoader

    from utils.training.recipe_trainer import SkipTrainedBatches

    def batches(wrap):
        torch.manual_seed(1234)
        data = _Counted(50)
        loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=list, num_workers=workers)
        it = SkipTrainedBatches(loader, _Resumed(skip)) if wrap else loader
        assert len(it) == 13
        trained = [b for i, b in enumerate(it) if i >= skip]  # train_loop's skip
        return trained, data.loaded, torch.rand(1).item()  # the RNG afterwards: the same draws were made

    stock, stock_loaded, stock_rng = batches(wrap=False)
    ours, ours_loaded, ours_rng = batches(wrap=True)
    assert ours == stock and ours_rng == stock_rng
    if workers:  # the loads happen in the workers: what came back is what was loaded
        return
    assert len(stock_loaded) == 50 and sorted(ours_loaded) == sorted(i for b in stock for i in b)
    assert len(ours_loaded) == 50 - 4 * min(skip, 12) - (2 if skip > 12 else 0)  # 13 batches: 12 of 4, one of 2
