"""Use cases: each public function is one thing a caller can ask of the service."""
