"""The clinical policy: the knowledge parameters a clinic can tune (CDS_WEANING_WAIT_MONTHS, ...).

A frozen value built once from the settings at start-up (`ClinicalPolicy.from_settings`) and passed into the
screening, so the clinical core never reads the service's settings. Rules in cards/ name the parameter a leaf
uses (`max_age_setting: pregnancy_status_max_age_days`); the knowledge loader checks every such name against
`ClinicalPolicy.NAMES`, so an unknown one is a start-up error, and `limit(name)` cannot fail at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ClinicalPolicy:
    weaning_wait_months: int
    postpartum_months: int  # a delivery this recent, with no feeding record after it, asks about breastfeeding
    mi_recent_days: int
    pregnancy_status_max_age_days: int
    breastfeeding_status_max_age_days: int
    childbearing_age_min: int
    childbearing_age_max: int
    planned_lookahead_days: int  # patient-view: plans dated up to this far ahead
    _limits: dict[str, int] = field(init=False, repr=False, compare=False)

    NAMES: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_limits", {name: getattr(self, name) for name in self.NAMES})

    @classmethod
    def from_settings(cls, settings: Any) -> ClinicalPolicy:
        """The policy fields of the service's settings (cds.settings.Settings, whose defaults are the policy's)."""
        return cls(**{name: getattr(settings, name) for name in sorted(cls.NAMES)})

    def limit(self, name: str) -> int:
        """The parameter a rule names (checked at start-up against NAMES)."""
        return self._limits[name]


ClinicalPolicy.NAMES = frozenset(f.name for f in fields(ClinicalPolicy) if f.init)
