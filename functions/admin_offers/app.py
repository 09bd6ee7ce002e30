"""PUT /admin/offers/{offerId}, GET /admin/offers: the catalog, for the operator's back-end."""

from user_credits.api.app import lambda_entry
from user_credits.api.offers import admin_router

handler = lambda_entry(admin_router)
