"""Tool specs for the 14 τ³-airline tools in the OpenAI/HF ``tools=`` format, and the argument
validator that turns malformed calls into an error observation instead of an exception.

Descriptions paraphrase the official tool docs; argument names, required sets and enums match them.
"""

from __future__ import annotations

import json
from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}
CABINS = ["basic_economy", "economy", "business"]
_FLIGHT_INFO = {"type": "object", "properties": {
    "flight_number": {"type": "string", "description": "Flight number, such as 'HAT001'."},
    "date": {"type": "string", "description": "Flight date 'YYYY-MM-DD', such as '2024-05-01'."}},
    "required": ["flight_number", "date"]}
_PASSENGER = {"type": "object", "properties": {
    "first_name": _STR, "last_name": _STR,
    "dob": {"type": "string", "description": "Date of birth 'YYYY-MM-DD'."}},
    "required": ["first_name", "last_name", "dob"]}
_PAYMENT = {"type": "object", "properties": {
    "payment_id": {"type": "string", "description": "Payment method id from the user profile."},
    "amount": {"type": "integer", "description": "Amount in dollars."}},
    "required": ["payment_id", "amount"]}


def _d(text: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "description": text}


# name -> (description, {param: schema}, required)
TOOL_SPECS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "book_reservation": ("Book a reservation.", {
        "user_id": _d("The user id, such as 'sara_doe_496'.", _STR),
        "origin": _d("IATA code of the origin city, such as 'SFO'.", _STR),
        "destination": _d("IATA code of the destination city, such as 'JFK'.", _STR),
        "flight_type": _d("'one_way' or 'round_trip'.", {"type": "string", "enum": ["round_trip", "one_way"]}),
        "cabin": _d("Cabin class.", {"type": "string", "enum": CABINS}),
        "flights": _d("Every flight segment of the reservation.", {"type": "array", "items": _FLIGHT_INFO}),
        "passengers": _d("Every passenger.", {"type": "array", "items": _PASSENGER}),
        "payment_methods": _d("Payments that add up to the total price.", {"type": "array", "items": _PAYMENT}),
        "total_baggages": _d("Total number of bags.", _INT),
        "nonfree_baggages": _d("Number of paid bags.", _INT),
        "insurance": _d("Travel insurance, 'yes' or 'no'.", {"type": "string", "enum": ["yes", "no"]}),
    }, ["user_id", "origin", "destination", "flight_type", "cabin", "flights", "passengers",
        "payment_methods", "total_baggages", "nonfree_baggages", "insurance"]),
    "calculate": ("Calculate a mathematical expression with numbers, + - * /, parentheses and spaces.", {
        "expression": _d("The expression, such as '2 + 2'.", _STR)}, ["expression"]),
    "cancel_reservation": ("Cancel the whole reservation.", {
        "reservation_id": _d("The reservation id, such as 'ZFA04Y'.", _STR)}, ["reservation_id"]),
    "get_reservation_details": ("Get the details of a reservation.", {
        "reservation_id": _d("The reservation id, such as '8JX2WO'.", _STR)}, ["reservation_id"]),
    "get_user_details": ("Get the details of a user, including their reservations.", {
        "user_id": _d("The user id, such as 'sara_doe_496'.", _STR)}, ["user_id"]),
    "list_all_airports": ("List all available airports.", {}, []),
    "search_direct_flight": ("Search direct flights between two cities on a date.", {
        "origin": _d("Origin airport, three letters, such as 'JFK'.", _STR),
        "destination": _d("Destination airport, three letters, such as 'LAX'.", _STR),
        "date": _d("Date 'YYYY-MM-DD'.", _STR)}, ["origin", "destination", "date"]),
    "search_onestop_flight": ("Search one-stop flights between two cities on a date.", {
        "origin": _d("Origin airport, three letters, such as 'JFK'.", _STR),
        "destination": _d("Destination airport, three letters, such as 'LAX'.", _STR),
        "date": _d("Date 'YYYY-MM-DD'.", _STR)}, ["origin", "destination", "date"]),
    "send_certificate": ("Send a certificate to a user. Be careful!", {
        "user_id": _d("The user id, such as 'sara_doe_496'.", _STR),
        "amount": _d("Certificate amount in dollars.", _INT)}, ["user_id", "amount"]),
    "transfer_to_human_agents": (
        "Transfer the user to a human agent with a summary of the issue. Only transfer if the user "
        "explicitly asks for a human agent, or the policy and tools cannot solve the issue.", {
            "summary": _d("A summary of the user's issue.", _STR)}, ["summary"]),
    "update_reservation_baggages": ("Update the baggage information of a reservation.", {
        "reservation_id": _d("The reservation id.", _STR),
        "total_baggages": _d("Updated total number of bags.", _INT),
        "nonfree_baggages": _d("Updated number of paid bags.", _INT),
        "payment_id": _d("Payment id from the user profile, such as 'credit_card_7815826'.", _STR)},
        ["reservation_id", "total_baggages", "nonfree_baggages", "payment_id"]),
    "update_reservation_flights": ("Update the flights of a reservation.", {
        "reservation_id": _d("The reservation id.", _STR),
        "cabin": _d("Cabin class.", {"type": "string", "enum": CABINS}),
        "flights": _d("Every flight of the ENTIRE new reservation, unchanged segments included.",
                      {"type": "array", "items": _FLIGHT_INFO}),
        "payment_id": _d("Payment id from the user profile, such as 'gift_card_7815826'.", _STR)},
        ["reservation_id", "cabin", "flights", "payment_id"]),
    "update_reservation_passengers": ("Update the passenger information of a reservation.", {
        "reservation_id": _d("The reservation id.", _STR),
        "passengers": _d("Every passenger.", {"type": "array", "items": _PASSENGER})},
        ["reservation_id", "passengers"]),
    "get_flight_status": ("Get the status of a flight on a date.", {
        "flight_number": _d("The flight number.", _STR),
        "date": _d("The date 'YYYY-MM-DD'.", _STR)}, ["flight_number", "date"]),
}


