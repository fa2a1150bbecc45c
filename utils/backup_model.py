"""Back up a trained model with its conf as one tar.gz; check a backup; restore one safely.

    python3 -m utils.backup_model --conf C [-o OUT_DIR] [-e | -n] [--checkpoint CKPT | -m MODEL_DIR]
    python3 -m utils.backup_model --verify ARCHIVE
    python3 -m utils.backup_model --restore ARCHIVE DIR

A backup is {OUT_DIR or work_dir}/{model}_{time}.tar.gz ({model}: the last component of a local
model_name, or owner_name for a hub id; {time}: YYYYmmdd_HHMMSS). An existing archive is never
overwritten: when the name is taken, _1, _2, ... is added to it. The archive is written under a
temporary name in the same folder and renamed when complete, so an interrupted backup leaves no
file under the final name. It holds one folder:

    {model}_{time}/model/...        the trained model dir ({work_dir}/output, or -m's, e.g.
                                    {work_dir}/output_best; with --checkpoint, the same files with
                                    pytorch_model.bin taken from that checkpoint)
    {model}_{time}/conf.json        the conf as loaded and resolved (none with -n; with -e the local
                                    paths img_addr, dataset_path and work_dir are null)
    {model}_{time}/manifest.json    sha256 and size of every other file, toolkit version, style map,
                                    model_name/model_revision, checkpoint, creation time

--restore extracts to DIR/{model}_{time}/ (refusing absolute paths, "..", links and device files,
a manifest whose model_dir or conf is not a path inside the archive, and an existing target), checks
every file's sha256 and size against the manifest, and prints the model dir, which pre_inference.py -m
takes. --verify checks sha256 and size too.

Exit codes: 0 ok; 1 the archive's content differs from its manifest (--verify, --restore: the
differences are listed); 2 bad input (conf, checkpoint, paths) or an unreadable, corrupt or unsafe
archive. Errors are one line, "error: ...".
"""

# The command's table of contents; the work is in utils.backup:
#   utils.backup.archive    the format: members, safety checks, the manifest, the one sha256 helper
#   utils.backup.create     backup(): a model dir (or a checkpoint's weights) with its conf
#   utils.backup.shareable  -e: the conf's local paths out of the conf and the model's JSON files
#   utils.backup.restore    scan_archive(), verify(), restore()
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from utils.backup.create import backup
from utils.backup.restore import restore, verify
from utils.core.cli import EXIT_USAGE, run_reporting_errors
from utils.core.flags import add_conf_flags, conf_overrides
from utils.core.logs import setup_logging


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (from main), instead of usage + message
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog='python3 -m utils.backup_model', description=__doc__.split('\n\n', 2)[2],
                usage='\n       '.join(line.strip() for line in __doc__.split('\n\n')[1].splitlines()),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--conf', help='back up the model trained with this conf ({work_dir}/output)')
    p.add_argument('-o', '--out_dir', help='where the archive goes (default: work_dir); it is never '
                                           'overwritten: a taken name gets _1, _2, ... added')
    p.add_argument('-e', '--shareable', action='store_true',
                   help='store the conf with img_addr, dataset_path and work_dir set to null (and those paths '
                        'removed from the model\'s JSON files): safe to share')
    p.add_argument('-n', '--no_conf', action='store_true', help='store no conf')
    p.add_argument('-p', '--checkpoint',
                   help='back up the weights of this CheckpointHook checkpoint instead of work_dir/output\'s: '
                        'work_dir/iter_N or its iter_N.pth (a bare iter_N is looked for in work_dir), or "latest"')
    p.add_argument('-m', '--model', help='back up this model dir instead of work_dir/output, e.g. work_dir/output_best')
    p.add_argument('--verify', metavar='ARCHIVE', help='check every file of ARCHIVE against its manifest')
    p.add_argument('--restore', nargs=2, metavar=('ARCHIVE', 'DIR'),
                   help='check ARCHIVE, extract it to DIR/{model}_{time}/ and print the model dir')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    add_conf_flags(p, 'backup')  # with --conf: e.g. --work_dir
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        modes = [flag for flag, value in (('--conf', args.conf), ('--verify', args.verify),
                                          ('--restore', args.restore)) if value is not None]
        if len(modes) != 1:
            raise _UsageError('give one of --conf, --verify or --restore' if not modes
                              else f'{" and ".join(modes)} exclude each other')
        if args.checkpoint and args.model:
            raise _UsageError('--checkpoint (weights of a checkpoint) and -m (a model dir) exclude each other')
        if args.shareable and args.no_conf:
            raise _UsageError('-e (store a shareable conf) and -n (store no conf) exclude each other')
        if args.conf is None:
            extra = [flag for flag, value in (('-o', args.out_dir), ('-e', args.shareable), ('-n', args.no_conf),
                                              ('--checkpoint', args.checkpoint), ('-m', args.model)) if value]
            if extra:
                raise _UsageError(f'{", ".join(extra)} only go with --conf')
    except _UsageError as e:
        print(f'error: {e} (see --help)', file=sys.stderr)
        return EXIT_USAGE

    setup_logging()

    def run() -> int:
        if args.verify is not None:
            return verify(args.verify)
        if args.restore is not None:
            return restore(*args.restore)[0]
        mode = 'shareable' if args.shareable else 'none' if args.no_conf else 'full'
        print(backup(args.conf, args.out_dir, mode, args.checkpoint, args.model, conf_overrides(args)))
        return 0

    # bad input (the conf, the archive, a checkpoint, a work_dir in use): exit 2; a full disk or another
    # OSError: exit 1 (nothing was left under a final name either way)
    return run_reporting_errors(run, debug=args.debug)


if __name__ == '__main__':
    sys.exit(main())
