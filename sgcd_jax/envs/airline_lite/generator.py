"""Seeded procedural airline_lite: a small airline DB (τ³ record layout) and templated tasks over it.

Task families (difficulty):
  easy   status      "What is the status of flight X on D?"           get_flight_status
         membership  "What is my membership level?"                    get_user_details
         cancel_ok   "Please cancel reservation R."  (refundable)      get_reservation_details, cancel
  medium cancel      as cancel_ok, ~half not refundable → must refuse  get_reservation_details [, cancel]
         baggage     "Please add N checked bags to R, pay with my gift card."
                                                                       get_user_details, get_reservation_details,
                                                                       update_reservation_baggages
  hard   cancel_find "Please cancel my reservation from O to D." (id unknown)
                                                                       get_user_details, get_reservation_details×k
                                                                       [, cancel]
         book        "Please book the cheapest one-way C flight from O to D on DATE, pay with my credit card."
                                                                       search_direct_flight, get_user_details,
                                                                       book_reservation
Every task stores its gold ``actions`` (replayed by the verifier), the ``required_reads`` that must
succeed before the first write (so guessing ids scores 0), ``communicate_info`` and the oracle's
templated final message.
"""

from __future__ import annotations

import random
import threading
from typing import Any

AIRPORTS = ("JFK", "LAX", "SFO", "ORD", "BOS", "MIA", "SEA", "DEN")
DATES = tuple(f"2024-05-{d:02d}" for d in range(13, 21))  # "now" is 2024-05-15T15:00:00
FIRST = ("mia", "noah", "emma", "liam", "ava", "omar", "yara", "ivan", "lena", "raj", "sofia", "kai")
LAST = ("li", "kim", "khan", "lopez", "smith", "garcia", "ito", "brown", "nagy", "silva")
CABINS = ("basic_economy", "economy", "business")
FAMILIES = {"easy": ("status", "membership", "cancel_ok"),
            "medium": ("cancel", "baggage"),
            "hard": ("cancel_find", "book")}
FAMILIES["mixed"] = FAMILIES["easy"] + FAMILIES["medium"] + FAMILIES["hard"]
TOOLS = {"easy": ("get_flight_status", "get_user_details", "get_reservation_details", "cancel_reservation")}
TOOLS["medium"] = TOOLS["easy"] + ("update_reservation_baggages",)
TOOLS["hard"] = TOOLS["medium"] + ("search_direct_flight", "book_reservation")
TOOLS["mixed"] = TOOLS["hard"]


def refundable(reservation: dict[str, Any]) -> bool:
    return reservation["insurance"] == "yes" or reservation["cabin"] == "business"


_DB_LOCK = threading.Lock()
_DBS: dict[tuple[int, str], dict[str, dict[str, Any]]] = {}


def generate_db(seed: int, split: str = "train") -> dict[str, dict[str, Any]]:
    """Shared read-only base DB for (``seed``, ``split``) (cached; wrap in CowDB per episode). Each
    split has its own users, flights and reservations, so test tasks never repeat training entities."""
    with _DB_LOCK:
        if (seed, split) not in _DBS:
            _DBS[(seed, split)] = _build_db(seed, split)
        return _DBS[(seed, split)]


