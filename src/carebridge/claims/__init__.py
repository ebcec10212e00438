"""Claims: billing readiness, 837P/837I building, validation and release."""
