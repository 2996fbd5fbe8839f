"""The distiller model: its prompt, response parsing, generation engines and the HF pipeline."""
