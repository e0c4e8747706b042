"""FHIR errors as values: every failure leaves the server as an OperationOutcome with its status."""
from __future__ import annotations

from typing import Any

from rebond.fhir.model import Issue


class FhirError(Exception):
    """An error with the HTTP status and OperationOutcome issues that describe it."""

    def __init__(self, status: int, message: str, *, code: str = "processing", issues: list[Issue] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.issues = issues or []

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.message, code=self.code, issues=self.issues)


def operation_outcome(
    message: str, *, severity: str = "error", code: str = "processing", issues: list[Issue] | None = None
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    if issues:
        for issue in issues:
            entries.append(
                {"severity": severity, "code": "structure", "diagnostics": issue.message, "expression": [issue.path]}
            )
    else:
        entries.append({"severity": severity, "code": code, "diagnostics": message})
    return {"resourceType": "OperationOutcome", "issue": entries}


def bad_request(message: str, code: str = "invalid") -> FhirError:
    return FhirError(400, message, code=code)
