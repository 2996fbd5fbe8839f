"""One core per pipeline stage: a Dataset in, a Dataset out; no files, no argument parsing."""
