//! The consumer's NIF entry points. None of them calls librdkafka or waits on Kafka. The hot
//! ones (ack, demand, latest offset) run on normal schedulers and touch only a partition's
//! [`AckCell`](ottla_core::cell::AckCell) (found through a read lock on the map of cells,
//! written only at assignment and revocation). The rare ones take the state mutex for a few
//! microseconds; they run on dirty schedulers so that a mutex holder preempted by the OS
//! cannot stall a normal scheduler.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use ottla_core::cell::AckOutcome;
use ottla_core::partition::{Effect, Event, OnFailure, RetryPolicy};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use rustler::{Atom, Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use super::{poll, spawn_guarded, AckCounters, ConsumerResource, Settings, Shared, State, Tp};
use crate::atoms;
use crate::config::client_config;
use crate::error::Error;
use crate::position::Position;
use crate::timing::Timed;

/// `{topic, partition, position}` for assign mode.
type Assignment = (String, i32, Position);

/// The consumer's settings, as a map from Elixir: the one definition of their shape
/// (`Ottla.Consumer.Options.tuning/1` builds it). Durations are in ms.
#[derive(rustler::NifMap)]
pub struct Tuning {
    max_batch: usize,
    max_backlog: usize,
    max_buffered_bytes: usize,
    drain_timeout: u64,
    commit_interval: u64,
    /// Commit acked offsets to Kafka.
    commit: bool,
    /// `nil`: no limit.
    max_attempts: Option<u32>,
    retry_backoff: u64,
    max_retry_backoff: u64,
    /// `:retry | :skip | :dead_letter` (the dead-letter topic stays with the worker, which
    /// produces).
    on_failure: OnFailureKind,
    /// Offsets kept elsewhere: each partition starts where its worker says.
    start_from_worker: bool,
    /// Batches commit in transactions, which need the group's metadata.
    exactly_once: bool,
}

/// `:on_failure`, as the state machine applies it.
#[derive(rustler::NifUnitEnum, Clone, Copy)]
pub enum OnFailureKind {
    Retry,
    Skip,
    DeadLetter,
}

impl From<OnFailureKind> for OnFailure {
    fn from(kind: OnFailureKind) -> Self {
        match kind {
            OnFailureKind::Retry => OnFailure::Retry,
            OnFailureKind::Skip => OnFailure::Skip,
            OnFailureKind::DeadLetter => OnFailure::DeadLetter,
        }
    }
}

/// Creates the consumer and starts its threads. Creating the client and subscribing do not
/// wait on Kafka; it runs on a dirty scheduler because client creation allocates and spawns
/// librdkafka's threads.
#[rustler::nif(schedule = "DirtyIo")]
#[allow(clippy::too_many_arguments)]
fn consumer_new<'a>(
    env: Env<'a>,
    bootstrap: String,
    props: Vec<(String, String)>,
    manager: LocalPid,
    revoker: LocalPid,
    topics: Vec<String>,
    assignment: Vec<Assignment>,
    tuning: Tuning,
) -> NifResult<Term<'a>> {
    let group = assignment.is_empty();
    let shared = Arc::new(Shared {
        settings: Settings {
            manager,
            revoker,
            start_from_worker: tuning.start_from_worker,
            clock: super::ErlangClock::read(),
            group,
            max_batch: tuning.max_batch.max(1),
            max_backlog: tuning.max_backlog.max(1),
            max_buffered_bytes: tuning.max_buffered_bytes.max(1),
            drain_timeout: Duration::from_millis(tuning.drain_timeout),
            commit_interval: Duration::from_millis(tuning.commit_interval.max(10)),
            commit: group && tuning.commit,
            exactly_once: group && tuning.exactly_once,
            retry: RetryPolicy {
                max_attempts: tuning.max_attempts.filter(|&n| n > 0),
                backoff: Duration::from_millis(tuning.retry_backoff),
                max_backoff: Duration::from_millis(tuning.max_retry_backoff),
                on_failure: tuning.on_failure.into(),
            },
        },
        state: Mutex::new(State::default()),
        cells: RwLock::new(HashMap::new()),
        acks: AckCounters::default(),
        work: Default::default(),
        dirty: Default::default(),
        progress: Condvar::new(),
        wake: Default::default(),
        stop: Default::default(),
        test_panic: Default::default(),
        group_metadata: Default::default(),
        transactions: Default::default(),
    });
    let consumer: BaseConsumer<poll::GroupCtx> = client_config(&bootstrap, &props)
        .create_with_context(poll::GroupCtx::new(shared.clone()))
        .map_err(Error::from)?;
    poll::watch_main(&consumer, &shared);

    // librdkafka takes topic names as C strings, and the rdkafka crate panics on a NUL byte
    // (Elixir refuses such names; this keeps the NIF safe on its own).
    let named = topics
        .iter()
        .chain(assignment.iter().map(|(topic, _, _)| topic));
    if let Some(topic) = named.into_iter().find(|t| t.contains('\0')) {
        return Err(Error::new(
            "invalid_topic",
            format!("the topic name {topic:?} contains a NUL byte"),
        )
        .into());
    }
    if group {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(Error::from)?;
    } else {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, position) in &assignment {
            tpl.add_partition_offset(topic, *partition, position.kafka()?)
                .map_err(Error::from)?;
        }
        consumer.assign(&tpl).map_err(Error::from)?;
        if shared.settings.start_from_worker {
            super::rebalance::hold_for_start(&consumer, &tpl);
        }
        super::rebalance::split_queues(&consumer, &tpl);
        super::rebalance::assigned(&shared, &tpl);
    }

    let poll_thread = spawn_guarded("ottla-poll", &shared, {
        let shared = shared.clone();
        move || poll::run(consumer, shared)
    })?;
    let dispatch_thread = match spawn_guarded("ottla-dispatch", &shared, {
        let shared = shared.clone();
        move || super::dispatch::run(shared)
    }) {
        Ok(thread) => thread,
        Err(err) => {
            // The poll thread is running: stop it, or it stays in the group for good.
            shared.signal_stop();
            let _ = poll_thread.join();
            return Err(err.into());
        }
    };

    let resource = ResourceArc::new(ConsumerResource {
        shared,
        threads: Mutex::new(vec![poll_thread, dispatch_thread]),
    });
    Ok((atoms::ok(), resource).encode(env))
}

