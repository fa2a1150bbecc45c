"""Backups of a trained model: archives with a manifest of sha256 sums, verified and restored safely."""
