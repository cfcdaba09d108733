"""`POST /commands` and `GET /commands` on the operations endpoint, and the CLI's argument parsing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from devices.command import Command, CommandAck
from devices.registry import parse_registry
from devices.topic import TopicScheme
from gateway.cli import _report_command, build_parser
from gateway.commandclient import parse_params
from gateway.commands import CommandDispatcher
from gateway.httpapi import StatusServer
from gateway.store.base import Point

REGISTRY = """\
types:
  greenhouse:
    fields: {temperature: {type: number}}
    commands:
      fan: {params: {on: {type: bool}}}
devices:
  - {id: gh-1, type: greenhouse}
"""


class AckingChannel:
    """A channel whose device answers every command at once: ok, or error when asked to."""

    def __init__(self) -> None:
        self.sent: list[Command] = []
        self.dispatcher: CommandDispatcher | None = None
        self.answer: str = "ok"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        command = Command.decode(topic.split("/")[1], payload)
        self.sent.append(command)
        if self.answer != "silent":
            assert self.dispatcher is not None
            ack = CommandAck(
                command.id, command.device_id, "ok" if self.answer == "ok" else "error", "jammed"
            )
            loop = asyncio.get_running_loop()
            loop.call_soon(self.dispatcher.handle_ack, command.device_id, ack.encode())


def request(method: str, path: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}"
    if method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def exchange(port: int, raw: bytes) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def serve_and_run(
    steps: list[tuple[str, bytes]], *, token: str | None = None, answers: list[str] | None = None
) -> tuple[list[tuple[int, Any]], list[Point], AckingChannel]:
    records: list[Point] = []
    channel = AckingChannel()

    async def scenario() -> list[tuple[int, Any]]:
        dispatcher = CommandDispatcher(
            channel=channel,
            topics=TopicScheme("devices/{device_id}/commands"),
            record=records.append,
            clock=lambda: 1000.0,
            allow_list=parse_registry(REGISTRY, "d.yaml").allow_list(),
        )
        channel.dispatcher = dispatcher
        server = StatusServer("127.0.0.1", 0, dict, commands=dispatcher, command_token=token)
        started = asyncio.Event()
        task = asyncio.create_task(server.run(started))
        await started.wait()
        results = []
        for i, (label, raw) in enumerate(steps):
            channel.answer = answers[i] if answers is not None else "ok"
            del label
            results.append(await exchange(server.port, raw))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return results

    return asyncio.run(scenario()), records, channel


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_post_commands_answers_with_the_outcome_and_its_status_code() -> None:
    steps = [
        ("acked ok", request("POST", "/commands", body(device="gh-1", name="fan", params={"on": True}, wait=5))),
        ("acked error", request("POST", "/commands", body(device="gh-1", name="fan", params={"on": False}, wait=5))),
        ("not waited", request("POST", "/commands", body(device="gh-1", name="fan", params={"on": True}))),
        ("off the list", request("POST", "/commands", body(device="gh-1", name="self_destruct", wait=5))),
        ("listing", request("GET", "/commands")),
    ]  # fmt: skip
    results, records, channel = serve_and_run(steps, answers=["ok", "error", "silent", "ok", "ok"])
    (ok_code, ok), (err_code, err), (sent_code, sent), (rej_code, rej), (list_code, listed) = results
    assert (ok_code, ok["status"]) == (200, "ok")
    assert (err_code, err["status"], err["detail"]) == (200, "error", "jammed")
    assert (sent_code, sent["status"]) == (202, "sent")
    assert rej_code == 422 and rej["status"] == "rejected" and "allow-list" in rej["detail"]
    assert list_code == 200 and [c["status"] for c in listed] == ["ok", "error", "sent", "rejected"]
    assert [c.name for c in channel.sent] == ["fan", "fan", "fan"]  # the rejected one never went out
    assert [dict(p.tags)["status"] for p in records] == ["sent", "ok", "sent", "error", "sent", "rejected"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"nope", "not JSON"),
        (body(device="gh-1"), "expected"),
        (body(device="gh-1", name="fan", colour="red"), "expected"),
        (body(device="", name="fan"), "non-empty"),
        (body(device="gh-1", name="fan", params=[1]), "params must be a JSON object"),
        (body(device="gh-1", name="fan", ttl=0), "ttl must be"),
        (body(device="gh-1", name="fan", wait=1e9), "wait must be"),
        (body(device="gh-1", name="fan", wait=True), "wait must be"),
    ],
)
def test_malformed_bodies_are_400(raw: bytes, message: str) -> None:
    [(code, answer)], records, channel = serve_and_run([("bad", request("POST", "/commands", raw))])
    assert code == 400 and message in answer["error"]
    assert records == [] and channel.sent == []


def test_with_a_token_an_unauthorised_command_is_refused_and_audited() -> None:
    command = body(device="gh-1", name="fan", params={"on": True}, wait=5)
    steps = [
        ("no token", request("POST", "/commands", command)),
        ("wrong token", request("POST", "/commands", command, "Authorization: Bearer nope\r\n")),
        ("right token", request("POST", "/commands", command, "Authorization: Bearer s3cret\r\n")),
    ]
    results, records, channel = serve_and_run(steps, token="s3cret")
    assert [code for code, _ in results] == [401, 401, 200]
    assert results[0][1]["status"] == "rejected" and "unauthorised" in results[0][1]["detail"]
    assert [dict(p.tags)["status"] for p in records] == ["rejected", "rejected", "sent", "ok"]
    assert len(channel.sent) == 1
    assert all("s3cret" not in json.dumps(answer) for _, answer in results)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["speed=3"], {"speed": 3}),
        (["on=true", "off=false"], {"on": True, "off": False}),
        (["mode=high"], {"mode": "high"}),
        (['mode="3"'], {"mode": "3"}),
        (["level=-2.5"], {"level": -2.5}),
        (["tags=[1, 2]"], {"tags": [1, 2]}),
        (["x=NaN", "y=Infinity"], {"x": "NaN", "y": "Infinity"}),
        (["note="], {"note": ""}),
        (["url=a=b"], {"url": "a=b"}),
    ],
)
def test_params_parse_as_json_when_they_are_json(pairs: list[str], expected: dict[str, Any]) -> None:
    assert parse_params(pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["speed"], "expected KEY=VALUE"), (["=3"], "expected KEY=VALUE"), (["a=1", "a=2"], "given twice")],
)
def test_bad_params_are_refused(pairs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_params(pairs)


@pytest.mark.parametrize(
    ("status", "waited", "code"),
    [
        ("ok", True, 0),
        ("error", True, 1),
        ("timed_out", True, 1),
        ("expired", True, 1),
        ("rejected", True, 1),
        ("rejected", False, 1),
        ("sent", False, 0),
        ("queued", False, 0),
        ("sent", True, 3),
        ("queued", True, 3),
    ],
)
def test_exit_status_is_zero_only_for_ok_or_an_accepted_command_not_waited_for(
    status: str, waited: bool, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    view = {
        "id": "abc",
        "device": "gh-1",
        "name": "fan",
        "status": status,
        "detail": "why",
        "latency_ms": 3.0,
    }
    assert _report_command(view, waited=waited, timeout=5, as_json=False) == code
    out, err = capsys.readouterr()
    assert ("abc" in out) if code == 0 else ("error: command abc fan to gh-1" in err and "why" in err)


def test_command_send_arguments() -> None:
    args = build_parser().parse_args(
        ["command", "send", "gh-1", "fan", "on=true", "--wait", "--timeout", "10s", "--url", "http://x:1"]
    )
    assert (args.device, args.name, args.params, args.wait, args.timeout, args.url) == (
        "gh-1",
        "fan",
        ["on=true"],
        True,
        10.0,
        "http://x:1",
    )
    assert args.ttl is None and not args.direct


def test_rules_check_with_a_registry_checks_command_actions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    registry = tmp_path / "devices.yaml"
    registry.write_text(REGISTRY, encoding="utf-8")
    rules = tmp_path / "rules"
    rules.mkdir()
    rule = "rules:\n  - id: hot\n    when: temperature > 30\n    on_raise: [{command: {name: fan, params: {on: %s}}}]\n"
    (rules / "r.yaml").write_text(rule % "true", encoding="utf-8")
    assert main(["rules", "check", str(rules), "--devices", str(registry)]) == 0
    assert capsys.readouterr().err == ""
    (rules / "r.yaml").write_text(rule % "1", encoding="utf-8")
    assert main(["rules", "check", str(rules)]) == 0  # without a registry there is nothing to check against
    capsys.readouterr()
    assert main(["rules", "check", str(rules), "--devices", str(registry)]) == 1
    err = capsys.readouterr().err
    assert (
        f"error: {rules / 'r.yaml'}: rule 'hot' on_raise[0]: devices of type 'greenhouse' (1 reached)" in err
    )
    assert "param 'on': expected a bool, got number 1" in err