def _build_db(seed: int, split: str) -> dict[str, dict[str, Any]]:
    rng = random.Random(f"airline_lite-db-{seed}-{split}")
    routes = rng.sample([(o, d) for o in AIRPORTS for d in AIRPORTS if o != d], 24)
    flights, number = {}, 100
    for origin, destination in routes:
        for _ in range(rng.choice((1, 2))):
            number += rng.randint(1, 9)
            hour = rng.randint(6, 20)
            flights[f"HAT{number}"] = {
                "origin": origin, "destination": destination, "flight_number": f"HAT{number}",
                "scheduled_departure_time_est": f"{hour:02d}:00:00",
                "scheduled_arrival_time_est": f"{hour + 2:02d}:30:00",
                "dates": {date: _flight_date(rng, date, hour) for date in DATES}}
    users, reservations = {}, {}
    names = rng.sample([(f, l) for f in FIRST for l in LAST], 30)
    for first, last in names:
        user_id = f"{first}_{last}_{rng.randint(1000, 9999)}"
        methods = {}
        for source in ("credit_card", "gift_card", "certificate"):
            if source == "credit_card" or rng.random() < (0.6 if source == "gift_card" else 0.3):
                pid = f"{source}_{rng.randint(1000000, 9999999)}"
                methods[pid] = {"source": source, "id": pid}
                if source == "credit_card":
                    methods[pid].update(brand=rng.choice(("visa", "mastercard")),
                                        last_four=f"{rng.randint(0, 9999):04d}")
                else:
                    methods[pid]["amount"] = float(rng.choice((100, 150, 200, 300, 500)))
        card = next(p for p in methods if p.startswith("credit_card"))
        user = {"user_id": user_id, "name": {"first_name": first.capitalize(), "last_name": last.capitalize()},
                "dob": f"19{rng.randint(50, 99)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                "payment_methods": methods, "membership": rng.choice(("gold", "silver", "regular")),
                "reservations": []}
        used_routes = set()
        for _ in range(rng.randint(2, 4)):
            flight = flights[rng.choice(sorted(flights))]
            if (flight["origin"], flight["destination"]) in used_routes:
                continue
            used_routes.add((flight["origin"], flight["destination"]))
            rid = _new_id(rng, reservations)
            cabin, date = rng.choice(CABINS), rng.choice(DATES[3:])
            price = rng.randint(80, 900)
            reservations[rid] = {
                "reservation_id": rid, "user_id": user_id, "origin": flight["origin"],
                "destination": flight["destination"], "flight_type": "one_way", "cabin": cabin,
                "flights": [{"origin": flight["origin"], "destination": flight["destination"],
                             "flight_number": flight["flight_number"], "date": date, "price": price}],
                "passengers": [{"first_name": user["name"]["first_name"],
                                "last_name": user["name"]["last_name"], "dob": user["dob"]}],
                "payment_history": [{"payment_id": card, "amount": price}],
                "created_at": f"2024-05-{rng.randint(1, 14):02d}T{rng.randint(0, 23):02d}:00:00",
                "total_baggages": rng.randint(0, 2), "nonfree_baggages": 0,
                "insurance": rng.choice(("yes", "no"))}
            user["reservations"].append(rid)
        users[user_id] = user
    return {"flights": flights, "users": users, "reservations": reservations}


def _flight_date(rng: random.Random, date: str, hour: int) -> dict[str, Any]:
    if date < "2024-05-15":
        return rng.choice(({"status": "landed", "actual_departure_time_est": f"{date}T{hour:02d}:05:00",
                            "actual_arrival_time_est": f"{date}T{hour + 2:02d}:20:00"},
                           {"status": "cancelled"}))
    if date == "2024-05-15":
        status = rng.choice(("on time", "delayed", "landed"))
        times = {"actual_departure_time_est" if status == "landed" else "estimated_departure_time_est":
                 f"{date}T{hour:02d}:10:00",
                 "actual_arrival_time_est" if status == "landed" else "estimated_arrival_time_est":
                 f"{date}T{hour + 2:02d}:40:00"}
        return {"status": status, **times}
    if rng.random() < 0.15:
        return {"status": "cancelled"}
    return {"status": "available",
            "available_seats": {c: rng.randint(1, 9) for c in CABINS},
            "prices": {"basic_economy": rng.randint(50, 150), "economy": rng.randint(100, 300),
                       "business": rng.randint(300, 900)}}


def _new_id(rng: random.Random, taken: dict[str, Any]) -> str:
    while True:
        rid = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))
        if rid not in taken:
            return rid


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def generate_tasks(seed: int, split: str, num_tasks: int, difficulty: str) -> list[dict[str, Any]]:
    """``num_tasks`` task payloads for ``split``, deterministic in (seed, split, num_tasks, difficulty)."""
    if difficulty not in FAMILIES:
        raise ValueError(f"airline_lite difficulty {difficulty!r}; choose one of {sorted(FAMILIES)}")
    db = generate_db(seed, split)
    rng = random.Random(f"airline_lite-tasks-{seed}-{split}-{difficulty}")
    families = FAMILIES[difficulty]
    out = []
    while len(out) < num_tasks:
        family = families[len(out) % len(families)]
        task = _MAKERS[family](rng, db)
        if task is not None:
            task.update(family=family, difficulty=difficulty, index=len(out), db_seed=seed, db_split=split)
            out.append(task)
    return out


def _pick_user(rng, db, need=lambda u: True):
    users = [u for u in sorted(db["users"]) if need(db["users"][u])]
    return db["users"][rng.choice(users)] if users else None


def _status_task(rng, db):
    number = rng.choice(sorted(db["flights"]))
    date = rng.choice(DATES)
    status = db["flights"][number]["dates"][date]["status"]
    return {"opening": f"What is the status of flight {number} on {date}?",
            "actions": [_call("get_flight_status", flight_number=number, date=date)],
            "required_reads": [0], "communicate_info": [status],
            "final_message": f"Flight {number} on {date} is {status}."}


def _membership_task(rng, db):
    user = _pick_user(rng, db)
    uid, level = user["user_id"], user["membership"]
    return {"opening": f"What is my membership level? My user id is {uid}.",
            "actions": [_call("get_user_details", user_id=uid)], "required_reads": [0],
            "communicate_info": [level], "final_message": f"Your membership level is {level}."}


