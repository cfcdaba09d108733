"""Wire the gateway together from settings and run it until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devices.delivery import DeliveryPolicy
from devices.errors import SourceFileError
from devices.payload import PayloadDecoder
from devices.topic import TopicScheme
from gateway.actions import ActionRunner, WebhookSender
from gateway.checkpoint import RuleStateCheckpointer
from gateway.commands import CommandDispatcher
from gateway.config import (
    InfluxV1Settings,
    InfluxV2Settings,
    NullSettings,
    Settings,
    SqliteSettings,
    StoreSettings,
)
from gateway.deadletter import DeadLetterFile
from gateway.devicefile import read_device_file
from gateway.httpapi import StatusServer
from gateway.ingest import TelemetryIngest
from gateway.mqtt import MqttClient, Subscription
from gateway.records import ALERTS, session_loss_point
from gateway.rulefiles import read_rule_dir, rule_files_fingerprint
from gateway.runstate import RunState, read_run_state, run_state_path, write_run_state
from gateway.store.base import Point, RejectedPointsError, Store
from gateway.store.batcher import BatchWriter
from gateway.store.spool import Spool, SpoolStats
from gateway.tls import TlsOptions
from rules import AlarmStatus, RuleEngine, RuleSet, build_rule_set

log = logging.getLogger(__name__)
ENGINE_TICK = 1.0  # how often timers (absence, `for:` durations) are advanced
DRAIN_TIMEOUT = 10.0
WEBHOOK_DRAIN_TIMEOUT = 5.0  # at shutdown, for queued webhooks (a dead endpoint must not hold it up)
# How often the rule directory is checked for changes: a stat per file, so cheap; an operator who
# saves a file sees it in force within this long (SIGHUP reloads at once).
RULE_POLL_INTERVAL = 2.0
ACKNOWLEDGED_MESSAGE = "acknowledged"


def open_store(settings: StoreSettings) -> Store:
    """Create the store the settings describe."""
    if isinstance(settings, InfluxV1Settings):
        from gateway.store.influx_v1 import InfluxV1Store

        return InfluxV1Store(
            url=settings.url,
            database=settings.database,
            retention_policy=settings.retention_policy,
            username=settings.username,
            password=settings.password,
            timeout=settings.timeout,
            create_database=settings.create_database,
        )
    if isinstance(settings, InfluxV2Settings):
        from gateway.store.influx_v2 import InfluxV2Store

        return InfluxV2Store(
            url=settings.url,
            token=settings.token,
            org=settings.org,
            bucket=settings.bucket,
            timeout=settings.timeout,
        )
    if isinstance(settings, SqliteSettings):
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(settings.path)
    assert isinstance(settings, NullSettings)
    from gateway.store.memory import NullStore

    return NullStore()


def load_rules(settings: Settings) -> RuleSet:
    """Read the configured rule directory, or return an empty rule set."""
    if settings.rules.dir is None:
        return build_rule_set({})
    return read_rule_dir(settings.rules.dir)


def _task_count() -> int:
    """asyncio tasks alive in the running loop; 0 when read after the loop ended (CLI summaries)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running event loop
        return 0


