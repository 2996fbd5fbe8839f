"""The data contract (schema), pool and stage-folder I/O with quarantine, and what high quality means."""
