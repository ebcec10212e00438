"""Code-system names used in canonical records and crosswalk keys.

Sources name the same system in many ways (a FHIR URI, an HL7 table 0396
mnemonic, a CSV column). Mappers normalise them with :func:`code_system_from`
so that crosswalk look-ups compare like with like.
"""

from __future__ import annotations

SNOMED = "SNOMED"
CPT = "CPT"
HCPCS = "HCPCS"
CVX = "CVX"
RXNORM = "RXNORM"
NDC = "NDC"
ICD10CM = "ICD10CM"
ICD9CM = "ICD9CM"
DIAGNOSIS_SYSTEMS = frozenset({ICD10CM, ICD9CM})
ICD10CM_CODE = r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$"
"""Shape of an ICD-10-CM code, with or without its dot (``J02.9``, ``J029``)."""
LOCAL = "LOCAL"
CDM = "CDM"
"""Not an external system: the code is already a house chargemaster code."""

_ALIASES = {
    "http://snomed.info/sct": SNOMED,
    "sct": SNOMED,
    "snomed": SNOMED,
    "snomed-ct": SNOMED,
    "snomedct": SNOMED,
    "http://www.ama-assn.org/go/cpt": CPT,
    "cpt": CPT,
    "c4": CPT,  # HL7 table 0396: CPT-4
    "cpt4": CPT,
    "cpt-4": CPT,
    "https://www.cms.gov/medicare/coding/hcpcsreleasecodesets": HCPCS,
    "http://www.cms.gov/medicare/coding/medhcpcsgeninfo": HCPCS,
    "hcpcs": HCPCS,
    "hc": HCPCS,
    "c5": HCPCS,  # HL7 table 0396 lists HCPCS level II as HCPCS; some senders use C5
    "http://hl7.org/fhir/sid/cvx": CVX,
    "cvx": CVX,
    "http://www.nlm.nih.gov/research/umls/rxnorm": RXNORM,
    "rxnorm": RXNORM,
    "http://hl7.org/fhir/sid/ndc": NDC,
    "ndc": NDC,
    "http://hl7.org/fhir/sid/icd-10-cm": ICD10CM,
    "icd10cm": ICD10CM,
    "icd-10-cm": ICD10CM,
    "i10": ICD10CM,  # HL7 table 0396: ICD-10
    "i10c": ICD10CM,  # HL7 table 0396: ICD-10-CM
    "icd10": ICD10CM,
    "http://hl7.org/fhir/sid/icd-9-cm": ICD9CM,
    "i9": ICD9CM,
    "i9c": ICD9CM,
    "icd9": ICD9CM,
    "icd9cm": ICD9CM,
    "local": LOCAL,
    "l": LOCAL,
    "99zzz": LOCAL,
}


def code_system_from(name: str | None) -> str | None:
    """Return the canonical code-system name for ``name``, or ``None``.

    ``None`` means the system is not one carebridge recognises; callers keep
    the original text for the work item rather than guessing.
    """
    if not name:
        return None
    return _ALIASES.get(name.strip().lower())
