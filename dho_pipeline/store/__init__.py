"""The teacher-logit store: the Zarr store itself, its write lock, lookup by fingerprint, copies and reports."""
