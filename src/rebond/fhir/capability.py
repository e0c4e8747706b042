"""The CapabilityStatement: exactly the interactions and search parameters this server supports."""
from __future__ import annotations

import functools
from typing import Any

from rebond import __version__
from rebond.fhir.model import RESOURCE_TYPES
from rebond.fhir.searchparams import registry

_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
_MODIFIERS_DOC = {
    "string": ":exact, :contains, :missing",
    "token": ":not, :text, :missing",
    "reference": ":[type], :missing, chaining one level",
    "uri": ":below, :above, :missing",
}


@functools.cache
def _resources() -> list[dict[str, Any]]:
    out = []
    reg = registry()
    for rtype in RESOURCE_TYPES:
        params = [
            {"name": "_id", "type": "token"},
            {"name": "_lastUpdated", "type": "date"},
        ]
        for code, param in sorted(reg.get(rtype, {}).items()):
            if code in ("_id", "_lastUpdated"):
                continue
            entry: dict[str, Any] = {"name": code, "type": param.type, "definition": param.url}
            if param.type in _MODIFIERS_DOC:
                entry["documentation"] = "modifiers " + _MODIFIERS_DOC[param.type]
            params.append(entry)
        reference_params = sorted(c for c, p in reg.get(rtype, {}).items() if p.type == "reference")
        out.append(
            {
                "type": rtype,
                "interaction": [{"code": c} for c in _INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                "searchInclude": ["*"] + [f"{rtype}:{c}" for c in reference_params],
                "searchRevInclude": ["*"],
                "searchParam": params,
            }
        )
    return out


def capability_statement(base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "kind": "instance",
        "software": {"name": "Rebond", "version": __version__},
        "implementation": {"description": "Rebond FHIR server", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                # SMART (security/smart.py): where a backend service, or an app a person uses, gets its tokens
                "security": {
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                             "code": "SMART-on-FHIR"}]}],
                    "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris", "extension": [
                        {"url": "token", "valueUri": base_url.removesuffix("/fhir") + "/auth/token"},
                        {"url": "authorize", "valueUri": base_url.removesuffix("/fhir") + "/auth/authorize"}]}],
                    "description": "Authorization: Bearer — an API token (rebond accounts token); a SMART Backend Services token "
                                   "(client_credentials, private_key_jwt RS384/ES384, system scopes); or a SMART App Launch "
                                   "token (standalone, authorization_code with PKCE S256, user scopes). "
                                   "See .well-known/smart-configuration.",
                },
                "documentation": (
                    "Unknown search parameters are rejected with 400 unless the request says Prefer: handling=lenient. "
                    "Search result parameters: _count, _offset, _sort, _include, _revinclude (with :iterate), "
                    "_summary, _total=accurate, _elements. The change feed is GET [base]/$changes?after=CURSOR&_count=N. "
                    "The audit trail of this node is GET [base]/$audit?patient=&agent=&date=&_count= (AuditEvents; role admin)."
                ),
                "resource": _resources(),
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
                "operation": [{"name": "changes", "definition": "https://rebond.health/fhir/OperationDefinition/changes"},
                              {"name": "audit", "definition": "https://rebond.health/fhir/OperationDefinition/audit"}],
            }
        ],
    }
