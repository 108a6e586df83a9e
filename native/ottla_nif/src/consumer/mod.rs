//! The consumer: one librdkafka consumer per connection, polled on its own thread, with a
//! bounded backlog per assigned partition and the ack path.
//!
//! Threads: `poll` (librdkafka poll, rebalance callbacks, pause/resume, seeks, commits) and
//! `dispatch` (sends batches to the partitions' worker processes). Both share [`Shared`]:
//! one mutex over every partition's [`PartitionState`], and per partition an [`AckCell`]
//! of atomics. The NIFs never call librdkafka. The hot ones (ack, demand, latest offset) run
//! on normal schedulers and only touch cells, never the mutex; the rest run on dirty
//! schedulers.

mod dispatch;
mod poll;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ottla_core::partition::{Offset, PartitionState};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset as KOffset, TopicPartitionList};
use rustler::{Atom, Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::config::client_config;
use crate::context::log;
use crate::error::Error;
use crate::timing::Timed;

pub type Tp = (String, i32);

/// A message held in a backlog.
pub struct Msg {
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Offset for Msg {
    fn offset(&self) -> i64 {
        self.offset
    }
}

/// Fixed at start.
pub struct Settings {
    pub manager: LocalPid,
    /// Group mode commits and exposes generations; assign mode (Elsa's `consumer:`) does not.
    pub group: bool,
    pub max_batch: usize,
    pub max_backlog: usize,
    pub drain_timeout: Duration,
    pub commit_interval: Duration,
}

/// What the ack and demand NIFs write without taking the state mutex: a held lock can be
/// preempted by the OS for milliseconds on a busy machine, and those NIFs run on normal
/// schedulers. The poll and dispatch threads fold cells into the state (`Slot::sync`).
pub struct AckCell {
    pub generation: i32,
    /// The highest acked offset, -1 when none.
    acked: AtomicI64,
    /// The first offset seen in this generation, -1 before any (set by the poll thread).
    pub low: AtomicI64,
    /// The highest offset delivered to the worker, -1 before any (set by the dispatcher):
    /// an ack beyond it would commit messages nobody processed.
    pub high: AtomicI64,
    /// The worker asked for its next batch.
    pub demand: AtomicBool,
}

impl AckCell {
    fn new(generation: i32) -> Self {
        AckCell {
            generation,
            acked: AtomicI64::new(-1),
            low: AtomicI64::new(-1),
            high: AtomicI64::new(-1),
            demand: AtomicBool::new(false),
        }
    }

    pub fn acked(&self) -> Option<i64> {
        let a = self.acked.load(Ordering::Acquire);
        (a >= 0).then_some(a)
    }
}

/// One assigned partition: its bookkeeping, its cell, its worker.
pub struct Slot {
    pub state: PartitionState<Msg>,
    pub cell: Arc<AckCell>,
    pub worker: Option<LocalPid>,
}

impl Slot {
    pub fn new(generation: i32, max_backlog: usize) -> Self {
        Slot {
            state: PartitionState::new(generation, max_backlog),
            cell: Arc::new(AckCell::new(generation)),
            worker: None,
        }
    }

    /// Folds the cell's acks and demand into the state.
    pub fn sync(&mut self) {
        if let Some(acked) = self.cell.acked() {
            let generation = self.state.generation;
            let _ = self.state.ack(generation, acked);
        }
        if self.cell.demand.swap(false, Ordering::AcqRel) {
            self.state.demand = true;
        }
    }
}

#[derive(Default)]
pub struct State {
    pub partitions: HashMap<Tp, Slot>,
    /// Grows with every assignment this member receives: the generation of the partitions
    /// it assigns (librdkafka does not expose Kafka's generation id).
    pub epoch: i32,
    /// Something for the poll thread to apply (pause, resume, seek).
    pub dirty: bool,
    pub last_rebalance_ms: Option<i64>,
    pub revoke_seq: u64,
    pub revoke_done: u64,
    pub closing: bool,
}

pub struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    /// The cells of the assigned partitions; written only on assignment and revocation.
    pub cells: RwLock<HashMap<Tp, Arc<AckCell>>>,
    pub stale_acks: AtomicU64,
    pub unheld_acks: AtomicU64,
    pub undelivered_acks: AtomicU64,
    /// When a dropped ack was last logged (ms): at most one warning a second.
    last_ack_warning_ms: AtomicI64,
    /// Wakes the dispatcher: a partition may have a batch to send.
    pub work: Condvar,
    /// Wakes the poll thread's bounded waits (revoke replies).
    pub progress: Condvar,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cell(&self, tp: &Tp) -> Option<Arc<AckCell>> {
        self.cells
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tp)
            .cloned()
    }

    /// Adds partitions under a new generation (state and cells).
    pub fn insert_partitions(&self, list: &[Tp]) -> i32 {
        let mut st = self.lock();
        st.epoch += 1;
        let epoch = st.epoch;
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        for tp in list {
            let slot = st
                .partitions
                .entry(tp.clone())
                .or_insert_with(|| Slot::new(epoch, self.settings.max_backlog));
            cells.insert(tp.clone(), slot.cell.clone());
        }
        st.last_rebalance_ms = Some(now_ms());
        epoch
    }

    /// Forgets revoked partitions (state and cells).
    pub fn remove_partitions(&self, list: &[Tp]) {
        let mut st = self.lock();
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        for tp in list {
            st.partitions.remove(tp);
            cells.remove(tp);
        }
        st.last_rebalance_ms = Some(now_ms());
    }

    /// Logs a dropped ack, at most once a second (the counters in the stats count them all).
    fn warn_dropped_ack(&self, text: impl FnOnce() -> String) {
        let now = now_ms();
        let last = self.last_ack_warning_ms.load(Ordering::Relaxed);
        if now - last >= 1_000
            && self
                .last_ack_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log(atoms::warning(), "ACK", &text());
        }
    }

    /// Wakes the dispatcher if the state lock is free right now; otherwise whoever holds it
    /// re-checks, or the dispatcher's short wait ends. Never blocks.
    pub fn poke(&self) {
        if let Ok(_guard) = self.state.try_lock() {
            self.work.notify_one();
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Spawns one of the consumer's threads. A panic there (a bug) must not leave a consumer
/// that looks alive: it stops the other thread and tells the manager, which restarts the
/// consumer.
fn spawn_guarded(
    name: &str,
    shared: &Arc<Shared>,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    let shared = shared.clone();
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
                shared.stop.store(true, Ordering::SeqCst);
                shared.work.notify_all();
                shared.progress.notify_all();
                crate::context::send_reliably(
                    &shared.settings.manager,
                    Box::new(move |env| (atoms::ottla_consumer_down(), thread_name).encode(env)),
                );
            }
        })
        .map_err(|e| Error::new("thread_spawn", e.to_string()))
}

