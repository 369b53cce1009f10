"""Small JSON schemas, a prompt each, for constrained decoding on SmolLM2-135M (test_schema_corpus.py).

Every keyword family the grammar enforces appears: nested objects, arrays with minItems/maxItems,
enums and consts, anyOf, required and optional fields, integers and numbers with bounds, string
patterns, lengths and formats. They are kept small so that a 135M model closes every answer within
`MAX_TOKENS`: every string has a maxLength, a bounded pattern or a format of bounded shape, and
every array a maxItems (without them the model can fill a string or a list until the budget runs
out, which is a valid prefix ending with `length` but not a whole answer); objects have a handful
of fields; nesting goes three levels deep at most. How they were chosen: written to these rules,
then run greedy at TP 1 x PP 1; the two of the first draft that ran to `MAX_TOKENS` were replaced
by bounded patterns (an "email" format with a maxLength, which xgrammar ignores beside a format,
so the address went on; a "time" format whose fraction of a second went on).
"""

from __future__ import annotations

import datetime

import jsonschema

MAX_TOKENS = 160


def s(n: int = 16, **kw) -> dict:
    """A string of at most n characters."""
    return {"type": "string", "maxLength": n, **kw}


def i(lo: int | None = None, hi: int | None = None) -> dict:
    bounds = {"minimum": lo, "maximum": hi}
    return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}}


def obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def arr(items: dict, lo: int = 1, hi: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


BOOL = {"type": "boolean"}
EMAIL = "^[a-z]{1,10}@[a-z]{1,10}[.]com$"   # bounded: a format ignores maxLength, and "email" alone may not end

# (name, what to ask for, schema)
CORPUS: list[tuple[str, str, dict]] = [
    # flat objects, every field required
    ("person", "a person", obj({"name": s(), "age": i(0, 120)})),
    ("book", "a book", obj({"title": s(24), "author": s(), "year": i(1450, 2025)})),
    ("city", "a city", obj({"name": s(), "country": s(), "population": i(0, 40_000_000)})),
    ("flag", "whether the sun is a star", obj({"answer": BOOL})),
    ("point", "a point on a plane", obj({"x": i(-100, 100), "y": i(-100, 100)})),
    ("color", "a color in RGB", obj({"r": i(0, 255), "g": i(0, 255), "b": i(0, 255)})),
    ("product", "a product in a shop", obj({"name": s(), "price": {"type": "number", "minimum": 0, "maximum": 1000},
                                           "in_stock": BOOL})),
    ("movie", "a movie", obj({"title": s(24), "year": i(1900, 2025), "rating": {"type": "number", "minimum": 0,
                                                                                "maximum": 10}})),
    # optional fields
    ("pet_optional", "a pet", obj({"name": s(), "species": s(12), "age": i(0, 40)}, ["name"])),
    ("user_optional", "a user account", obj({"username": s(12), "email": {"type": "string", "pattern": EMAIL},
                                             "admin": BOOL},
                                            ["username", "admin"])),
    ("address_optional", "an address", obj({"street": s(24), "city": s(), "zip": s(10)}, ["city"])),
    ("none_required", "a note", obj({"text": s(24), "pinned": BOOL}, [])),
    # enums and consts
    ("weekday", "a day of the week", obj({"day": {"enum": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                                           "Saturday", "Sunday"]}})),
    ("traffic_light", "the color of a traffic light", {"enum": ["red", "yellow", "green"]}),
    ("task_status", "a task", obj({"title": s(20), "status": {"enum": ["todo", "doing", "done"]}})),
    ("mixed_enum", "a setting", obj({"level": {"enum": [1, 2, 3, "max", None]}})),
    ("const_version", "a config file", obj({"version": {"const": 2}, "name": s()})),
    ("size", "a t-shirt order", obj({"size": {"enum": ["S", "M", "L", "XL"]}, "quantity": i(1, 10)})),
    # numbers with bounds
    ("temperature", "a temperature reading", obj({"celsius": {"type": "number", "minimum": -90, "maximum": 60}})),
    ("percentage", "a test score", obj({"score": i(0, 100)})),
    ("probability", "a probability", obj({"p": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("exclusive", "a positive price", obj({"amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 500}})),
    ("negative", "a depth below sea level in meters", obj({"depth": i(-11000, -1)})),
    ("year_range", "a historical event", obj({"event": s(24), "year": i(1000, 2000)})),
    ("latlon", "a location", obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                  "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    # string patterns, lengths and formats
    ("zip_pattern", "a US zip code", obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("phone_pattern", "a phone number", obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"}})),
    ("code_pattern", "a product code", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("hex_color", "a color as hex", obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("short_word", "a word", obj({"word": {"type": "string", "minLength": 3, "maxLength": 8}})),
    ("email", "a contact", obj({"name": s(), "email": {"type": "string", "format": "email"}})),
    ("date", "a birthday", obj({"name": s(), "born": {"type": "string", "format": "date"}})),
    ("ipv4", "a server", obj({"host": s(), "ip": {"type": "string", "format": "ipv4"}})),
    ("uuid", "a record with an id", obj({"id": {"type": "string", "format": "uuid"}})),
    ("datetime", "a meeting", obj({"topic": s(), "at": {"type": "string", "format": "date-time"}})),
    ("clock_pattern", "an alarm", obj({"label": s(12),
                                       "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}})),
    # arrays with bounds
    ("tags", "tags for a blog post", obj({"tags": arr(s(12), 1, 3)})),
    ("numbers", "three lucky numbers", obj({"numbers": arr(i(1, 99), 3, 3)})),
    ("top_array", "a list of fruits", arr(s(12), 2, 4)),
    ("scores", "game scores", obj({"scores": arr(i(0, 1000), 1, 5)})),
    ("matrix", "a 2 by 2 matrix", obj({"rows": arr(arr(i(-9, 9), 2, 2), 2, 2)})),
    ("empty_ok", "a shopping list", obj({"items": arr(s(12), 0, 3)})),
    ("bool_list", "answers to three yes/no questions", arr(BOOL, 3, 3)),
    # nested objects and arrays of objects
    ("person_address", "a person with an address",
     obj({"name": s(), "address": obj({"city": s(), "country": s()})})),
    ("order", "an order", obj({"id": i(1, 9999), "items": arr(obj({"sku": s(8), "qty": i(1, 9)}), 1, 2)})),
    ("team", "a team", obj({"team": s(), "members": arr(obj({"name": s(12), "role": {"enum": ["lead", "dev"]}}),
                                                          1, 3)})),
    ("company", "a company", obj({"name": s(), "ceo": obj({"name": s(), "age": i(20, 90)}),
                                  "public": BOOL})),
    ("deep", "a nested config", obj({"server": obj({"http": obj({"port": i(1, 65535), "tls": BOOL})})})),
    ("recipe", "a recipe", obj({"name": s(20), "ingredients": arr(obj({"item": s(12), "grams": i(1, 1000)}), 1, 3),
                                "vegan": BOOL})),
    ("event", "a calendar event", obj({"title": s(20), "date": {"type": "string", "format": "date"},
                                       "attendees": arr(s(12), 1, 3)})),
    ("graph", "a graph edge", obj({"from": obj({"id": i(0, 99)}), "to": obj({"id": i(0, 99)}),
                                   "weight": {"type": "number", "minimum": 0, "maximum": 1}})),
    # anyOf
    ("id_or_name", "an identifier", obj({"key": {"anyOf": [i(0, 1000), s(12)]}})),
    ("nullable", "a middle name, or null", obj({"middle": {"anyOf": [s(12), {"type": "null"}]}})),
    ("shape", "a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "radius": i(1, 50)}),
                                    obj({"kind": {"const": "square"}, "side": i(1, 50)})]}),
    ("value", "a value", obj({"v": {"anyOf": [BOOL, i(-5, 5), {"enum": ["none"]}]}})),
    ("contact_any", "a way to reach someone", obj({"contact": {"anyOf": [
        obj({"email": {"type": "string", "format": "email"}}),
        obj({"phone": {"type": "string", "pattern": "^[0-9]{7,10}$"}})]}})),
    # scalars at the top
    ("top_integer", "the number of legs of a spider", i(0, 20)),
    ("top_bool", "whether water is wet", BOOL),
    ("top_string", "a greeting", s(20)),
    ("top_number", "pi to two decimals", {"type": "number", "minimum": 3, "maximum": 4}),
    # $defs and $ref
    ("refs", "a line between two points", {"$defs": {"pt": obj({"x": i(-9, 9), "y": i(-9, 9)})},
                                           **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})}),
]


def prompt(what: str) -> str:
    return f"Write {what} as JSON."


def _iso(parse):
    def check(value) -> bool:
        if not isinstance(value, str):
            return True
        parse(value.replace("Z", "+00:00"))
        return True
    return check


FORMATS = jsonschema.FormatChecker()
# jsonschema checks date-time only with optional packages; RFC 3339 as Python reads it.
FORMATS.checks("date-time", raises=ValueError)(_iso(datetime.datetime.fromisoformat))


def validate(answer, schema: dict) -> None:
    """jsonschema's validation, formats included."""
    jsonschema.validate(answer, schema, format_checker=FORMATS)
