"""The money rules in plain Python: no boto3, no stripe. Every function here is pure."""