/// A worker process takes over a partition, going on from `from` (`nil`: where librdkafka
/// starts; a position: sought, and confirmed before anything is delivered). Batches go to
/// `pid` from now on; the resource monitors it, so a revocation knows when it is gone.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_start(
    env: Env<'_>,
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    pid: LocalPid,
    from: Option<Position>,
) -> NifResult<Atom> {
    let from = from.map(Position::offset).transpose()?;
    let shared = &resource.shared;
    let tp = (topic, partition);
    let mut st = shared.lock();
    match st.partitions.get_mut(&tp) {
        Some(slot) if slot.part.generation() == generation && !slot.part.revoking() => {
            slot.worker = Some(pid);
            slot.worker_alive = true;
        }
        _ => return Err(Error::new("not_assigned", "this partition is not assigned here").into()),
    }
    drop(st);
    // Outside the lock: the monitor's callback takes it when the process is already dead.
    if env.monitor(&resource, &pid).is_none() {
        // Dead already: its start is void.
        if let Some(slot) = shared.lock().partitions.get_mut(&tp) {
            slot.worker_alive = false;
        }
        return Err(Error::new("not_assigned", "the worker is not alive").into());
    }
    let mut st = shared.lock();
    st.handle(&tp, Event::Start { from });
    drop(st);
    shared.work.notify();
    shared.wake.notify();
    Ok(atoms::ok())
}

/// Whether `assignment_received_handler` is to run for this assignment of the partition:
/// true once per assignment (the first caller), false after that and for a partition not
/// held under `generation`.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_claim_announce(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
) -> bool {
    let mut st = resource.shared.lock();
    match st.partitions.get_mut(&(topic, partition)) {
        Some(slot) if slot.part.generation() == generation => {
            !std::mem::replace(&mut slot.announced, true)
        }
        _ => false,
    }
}

/// The one backoff formula (the state machine's): ms to wait after `failures` failures.
#[rustler::nif]
fn backoff_ms(first_ms: u64, max_ms: u64, failures: u32) -> u64 {
    RetryPolicy {
        max_attempts: None,
        backoff: Duration::from_millis(first_ms),
        max_backoff: Duration::from_millis(max_ms),
        on_failure: OnFailure::Retry,
    }
    .backoff_after(failures)
    .as_millis() as u64
}

