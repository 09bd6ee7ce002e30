"""Running the service off AWS: tables and routes read from template.yaml, DynamoDB Local, dev server."""
