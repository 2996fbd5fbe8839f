"""Everything around the cores: one command per stage, stage bookkeeping, `lmmixup run`, the report."""