/// The worker is done with its batch and wants the next one, having acked up to `ack` (when
/// given; `{:ack, state}`, the common case). Touches only the cell: one call per batch on the
/// fast path. Returns what became of the ack (`:advanced`, `:behind`, ..., as
/// `consumer_ack`), or `:ok` without one.
#[rustler::nif]
fn consumer_next(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    ack: Option<i64>,
) -> Atom {
    let _timed = Timed::start();
    let shared = &resource.shared;
    let tp = (topic, partition);
    let outcome = match ack {
        Some(offset) => ack_cell(shared, &tp, Some(generation), offset),
        None => atoms::ok(),
    };
    if let Some(cell) = shared.cell(&tp) {
        if cell.demand(generation) {
            shared.poke(&tp, &cell, true);
        }
    }
    outcome
}

/// What a handler's batch came to, beyond a plain ack (`consumer_next`), as the worker
/// reports it: the partition's state machine decides what follows.
#[derive(rustler::NifTaggedEnum)]
pub enum BatchResult {
    /// `{:ack, offset, state}` inside the batch: acked up to `offset`, the rest comes again.
    PartialAck(i64),
    /// The handler failed the batch from this offset (a raise, exit, throw or
    /// `{:error, reason, state}`).
    Failed(i64),
    /// `{:seek, offset, state}`.
    Seek(Position),
    /// The dead letter the partition asked for was produced (`true`) or not.
    DeadLettered(i64, bool),
}

/// Hands a batch's result to its partition (of `generation`); returns the verdict for the
/// worker: `:ok`, `{:skipped, offset}` (a last attempt given up on: log it) or
/// `{:dead_letter, offset}` (produce that message to the dead-letter topic, then report
/// `{:dead_lettered, offset, ok?}`). The worker then asks for its next batch.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_result<'a>(
    env: Env<'a>,
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    result: BatchResult,
) -> NifResult<Term<'a>> {
    let shared = &resource.shared;
    let tp = (topic, partition);
    let events = match result {
        BatchResult::PartialAck(offset) => {
            ack_cell(shared, &tp, Some(generation), offset);
            vec![Event::Redeliver { from: offset + 1 }]
        }
        BatchResult::Failed(from) => vec![Event::Failed { from }],
        BatchResult::Seek(to) => vec![Event::SeekTo {
            offset: to.offset()?,
        }],
        BatchResult::DeadLettered(offset, ok) => vec![Event::DeadLettered { offset, ok }],
    };
    let mut st = shared.lock();
    let held = st
        .partitions
        .get(&tp)
        .is_some_and(|s| s.part.generation() == generation);
    let mut verdict = atoms::ok().encode(env);
    if held {
        for event in events {
            for effect in st.handle_verdicts(&tp, event) {
                verdict = match effect {
                    Effect::Skipped(o) => (atoms::skipped(), o).encode(env),
                    Effect::DeadLetter(o) => (atoms::dead_letter(), o).encode(env),
                    _ => verdict,
                };
            }
        }
        if !st.outbox.is_empty() {
            shared.work.notify();
        }
    }
    Ok(verdict)
}

/// Acks every offset of the partition up to `offset`. Acks from another generation, for a
/// partition this member does not hold, or beyond what was delivered are dropped with a
/// warning and counted. Touches only the cell. Returns what became of the ack: `:advanced`,
/// `:behind`, `:stale`, `:undelivered` or `:unheld`.
#[rustler::nif]
fn consumer_ack(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: Option<i32>,
    offset: i64,
) -> Atom {
    let _timed = Timed::start();
    ack_cell(&resource.shared, &(topic, partition), generation, offset)
}

/// An ack through the partition's cell (see `consumer_ack`).
pub(crate) fn ack_cell(shared: &Shared, tp: &Tp, generation: Option<i32>, offset: i64) -> Atom {
    let acks = &shared.acks;
    let shown = || generation.map_or("nil".to_string(), |g| g.to_string());
    let cell = shared.cell(tp);
    match cell.as_ref().map(|cell| cell.ack(generation, offset)) {
        Some(AckOutcome::Advanced) => {
            // Visited at the dispatcher's next wake (the worker's demand usually follows).
            if let Some(cell) = &cell {
                shared.poke(tp, cell, false);
            }
            atoms::advanced()
        }
        Some(AckOutcome::Behind) => atoms::behind(),
        Some(AckOutcome::Undelivered { last_delivered }) => {
            acks.undelivered.fetch_add(1, Ordering::Relaxed);
            acks.warn(|| {
                format!(
                    "dropped ack of {}/{} offset {offset}: the last delivered offset is {last_delivered:?}",
                    tp.0, tp.1
                )
            });
            atoms::undelivered()
        }
        Some(AckOutcome::StaleGeneration { current }) => {
            acks.stale.fetch_add(1, Ordering::Relaxed);
            acks.warn(|| {
                format!(
                    "dropped ack of {}/{} offset {offset}: generation {}, the partition is at generation {current}",
                    tp.0, tp.1, shown()
                )
            });
            atoms::stale()
        }
        None => {
            acks.unheld.fetch_add(1, Ordering::Relaxed);
            acks.warn(|| {
                format!(
                    "dropped ack of {}/{} offset {offset} (generation {}): the partition is not assigned to this member",
                    tp.0, tp.1, shown()
                )
            });
            atoms::unheld()
        }
    }
}

