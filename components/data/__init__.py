"""The data stage: raw photos to train/val/test folders of cleaned JPEGs, and the rules they share.

fetch (a folder or s3://), clean (decode safely, drop duplicates; corrections from a review),
near_duplicates, split (by product and look-alike group: lookalike), balance, augment; images (safe
decoding), naming (product ids, atomic writes), dataset (the <split>/<category>/ layout), fingerprint.
Imports nothing from the later stages.
"""
