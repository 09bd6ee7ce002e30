"""Events out: EventBridge, bus EVENT_BUS_NAME, source `user-credits` (SPEC 4)."""
