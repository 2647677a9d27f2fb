"""The aiohttp pingback sidecar: receive, authenticate, record durably, never drop."""
