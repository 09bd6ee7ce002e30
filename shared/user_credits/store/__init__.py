"""DynamoDB behind small named modules: pynamodb models and the few conditional writes we run."""
