"""vllm-fleet roles: one module per concern, ``@deploy`` functions plus the pure logic they use."""