pub struct ConsumerResource {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[rustler::resource_impl]
impl rustler::Resource for ConsumerResource {}

impl ConsumerResource {
    fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.work.notify_all();
        self.shared.progress.notify_all();
    }
}

impl Drop for ConsumerResource {
    fn drop(&mut self) {
        // Garbage-collected without consumer_close: the threads close the consumer on their
        // own; joining here would block a scheduler.
        self.signal_stop();
    }
}

/// `{topic, partition, offset}` for assign mode; offset -1 earliest, -2 latest.
type Assignment = (String, i32, i64);

/// `{max_batch, max_backlog, drain_timeout_ms, commit_interval_ms}`
type Tuning = (usize, usize, u64, u64);

#[rustler::nif(schedule = "DirtyIo")]
#[allow(clippy::too_many_arguments)]
fn consumer_new<'a>(
    env: Env<'a>,
    bootstrap: String,
    props: Vec<(String, String)>,
    manager: LocalPid,
    topics: Vec<String>,
    assignment: Vec<Assignment>,
    tuning: Tuning,
) -> NifResult<Term<'a>> {
    let (max_batch, max_backlog, drain_ms, commit_ms) = tuning;
    let group = assignment.is_empty();
    let shared = Arc::new(Shared {
        settings: Settings {
            manager,
            group,
            max_batch: max_batch.max(1),
            max_backlog: max_backlog.max(1),
            drain_timeout: Duration::from_millis(drain_ms),
            commit_interval: Duration::from_millis(commit_ms.max(10)),
        },
        state: Mutex::new(State::default()),
        cells: RwLock::new(HashMap::new()),
        stale_acks: AtomicU64::new(0),
        unheld_acks: AtomicU64::new(0),
        undelivered_acks: AtomicU64::new(0),
        last_ack_warning_ms: AtomicI64::new(0),
        work: Condvar::new(),
        progress: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let consumer: BaseConsumer<poll::GroupCtx> = client_config(&bootstrap, &props)
        .create_with_context(poll::GroupCtx::new(shared.clone()))
        .map_err(Error::from)?;

    if group {
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(Error::from)?;
    } else {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &assignment {
            let offset = match offset {
                -1 => KOffset::Beginning,
                -2 => KOffset::End,
                o => KOffset::Offset(*o),
            };
            tpl.add_partition_offset(topic, *partition, offset)
                .map_err(Error::from)?;
        }
        consumer.assign(&tpl).map_err(Error::from)?;
        poll::assigned(&shared, &tpl);
    }

    let poll_thread = spawn_guarded("ottla-poll", &shared, {
        let shared = shared.clone();
        move || poll::run(consumer, shared)
    })?;
    let dispatch_thread = match spawn_guarded("ottla-dispatch", &shared, {
        let shared = shared.clone();
        move || dispatch::run(shared)
    }) {
        Ok(thread) => thread,
        Err(err) => {
            // The poll thread is running: stop it, or it stays in the group for good.
            shared.stop.store(true, Ordering::SeqCst);
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

/// A worker process takes over a partition: batches go to `pid` from now on.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_attach(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    pid: LocalPid,
) -> NifResult<Atom> {
    let shared = &resource.shared;
    let mut st = shared.lock();
    match st.partitions.get_mut(&(topic, partition)) {
        Some(slot) if slot.state.generation == generation && !slot.state.revoking => {
            slot.worker = Some(pid);
            slot.state.has_worker = true;
            slot.state.demand = true;
        }
        _ => return Err(Error::new("not_assigned", "this partition is not assigned here").into()),
    }
    shared.work.notify_one();
    Ok(atoms::ok())
}

/// The worker is done with its batch and wants the next one. Lock-free.
#[rustler::nif]
fn consumer_demand(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
) -> Atom {
    let _timed = Timed::start();
    let shared = &resource.shared;
    if let Some(cell) = shared.cell(&(topic, partition)) {
        if cell.generation == generation {
            cell.demand.store(true, Ordering::Release);
            shared.poke();
        }
    }
    atoms::ok()
}

/// Acks every offset of the partition up to `offset`. Acks from another generation, or for
/// a partition this member does not hold, are dropped with a warning and counted. Lock-free.
#[rustler::nif]
fn consumer_ack(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: Option<i32>,
    offset: i64,
) -> Atom {
    let _timed = Timed::start();
    let shared = &resource.shared;
    let group = shared.settings.group;
    let tp = (topic, partition);
    let shown = generation.map_or("nil".to_string(), |g| g.to_string());
    match shared.cell(&tp) {
        // Outside a group there are no generations: nil acks the current assignment.
        Some(cell) if generation == Some(cell.generation) || (generation.is_none() && !group) => {
            let high = cell.high.load(Ordering::Acquire);
            if offset > high {
                shared.undelivered_acks.fetch_add(1, Ordering::Relaxed);
                shared.warn_dropped_ack(|| {
                    format!(
                        "dropped ack of {}/{} offset {offset}: only offsets up to {high} were delivered",
                        tp.0, tp.1
                    )
                });
            } else if offset >= cell.low.load(Ordering::Acquire) {
                cell.acked.fetch_max(offset, Ordering::AcqRel);
            }
            // Below the first offset of this assignment: already done, nothing to record.
        }
        Some(cell) => {
            shared.stale_acks.fetch_add(1, Ordering::Relaxed);
            shared.warn_dropped_ack(|| {
                format!(
                    "dropped ack of {}/{} offset {offset}: generation {shown}, the partition is at generation {}",
                    tp.0, tp.1, cell.generation
                )
            });
        }
        None => {
            shared.unheld_acks.fetch_add(1, Ordering::Relaxed);
            shared.warn_dropped_ack(|| {
                format!(
                    "dropped ack of {}/{} offset {offset} (generation {shown}): the partition is not assigned to this member",
                    tp.0, tp.1
                )
            });
        }
    }
    atoms::ok()
}

/// Redeliver the partition from `offset` (a handler acked only part of its batch).
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_redeliver(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
    offset: i64,
) -> Atom {
    let shared = &resource.shared;
    let mut st = shared.lock();
    if let Some(slot) = st.partitions.get_mut(&(topic, partition)) {
        if slot.state.generation == generation {
            slot.sync();
            slot.state.rewind_from(offset);
            st.dirty = true;
        }
    }
    atoms::ok()
}

/// The partition's worker died: forget it, and rewind so that a new worker gets every
/// unacked message again. Returns `{:ok, last_acked | nil}`.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_worker_down(
    resource: ResourceArc<ConsumerResource>,
    topic: String,
    partition: i32,
    generation: i32,
) -> (Atom, Option<i64>) {
    let shared = &resource.shared;
    let mut st = shared.lock();
    let mut acked = None;
    let mut rewound = false;
    if let Some(slot) = st.partitions.get_mut(&(topic, partition)) {
        if slot.state.generation == generation {
            slot.sync();
            slot.cell.demand.store(false, Ordering::Release);
            slot.worker = None;
            slot.state.has_worker = false;
            acked = slot.state.acked;
            rewound = slot.state.rewind().is_some();
        }
    }
    if rewound {
        st.dirty = true;
    }
    (atoms::ok(), acked)
}

/// Elsa's `get_latest_offset`: last acked offset + 1, or nil if nothing was acked since the
/// partition was assigned. Lock-free.
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
        .and_then(|cell| cell.acked())
        .map(|a| a + 1)
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

/// `{:ok, %{partitions: [%{...}], last_rebalance: ms | nil, stale_acks: n, unheld_acks: n}}`
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
        let Some(slot) = st.partitions.get_mut(&tp) else {
            continue;
        };
        slot.sync();
        let p = &slot.state;
        let generation = if group { Some(p.generation) } else { None };
        let pairs: Vec<(Term<'a>, Term<'a>)> = vec![
            (atoms::topic().encode(env), tp.0.encode(env)),
            (atoms::partition().encode(env), tp.1.encode(env)),
            (atoms::generation_id().encode(env), generation.encode(env)),
            (atoms::backlog().encode(env), p.backlog_len().encode(env)),
            (atoms::paused().encode(env), p.paused.encode(env)),
            (
                atoms::last_delivered().encode(env),
                p.last_delivered.encode(env),
            ),
            (atoms::last_acked().encode(env), p.acked.encode(env)),
            (atoms::committed().encode(env), p.committed.encode(env)),
            (
                atoms::high_watermark().encode(env),
                p.high_watermark.encode(env),
            ),
            (atoms::lag().encode(env), p.lag().encode(env)),
            (atoms::worker().encode(env), slot.worker.encode(env)),
        ];
        rows.push(Term::map_from_pairs(env, &pairs)?);
    }
    let pairs: Vec<(Term<'a>, Term<'a>)> = vec![
        (atoms::partitions().encode(env), rows.encode(env)),
        (
            atoms::last_rebalance().encode(env),
            st.last_rebalance_ms.encode(env),
        ),
        (
            atoms::stale_acks().encode(env),
            shared.stale_acks.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::unheld_acks().encode(env),
            shared.unheld_acks.load(Ordering::Relaxed).encode(env),
        ),
        (
            atoms::undelivered_acks().encode(env),
            shared.undelivered_acks.load(Ordering::Relaxed).encode(env),
        ),
    ];
    Ok((atoms::ok(), Term::map_from_pairs(env, &pairs)?).encode(env))
}

/// Commits what was acked, leaves the group, stops and joins the threads.
#[rustler::nif(schedule = "DirtyIo")]
fn consumer_close(resource: ResourceArc<ConsumerResource>) -> Atom {
    resource.signal_stop();
    let threads: Vec<JoinHandle<()>> = match resource.threads.lock() {
        Ok(mut threads) => threads.drain(..).collect(),
        Err(_) => Vec::new(),
    };
    for thread in threads {
        let _ = thread.join();
    }
    atoms::ok()
}
