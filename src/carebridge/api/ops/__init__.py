"""The operations API under ``/api/v1``: messages, work items, deliveries, master data, audit.

Each sub-router declares the scope of every route in its description and
its error answers in ``responses=``; list routes page by keyset cursor (see
:mod:`carebridge.api.ops.common`).
"""

from fastapi import APIRouter

from carebridge.api.ops import audit_routes, deliveries, master_data, messages, work_items

router = APIRouter(prefix="/api/v1")
router.include_router(messages.router)
router.include_router(work_items.router)
router.include_router(deliveries.router)
router.include_router(master_data.router)
router.include_router(audit_routes.router)
