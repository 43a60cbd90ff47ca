"""The hooks this service serves, and its service ids (the request itself is validated in cds/requests.py)."""

from __future__ import annotations

SERVED_HOOKS = ("order-select", "order-sign", "patient-view", "appointment-book")
ORDER_HOOKS = ("order-select", "order-sign")
# One service per hook (CDS Hooks identifies a service by its URL, `{baseUrl}/cds-services/{id}`, and clients such
# as the reference sandbox key services by that URL, so one id must mean one hook).
SERVICES: dict[str, str] = {
    "mesotherapy-order-select": "order-select",
    "mesotherapy-order-sign": "order-sign",
    "mesotherapy-patient-view": "patient-view",
    "mesotherapy-appointment-book": "appointment-book",
}
LEGACY_SERVICE = "mesotherapy-contraindications"  # answers both order hooks; not listed in discovery
SERVICE_HOOKS: dict[str, tuple[str, ...]] = {**{sid: (hook,) for sid, hook in SERVICES.items()},
                                             LEGACY_SERVICE: ORDER_HOOKS}
