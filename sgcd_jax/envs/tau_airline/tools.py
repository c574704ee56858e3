"""The 14 τ³-airline agent tools over a copy-on-write DB of plain JSON records.

Semantics follow the official tau2/τ³ airline toolkit (including its quirks: cancellation refunds
every payment-history entry but releases no seats, flight updates do not touch seat counts, a
one-stop search builds the next day as ``2024-05-{day+1}``), so that replaying gold actions gives the
official database. Checks always run before any mutation, so a failing call leaves the DB unchanged.
``call(name, arguments)`` is the only entry point the env uses; it never raises.
"""

from __future__ import annotations

import ast
import copy
import json
import operator
from typing import Any, Callable

from sgcd_jax.envs.cowdb import CowDB
from sgcd_jax.envs.tau_airline.schemas import ToolArgumentError, validate_arguments

NOW = "2024-05-15T15:00:00"
NEW_RESERVATION_IDS = ("HATHAT", "HATHAU", "HATHAV")
NEW_CERTIFICATE_IDS = ("certificate_3221322", "certificate_3221323", "certificate_3221324")
WRITE_TOOLS = frozenset({"book_reservation", "cancel_reservation", "send_certificate",
                         "update_reservation_baggages", "update_reservation_flights",
                         "update_reservation_passengers"})
AIRPORTS = (("SFO", "San Francisco"), ("JFK", "New York"), ("LAX", "Los Angeles"), ("ORD", "Chicago"),
            ("DFW", "Dallas"), ("DEN", "Denver"), ("SEA", "Seattle"), ("ATL", "Atlanta"),
            ("MIA", "Miami"), ("BOS", "Boston"), ("PHX", "Phoenix"), ("IAH", "Houston"),
            ("LAS", "Las Vegas"), ("MCO", "Orlando"), ("EWR", "Newark"), ("CLT", "Charlotte"),
            ("MSP", "Minneapolis"), ("DTW", "Detroit"), ("PHL", "Philadelphia"), ("LGA", "LaGuardia"))


class ToolFailure(ValueError):
    """A call the tool rejects (same messages as the official toolkit)."""


