"""What one run of the gateway leaves on disk for the next: its MQTT session, and how it stopped.

Two facts do not survive a restart in memory, and the next run needs both:

- whether the broker held a persistent session for us. Without it, a first CONNACK with
  `session_present = 0` after a restart cannot be told from a first start: the broker forgot us
  (session expired, broker restarted without persistence) and the messages it queued are gone.
- whether the previous run stopped cleanly. Only then is the rule checkpoint (with the per-device
  seqs) as new as what was stored; after a crash, seqs the crashed run stored after its last
  checkpoint would look missing (see devices/dedupe.py).

The file is `tidegate-run.json` next to the rule checkpoint file (else next to the spool directory),
one JSON object, replaced atomically (gateway/durable.py)::

    {"format": "tidegate-run", "version": 1, "client_id": "tidegate", "broker": "127.0.0.1:1883",
     "session": true, "connected_until": 1764000000.0, "clean_stop": false}

`session` says the broker holds a session for `client_id` at `broker`; `connected_until` is the
last moment we know it did (the clean stop, or else the last connect); `clean_stop` is written
false when a run starts and true only once it has stopped cleanly. A file for another client id or
broker does not apply. An unreadable file is logged and treated as absent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from gateway.durable import write_atomically

log = logging.getLogger(__name__)

RUN_STATE_FORMAT: Final = "tidegate-run"
RUN_STATE_VERSION: Final = 1
RUN_STATE_NAME: Final = "tidegate-run.json"


@dataclass(frozen=True, slots=True)
class RunState:
    """The previous run's session and stop, as read back (see the module docstring)."""

    client_id: str
    broker: str
    session: bool
    connected_until: float | None
    clean_stop: bool


def run_state_path(checkpoint_file: Path | None, spool_dir: Path | None) -> Path | None:
    """Return where the run state lives: next to the checkpoint, else next to the spool, else None."""
    if checkpoint_file is not None:
        return checkpoint_file.with_name(RUN_STATE_NAME)
    if spool_dir is not None:
        return spool_dir.absolute().parent / RUN_STATE_NAME
    return None


def read_run_state(path: Path) -> RunState | None:
    """Return the state in `path`, or None if there is none or it cannot be used (logged)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("ignoring run state file %s: %s", path, exc)
        return None
    try:
        if data.get("format") != RUN_STATE_FORMAT or data.get("version") != RUN_STATE_VERSION:
            raise ValueError(f"not a {RUN_STATE_FORMAT} version {RUN_STATE_VERSION} file")
        until = data["connected_until"]
        state = RunState(
            client_id=data["client_id"],
            broker=data["broker"],
            session=data["session"],
            connected_until=None if until is None else float(until),
            clean_stop=data["clean_stop"],
        )
        if not (
            isinstance(state.client_id, str)
            and isinstance(state.broker, str)
            and isinstance(state.session, bool)
            and isinstance(state.clean_stop, bool)
        ):
            raise ValueError("a field has the wrong type")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.error("ignoring run state file %s: %s", path, exc)
        return None
    return state


def write_run_state(path: Path, state: RunState) -> bool:
    """Write `state` to `path` atomically and durably; log and return False if that fails."""
    data = {"format": RUN_STATE_FORMAT, "version": RUN_STATE_VERSION, **asdict(state)}
    try:
        write_atomically(path, json.dumps(data).encode())
    except OSError as exc:
        log.error("could not write run state file %s: %s", path, exc)
        return False
    return True
