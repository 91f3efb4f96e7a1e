"""The wire format: pydantic models for every request and response body."""
