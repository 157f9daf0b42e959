"""The error types users see: an inventory or release that cannot work, and a lab step that failed.

It sits below every other layer (planner, releases, roles, lab) and imports nothing of
pyinfra, so that the planner can be used, and tested, without it. The deploy files turn it
into a pyinfra error (``roles.preflight.refusals``), which pyinfra's CLI prints as one paragraph,
without a traceback, before any operation runs on any host.
"""


class FleetConfigError(Exception):
    """A configuration that cannot work; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem} Fix: {fix}")


class LabError(RuntimeError):
    """A step of the local lab that cannot go on (not a refused input); the message says what to do."""