def tool_schemas(names: list[str] | None = None) -> list[dict[str, Any]]:
    """OpenAI/HF function-tool dicts for ``names`` (default: all 14, in official order)."""
    out = []
    for name in names or list(TOOL_SPECS):
        description, properties, required = TOOL_SPECS[name]
        out.append({"type": "function", "function": {
            "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}})
    return out


class ToolArgumentError(ValueError):
    pass


def validate_arguments(name: str, arguments: Any) -> dict[str, Any]:
    """Checked, coerced copy of ``arguments`` (pydantic-lax-like: integral floats pass as ints,
    unknown object keys are dropped as pydantic's default ``extra='ignore'`` does).
    Raises ToolArgumentError naming the bad argument."""
    if name not in TOOL_SPECS:
        raise ToolArgumentError(f"Tool '{name}' not found. Available tools: {', '.join(TOOL_SPECS)}")
    if isinstance(arguments, str):  # a parser that left the JSON undecoded
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ToolArgumentError(f"{name}: arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"{name}: arguments must be a JSON object, got {type(arguments).__name__}")
    _, properties, required = TOOL_SPECS[name]
    missing = [p for p in required if p not in arguments]
    if missing:
        raise ToolArgumentError(f"{name}: missing required argument(s): {', '.join(missing)}")
    unknown = [p for p in arguments if p not in properties]
    if unknown:
        raise ToolArgumentError(f"{name}: unexpected argument(s): {', '.join(unknown)}")
    return {p: _coerce(v, properties[p], f"{name}.{p}") for p, v in arguments.items()}


def _coerce(value: Any, schema: dict[str, Any], where: str) -> Any:
    kind = schema["type"]
    if kind == "string":
        if not isinstance(value, str):
            raise ToolArgumentError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        if "enum" in schema and value not in schema["enum"]:
            raise ToolArgumentError(f"{where}: must be one of {schema['enum']}, got {value!r}")
        return value
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ToolArgumentError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return int(value)
    if kind == "array":
        if not isinstance(value, list):
            raise ToolArgumentError(f"{where}: expected an array, got {type(value).__name__}")
        return [_coerce(v, schema["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "object":
        if not isinstance(value, dict):
            raise ToolArgumentError(f"{where}: expected an object, got {type(value).__name__}")
        missing = [p for p in schema["required"] if p not in value]
        if missing:
            raise ToolArgumentError(f"{where}: missing field(s): {', '.join(missing)}")
        return {p: _coerce(value[p], s, f"{where}.{p}") for p, s in schema["properties"].items()
                if p in value}
    raise AssertionError(f"unhandled schema type {kind}")
