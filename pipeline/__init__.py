"""The real-time path: types, the five stages, engine, config, tenants and API keys, the gateway."""