class Gateway:
    """The running gateway: MQTT in, rules, batched store writes, commands out.

    Args:
        settings: validated configuration.
        rule_set: rules to run (default: read from `settings.rules.dir`).
        store: the store to write to (default: opened from `settings.store`).
        clock: epoch seconds; injectable for tests.
        rule_poll_interval: seconds between checks of `settings.rules.dir` for changed files.

    Attributes:
        rule_reloads: rule sets swapped in by a reload.
        rule_reload_failures: reloads refused because a rule file had problems (the running rules
            stayed in force).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        rule_set: RuleSet | None = None,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        rule_poll_interval: float = RULE_POLL_INTERVAL,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.store = store if store is not None else open_store(settings.store)
        rules_dir = settings.rules.dir
        # Taken before the files are read, so a write in between is seen as a change.
        self._rule_fingerprint = rule_files_fingerprint(rules_dir) if rules_dir is not None else frozenset()
        self._rule_poll_interval = rule_poll_interval
        self._reload_requested = asyncio.Event()
        self.rule_reloads = 0
        self.rule_reload_failures = 0
        self.engine = RuleEngine(rule_set if rule_set is not None else load_rules(settings))
        # (rule, device) -> `since` of the raised alarm that was acknowledged; a later raise of the
        # same pair has another `since`, so it shows as unacknowledged again.
        self._acknowledged: dict[tuple[str, str], float] = {}
        batch = settings.batch
        self.writer = BatchWriter(
            self.store,
            batch_size=batch.size,
            flush_interval=batch.flush_interval,
            max_pending=batch.max_pending,
            on_rejected=self._on_rejected,
            spool=(
                Spool(settings.spool.dir, max_bytes=settings.spool.max_bytes)
                if settings.spool.enabled and settings.spool.dir is not None
                else None
            ),
        )
        topics = settings.mqtt.topics
        telemetry = TopicScheme(topics.telemetry)
        self._acks = TopicScheme(topics.command_acks)
        status_topics = self._status_topics = TopicScheme(topics.status)
        mqtt = settings.mqtt
        self.mqtt = MqttClient(
            host=mqtt.host,
            port=mqtt.port,
            client_id=mqtt.client_id,
            protocol=mqtt.protocol,
            username=mqtt.username,
            password=mqtt.read_password(),
            keepalive=mqtt.keepalive,
            session_expiry=mqtt.session_expiry,
            receive_maximum=mqtt.receive_maximum,
            reconnect_min_delay=mqtt.reconnect_min_delay,
            reconnect_max_delay=mqtt.reconnect_max_delay,
            subscriptions=[
                Subscription(telemetry.subscription, 1, self._on_telemetry),
                Subscription(self._acks.subscription, 1, self._on_command_ack),
                Subscription(status_topics.subscription, 1, self._on_status),
            ],
            on_session_lost=self._on_session_lost,
            tls=(
                TlsOptions(
                    ca_file=mqtt.tls.ca_file,
                    cert_file=mqtt.tls.cert_file,
                    key_file=mqtt.tls.key_file,
                    server_name=mqtt.tls.server_name,
                )
                if mqtt.tls_enabled
                else None
            ),
        )
        command = settings.commands
        self.commands = CommandDispatcher(
            channel=self.mqtt,
            topics=TopicScheme(topics.commands),
            record=self._record,
            clock=clock,
            policy=DeliveryPolicy(
                ack_timeout=command.ack_timeout,
                retry_interval=command.retry_interval,
                max_attempts=command.max_attempts,
                offline=command.offline,
                max_queued_per_device=command.max_queued_per_device,
                max_pending=command.max_pending,
                rate=command.rate,
                burst=command.burst,
            ),
            ttl=command.ttl,
            is_connected=self.mqtt.connected.is_set,
            is_offline=self._device_offline,
            ack_topics=self._acks,
            mqtt5=mqtt.protocol == "5",
        )
        dead = settings.dead_letter
        self.dead_letter = (
            DeadLetterFile(dead.file, max_bytes=dead.max_bytes)
            if dead.enabled and dead.file is not None
            else None
        )
        self.ingest = TelemetryIngest(
            topics=telemetry,
            decoder=PayloadDecoder(
                max_bytes=settings.ingest.max_payload_bytes, max_batch=settings.ingest.max_batch
            ),
            engine=self.engine,
            sink=self.writer,
            commands=self.commands,
            mqtt=self.mqtt,
            dead_letter_topic=topics.dead_letter,
            dead_letter_max_bytes=settings.ingest.dead_letter_max_bytes,
            clock=clock,
            dead_letter_file=self.dead_letter,
            registry=read_device_file(settings.devices.file) if settings.devices.file is not None else None,
            unknown_devices=settings.devices.unknown,
            status_topics=status_topics,
            hand_off=lambda: self.writer.current_hand_off,
        )
        actions = settings.actions
        self.actions = ActionRunner(
            mqtt=self.mqtt,
            webhooks=WebhookSender(
                timeout=actions.webhook_timeout,
                max_queue=actions.webhook_queue,
                max_attempts=actions.webhook_attempts,
                backoff=actions.webhook_backoff,
                workers=actions.webhook_workers,
            ),
        )
        self.ingest.run_action = self.actions.execute  # republish, webhooks, derived points
        if settings.devices.file is not None:  # with a registry, only its devices' declared commands go out
            self.commands.allow_list = self.ingest.registry.allow_list()
        rules = settings.rules
        self.checkpointer = (
            RuleStateCheckpointer(
                rules.checkpoint_file,
                engine=self.engine,
                seqs=self.ingest.seqs,
                writer=self.writer,
                interval=rules.checkpoint_interval,
            )
            if rules.checkpoint_enabled and rules.checkpoint_file is not None
            else None
        )
        # The previous run's MQTT session and how it stopped (gateway/runstate.py)
        self.run_state_path = run_state_path(
            rules.checkpoint_file if self.checkpointer is not None else None,
            settings.spool.dir if settings.spool.enabled else None,
        )
        self._previous_run: RunState | None = None
        self._run_state_write: asyncio.Future[bool] | None = None
        self.points_rejected = 0
        self.status_server: StatusServer | None = None
        self.ready = asyncio.Event()

    def _on_telemetry(self, message: Any) -> None:
        self.ingest.on_message(message)

    def _on_status(self, message: Any) -> None:
        self.ingest.on_status(message)
        device_id = self._status_topics.device_id(message.topic)
        if device_id is not None:  # a birth message releases the commands held for that device now
            self.commands.device_changed(device_id)

    def _device_offline(self, device_id: str) -> bool:
        return self.ingest.tracker.view(device_id, self._clock()).status == "offline"

    def _on_command_ack(self, message: Any) -> None:
        device_id = self._acks.device_id(message.topic)
        if device_id is not None:
            # MQTT 5 acks may carry the command id as Correlation Data (request/response pattern);
            # None without it, and always on MQTT 3.1.1 (the codec's NO_PROPERTIES)
            self.commands.handle_ack(
                device_id, message.payload, correlation_data=message.properties.correlation_data
            )
        generation = self.mqtt.generation
        # ack after the outcome record is written, like telemetry
        self.writer.add([], lambda: self.mqtt.ack(message.mid, message.qos, generation))

    def _record(self, point: Point) -> None:
        self.writer.add([point])

    def _on_session_lost(self, since: float, until: float) -> None:
        # Recorded in the store so analysts see the window in which gaps are explained by the broker.
        self.writer.add([session_loss_point(since, until, client_id=self.settings.mqtt.client_id)])

    def _on_rejected(self, error: RejectedPointsError) -> None:
        self.points_rejected += len(error.rejected)
        log.error("store rejected %d point(s): %s", len(error.rejected), error.reason)
        if self.dead_letter is not None:
            self.dead_letter.points(error.rejected, error.reason, self._clock())
            self.dead_letter.sync()  # before the batch's messages are acked

    async def _tick_engine(self) -> None:
        while True:
            await asyncio.sleep(ENGINE_TICK)
            actions = self.engine.advance(self._clock())
            if actions:
                points: list[Point] = []
                self.ingest.execute(actions, points)
                self.writer.add(points)

    # -- rule reload ---------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Have the rule watcher re-read the rule files now (the SIGHUP handler of `tidegate run`)."""
        self._reload_requested.set()

    async def reload_rules(self) -> bool:
        """Re-read the rule directory and swap its rules in; on any problem keep the running rules.

        Unchanged rules keep their state; the alerts that close the alarms of changed and removed
        rules are written like any other (see `rules.engine`). Returns whether the new rules run.
        """
        directory = self.settings.rules.dir
        if directory is None:
            log.warning("rule reload asked for, but no rules.dir is configured")
            return False
        try:
            rule_set = await asyncio.to_thread(read_rule_dir, directory)
        except SourceFileError as exc:
            self.rule_reload_failures += 1
            for problem in exc.problems:
                log.error("rule reload: %s", problem)
            log.error(
                "rule reload refused (%d problem(s)); the running %d rules stay in force",
                len(exc.problems),
                len(self.engine.rule_set),
            )
            return False
        reload = self.engine.replace_rules(rule_set, self._clock())
        self.rule_reloads += 1
        if reload.actions:
            points: list[Point] = []
            self.ingest.execute(reload.actions, points)
            self.writer.add(points)
        log.info("reloaded %s", reload.summary())
        return True

    async def _watch_rules(self, directory: Path) -> None:
        while True:
            try:
                async with asyncio.timeout(self._rule_poll_interval):
                    await self._reload_requested.wait()
            except TimeoutError:
                pass
            requested = self._reload_requested.is_set()
            self._reload_requested.clear()
            current = rule_files_fingerprint(directory)
            if requested or current != self._rule_fingerprint:
                self._rule_fingerprint = current
                await self.reload_rules()

    # -- alarms --------------------------------------------------------------------------------------

    def alarms(self) -> list[dict[str, Any]]:
        """List the raised alarms as plain data, each with whether an operator acknowledged it."""
        active = self.engine.active_alarms()
        self._forget_stale_acks(active)
        return [
            {
                "rule": alarm.rule_id,
                "device": alarm.device_id,
                "severity": alarm.severity,
                "since": alarm.since,
                "values": dict(alarm.values),
                "acknowledged": self._acknowledged.get((alarm.rule_id, alarm.device_id)) == alarm.since,
            }
            for alarm in active
        ]

    def acknowledge(self, rule_id: str, device_id: str) -> dict[str, Any] | None:
        """Acknowledge the raised alarm of (`rule_id`, `device_id`) and record that in the store.

        Returns the alarm as `alarms` lists it, or None if there is no such raised alarm. A repeated
        acknowledgement changes nothing and records nothing.
        """
        active = self.engine.active_alarms()
        self._forget_stale_acks(active)
        for alarm in active:
            if alarm.rule_id == rule_id and alarm.device_id == device_id:
                break
        else:
            return None
        key = (rule_id, device_id)
        if self._acknowledged.get(key) != alarm.since:
            self._acknowledged[key] = alarm.since
            subject: tuple[tuple[str, str], ...] = (("device", device_id),)
            if alarm.group is not None:  # a group rule's alarm is recorded by group, as when raised
                subject = (("group", alarm.group[1]), ("group_by", alarm.group[0]))
            tags = (*subject, ("rule", rule_id), ("severity", alarm.severity), ("state", "acknowledged"))
            self.writer.add([Point(ALERTS, tags, {"message": ACKNOWLEDGED_MESSAGE}, self._clock())])
            log.info("alarm acknowledged: rule %s, device %s", rule_id, device_id)
        return {
            "rule": rule_id,
            "device": device_id,
            "severity": alarm.severity,
            "since": alarm.since,
            "values": dict(alarm.values),
            "acknowledged": True,
        }

    def devices(self) -> list[dict[str, Any]]:
        """List registered, heard-from and quarantined devices with status, rate and alarm count."""
        now = self._clock()
        ingest = self.ingest
        registry = ingest.registry.devices
        alarms: dict[str, int] = {}
        for alarm in self.engine.active_alarms():
            alarms[alarm.device_id] = alarms.get(alarm.device_id, 0) + 1
        ids = sorted({*registry, *ingest.tracker.device_ids()})
        rows = []
        for device_id in ids:
            view = ingest.tracker.view(device_id, now)
            entry = registry.get(device_id)
            rows.append(
                {
                    "device": device_id,
                    "type": entry.type if entry is not None else None,
                    "registered": entry is not None,
                    "quarantined": device_id in ingest.quarantined,
                    "tags": dict(entry.tags) if entry is not None else {},
                    "status": view.status,
                    "status_since": view.status_since,
                    "last_seen": view.last_seen,
                    "rate": view.rate,
                    "alarms": alarms.get(device_id, 0),
                }
            )
        return rows

    def _forget_stale_acks(self, active: list[AlarmStatus]) -> None:
        # Keeps the map no larger than the set of raised alarms.
        current = {(alarm.rule_id, alarm.device_id): alarm.since for alarm in active}
        for key, since in list(self._acknowledged.items()):
            if current.get(key) != since:
                del self._acknowledged[key]

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain: stop reading, write what is pending, disconnect."""
        previous = await self._begin_run()
        if self.checkpointer is not None:  # before the first message or tick, and before the registry
            restored = await self.checkpointer.restore(self._clock())
            if restored:
                points: list[Point] = []
                self.ingest.execute(restored, points)
                self.writer.add(points)
            if previous is None or not previous.clean_stop:
                # after a crash the checkpoint is older than what was stored: seqs stored since then
                # would look missing (devices/dedupe.py)
                self.ingest.seqs.distrust()
        registered = self.ingest.registry.devices
        if registered:  # absence rules then cover registered devices that never speak at all
            self.engine.add_known_devices(registered, self._clock())
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self.writer.run(), name="batch-writer")
                tasks = [
                    group.create_task(self.mqtt.run(), name="mqtt"),
                    group.create_task(self.commands.run(), name="commands"),
                    group.create_task(self.ingest.run_backpressure(), name="backpressure"),
                    group.create_task(self._tick_engine(), name="engine-timers"),
                    group.create_task(self.actions.webhooks.run(), name="webhooks"),
                    group.create_task(self._remember_session(), name="run-state"),
                ]
                if self.settings.rules.dir is not None:
                    tasks.append(
                        group.create_task(self._watch_rules(self.settings.rules.dir), name="rule-watch")
                    )
                address = self.settings.http.address
                if address is not None:
                    self.status_server = StatusServer(
                        *address,
                        snapshot=self.snapshot,
                        alarms=self.alarms,
                        acknowledge=self.acknowledge,
                        devices=self.devices,
                        commands=self.commands,
                        command_token=(
                            self.settings.commands.token.get_secret_value()
                            if self.settings.commands.token is not None
                            else None
                        ),
                    )
                    tasks.append(group.create_task(self.status_server.run(), name="status-http"))
                checkpoints = (
                    group.create_task(self.checkpointer.run(), name="rule-checkpoints")
                    if self.checkpointer is not None
                    else None
                )
                self.ready.set()
                await stop.wait()
                log.info("stopping: flushing pending writes")
                if checkpoints is not None:
                    checkpoints.cancel()
                self.mqtt.pause_reading()
                self.commands.close()  # pending commands get an end on record before the last writes
                await self.actions.webhooks.drain(WEBHOOK_DRAIN_TIMEOUT)  # what is left is counted, logged
                clean = False
                try:
                    # acks for everything written go out before we disconnect; what cannot be written
                    # in time stays unacked, and the broker redelivers it to our session on restart
                    await asyncio.wait_for(self.writer.close(), timeout=DRAIN_TIMEOUT)
                    clean = True
                    if self.checkpointer is not None:  # all written: the state may say so
                        clean = await self.checkpointer.close()
                except TimeoutError:
                    log.warning(
                        "store did not take pending points within %ss; the broker keeps them", DRAIN_TIMEOUT
                    )
                    writer.cancel()
                await self.mqtt.disconnect()
                await self._end_run(clean)
                for task in tasks:
                    task.cancel()
        finally:
            await self.store.close()
            if self.dead_letter is not None:
                self.dead_letter.close()

    # -- run state: the MQTT session and clean stops across restarts --------------------------------

    def _session_kept(self) -> bool:
        """Tell whether the broker keeps a session for us while we are away."""
        mqtt = self.settings.mqtt
        return mqtt.protocol == "3.1.1" or mqtt.session_expiry > 0

    def _run_state(self, *, session: bool, connected_until: float | None, clean_stop: bool) -> RunState:
        broker = f"{self.mqtt.host}:{self.mqtt.port}"
        return RunState(self.settings.mqtt.client_id, broker, session, connected_until, clean_stop)

    async def _begin_run(self) -> RunState | None:
        """Read what the previous run left (None if nothing applies); note this run as not stopped."""
        path = self.run_state_path
        if path is None:
            return None
        previous = await asyncio.to_thread(read_run_state, path)
        fresh = self._run_state(session=False, connected_until=None, clean_stop=False)
        if previous is not None and (previous.client_id, previous.broker) != (fresh.client_id, fresh.broker):
            log.info("run state %s is for another client id or broker; not used", path)
            previous = None
        self._previous_run = previous
        if previous is not None and previous.session and self._session_kept():
            # a CONNACK without our session is then a loss, not a first start
            self.mqtt.assume_session(
                previous.connected_until if previous.connected_until is not None else self._clock()
            )
        if previous is not None:
            fresh = self._run_state(
                session=previous.session, connected_until=previous.connected_until, clean_stop=False
            )
        await self._save_run_state(path, fresh)
        return previous

    async def _remember_session(self) -> None:
        """Once connected and subscribed, record that the broker holds a session for us."""
        path = self.run_state_path
        if path is None or not self._session_kept():
            return
        await self.mqtt.connected.wait()
        state = self._run_state(session=True, connected_until=self._clock(), clean_stop=False)
        await self._save_run_state(path, state)

    async def _end_run(self, clean: bool) -> None:
        """Record how this run stopped, and until when it had its session."""
        path = self.run_state_path
        if path is None:
            return
        previous = self._previous_run
        until: float | None
        if self.mqtt.stats.connects and self._session_kept():
            session, until = True, self._clock()
        elif previous is not None:  # never connected: what the previous run knew still holds
            session, until = previous.session, previous.connected_until
        else:
            session, until = False, None
        state = self._run_state(session=session, connected_until=until, clean_stop=clean)
        await self._save_run_state(path, state)

    async def _save_run_state(self, path: Path, state: RunState) -> None:
        # One write at a time, in order: a write whose caller was cancelled runs on in its thread.
        previous = self._run_state_write
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        self._run_state_write = asyncio.ensure_future(asyncio.to_thread(write_run_state, path, state))
        await asyncio.shield(self._run_state_write)

    def snapshot(self) -> dict[str, Any]:
        """Return the gateway's counters as plain data (for status, metrics and the demo)."""
        ingest, commands = self.ingest.stats, self.commands.stats
        spool = self.writer.spool.stats if self.writer.spool is not None else SpoolStats()
        return {
            "received": ingest.received,
            "written": ingest.written,
            "rejected": ingest.rejected,
            "messages_stored": ingest.messages_stored,
            "messages_spooled": ingest.messages_spooled,
            "messages_dead_lettered": ingest.messages_dead_lettered,
            "in_flight": ingest.in_flight,
            "seq_gaps": ingest.seq_gaps,
            "seq_missing": ingest.seq_missing,
            "seq_late": ingest.seq_late,
            "seq_gaps_unverified": ingest.seq_gaps_unverified,
            "events": ingest.events,
            "duplicates": ingest.duplicates,
            "pending_points": self.writer.pending,
            "stored": ingest.events_written,
            "alerts": ingest.alerts_raised + ingest.alerts_cleared,
            "alerts_raised": ingest.alerts_raised,
            "alerts_cleared": ingest.alerts_cleared,
            "commands_sent": commands.sent,
            "commands_acked": commands.acked_ok + commands.acked_error,
            "commands_failed": commands.acked_error,
            "commands_timed_out": commands.timed_out,
            "commands_rejected": commands.rejected,
            "commands_expired": commands.expired,
            "commands_retries": commands.retries,
            "commands_queued": commands.queued,
            "commands_pending": self.commands.pending,
            "commands_waiting": self.commands.queued,
            "command_acks_unmatched": commands.unknown_acks + commands.late_acks,
            "points_rejected": self.points_rejected,
            "dead_letter_records": self.dead_letter.records if self.dead_letter is not None else 0,
            "store_retries": self.writer.retries,
            "mqtt_connected": self.mqtt.connected.is_set(),
            "mqtt_error": self.mqtt.stats.last_error,  # why the last connection attempt failed, if it did
            "mqtt_reconnects": max(self.mqtt.stats.connects - 1, 0),
            "sessions_lost": self.mqtt.stats.sessions_lost,
            "session_loss_windows": self.mqtt.stats.sessions_lost,
            "backpressure_pauses": ingest.backpressure_pauses,
            "spool_batches": spool.batches,
            "spool_points": spool.points,
            "spool_bytes": spool.bytes,
            "points_spooled": spool.spooled_points,
            "points_drained": spool.drained_points,
            "spool_corrupt_segments": spool.corrupt_segments,
            "rules_loaded": len(self.engine.rule_set),
            "rule_reloads": self.rule_reloads,
            "rule_reload_failures": self.rule_reload_failures,
            "rule_late_events": self.engine.late_events,
            "rule_evaluation_errors": self.engine.evaluation_errors,
            "rule_actions_suppressed": self.engine.suppressed_commands,
            "rule_actions_failed": self.actions.stats.failed_actions,
            "republished": self.actions.stats.republished,
            "republish_failures": self.actions.stats.republish_failures,
            "webhooks_sent": self.actions.webhooks.stats.sent,
            "webhooks_failed": self.actions.webhooks.stats.failed,
            "webhooks_dropped": self.actions.webhooks.stats.dropped,
            "webhooks_retries": self.actions.webhooks.stats.retries,
            "webhooks_queued": self.actions.webhooks.queued,
            "derived_points": self.actions.stats.derived_points,
            "checkpoints_written": self.checkpointer.written if self.checkpointer is not None else 0,
            "checkpoint_failures": self.checkpointer.failures if self.checkpointer is not None else 0,
            "devices_quarantined": ingest.quarantined,
            "device_status_changes": ingest.status_changes,
            "tasks": _task_count(),
        }
