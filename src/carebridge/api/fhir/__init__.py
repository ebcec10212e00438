"""FHIR R4 REST under ``/fhir``."""

from fastapi import APIRouter

router = APIRouter(prefix="/fhir", tags=["fhir"])