def _cancel_actions(reservation, reads):
    rid = reservation["reservation_id"]
    if refundable(reservation):
        return {"actions": reads + [_call("cancel_reservation", reservation_id=rid)],
                "communicate_info": [], "final_message": f"Reservation {rid} is cancelled."}
    return {"actions": reads, "communicate_info": ["cannot be cancelled"],
            "final_message": f"Reservation {rid} cannot be cancelled."}


def _cancel_task(rng, db, only_refundable=False):
    rids = [r for r in sorted(db["reservations"]) if refundable(db["reservations"][r]) or not only_refundable]
    reservation = db["reservations"][rng.choice(rids)]
    rid, uid = reservation["reservation_id"], reservation["user_id"]
    return {"opening": f"Please cancel reservation {rid}. My user id is {uid}.", "required_reads": [0],
            **_cancel_actions(reservation, [_call("get_reservation_details", reservation_id=rid)])}


def _baggage_task(rng, db):
    user = _pick_user(rng, db, lambda u: any(p["source"] == "gift_card" for p in u["payment_methods"].values()))
    gift = next(p for p in user["payment_methods"].values() if p["source"] == "gift_card")
    bags = rng.choice((1, 2))
    if gift["amount"] < 50 * bags or not user["reservations"]:
        return None
    reservation = db["reservations"][rng.choice(user["reservations"])]
    rid, uid = reservation["reservation_id"], user["user_id"]
    bag_word = "bag" if bags == 1 else "bags"
    return {"opening": f"Please add {bags} checked {bag_word} to reservation {rid} and pay with my gift "
                       f"card. My user id is {uid}.",
            "actions": [_call("get_user_details", user_id=uid),
                        _call("get_reservation_details", reservation_id=rid),
                        _call("update_reservation_baggages", reservation_id=rid,
                              total_baggages=reservation["total_baggages"] + bags,
                              nonfree_baggages=reservation["nonfree_baggages"] + bags,
                              payment_id=gift["id"])],
            "required_reads": [0, 1], "communicate_info": [],
            "final_message": f"Added {bags} checked {bag_word} to reservation {rid}."}


def _cancel_find_task(rng, db):
    user = _pick_user(rng, db, lambda u: len(u["reservations"]) >= 2)
    target = db["reservations"][rng.choice(user["reservations"])]
    uid = user["user_id"]
    reads = [_call("get_user_details", user_id=uid)]
    for rid in user["reservations"]:
        reads.append(_call("get_reservation_details", reservation_id=rid))
        if rid == target["reservation_id"]:
            break
    return {"opening": f"Please cancel my reservation from {target['origin']} to {target['destination']}. "
                       f"My user id is {uid}.",
            "required_reads": [0, len(reads) - 1], **_cancel_actions(target, reads)}


def _book_task(rng, db):
    cabin = rng.choice(CABINS)
    flight = db["flights"][rng.choice(sorted(db["flights"]))]
    date = rng.choice(DATES[3:])
    origin, destination = flight["origin"], flight["destination"]
    options = [(f["dates"][date]["prices"][cabin], f["flight_number"]) for f in db["flights"].values()
               if f["origin"] == origin and f["destination"] == destination
               and f["dates"][date]["status"] == "available" and f["dates"][date]["available_seats"][cabin] >= 1]
    if not options or [p for p, _ in options].count(min(options)[0]) > 1:
        return None
    price, number = min(options)
    user = _pick_user(rng, db)
    uid = user["user_id"]
    card = next(p for p in user["payment_methods"] if p.startswith("credit_card"))
    words = cabin.replace("_", " ")
    return {"opening": f"Please book the cheapest one-way {words} flight from {origin} to {destination} on "
                       f"{date} for me and pay with my credit card. My user id is {uid}.",
            "actions": [_call("search_direct_flight", origin=origin, destination=destination, date=date),
                        _call("get_user_details", user_id=uid),
                        _call("book_reservation", user_id=uid, origin=origin, destination=destination,
                              flight_type="one_way", cabin=cabin,
                              flights=[{"flight_number": number, "date": date}],
                              passengers=[{"first_name": user["name"]["first_name"],
                                           "last_name": user["name"]["last_name"], "dob": user["dob"]}],
                              payment_methods=[{"payment_id": card, "amount": price}],
                              total_baggages=0, nonfree_baggages=0, insurance="no")],
            "required_reads": [0, 1], "communicate_info": ["HATHAT"],
            "final_message": f"Booked flight {number} for {price} dollars, reservation HATHAT."}


_MAKERS = {"status": _status_task, "membership": _membership_task,
           "cancel_ok": lambda rng, db: _cancel_task(rng, db, only_refundable=True),
           "cancel": _cancel_task, "baggage": _baggage_task, "cancel_find": _cancel_find_task,
           "book": _book_task}
