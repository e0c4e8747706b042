"""HL7 v2 over MLLP: admissions (IHE PAM, French profile) and lab results (ORU^R01), kept raw before they are acknowledged."""
