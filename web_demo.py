"""Web demo: caption an uploaded image (or a sample) in one style or in all of them, with a trained model.

    python3 web_demo.py --conf C [-m MODEL] [--host 127.0.0.1] [--port 7860] [--max_upload_mb 10]

A gradio app over the toolkit's Captioner (the same captions as pre_inference.py for the same settings), with
the model of -m (default: {work_dir}/output; the conf's model_name is the base model it was trained from). The
model is loaded once; beam size and caption length are set per request. The app binds to 127.0.0.1 unless
--host says otherwise. It serves nothing but the uploads and what it shows (a private temporary folder, removed
when the app stops). Ctrl-C stops it (exit code 130), SIGTERM too (exit code 143), removing that folder either way.
The app itself: utils/demo/web_app.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from typing import List, Optional

from utils.core.conf_checks import load_conf
from utils.core.errors import UsageError
from utils.core.flags import add_conf_flags, conf_overrides

logger = logging.getLogger('web_demo')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='web_demo.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', required=True, help='path to the JSON conf (generation settings, samples)')
    p.add_argument('-m', '--model', metavar='MODEL',
                   help='the model that captions: a model dir or hub id (default: {work_dir}/output)')
    p.add_argument('--host', default='127.0.0.1', help='address to bind, 0.0.0.0: every interface (default: %(default)s)')
    p.add_argument('--port', type=int, default=7860, help='port to listen on (default: %(default)s)')
    p.add_argument('--max_upload_mb', type=float, default=10, metavar='MB',
                   help='largest upload accepted, in MB (default: %(default)g)')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'caption')  # e.g. --beam_size, --max_len: the controls' starting values
    return p


def check_flags(args) -> None:
    """The command's own flags (not conf keys), before anything is read."""
    if not 0 < args.max_upload_mb:
        raise UsageError(f'--max_upload_mb must be positive, got {args.max_upload_mb}')
    if not 0 <= args.port < 65536:
        raise UsageError(f'--port must be 0..65535, got {args.port}')


def main(argv: Optional[List[str]] = None) -> int:
    from utils.core.cli import run_reporting_errors
    from utils.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger('httpx').setLevel(logging.WARNING)  # gradio's requests to itself at start-up
    # gradio 6.17 names a status code that its newer starlette renamed: a warning at every request
    warnings.filterwarnings('ignore', message='.*HTTP_422_UNPROCESSABLE_ENTITY.*')
    return run_reporting_errors(lambda: run(args), debug=args.debug)


EXIT_TERMINATED = 128 + signal.SIGTERM


def _terminated(signum, frame):
    """SIGTERM (kill, systemd, docker stop): leave as Ctrl-C does, through every ``finally`` (the server closes,
    the private folder with the users' uploads is removed), with exit code 143."""
    logger.info('SIGTERM: stopping the web demo')
    raise SystemExit(EXIT_TERMINATED)


def run(args) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    from utils.captioning.captioner import load_captioner
    from utils.demo.web_app import Demo, build_app, private_folder, sample_images, serve

    # the command line and the conf
    check_flags(args)
    conf = load_conf(args.conf, conf_overrides(args), splits=())
    # model: loaded once, here
    captioner = load_captioner(conf, args.model)
    max_bytes = int(args.max_upload_mb * 1e6)
    with private_folder() as private:  # before gradio is imported: nothing else is served
        # data: the sample images; work: the app, until Ctrl-C (KeyboardInterrupt: exit code 130)
        demo = Demo(captioner, sample_images(conf, private.samples), max_bytes=max_bytes,
                    batch_size=conf.run.batch_size)
        serve(build_app(demo, os.path.abspath(captioner.model_dir)), args.host, args.port, max_bytes, debug=args.debug)
    return 0


if __name__ == '__main__':
    sys.exit(main())
