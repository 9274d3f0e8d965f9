"""The redaction rule on its own: where masked values are found, and that hostile rows stay cheap."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

from eventhandler.models import DLQEntry
from eventhandler.redaction import MASK, Redactor


def entry(payload: bytes | None, **fields: Any) -> DLQEntry:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "dlq_id": 1,
        "consumer": "c",
        "event_id": "e-1",
        "event_type": "t",
        "source_topic": "topic",
        "source_partition": 0,
        "source_offset": 0,
        "stage": "handler",
        "error_type": "HandlerFailure",
        "error_message": "boom",
        "fingerprint": "f",
        "status": "pending",
        "retry_count": 0,
        "failure_count": 1,
        "replay_count": 0,
        "failed_at": now,
        "last_failed_at": now,
        "last_replayed_at": None,
        "resolved_at": None,
        "payload_size": None if payload is None else len(payload),
        "event_source": "/s",
        "event_payload": payload,
        "message_key": None,
        "headers": [],
        "message_timestamp": None,
        "error_traceback": None,
        "replayed_to_topic": None,
        "resolved_by": None,
        "resolution_note": None,
        "worker_version": "test",
        "updated_at": now,
    }
    return DLQEntry.model_validate(values | fields)


def test_values_are_found_in_data_base64_and_in_json_held_in_a_string() -> None:
    redactor = Redactor(["data.token"])
    inner = base64.b64encode(json.dumps({"token": "tok-123", "n": 1}).encode()).decode()
    view = redactor.view(entry(json.dumps({"data_base64": inner}).encode()))
    shown = json.loads(base64.b64decode(view.payload.document["data_base64"]))
    assert shown == {"token": MASK, "n": 1}

    nested = json.dumps({"data": json.dumps({"token": "tok-456", "keep": "me"})}).encode()
    view = redactor.view(entry(nested, error_message="token tok-456 was refused"))
    assert json.loads(view.payload.document["data"]) == {"token": MASK, "keep": "me"}
    assert view.entry.error_message == f"token {MASK} was refused"


def test_bytes_that_are_not_json_are_withheld_while_redacting() -> None:
    view = Redactor(["data.token"]).view(entry(b"\xff token=tok"))
    assert (view.payload.document, view.payload.encoding) == (None, "withheld")
    view = Redactor(["data.token"]).view(entry(json.dumps({"data_base64": "not base64 at all!"}).encode()))
    assert view.payload.document == {"data_base64": MASK}


def test_the_value_is_masked_in_key_headers_ids_and_traceback_in_the_forms_text_quotes_it() -> None:
    value = "dév'9"
    payload = json.dumps({"data": {"device_id": value}}).encode()
    view = Redactor(["data.device_id"]).view(
        entry(
            payload,
            message_key="dév'9".encode(),
            headers=[("x-device", "id=dév'9".encode()), ("bin", b"\xff" + "dév'9".encode())],
            event_id="dév'9-1",
            error_message=f"input_value={json.dumps(value)} and {value!a}",
            error_traceback="KeyError: dév'9",
        )
    )
    assert view.entry.message_key == MASK.encode()
    assert view.entry.headers == [("x-device", f"id={MASK}".encode()), ("bin", b"\xff" + MASK.encode())]
    assert view.entry.event_id == f"{MASK}-1"
    assert "9" not in view.entry.error_message.replace(MASK, "")
    assert view.entry.error_traceback == f"KeyError: {MASK}"


def test_hostile_rows_are_viewed_in_bounded_time() -> None:
    redactor = Redactor(["*.v", "v", "data.x"])
    many = json.dumps({"data": [{"v": f"value-{i}"} for i in range(50_000)]}).encode()
    deep = ("[" * 60 + '{"v": "' + "a" * 1_000_000 + '"}' + "]" * 60).encode()
    embedded = json.dumps({"data": json.dumps({"x": "y" * 500_000, "z": "[" * 10_000})}).encode()
    started = time.perf_counter()
    views = [
        redactor.view(entry(many, error_message="value-7 " * 100_000)),
        redactor.view(entry(deep, error_message="a" * 1_000_000)),
        redactor.view(entry(embedded, error_message="y" * 1_000_000)),
    ]
    assert time.perf_counter() - started < 10
    assert views[0].entry.error_message == MASK  # too many values to search for: the text is withheld
    assert views[1].entry.error_message == MASK
    assert "y" not in views[2].entry.error_message


def test_what_an_attacker_review_found_stays_masked() -> None:
    """A payload the API cannot render (NaN, a lone surrogate) left the other text unmasked; JSON in a
    string was skipped when it had leading spaces, NaN, broken syntax or a megabyte; dict keys,
    changed case, URL-encoding and pydantic's cut `input_value` showed the value."""
    redactor = Redactor(["data.password", "data.user_id"])
    withheld = redactor.view(
        entry(
            b'{"data": {"password": "hunter2", "n": NaN}}',
            error_message="refused hunter2",
            message_key=b"hunter2",
        )
    )
    assert withheld.payload.encoding == "withheld"
    assert (withheld.entry.error_message, withheld.entry.message_key) == (f"refused {MASK}", MASK.encode())

    for embedded in (
        " " + json.dumps({"password": "hunter2"}),
        '{"password": "hunter2", "x": NaN}',
        '{"password": "hunter2", broken',
        json.dumps({"password": "hunter2", "pad": "x" * 1_000_001}),
    ):
        shown = redactor.view(entry(json.dumps({"data": embedded}).encode())).payload.document
        assert "hunter2" not in json.dumps(shown), embedded[:40]

    token = "sk_live_" + "A1b2C3d4" * 8
    keyed = redactor.view(
        entry(
            json.dumps(
                {"data": {"user_id": "u-4242", "balances": {"u-4242": 10}, "password": token}}
            ).encode(),
            error_message=f"input_value='{token[:24]}...{token[-24:]}' for U-4242",
        )
    )
    assert "4242" not in json.dumps(keyed.payload.document)
    assert "4242" not in keyed.entry.error_message
    assert token[:20] not in keyed.entry.error_message
    assert token[-20:] not in keyed.entry.error_message
    encoded = redactor.view(
        entry(b'{"data": {"password": "hunter 2/x"}}', error_message="GET /login?pw=hunter+2%2Fx failed")
    )
    assert encoded.entry.error_message == f"GET /login?pw={MASK} failed"


