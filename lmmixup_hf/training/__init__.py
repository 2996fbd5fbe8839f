"""MIXTURE rows -> SFT and GRPO training rows."""
