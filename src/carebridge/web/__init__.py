"""The web UI under ``/ui``: work queues, messages, deliveries, dashboard, reconciliation.

Pages are rendered on the server with Jinja2; the stylesheet is in the
package, so the UI works on a machine without internet access. A person
signs in with the API's credentials and gets a signed session cookie (see
:mod:`carebridge.web.session`); each page and action needs the same scope as
the matching API route. UI routes are left out of the OpenAPI schema
because they authenticate by cookie, not by bearer token.
"""

from fastapi import APIRouter

from carebridge.web import (
    auth_pages,
    delivery_pages,
    message_pages,
    report_pages,
    work_pages,
)

router = APIRouter(prefix="/ui", include_in_schema=False)
router.include_router(auth_pages.router)
router.include_router(work_pages.router)
router.include_router(message_pages.router)
router.include_router(delivery_pages.router)
router.include_router(report_pages.router)
