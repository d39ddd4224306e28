"""`InRankError`: the base of every error inrank_fx raises on purpose.

Each error class also keeps the builtin base it had before there was a common one (callers may
catch those): OptimizerStateError is a TypeError, ExportParityError an AssertionError, ExportError
and InRankDistributedError RuntimeErrors. `except inrank_fx.InRankError` catches them all.
"""


class InRankError(Exception):
    """Something inrank_fx refused or could not do; the message says what and where."""
