"""Web demo: caption an uploaded image (or a sample) in one style or in all of them, with a trained model.

    python3 web_demo.py --conf C [-m MODEL] [--host 127.0.0.1] [--port 7860] [--max_upload_mb 10]

A gradio app over the toolkit's Captioner (the same captions as pre_inference.py for the same settings). The
model is loaded once; beam size and caption length are set per request. The app binds to 127.0.0.1 unless
--host says otherwise. It serves nothing but the uploads and what it shows: gradio keeps uploads and the
sample copies in a private temporary folder (GRADIO_TEMP_DIR), removed when the app stops, and no other
path is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from typing import List, Optional

from utils.core.layout import OUTPUT_DIR
from utils.core.errors import ConfError
from utils.core.conf import load_conf
from utils.core.flags import add_conf_flags, conf_overrides
from utils.core.errors import first_line

logger = logging.getLogger('web_demo')
ALL_STYLES = 'All styles'
N_SAMPLES = 4       # sample images offered: the first distinct images of the conf's test split
MAX_BEAM = 10       # slider ranges
MAX_LEN = 64
FONTS = ['ui-sans-serif', 'system-ui', 'sans-serif']  # local fonts: the page fetches nothing from the internet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='web_demo.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', required=True, help='path to the JSON conf (generation settings, samples)')
    p.add_argument('-m', '--model', help='model dir or hub id (default: {work_dir}/output)')
    p.add_argument('--host', default='127.0.0.1', help='address to bind (0.0.0.0: every interface)')
    p.add_argument('--port', type=int, default=7860, help='port to listen on')
    p.add_argument('--max_upload_mb', type=float, default=10, help='largest upload accepted, in MB')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'caption')  # e.g. --beam_size, --max_len: the controls' starting values
    return p


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
    from utils.core.errors import DataError
    from utils.data.rows import load_split
    try:
        rows, _ = load_split(conf, 'test', limit=8 * N_SAMPLES)
    except (ConfError, DataError, OSError) as e:
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


def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.cli import run_reporting_errors
    from utils.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger('httpx').setLevel(logging.WARNING)  # gradio's requests to itself at start-up
    # gradio 6.17 names a status code that its newer starlette renamed: a warning at every request
    warnings.filterwarnings('ignore', message='.*HTTP_422_UNPROCESSABLE_ENTITY.*')
    return run_reporting_errors(lambda: run(args), debug=args.debug)


def run(args) -> int:
    conf = load_conf(args.conf, conf_overrides(args), splits=())
    if not 0 < args.max_upload_mb:
        raise ConfError(f'--max_upload_mb must be positive, got {args.max_upload_mb}')
    if not 0 <= args.port < 65536:
        raise ConfError(f'--port must be 0..65535, got {args.port}')
    from utils.captioning.captioner import load_captioner
    captioner = load_captioner(conf, args.model)  # the model is loaded once, here

    with tempfile.TemporaryDirectory(prefix='web_demo_') as private:
        # before gradio is imported: uploads and the files it shows live here, and nowhere else is served
        os.environ['GRADIO_TEMP_DIR'] = os.path.join(private, 'uploads')
        os.environ['GRADIO_EXAMPLES_CACHE'] = os.path.join(private, 'examples')
        os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
        import gradio as gr

        os.makedirs(os.path.join(private, 'samples'))
        demo = Demo(captioner, sample_images(conf, os.path.join(private, 'samples')),
                    max_bytes=int(args.max_upload_mb * 1e6), batch_size=conf.run.batch_size)
        app = build_app(demo, args.model or os.path.join(conf.run.work_dir, OUTPUT_DIR))
        logger.info('web demo on http://%s:%d (Ctrl-C stops it)', args.host, args.port)
        app.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 1e6),
            ssr_mode=False, show_error=False, quiet=True,
            theme=gr.themes.Default(font=FONTS, font_mono=['ui-monospace', 'monospace']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
