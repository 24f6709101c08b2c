"""The one exception type a step raises for bad input; the CLI prints it as a message, not a traceback.

Every stage raises it, so it sits in components/ itself and imports nothing.
"""


class StepError(Exception):
    """Input or arguments a step cannot work with; the message says what to change."""
