"""Thin routers: parse, check access, call a function in server/features.py or
server/service.py, return its schema."""
