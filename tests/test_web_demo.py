"""web_demo.py in a real browser: Debian's headless Chromium driven by selenium (through /usr/bin/chromedriver;
nothing is downloaded). The app runs in a subprocess on 127.0.0.1; the captions read off the page must equal
the toolkit's Captioner's for the same image, style and settings. Skips, saying why, where there is no
Chromium (.ci/run installs it with apt)."""
import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for_web_demo
from PIL import Image

from utils.core.conf import GenerationConf

ROOT = Path(__file__).resolve().parents[1]
MAX_UPLOAD_MB = 0.1  # small, so that the too-large upload below is small too
STYLES = ['Happy', 'Sarcastic', 'Romantic', 'Anxious']


def browser_paths():
    """(chromium, chromedriver), or a pytest skip saying what is missing."""
    chromium = next((p for p in (shutil.which('chromium'), shutil.which('chromium-browser'), '/usr/bin/chromium')
                     if p and Path(p).exists()), None)
    driver = shutil.which('chromedriver') or ('/usr/bin/chromedriver' if Path('/usr/bin/chromedriver').exists() else None)
    missing = [name for name, path in (('chromium', chromium), ('chromedriver', driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append('the selenium package')
    if missing:
        reason = f'no {" or ".join(missing)}: the browser test needs `apt-get install chromium chromium-driver`'
        sys.__stderr__.write(f'\ntests/test_web_demo.py skipped: {reason}\n')
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture(scope='module')
def browser():
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,1000'):
        options.add_argument(arg)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def app(trained, random_output, tmp_path_factory):
    """URL of web_demo.py serving the random-weights model (captions that differ by image and style)."""
    browser_paths()  # skip before starting anything
    port = free_port()
    log = tmp_path_factory.mktemp('web_demo') / 'web_demo.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, 'web_demo.py', '--conf', trained[0], '-m', random_output,
                                 '--port', str(port), '--max_upload_mb', str(MAX_UPLOAD_MB)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_for_web_demo(proc, url, log)
        yield {'url': url, 'port': port, 'log': log}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope='module')
def captioner(trained, random_output):
    from utils.captioning.captioner import load_captioner
    from utils.core.conf import read_conf
    return load_captioner(read_conf(trained[0]), random_output)


@pytest.fixture(scope='module')
def conf(trained):
    return json.loads(Path(trained[0]).read_text())


def open_page(browser, app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(app['url'])
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#run'))


def wait_for(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(lambda d: condition())


def text_of(browser, css):
    from selenium.webdriver.common.by import By
    return browser.find_element(By.CSS_SELECTOR, css).text


def upload(browser, path):
    from selenium.webdriver.common.by import By
    browser.find_element(By.CSS_SELECTOR, '#upload input[type=file]').send_keys(str(path))


def choose_style(browser, style):
    from selenium.webdriver.common.by import By
    browser.find_element(By.CSS_SELECTOR, '#style input').click()
    browser.find_element(By.CSS_SELECTOR, f'#style li[role=option][aria-label="{style}"]').click()


def set_number(browser, elem_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = browser.find_element(By.CSS_SELECTOR, f'#{elem_id} input[type=number]')
    box.send_keys(Keys.CONTROL, 'a')
    box.send_keys(str(value), Keys.TAB)


def run_caption(browser):
    """Press Caption on a page whose caption box is empty; the caption box's text once the app has answered
    (a caption, or a message on the status line)."""
    from selenium.webdriver.common.by import By
    box = browser.find_element(By.CSS_SELECTOR, '#caption textarea')
    assert box.get_attribute('value') == ''
    browser.find_element(By.CSS_SELECTOR, '#run').click()
    wait_for(browser, lambda: box.get_attribute('value') or any(
        m in text_of(browser, '#status') for m in ('Upload an image or pick a sample first', 'Captioning failed')))
    return box.get_attribute('value')


@pytest.mark.e2e
def test_caption_in_the_browser_equals_the_captioner(browser, app, captioner, conf):
    image = Path(conf['img_addr'], 'test0001.jpg')
    expected = dict(zip(STYLES, captioner.caption([{'style': s, 'image': str(image)} for s in STYLES],
                                                  progress=False)))
    assert expected['Sarcastic'] != expected['Happy']  # the style picked on the page shows in the caption
    open_page(browser, app)
    upload(browser, image)
    from selenium.webdriver.common.by import By
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, '#preview img'))
    choose_style(browser, 'Sarcastic')
    assert run_caption(browser) == expected['Sarcastic']
    assert text_of(browser, '#status') == ''

    # the beam size and length controls reach the generator
    open_page(browser, app)
    upload(browser, image)
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, '#preview img'))
    choose_style(browser, 'Sarcastic')
    set_number(browser, 'beam_size', 1)
    set_number(browser, 'max_len', 3)
    short = run_caption(browser)
    generation = captioner.generation
    captioner.set_generation(dataclasses.replace(generation, beam_size=1, max_len=3))
    try:
        assert short == captioner.caption([{'style': 'Sarcastic', 'image': str(image)}], progress=False)[0]
    finally:
        captioner.set_generation(generation)
    # 3 tokens at most: shorter than the 16-token caption (characters, not words: with the image tokens masked, a
    # random model's tokens are byte-level pieces without spaces)
    assert short != expected['Sarcastic'] and len(short) < len(expected['Sarcastic'])


@pytest.mark.e2e
def test_all_styles_for_a_sample(browser, app, captioner, trained):
    from selenium.webdriver.common.by import By

    from utils.core.conf import read_conf
    from utils.data.rows import load_split
    rows, _ = load_split(read_conf(trained[0]), 'test')
    second = list(dict.fromkeys(r['image'] for r in rows))[1]  # the app's second sample
    expected = captioner.caption([{'style': s, 'image': second} for s in STYLES], progress=False)
    open_page(browser, app)
    browser.find_element(By.CSS_SELECTOR, '#samples button[aria-label="Thumbnail 2 of 4"]').click()
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, '#preview img'))
    choose_style(browser, 'All styles')
    assert run_caption(browser).splitlines() == [f'{s}: {c}' for s, c in zip(STYLES, expected)]


