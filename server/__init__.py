"""The HTTP feature service: FastAPI app, schemas, settings, and the web feature browser."""
