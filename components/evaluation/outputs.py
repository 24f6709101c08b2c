"""The files evaluate writes to its OUT folder, by name.

evaluate writes them; its report (`report.py`) reads them back, and so may anything that reads an
evaluation folder, without importing the step itself.
"""

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSIONS_FILE = "confusions.csv"
CONFUSION_PNG = "confusion_matrix.png"
COVERAGE_FILE = "coverage.csv"
COVERAGE_PNG = "coverage.png"
MODEL_DIR = "model"
