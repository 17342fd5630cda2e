"""The project's error types. The CLI turns each into one line and an exit code.

Exit codes let an app's release build tell *why* edgeslim refused: 2 = the input is wrong (fix the command or
file), 3 = the budget cannot be met by any plan, 1 = the model was built but failed validation.
"""


class EdgeslimError(Exception):
    """Base class: a message for a person, already one line."""

    exit_code = 1


class UsageError(EdgeslimError):
    """Bad input: a flag, file or field is wrong. The message names it and says what to do."""

    exit_code = 2


class BudgetError(EdgeslimError):
    """No plan meets the device budget; the message states the smallest achievable figure."""

    exit_code = 3


class ValidationFailed(EdgeslimError):
    """The exported model does not match PyTorch or does not fit its budget."""

    exit_code = 1


class NumericalError(EdgeslimError):
    """A decomposition failed on one layer; never silently replaced by something else."""

    exit_code = 1
