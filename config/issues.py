"""A problem in a stack file, named by the key a user edits (`enclave:roles.mysql.count`), and the error that
carries every problem found. Every check of a stack (schema, whole-stack checks, limits, the stack file's own
reading) reports through these, so the CLI and the Pulumi program print them alike.

For users: docs/stack-file.md (what is refused, and how it is reported).
"""

from __future__ import annotations

from dataclasses import dataclass

NAMESPACE = "enclave"


@dataclass(frozen=True)
class StackIssue:
    """One problem in a stack file, named by the key path the user has to edit."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class StackError(Exception):
    """A stack file that must not be deployed. Carries every issue found, not just the first."""

    def __init__(self, issues: list[StackIssue], source: str = "stack") -> None:
        self.issues = issues
        self.source = source
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} problem(s); nothing was created or changed:\n{lines}")
