"""Errors a user can hit. Each says what went wrong and what to do; the CLI prints it on one line."""

from __future__ import annotations


class RtaError(Exception):
    """Base of every error the `rta` command reports as a one-line message (exit code 2)."""


class ConfigError(RtaError):
    """A setting is missing, malformed or contradicts another one."""


class StackError(RtaError):
    """The local broker/Redis stack could not be started, reached or stopped."""


class BundleError(RtaError):
    """A model bundle is missing, corrupt, or does not match what the caller expects."""


class DataError(RtaError):
    """Logged traffic is unreadable or lacks what the trainer or replay needs."""


class InfeasibleTargets(RtaError):
    """Ratio targets that cannot hold together (e.g. r + p_u + epsilon > 1)."""


class WorkerError(RtaError):
    """The worker stopped itself because going on could break the delivery guarantee."""
