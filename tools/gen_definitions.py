"""Regenerate Rebond's compact FHIR R4 definitions from their sources.

Two files are written under src/rebond/fhir/definitions/:
  search-parameters.json  from the specification's search-parameter bundle
                          (../shared/fhir/search-parameters-r4.json)
  elements.json           the element tree of every R4 resource and data type,
                          read from the fhirclient package's R4 (4.0.1) models,
                          used for structural validation on write.
Run: .venv/bin/python tools/gen_definitions.py [PATH_TO_SEARCH_PARAMETERS]
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "rebond" / "fhir" / "definitions"
KEEP = ("code", "base", "type", "expression", "target", "comparator", "modifier", "component", "url", "multipleOr", "multipleAnd")


def search_parameters(source: Path) -> list[dict[str, object]]:
    bundle = json.loads(source.read_text())
    params = []
    for entry in bundle["entry"]:
        res = entry["resource"]
        params.append({k: res[k] for k in KEEP if k in res})
    return params


def primitive_kind(py_type: type) -> str:
    name = py_type.__name__
    if py_type is bool:
        return "boolean"
    if py_type is int:
        return "integer"
    if py_type is float:
        return "decimal"
    if py_type is str:
        return "string"
    dates = {"FHIRDate": "date", "FHIRDateTime": "dateTime", "FHIRInstant": "instant", "FHIRTime": "time"}
    if name in dates:
        return dates[name]
    raise ValueError(name)


def element_tree() -> tuple[dict[str, dict[str, list[object]]], list[str]]:
    import fhirclient.models as models
    from fhirclient.models.fhirabstractbase import FHIRAbstractBase
    from fhirclient.models.resource import Resource

    types: dict[str, dict[str, list[object]]] = {}
    resources: set[str] = set()
    for info in pkgutil.iter_modules(models.__path__):
        mod = importlib.import_module(f"fhirclient.models.{info.name}")
        for cls_name, cls in inspect.getmembers(mod, inspect.isclass):
            if not issubclass(cls, FHIRAbstractBase) or cls.__module__ != mod.__name__:
                continue
            key = cls.resource_type if issubclass(cls, Resource) and cls_name == cls.resource_type else cls_name
            if issubclass(cls, Resource) and cls_name == cls.resource_type and cls_name not in ("Resource", "DomainResource"):
                resources.add(cls_name)
            elements: dict[str, list[object]] = {}
            for _, js_name, py_type, is_list, of_many, required in cls.elementProperties(cls()):
                if issubclass(py_type, FHIRAbstractBase):
                    kind = py_type.resource_type if issubclass(py_type, Resource) and py_type.__name__ == py_type.resource_type else py_type.__name__
                else:
                    kind = primitive_kind(py_type)
                elements[js_name] = [kind, bool(is_list), bool(required), of_many or ""]
            types[key] = elements
    return types, sorted(resources)


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "fhir" / "search-parameters-r4.json"
    OUT.mkdir(parents=True, exist_ok=True)
    types, resources = element_tree()
    (OUT / "search-parameters.json").write_text(json.dumps(search_parameters(source), separators=(",", ":")))
    (OUT / "elements.json").write_text(json.dumps({"resources": resources, "types": types}, separators=(",", ":"), sort_keys=True))
    print(f"{len(resources)} resource types, {len(types)} element types, written {datetime.date.today()}")


if __name__ == "__main__":
    main()
