"""Stripe at the edge: secrets, PaymentIntents and webhook verification.

Only the order and webhook functions import this package, because `stripe` is a large import and the
other functions' cold starts should not pay for it.
"""
