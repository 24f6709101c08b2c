"""The data stage: raw photos to cleaned JPEGs and train/val/test manifests over them, and their rules.

fetch (a folder or s3://), clean (decode safely, drop duplicates; corrections from a review),
near_duplicates, split (by product and look-alike group: lookalike), balance, augment; images (safe
decoding), naming (product ids, atomic writes), dataset (the <split>/<category>/ layout), manifest
(references instead of copies between steps), fingerprint.
Imports nothing from the later stages.
"""
