"""The web demo's gradio app (``web_demo.py``): upload checks, sample images, the page, and serving it until
Ctrl-C (or SIGTERM: web_demo.py raises SystemExit then, through the same ``finally`` blocks).

It serves nothing but the uploads and what it shows: gradio keeps uploads and the sample copies in a private
temporary folder (GRADIO_TEMP_DIR, :func:`private_folder`), removed when the app stops, and no other path is
allowed. The model is loaded once (a Captioner); beam size and caption length are set per request, under a lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Iterator, List, Optional

from utils.core.errors import BadInput, first_line

logger = logging.getLogger('web_demo')  # the name users see on web_demo.py's log lines
ALL_STYLES = 'All styles'
N_SAMPLES = 4       # sample images offered: the first distinct images of the conf's test split
MAX_BEAM = 10       # slider ranges
MAX_LEN = 64
FONTS = ['ui-sans-serif', 'system-ui', 'sans-serif']  # local fonts: the page fetches nothing from the internet


def check_upload(path: str, max_bytes: int) -> Optional[str]:
    """None if the uploaded file is a usable image, else a sentence for the page saying why not."""
    from utils.data.images import MAX_PIXELS, check_image
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if size > max_bytes:
        return f'The file is too large ({size / 1e6:.1f} MB): the limit is {max_bytes / 1e6:g} MB.'
    problem = check_image(path)
    if problem == 'image too large':
        return f'The image is too large: at most {MAX_PIXELS / 1e6:g} million pixels.'
    if problem:
        return f'This file cannot be used: {problem.replace("image ", "", 1)} (not an image, or a damaged one).'
    return None


def sample_images(conf, folder: str) -> List[str]:
    """Copies of the first N_SAMPLES distinct images of the conf's test split in folder (served from there, not
    from img_addr); none when the split cannot be read."""
    from utils.data.rows import load_split
    try:
        rows, _ = load_split(conf, 'test', limit=8 * N_SAMPLES)
    except (BadInput, OSError) as e:
        logger.warning('no sample images: %s', e)
        return []
    images = list(dict.fromkeys(r['image'] for r in rows))[:N_SAMPLES]
    samples = []
    for i, image in enumerate(images):
        dest = os.path.join(folder, f'sample{i + 1}{os.path.splitext(image)[1]}')
        shutil.copyfile(image, dest)
        samples.append(dest)
    return samples


class Demo:
    """The app's state: one Captioner, generation settings changed under a lock between requests."""

    def __init__(self, captioner, samples: List[str], max_bytes: int, batch_size: int):
        self.captioner, self.samples, self.max_bytes, self.batch_size = captioner, samples, max_bytes, batch_size
        self.lock = threading.Lock()

    def on_upload(self, path: Optional[str]):
        """(preview, current image, caption, status) for an upload (None: the upload was removed)."""
        if path is None:
            return None, None, '', ''
        problem = check_upload(path, self.max_bytes)
        if problem:
            return None, None, '', f'**Upload refused.** {problem}'
        return path, path, '', ''

    def on_sample(self, index: int):
        path = self.samples[index]
        return path, path, '', ''

    def caption(self, image: Optional[str], style: str, beam_size: float, max_len: float):
        """(caption text, status) for the current image in one style, or one line per style."""
        if image is None:
            return '', 'Upload an image or pick a sample first.'
        styles = self.captioner.style_map.styles if style == ALL_STYLES else [style]
        try:
            with self.lock:
                settings = dataclasses.replace(self.captioner.generation, beam_size=int(beam_size), max_len=int(max_len))
                if settings != self.captioner.generation:
                    self.captioner.set_generation(settings)
                captions = self.captioner.caption([{'style': s, 'image': image} for s in styles],
                                                  batch_size=self.batch_size, progress=False)
        except Exception as e:  # noqa: BLE001 - the page gets one sentence, the log the traceback
            logger.exception('captioning %s failed', image)
            return '', f'**Captioning failed:** {type(e).__name__}: {first_line(e)}'
        if len(styles) == 1:
            return captions[0], ''
        return '\n'.join(f'{s}: {c}' for s, c in zip(styles, captions)), ''


@dataclasses.dataclass(frozen=True)
class PrivateFolder:
    root: str
    samples: str   # the sample copies the page shows


