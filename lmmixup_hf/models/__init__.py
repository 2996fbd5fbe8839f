"""Model names and aliases (offline stand-ins included) and the OpenAI-compatible client."""