@pytest.mark.e2e
def test_nothing_to_caption_yet(browser, app):
    open_page(browser, app)
    assert run_caption(browser) == ''
    assert text_of(browser, '#status') == 'Upload an image or pick a sample first.'


@pytest.mark.parametrize('name, message', [
    ('random.jpg', 'Upload refused. This file cannot be used: unreadable (not an image, or a damaged one).'),
    ('huge.png', 'Upload refused. The image is too large: at most 50 million pixels.'),
    ('notes.txt', 'Invalid file type'),
    ('big.jpg', 'exceed the maximum allowed size'),
])
@pytest.mark.e2e
def test_bad_upload_gets_a_message_in_the_page(browser, app, tmp_path, name, message):
    path = tmp_path / name
    if name == 'random.jpg':  # an image's name, not an image
        path.write_bytes(bytes(range(256)) * 8)
    elif name == 'huge.png':  # 64 million pixels in a few kB
        Image.new('1', (8000, 8000)).save(path)
    elif name == 'notes.txt':
        path.write_text('not an image')
    else:
        path.write_bytes(b'\xff\xd8' + bytes(int(MAX_UPLOAD_MB * 2e6)))
    open_page(browser, app)
    upload(browser, path)
    wait_for(browser, lambda: message in browser.find_element('tag name', 'body').text)
    assert 'Traceback' not in browser.page_source
    assert run_caption(browser) == ''  # nothing was taken for the image
    assert 'Upload an image' in text_of(browser, '#status')


@pytest.mark.e2e
def test_only_the_uploads_and_samples_are_served(browser, app, trained, conf):
    from selenium.webdriver.common.by import By
    open_page(browser, app)
    sample_url = browser.find_elements(By.CSS_SELECTOR, '#samples img')[0].get_attribute('src')
    with urllib.request.urlopen(sample_url, timeout=10) as r:
        assert r.status == 200 and r.read(3) == b'\xff\xd8\xff'  # a copy of a test image
    for path in (trained[0], Path(conf['img_addr'], 'test0001.jpg'), Path(trained[1], 'output', 'style_map.json'),
                 '/etc/passwd', ROOT / 'web_demo.py'):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f'{app["url"]}/gradio_api/file={path}', timeout=10)
        assert refused.value.code == 403, path


@pytest.mark.e2e
def test_binds_to_loopback_only(app):
    with socket.socket() as s:  # 127.0.0.2 is this machine too, but not the address the app listens on
        assert s.connect_ex(('127.0.0.2', app['port'])) != 0


@pytest.mark.e2e
def test_the_model_is_loaded_once(app):
    assert app['log'].read_text().count('initialize model from') == 1  # ModelScope's line, for every load


@pytest.mark.integration
def test_set_generation_equals_a_captioner_built_with_those_settings(captioner, random_output, conf):
    """What the page's controls do (no browser needed)."""
    from utils.captioning.captioner import Captioner
    items = [{'style': s, 'image': str(Path(conf['img_addr'], 'test0002.jpg'))} for s in STYLES]
    generation = captioner.generation
    captioner.set_generation(GenerationConf(beam_size=2, max_len=5, no_repeat_ngram_size=0))
    try:
        changed = captioner.caption(items, progress=False)
    finally:
        captioner.set_generation(generation)
    assert changed == Captioner(random_output, GenerationConf(beam_size=2, max_len=5, no_repeat_ngram_size=0)).caption(
        items, progress=False)
    assert changed != captioner.caption(items, progress=False)


@pytest.mark.integration
def test_ctrl_c_while_the_server_starts_closes_it(monkeypatch):
    """A Ctrl-C that lands while gradio's launch() is still checking the server it started (under load, the window
    after the page first answers) stops serve() with KeyboardInterrupt and closes that server: before, the server
    was left running, and web_demo.py could hang on exit instead of exiting 130."""
    import gradio as gr
    from gradio import networking

    from utils.demo.web_app import serve
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with gr.Blocks() as app:
        gr.Markdown('ctrl-c')

    def interrupted(url, *args, **kwargs):
        assert urllib.request.urlopen(url, timeout=10).status == 200  # the server is up when the Ctrl-C lands
        raise KeyboardInterrupt
    monkeypatch.setattr(networking, 'url_ok', interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve(app, '127.0.0.1', port, 1 << 20)
    assert not app.is_running
    with pytest.raises(OSError):  # nothing answers on the port any more
        urllib.request.urlopen(f'http://127.0.0.1:{port}', timeout=5)