@contextlib.contextmanager
def private_folder() -> Iterator[PrivateFolder]:
    """A temporary folder for everything the app may serve, removed when the block ends. Enter it before
    gradio is imported: gradio reads GRADIO_TEMP_DIR (uploads, the files it shows) at import."""
    with tempfile.TemporaryDirectory(prefix='web_demo_') as root:
        os.environ['GRADIO_TEMP_DIR'] = os.path.join(root, 'uploads')
        os.environ['GRADIO_EXAMPLES_CACHE'] = os.path.join(root, 'examples')
        os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
        samples = os.path.join(root, 'samples')
        os.makedirs(samples)
        yield PrivateFolder(root, samples)


def build_app(demo: Demo, model_name: str):
    import gradio as gr

    styles = demo.captioner.style_map.styles
    generation = demo.captioner.generation

    def on_sample(evt):
        return demo.on_sample(evt.index)
    on_sample.__annotations__['evt'] = gr.SelectData  # gradio passes the click's SelectData to such a parameter
    with gr.Blocks(title='Stylised image captioning') as app:
        gr.Markdown(f'## Stylised image captioning\nModel `{model_name}`, {len(styles)} styles. Upload an image '
                    'or pick a sample, choose a style, press **Caption**.')
        current = gr.State(None)  # the image being captioned: a path that stays on the server
        with gr.Row():
            with gr.Column():
                upload = gr.File(label='Upload an image', file_types=['image'], type='filepath', height=140,
                                 elem_id='upload')
                samples = gr.Gallery(demo.samples, label='Or pick a sample', columns=N_SAMPLES, rows=1, height=190,
                                     allow_preview=False, elem_id='samples', visible=bool(demo.samples))
                preview = gr.Image(label='Image', type='filepath', interactive=False, height=260, elem_id='preview')
            with gr.Column():
                style = gr.Dropdown([ALL_STYLES] + styles, value=styles[0], label='Style', elem_id='style')
                beam = gr.Slider(1, MAX_BEAM, value=generation.beam_size, step=1, label='Beam size',
                                 elem_id='beam_size')
                length = gr.Slider(1, MAX_LEN, value=generation.max_len, step=1,
                                   label='Longest caption (tokens)', elem_id='max_len')
                button = gr.Button('Caption', variant='primary', elem_id='run')
                caption = gr.Textbox(label='Caption', lines=2, max_lines=30, interactive=False, elem_id='caption')
                status = gr.Markdown('', elem_id='status')
        upload.upload(demo.on_upload, inputs=upload, outputs=[preview, current, caption, status])
        upload.clear(lambda: demo.on_upload(None), inputs=None, outputs=[preview, current, caption, status])
        samples.select(on_sample, inputs=None, outputs=[preview, current, caption, status])
        button.click(demo.caption, inputs=[current, style, beam, length], outputs=[caption, status])
    return app


class OneLineRequestErrors(logging.Filter):
    """A request that fails inside the server (a malformed client request: a broken upload body, an unknown event
    or session) is one log line naming the error, not uvicorn's "Exception in ASGI application" traceback; the
    traceback is kept for ``--debug``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            record.msg, record.args = 'malformed request: %s: %s (the server goes on; --debug shows the traceback)', \
                (type(e).__name__, first_line(e) or repr(e))
            record.exc_info = record.exc_text = None
        return True


def serve(app, host: str, port: int, max_bytes: int, debug: bool = False) -> None:
    """Serve the app until Ctrl-C, which is raised on (KeyboardInterrupt: the harness's exit code 130) once the
    server is closed. (gradio's own blocking launch swallows Ctrl-C and returns as if the app had ended.) Without
    ``debug`` a failed request is one log line (:class:`OneLineRequestErrors`)."""
    import gradio as gr

    if not debug:
        logging.getLogger('uvicorn.error').addFilter(OneLineRequestErrors())

    try:  # a Ctrl-C while launch() still checks the started server (networking.url_ok) closes it too
        app.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, max_file_size=max_bytes, ssr_mode=False, show_error=False, quiet=True,
            prevent_thread_lock=True, theme=gr.themes.Default(font=FONTS, font_mono=['ui-monospace', 'monospace']))
        logger.info('web demo on http://%s:%d (Ctrl-C stops it)', host, port)
        while app.is_running:
            time.sleep(0.1)
    finally:
        app.close(verbose=False)
