"""JSON schemas for structured-output tests and benchmarks: nested objects, arrays, enums,
numbers with bounds, optional fields. Strings are bounded so that a random-weight model's
answers end within a test's token budget (it writes any byte inside a string)."""

from __future__ import annotations


def _string(n: int = 12) -> dict:
    return {"type": "string", "maxLength": n}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False}


SCHEMAS = {
    # Nested objects and an array of objects.
    "order": _object({
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "customer": _object({"name": _string(), "vip": {"type": "boolean"}}),
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": _object({"sku": _string(6), "qty": {"type": "integer", "minimum": 1, "maximum": 99}})},
    }),
    # Enums and a bounded number.
    "label": _object({
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    }),
    # Numbers with bounds, exclusive and inclusive.
    "reading": _object({
        "celsius": {"type": "number", "minimum": -50, "exclusiveMaximum": 60},
        "station": {"type": "integer", "minimum": 100, "maximum": 999},
        "ok": {"type": "boolean"},
    }),
    # Optional fields (only "name" is required) and an array of enum values.
    "profile": _object({
        "name": _string(),
        "nickname": _string(8),
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["admin", "dev", "ops"]}},
    }, required=["name"]),
    # Strings, a pattern and a nullable field.
    "contact": _object({
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "phone": {"anyOf": [{"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}, {"type": "null"}]},
        "city": _string(),
    }),
}

# The benchmark's schema: six fields, one of each kind a form extraction asks for.
SIX_FIELDS = _object({
    "name": _string(24),
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": _string(32),
    "city": _string(24),
    "interests": {"type": "array", "maxItems": 4, "items": _string(16)},
    "member": {"type": "boolean"},
})