/// The partition's worker died: forget it; what it did not ack goes to the next worker.
/// Returns `{:ok, last_acked | nil}`, or `:not_held` when the partition is no longer held
/// under `generation` or is being revoked (no worker is to replace it).
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_worker_down<'a>(
    env: Env<'a>,
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
) -> Term<'a> {
    let shared = &resource.shared;
    let tp = (topic, partition);
    let mut st = shared.lock();
    let held = st
        .partitions
        .get(&tp)
        .is_some_and(|s| s.part.generation() == generation && !s.part.revoking());
    if !held {
        return atoms::not_held().encode(env);
    }
    if let Some(slot) = st.partitions.get_mut(&tp) {
        slot.worker = None;
        slot.worker_alive = false;
    }
    st.handle(&tp, Event::WorkerDown);
    let acked = st.partitions.get(&tp).and_then(|s| s.part.acked());
    if !st.outbox.is_empty() {
        shared.work.notify();
    }
    (atoms::ok(), acked).encode(env)
}

/// Starts a graceful stop's drain: nothing more is delivered, and what was delivered gets
/// until `timeout_ms` from now to be acked, from any process. A plain thread waits, then sends
/// `{:ottla_drained, tag}` to `pid`. The final commit comes with `consumer_close`.
#[rustler::nif]
fn consumer_drain(
    resource: ResourceArc<ConsumerResource>,
    pid: LocalPid,
    tag: u64,
    timeout_ms: u64,
) -> Atom {
    let shared = resource.shared.clone();
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
    let spawned = std::thread::Builder::new()
        .name("ottla-drain".into())
        .spawn(move || {
            super::rebalance::drain(&shared, deadline);
            crate::context::send_reliably(
                &pid,
                Box::new(move |env| (atoms::ottla_drained(), tag).encode(env)),
            );
        });
    if spawned.is_err() {
        return atoms::error();
    }
    atoms::ok()
}

/// Elsa's `get_latest_offset`: last acked offset + 1, or nil if nothing was acked since the
/// partition was assigned. Touches only the cell.
#[rustler::nif]
fn consumer_latest_offset(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
) -> Option<i64> {
    let _timed = Timed::start();
    resource
        .shared
        .cell(&(topic, partition))
        .and_then(|cell| cell.latest_offset())
}

/// The manager finished handling revocation `id` (workers stopped, handler called).
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_revoke_done(resource: ResourceArc<ConsumerResource>, id: u64) -> Atom {
    let shared = &resource.shared;
    let mut st = shared.lock();
    if id > st.revoke_done {
        st.revoke_done = id;
    }
    shared.progress.notify_all();
    atoms::ok()
}

