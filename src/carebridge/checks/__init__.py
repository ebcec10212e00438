"""AI-assisted checks that flag and rank; rules and people decide.

Duplicate patients (:mod:`.linkage`), missing charges
(:mod:`.missing_charges`), unit and amount anomalies (:mod:`.anomalies`) and
work-queue ranking (:mod:`.ranking`). :mod:`.run` turns their flags into
work items, :mod:`.merge` applies a merge a person approved, and
:mod:`.evaluate` measures each check on labelled data.
"""
