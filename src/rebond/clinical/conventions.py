"""How the hospital is written in FHIR: the identifier systems and codes every part of Rebond agrees on."""
from __future__ import annotations

from zoneinfo import ZoneInfo

#: the hospital's time: what a person reads and writes, and what an HL7 time without a zone means
HOSPITAL_TZ = ZoneInfo("Europe/Paris")
GROUP_IPP_SYSTEM = "urn:oid:1.2.250.1.999.1.1"  # the group's patient identifier (IPP) namespace
GROUP_VISIT_SYSTEM = "urn:oid:1.2.250.1.999.1.2"  # stay numbers (NDA)
FINESS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
RPPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"
LOCATION_SYSTEM = "urn:rebond:location"  # the codes of sites, wards, rooms and beds (H1, H1-CARD, …)
LOCATION_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
REPORT_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"  # LAB, RAD
DOCUMENT_CATEGORY = "urn:rebond:document-category"
ON_CALL_SYSTEM = "urn:rebond:on-call"
#: the services a message may be sent to (HealthcareService.identifier): a ward's by its code (H1-CARD), a hospital's
#: lab and pharmacy by the site's and their kind (H1-LAB, H1-PHARMA)
SERVICE_SYSTEM = "urn:rebond:service"

#: Communications: the crisis cell's situation updates (ops/situation.py), the staff's messages (clinical/messaging.py)
COMMUNICATION_CATEGORY = "urn:rebond:communication-category"
MODULE_SYSTEM = "urn:rebond:module"
MODULE_STATE_SYSTEM = "urn:rebond:module-state"
SITE_SYSTEM = "urn:rebond:site"

#: a clinician's acknowledgement that they have seen a result: a completed Task whose focus is the report
TASK_CODE_SYSTEM = "urn:rebond:task"
ACKNOWLEDGEMENT = "result-acknowledgement"
PRESCRIPTION_ACKNOWLEDGEMENT = "prescription-acknowledgement"  # a nurse has read a new prescription
PRESCRIPTION_VALIDATION = "prescription-validation"  # a pharmacist has validated a prescription (clinical/pharmacy.py)

#: interpretation codes that make a result stand out
ABNORMAL_FLAGS = frozenset({"H", "L", "HH", "LL", "HU", "LU", "A", "AA", "<", ">"})
CRITICAL_FLAGS = frozenset({"HH", "LL", "AA"})
#: the lab's call for a critical result that no one on the ward has taken in hand after this long goes to a physician
ESCALATE_MINUTES = 15.0