/// `{:ok, %{partitions: [%{...}], last_rebalance: ms | nil, last_revoke_duration: ms | nil,
/// stale_acks: n, unheld_acks: n, undelivered_acks: n}}`
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_stats<'a>(
    env: Env<'a>,
    resource: ResourceArc<ConsumerResource>,
) -> NifResult<Term<'a>> {
    let shared = &resource.shared;
    let group = shared.settings.group;
    let mut st = shared.lock();
    let mut keys: Vec<Tp> = st.partitions.keys().cloned().collect();
    keys.sort();
    let mut rows: Vec<Term<'a>> = Vec::with_capacity(keys.len());
    for tp in keys {
        st.handle(&tp, Event::Tick);
        let Some(slot) = st.partitions.get(&tp) else {
            continue;
        };
        let p = &slot.part;
        let generation = if group { Some(p.generation()) } else { None };
        let pairs: Vec<(Term<'a>, Term<'a>)> = vec![
            (atoms::topic().encode(env), tp.0.encode(env)),
            (atoms::partition().encode(env), tp.1.encode(env)),
            (atoms::generation_id().encode(env), generation.encode(env)),
            (atoms::backlog().encode(env), p.backlog_len().encode(env)),
            (atoms::held().encode(env), p.held().encode(env)),
            (atoms::held_bytes().encode(env), p.held_bytes().encode(env)),
            (atoms::paused().encode(env), p.paused().encode(env)),
            (
                atoms::last_delivered().encode(env),
                p.last_delivered().encode(env),
            ),
            (atoms::last_acked().encode(env), p.acked().encode(env)),
            (atoms::committed().encode(env), p.committed().encode(env)),
            (
                atoms::high_watermark().encode(env),
                p.high_watermark().encode(env),
            ),
            (atoms::lag().encode(env), p.lag().encode(env)),
            (atoms::worker().encode(env), slot.worker.encode(env)),
            (atoms::failures().encode(env), p.failures().encode(env)),
            (
                atoms::backoff().encode(env),
                p.backoff().map(|d| d.as_millis() as u64).encode(env),
            ),
            (atoms::skipped().encode(env), p.skipped().encode(env)),
            (
                atoms::dead_lettered().encode(env),
                p.dead_lettered().encode(env),
            ),
            (atoms::last_seek().encode(env), p.last_seek().encode(env)),
        ];
        rows.push(Term::map_from_pairs(env, &pairs)?);
    }
    if !st.outbox.is_empty() {
        shared.work.notify();
    }
    let acks = &shared.acks;
    let pairs: Vec<(Term<'a>, Term<'a>)> = vec![
        (atoms::partitions().encode(env), rows.encode(env)),
        (
            atoms::last_rebalance().encode(env),
            st.last_rebalance_ms.encode(env),
        ),
        (
            atoms::last_revoke_duration().encode(env),
            st.last_revoke_ms.encode(env),
        ),
        (
            atoms::buffered_bytes().encode(env),
            st.buffered_bytes().encode(env),
        ),
        (
            atoms::max_buffered_bytes().encode(env),
            shared.settings.max_buffered_bytes.encode(env),
        ),
        (atoms::librdkafka().encode(env), st.statistics.encode(env)),
        (
            atoms::stale_acks().encode(env),
            acks.stale.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::unheld_acks().encode(env),
            acks.unheld.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::undelivered_acks().encode(env),
            acks.undelivered.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::transactions_committed().encode(env),
            shared
                .transactions
                .committed
                .load(Ordering::Relaxed)
                .encode(env),
        ),
        (
            atoms::transactions_aborted().encode(env),
            shared
                .transactions
                .aborted
                .load(Ordering::Relaxed)
                .encode(env),
        ),
    ];
    Ok((atoms::ok(), Term::map_from_pairs(env, &pairs)?).encode(env))
}

/// Starts closing: the poll thread commits what was acked (bounded), leaves the group and
/// stops. A plain thread joins the consumer's threads and then sends `{:ottla_closed, tag}` to
/// `pid`, so no scheduler waits for the close.
#[rustler::nif]
fn consumer_close(resource: ResourceArc<ConsumerResource>, pid: LocalPid, tag: u64) -> Atom {
    resource.shared.signal_stop();
    let threads: Vec<_> = match resource.threads.lock() {
        Ok(mut threads) => threads.drain(..).collect(),
        Err(_) => Vec::new(),
    };
    let spawned = std::thread::Builder::new()
        .name("ottla-close".into())
        .spawn(move || {
            for thread in threads {
                let _ = thread.join();
            }
            crate::context::send_reliably(
                &pid,
                Box::new(move |env| (atoms::ottla_closed(), tag).encode(env)),
            );
        });
    if spawned.is_err() {
        // The threads stop on their own; only the reply is lost, and the caller's wait is
        // bounded.
        return atoms::error();
    }
    atoms::ok()
}

/// Test-only (hidden as `Ottla.Native.consumer_test_panic/1`): makes the consumer's poll
/// thread panic at its next turn, to show that the panic is caught, the consumer restarts and
/// nothing is lost. Nothing in the library calls it.
#[rustler::nif]
fn consumer_test_panic(resource: ResourceArc<ConsumerResource>) -> Atom {
    resource.shared.test_panic.store(true, Ordering::SeqCst);
    resource.shared.wake.notify();
    atoms::ok()
}

/// Test-only (hidden as `Ottla.Native.consumer_clock_ms/1`): the clock revocation deadlines
/// are set in, read on a thread of the consumer's own, so a test can check it is Erlang's
/// monotonic clock.
#[rustler::nif]
fn consumer_clock_ms(resource: ResourceArc<ConsumerResource>) -> i64 {
    let clock = resource.shared.settings.clock;
    // Read as the consumer's own threads read it.
    std::thread::spawn(move || clock.ms(std::time::Instant::now()))
        .join()
        .unwrap_or(i64::MIN)
}
