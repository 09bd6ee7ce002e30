"""user-credits: pay-as-you-go credits (token packs and subscriptions) on Lambda, DynamoDB and Stripe."""
