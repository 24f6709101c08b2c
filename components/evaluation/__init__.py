"""The evaluation stage: a model against labelled test photos, and every number a reviewer asks for.

predict (batch top-k), metrics (pure functions), photo_sets (which photos: a manifest or folders),
evaluate (the step), outputs (its file names), plots,
report (evaluate's report.html) and report_html (what the HTML reports share).
"""
