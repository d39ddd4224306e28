"""`InRankError`: the base of every error inrank_fx raises on purpose.

Each error class also keeps the builtin base it had before there was a common one (callers may
catch those): OptimizerStateError is a TypeError, ExportParityError an AssertionError, ExportError
and InRankDistributedError RuntimeErrors, MissingDependencyError (an exporter's optional package
or CUDA missing) an ImportError and a RuntimeError. `except inrank_fx.InRankError` catches them all.

Errors that are neither about a bad argument's type nor its value keep their builtin meaning
through InRankKeyError (an unknown name: a KeyError) and InRankRuntimeError (a state or an
environment that cannot do what was asked: a RuntimeError).

One rule for bad arguments: a value of the wrong type is an InRankTypeError (a TypeError), a value
of the right type out of range or outside the vocabulary an InRankValueError (a ValueError).
InRankConfig and set_ranks follow it.
"""


class InRankError(Exception):
    """Something inrank_fx refused or could not do; the message says what and where."""


class InRankTypeError(InRankError, TypeError, ValueError):
    """A value of the wrong type (a string for a number, a bool for a count, ...).

    The rule: a value of the wrong type is a TypeError, a value of the right type that is out of
    range or not in the vocabulary is a ValueError. This one is also a ValueError, which is what
    InRankConfig and set_ranks raised for wrong types before the rule, so that code catching
    ValueError keeps working.
    """


class InRankValueError(InRankError, ValueError):
    """A value of the right type that is out of range or not in the vocabulary."""


class InRankKeyError(InRankError, KeyError):
    """A name that is not there: a layer, a registered handler."""

    def __str__(self) -> str:  # KeyError quotes its message; this one reads as written
        return str(self.args[0]) if self.args else ""


class InRankRuntimeError(InRankError, RuntimeError):
    """A state or an environment in which inrank_fx cannot do what was asked."""
