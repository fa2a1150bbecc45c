"""Backups of a trained model: archives with a manifest of sha256 sums, verified and restored safely.

* :mod:`.archive`    the format: constants, tar members, member safety checks, the manifest, the one sha256 helper
* :mod:`.create`     :func:`~.create.backup`: a model dir (or a checkpoint's weights) with its conf, as one archive
* :mod:`.shareable`  ``-e``: the conf's local paths out of the conf and the model's JSON files
* :mod:`.restore`    :func:`~.restore.scan_archive`, :func:`~.restore.verify`, :func:`~.restore.restore`

The command (``python -m utils.backup_model``) is :mod:`utils.backup_model`.
"""