def test_values_with_letters_whose_case_changes_their_length_stay_masked() -> None:
    """The Turkish capital I with a dot lowers to two characters: a text holding one was searched
    exactly, so a value with any capital letter showed in it; bytes were lowered as ASCII only, so a
    value with a non-ASCII capital showed in the key and the headers; `str.lower` picks a final sigma
    by the letters around it."""
    redactor = Redactor(["data.device_id", "data.site"])

    def view(device: str, site: str = "plant", **fields: Any) -> DLQEntry:
        payload = json.dumps({"data": {"device_id": device, "site": site}}).encode()
        return redactor.view(entry(payload, **fields)).entry

    turkish = view(
        "İzmir-Pump-7",
        message_key="İzmir-Pump-7".encode(),
        error_message="device 'İzmir-Pump-7' is not registered",
    )
    assert turkish.error_message == f"device '{MASK}' is not registered"
    assert turkish.message_key == MASK.encode()
    beside = view("Pump-7-Secret", "İstanbul", error_message="device 'Pump-7-Secret' at site 'İstanbul'")
    assert beside.error_message == f"device '{MASK}' at site '{MASK}'"
    umlaut = view(
        "ÖBB-Pump-7",
        message_key="ÖBB-Pump-7".encode(),
        headers=[("device", "ÖBB-Pump-7".encode()), ("raw", b"\xff" + "öbb-pump-7".encode())],
    )
    assert umlaut.message_key == MASK.encode()
    assert umlaut.headers == [("device", MASK.encode()), ("raw", b"\xff" + MASK.encode())]
    sigma = view("ΔΣ", error_message="ΔΣX failed, then δσ")
    assert sigma.error_message == f"{MASK}X failed, then {MASK}"
    lowered = view("İstanbul-42", message_key="i̇stanbul-42".encode(), error_message="site i̇stanbul-42")
    assert (lowered.error_message, lowered.message_key) == (f"site {MASK}", MASK.encode())


def test_a_text_whose_case_changes_its_length_is_searched_in_linear_time() -> None:
    """With a Turkish capital I in the text, the text was folded letter by letter in Python again after
    every value found: 16 s for one view of a 900 kB payload with 290 masked values (0.4 s now)."""
    values = [f"value-{i:04d}x" for i in range(290)]
    note = "İ" + " ".join(values) * 250
    payload = json.dumps({"data": {"password": values, "note": note}}).encode()
    started = time.perf_counter()
    view = Redactor(["data.password"]).view(entry(payload))
    assert time.perf_counter() - started < 5
    assert "value-0001x" not in json.dumps(view.payload.document)


def test_a_one_character_envelope_attribute_is_masked_and_the_fingerprint_is_keyed() -> None:
    redactor = Redactor(["subject"], secret="postgresql://db/x")
    view = redactor.view(
        entry(
            b'{"a": 1}',
            headers=[("ce_specversion", b"1.0"), ("ce_subject", b"7")],
            fingerprint="0123456789abcdef",
        )
    )
    assert view.entry.headers == [("ce_specversion", b"1.0"), ("ce_subject", MASK.encode())]
    # the stored fingerprint hashes the error's words: a reader could hash guesses against it
    assert view.entry.fingerprint != "0123456789abcdef"
    assert view.entry.fingerprint == Redactor(["subject"], secret="postgresql://db/x").fingerprint(
        "0123456789abcdef"
    )
    assert Redactor([]).fingerprint("0123456789abcdef") == "0123456789abcdef"  # not redacting: as stored
