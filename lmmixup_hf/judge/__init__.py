"""The rating judge: rubrics, reply parsing, the API and local judges, and batch jobs."""
