"""JSON schemas the structured-output tests ask for: one per kind of constraint OpenAI's users write."""


def obj(required=True, **properties) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, "required": list(properties)} if required else schema


def as_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


SCHEMAS = {
    "enum": obj(color={"enum": ["red", "green", "blue"]}),
    "bounded integer": obj(count={"type": "integer", "minimum": 1, "maximum": 12}),
    "boolean": obj(signed={"type": "boolean"}),
    "nested objects": obj(
        receipt=obj(total={"type": "integer", "minimum": 0, "maximum": 999}, currency={"enum": ["USD", "EUR"]}),
        shop=obj(name={"type": "string", "maxLength": 6}),
    ),
    "array with bounds": obj(items={"type": "array", "items": {"enum": ["cup", "pen"]}, "minItems": 1, "maxItems": 3}),
    "anyOf with null": obj(note={"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}),
    "string with maxLength": obj(name={"type": "string", "maxLength": 5}),
    "top-level array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
    "const": obj(kind={"const": "shelf"}, rows={"type": "integer", "minimum": 0, "maximum": 3}),
    "$ref": {
        "$defs": {"item": obj(label={"type": "string", "maxLength": 4}, ok={"type": "boolean"})},
        **obj(first={"$ref": "#/$defs/item"}, second={"$ref": "#/$defs/item"}),
    },
    "pattern": obj(code={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}),
    "array of objects": obj(
        shelf={"type": "array", "items": obj(n={"type": "integer", "minimum": 0, "maximum": 5}), "maxItems": 2}
    ),
    "optional fields": obj(required=False, a={"type": "boolean"}, b={"enum": [1, 2]}),
}
