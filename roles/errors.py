"""The one error type users see when their inventory or release cannot work.

It subclasses pyinfra's ``PyinfraError`` so that the pyinfra CLI prints the message as one
paragraph, without a traceback, and stops before any operation runs on any host.
"""

from pyinfra.api.exceptions import PyinfraError


class FleetConfigError(PyinfraError):
    """A configuration that cannot work; the message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem} Fix: {fix}")