class AirlineTools:
    def __init__(self, db: CowDB, now: str = NOW, names: frozenset[str] | None = None):
        self.db = db
        self.now = now
        self.names = names  # None = all 14; a subset for airline_lite

    # ---------------------------------------------------------------- dispatch
    def call(self, name: str, arguments: Any) -> tuple[Any, str]:
        """(result, error): exactly one is meaningful; error is '' on success."""
        if self.names is not None and name not in self.names:
            return None, f"Tool '{name}' not found. Available tools: {', '.join(sorted(self.names))}"
        try:
            args = validate_arguments(name, arguments)
            return getattr(self, name)(**args), ""
        except (ToolFailure, ToolArgumentError, ZeroDivisionError) as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - τ² turns any tool exception into "Error: ..."
            return None, f"{type(exc).__name__}: {exc}"

    # ---------------------------------------------------------------- lookups
    def _user(self, user_id: str) -> dict:
        if not self.db.has("users", user_id):
            raise ToolFailure(f"User {user_id} not found")
        return self.db.get("users", user_id)

    def _reservation(self, reservation_id: str) -> dict:
        if not self.db.has("reservations", reservation_id):
            raise ToolFailure(f"Reservation {reservation_id} not found")
        return self.db.get("reservations", reservation_id)

    def _flight(self, flight_number: str) -> dict:
        if not self.db.has("flights", flight_number):
            raise ToolFailure(f"Flight {flight_number} not found")
        return self.db.get("flights", flight_number)

    def _flight_date(self, flight_number: str, date: str) -> dict:
        flight = self._flight(flight_number)
        if date not in flight["dates"]:
            raise ToolFailure(f"Flight {flight_number} not found on date {date}")
        return flight["dates"][date]

    def _bookable(self, flight_number: str, date: str, cabin: str, seats: int) -> tuple[dict, dict]:
        flight, info = self._flight(flight_number), self._flight_date(flight_number, date)
        if info["status"] != "available":
            raise ToolFailure(f"Flight {flight_number} not available on date {date}")
        if info["available_seats"][cabin] < seats:
            raise ToolFailure(f"Not enough seats on flight {flight_number}")
        return flight, info

    def _charge_for_update(self, user_id: str, payment_id: str, amount: int) -> dict | None:
        """Check and charge one payment method for a reservation update; the payment record or None."""
        user = self.db.get("users", user_id)
        if payment_id not in user["payment_methods"]:
            raise ToolFailure("Payment method not found")
        method = user["payment_methods"][payment_id]
        if method["source"] == "certificate":
            raise ToolFailure("Certificate cannot be used to update reservation")
        if method["source"] == "gift_card" and method["amount"] < amount:
            raise ToolFailure("Gift card balance is not enough")
        if method["source"] == "gift_card":
            card = self.db.get_mut("users", user_id)["payment_methods"][payment_id]
            card["amount"] = float(card["amount"]) - amount
        return {"payment_id": payment_id, "amount": amount} if amount != 0 else None

    # ---------------------------------------------------------------- read tools
    def get_user_details(self, user_id: str) -> dict:
        return self._user(user_id)

    def get_reservation_details(self, reservation_id: str) -> dict:
        return self._reservation(reservation_id)

    def get_flight_status(self, flight_number: str, date: str) -> str:
        return self._flight_date(flight_number, date)["status"]

    def list_all_airports(self) -> list[dict]:
        return [{"iata": code, "city": city} for code, city in AIRPORTS]

    def _direct(self, date: str, origin: str | None, destination: str | None,
                leave_after: str | None = None) -> list[dict]:
        found = []
        for flight in self.db.values("flights"):
            info = flight["dates"].get(date)
            if (info is None or info["status"] != "available"
                    or (origin is not None and flight["origin"] != origin)
                    or (destination is not None and flight["destination"] != destination)
                    or (leave_after is not None and flight["scheduled_departure_time_est"] < leave_after)):
                continue
            found.append({
                "flight_number": flight["flight_number"], "origin": flight["origin"],
                "destination": flight["destination"], "status": "available",
                "scheduled_departure_time_est": flight["scheduled_departure_time_est"],
                "scheduled_arrival_time_est": flight["scheduled_arrival_time_est"], "date": None,
                "available_seats": dict(info["available_seats"]), "prices": dict(info["prices"])})
        return found

    def search_direct_flight(self, origin: str, destination: str, date: str) -> list[dict]:
        return self._direct(date, origin, destination)

    def search_onestop_flight(self, origin: str, destination: str, date: str) -> list[list[dict]]:
        pairs = []
        for first in self._direct(date, origin, None):
            first["date"] = date
            # Official quirk: the next day is built without zero padding and assumes May.
            second_date = (f"2024-05-{int(date[-2:]) + 1}" if "+1" in first["scheduled_arrival_time_est"]
                           else date)
            for second in self._direct(second_date, first["destination"], destination,
                                       leave_after=first["scheduled_arrival_time_est"]):
                second["date"] = second_date
                pairs.append([first, second])
        return pairs

    # ---------------------------------------------------------------- generic tools
    def calculate(self, expression: str) -> str:
        if any(ch not in "0123456789+-*/(). " for ch in expression):
            raise ToolFailure("Invalid characters in expression")
        try:
            value = _arith(ast.parse(expression, mode="eval").body)
        except SyntaxError as exc:
            raise ToolFailure(f"Invalid expression: {exc.msg}") from None
        return str(round(float(value), 2))

    def transfer_to_human_agents(self, summary: str) -> str:
        return "Transfer successful"

    # ---------------------------------------------------------------- write tools
    def book_reservation(self, user_id: str, origin: str, destination: str, flight_type: str,
                         cabin: str, flights: list[dict], passengers: list[dict],
                         payment_methods: list[dict], total_baggages: int, nonfree_baggages: int,
                         insurance: str) -> dict:
        user = self._user(user_id)
        reservation_id = next((r for r in NEW_RESERVATION_IDS if not self.db.has("reservations", r)), None)
        if reservation_id is None:
            raise ToolFailure("Too many reservations")
        segments, total_price = [], 0
        for leg in flights:
            flight, info = self._bookable(leg["flight_number"], leg["date"], cabin, len(passengers))
            price = info["prices"][cabin]
            segments.append({"origin": flight["origin"], "destination": flight["destination"],
                             "flight_number": leg["flight_number"], "date": leg["date"], "price": price})
            total_price += price * len(passengers)
        total_price += (30 * len(passengers) if insurance == "yes" else 0) + 50 * nonfree_baggages
        for payment in payment_methods:
            if payment["payment_id"] not in user["payment_methods"]:
                raise ToolFailure(f"Payment method {payment['payment_id']} not found")
            method = user["payment_methods"][payment["payment_id"]]
            if method["source"] in ("gift_card", "certificate") and method["amount"] < payment["amount"]:
                raise ToolFailure(f"Not enough balance in payment method {payment['payment_id']}")
        paid = sum(p["amount"] for p in payment_methods)
        if paid != total_price:
            raise ToolFailure(f"Payment amount does not add up, total price is {total_price}, "
                              f"but paid {paid}")
        # All checks passed: mutate.
        user = self.db.get_mut("users", user_id)
        for payment in payment_methods:
            method = user["payment_methods"][payment["payment_id"]]
            if method["source"] == "gift_card":
                method["amount"] = float(method["amount"]) - payment["amount"]
            elif method["source"] == "certificate":
                del user["payment_methods"][payment["payment_id"]]
        for leg in flights:
            self.db.get_mut("flights", leg["flight_number"])["dates"][leg["date"]][
                "available_seats"][cabin] -= len(passengers)
        reservation = {
            "reservation_id": reservation_id, "user_id": user_id, "origin": origin,
            "destination": destination, "flight_type": flight_type, "cabin": cabin,
            "flights": segments, "passengers": copy.deepcopy(passengers),
            "payment_history": copy.deepcopy(payment_methods), "created_at": self.now,
            "total_baggages": total_baggages, "nonfree_baggages": nonfree_baggages,
            "insurance": insurance, "status": None}
        self.db.put("reservations", reservation_id, reservation)
        user["reservations"].append(reservation_id)
        return reservation

    def cancel_reservation(self, reservation_id: str) -> dict:
        self._reservation(reservation_id)
        reservation = self.db.get_mut("reservations", reservation_id)
        # Official behaviour: refund every history entry (earlier refunds too); seats are not released.
        reservation["payment_history"] += [{"payment_id": p["payment_id"], "amount": -p["amount"]}
                                           for p in reservation["payment_history"]]
        reservation["status"] = "cancelled"
        return reservation

    def send_certificate(self, user_id: str, amount: int) -> str:
        user = self._user(user_id)
        payment_id = next((p for p in NEW_CERTIFICATE_IDS if p not in user["payment_methods"]), None)
        if payment_id is None:
            raise ToolFailure("Too many certificates")
        self.db.get_mut("users", user_id)["payment_methods"][payment_id] = {
            "source": "certificate", "id": payment_id, "amount": float(amount)}
        return f"Certificate {payment_id} added to user {user_id} with amount {amount}."

    def update_reservation_baggages(self, reservation_id: str, total_baggages: int,
                                    nonfree_baggages: int, payment_id: str) -> dict:
        reservation = self._reservation(reservation_id)
        self._user(reservation["user_id"])
        price = 50 * max(0, nonfree_baggages - reservation["nonfree_baggages"])
        payment = self._charge_for_update(reservation["user_id"], payment_id, price)
        reservation = self.db.get_mut("reservations", reservation_id)
        if payment is not None:
            reservation["payment_history"].append(payment)
        reservation["total_baggages"], reservation["nonfree_baggages"] = total_baggages, nonfree_baggages
        return reservation

    def update_reservation_flights(self, reservation_id: str, cabin: str, flights: list[dict],
                                   payment_id: str) -> dict:
        reservation = self._reservation(reservation_id)
        self._user(reservation["user_id"])
        n_passengers = len(reservation["passengers"])
        new_segments, total_price = [], 0
        for leg in flights:
            kept = next((s for s in reservation["flights"]
                         if s["flight_number"] == leg["flight_number"] and s["date"] == leg["date"]
                         and cabin == reservation["cabin"]), None)
            if kept is None:
                flight, info = self._bookable(leg["flight_number"], leg["date"], cabin, n_passengers)
                kept = {"origin": flight["origin"], "destination": flight["destination"],
                        "flight_number": leg["flight_number"], "date": leg["date"],
                        "price": info["prices"][cabin]}
            new_segments.append(copy.deepcopy(kept))
            total_price += kept["price"] * n_passengers
        total_price -= sum(s["price"] for s in reservation["flights"]) * n_passengers
        payment = self._charge_for_update(reservation["user_id"], payment_id, total_price)
        reservation = self.db.get_mut("reservations", reservation_id)
        if payment is not None:
            reservation["payment_history"].append(payment)
        reservation["flights"], reservation["cabin"] = new_segments, cabin
        return reservation

    def update_reservation_passengers(self, reservation_id: str, passengers: list[dict]) -> dict:
        reservation = self._reservation(reservation_id)
        if len(passengers) != len(reservation["passengers"]):
            raise ToolFailure("Number of passengers does not match")
        reservation = self.db.get_mut("reservations", reservation_id)
        reservation["passengers"] = copy.deepcopy(passengers)
        return reservation


_ARITH: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.USub: operator.neg,
    ast.UAdd: operator.pos}


def _arith(node: ast.AST) -> float:
    """Evaluate + - * / and parentheses over numeric literals; anything else is rejected."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        if isinstance(node.op, ast.Pow) and abs(_arith(node.right)) > 64:
            raise ToolFailure("Invalid expression: exponent too large")
        return _ARITH[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_arith(node.operand))
    raise ToolFailure("Invalid expression: only numbers, + - * / and parentheses are allowed")


def render_result(result: Any, compact: bool = False) -> str:
    """Tool result → observation text (strings verbatim, everything else as JSON)."""
    if isinstance(result, str):
        return result
    return json.dumps(result, separators=(",", ":") if compact else None)
