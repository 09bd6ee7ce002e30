"""The HTTP edge: routers per area, strict request models, the one error map, the entry point."""
