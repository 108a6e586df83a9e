//! The consumer: one librdkafka consumer per connection, polled on its own thread, with one
//! [`Partition`] state machine per assigned partition, the single owner of that partition's
//! lifecycle (start, deliveries, acks, retries, seeks, revocation, shutdown drain).
//!
//! Files, one per actor: `nif.rs` (the NIF entry points the Elixir side calls), `poll.rs`
//! (the poll thread: librdkafka's poll, intake, pause/resume, commits, watermarks, fatal
//! errors), `rebalance.rs` (librdkafka's assign and revoke callbacks, and the shutdown
//! drain), `seek.rs` (confirmed seeks), `commit.rs` (asynchronous commits), `dispatch.rs`
//! (sends batches to worker processes), `queues.rs` (the intake queue and wake-ups). They
//! share [`Shared`]: one mutex over every partition's state machine, and the partitions'
//! [`AckCell`]s, which the hot NIFs (ack, demand, latest offset) reach through a read lock on
//! a map written only at assignment and revocation. The NIFs never call librdkafka.
//!
//! # The protocol with Elixir
//!
//! Every message this consumer sends to a BEAM process, in one list (the Elixir side matches
//! exactly these shapes). Positions are `:earliest | :latest | {:offset, n}` everywhere
//! ([`crate::position::Position`]); deadlines are absolute, in Erlang's monotonic clock (ms).
//!
//! To the manager (`Ottla.Group.Manager`):
//! - `{:ottla_assigned, generation, [{topic, partition}]}`: start a worker for each.
//! - `{:ottla_revoke_done, [{topic, partition}], took_ms}`: revoked, committed, forgotten.
//! - `{:ottla_committed, [{topic, partition, offset, ok?}]}`, `{:ottla_paused, topic,
//!   partition}`, `{:ottla_resumed, topic, partition}`: for telemetry only.
//! - `{:ottla_consumer_fatal, reason, [{topic, partition}]}`: fenced for good; stay stopped.
//! - `{:ottla_consumer_failed, %Ottla.Error{}}`: the group refuses this consumer; restart.
//! - `{:ottla_consumer_down, thread_name}`: a thread panicked; restart.
//!
//! To the revoker (`Ottla.Consumer.Revoker`):
//! - `{:ottla_revoke, id, deadline_ms, [{{topic, partition}, worker_pid}]}`: stop these
//!   workers by the deadline, run the revoked handler, then call `consumer_revoke_done(id)`.
//!
//! To a worker (`Ottla.Consumer.Worker`):
//! - `{:ottla_messages, topic, partition, generation, {attempt, last_attempt?,
//!   high_watermark}, [%Ottla.Message{}]}`: one batch, sent only after a demand.
//!
//! To the caller of `consumer_close` / `consumer_drain`: `{:ottla_closed, tag}` /
//! `{:ottla_drained, tag}`.
//!
//! From Elixir, the NIFs (`nif.rs`): `consumer_start` (a worker takes a partition over, from
//! a position), `consumer_claim_announce`, `consumer_demand`, `consumer_ack`,
//! `consumer_redeliver`, `consumer_failed`, `consumer_seek`, `consumer_gave_up`,
//! `consumer_worker_down`, `consumer_revoke_done`, `consumer_drain`, `consumer_close`,
//! `consumer_stats`, `consumer_latest_offset`; `backoff_ms` is the one backoff formula
//! ([`ottla_core::partition::RetryPolicy::backoff_after`]). Which process owns which fact:
//! the acked offset, the worker pid, the generation and the lag are the partition's (here);
//! the manager keeps only what it needs to restart a worker.

mod commit;
mod dispatch;
mod nif;
mod poll;
mod queues;
mod rebalance;
mod seek;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ottla_core::cell::AckCell;
use ottla_core::partition::{Effect, Event, Partition, RetryPolicy};
use rustler::{Encoder, LocalPid};

use crate::atoms;
use crate::context::log;
use crate::error::Error;
pub use crate::message::Msg;

pub type Tp = (String, i32);

/// Generations are numbered across every consumer this VM ever starts, so an ack made for
/// an earlier consumer (before a restart) never matches a partition of a later one.
static NEXT_GENERATION: AtomicI32 = AtomicI32::new(1);

fn next_generation() -> i32 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// Fixed at start.
pub struct Settings {
    pub manager: LocalPid,
    /// Carries out revocations (`Ottla.Consumer.Revoker`): stops the revoked partitions'
    /// workers by the revocation's deadline. It runs no user code, so a busy or suspended
    /// manager cannot delay a revocation.
    pub revoker: LocalPid,
    /// Offsets kept elsewhere: a partition starts where its worker says (the app's stored
    /// offset), confirmed before anything is delivered.
    pub start_from_worker: bool,
    /// Deadlines handed to Elixir are on this clock.
    pub clock: ErlangClock,
    /// Group mode commits and exposes generations; assign mode (Elsa's `consumer:`) does not.
    pub group: bool,
    pub max_batch: usize,
    pub max_backlog: usize,
    /// The consumer's byte budget (`:max_buffered_bytes`). An eighth of it is the assigned
    /// partitions' backlogs' (shared equally), as much again what they keep of the
    /// delivered messages; librdkafka's prefetch gets an eighth through its own settings
    /// (see `Ottla.Consumer.Options`).
    pub max_buffered_bytes: usize,
    pub drain_timeout: Duration,
    pub commit_interval: Duration,
    /// Commit acked offsets to Kafka (false when offsets are kept elsewhere, or outside a
    /// group).
    pub commit: bool,
    /// An exactly-once group consumer: its batches commit in transactions, sent with the
    /// group's metadata (`Shared::group_metadata`).
    pub exactly_once: bool,
    pub retry: RetryPolicy,
}

/// One assigned partition: its state machine and the process its batches go to.
pub struct Slot {
    pub part: Partition<Msg>,
    /// The worker process batches go to; the resource monitors it.
    pub worker: Option<LocalPid>,
    /// The worker is alive (its monitor has not fired). A revocation goes on only once the
    /// revoked partitions' workers are dead.
    pub worker_alive: bool,
    /// `assignment_received_handler` was claimed for this assignment (it runs once).
    pub announced: bool,
    /// When the running backoff ends (the dispatcher then sends `Event::RetryDue`).
    pub retry_at: Option<Instant>,
}

/// A batch on its way to a worker.
pub struct Outgoing {
    pub pid: LocalPid,
    pub topic: String,
    pub partition: i32,
    pub generation: i32,
    /// The batch's attempt number, whether it is its message's last attempt, and the
    /// partition's high watermark (for the lag).
    pub attempt: (u32, bool, Option<i64>),
    pub messages: Vec<Msg>,
}

#[derive(Default)]
pub struct State {
    pub partitions: HashMap<Tp, Slot>,
    /// Batches for the dispatch thread.
    pub outbox: Vec<Outgoing>,
    /// Pause, resume and seek effects for the poll thread (the only one calling librdkafka).
    pub ops: Vec<(Tp, Effect<Msg>)>,
    /// Running backoffs: when each ends (stale entries, of a slot whose backoff changed or
    /// that went, are skipped), so that ending them visits only those partitions.
    pub retries: Vec<(Instant, Tp)>,
    /// Verdicts on a failed last attempt (`Effect::Skipped`, `Effect::DeadLetter`) for the
    /// worker whose result is being handled (`State::handle_verdicts`).
    pub verdicts: Vec<Effect<Msg>>,
    pub last_rebalance_ms: Option<i64>,
    /// How long the last revocation took, from librdkafka's callback to its return.
    pub last_revoke_ms: Option<i64>,
    pub revoke_seq: u64,
    pub revoke_done: u64,
    pub closing: bool,
    /// The commit and partition queues were released before the consumer's close: nothing
    /// may create new ones (a revocation during close must not commit).
    pub released: bool,
    /// librdkafka's latest statistics, when `statistics.interval.ms` is set.
    pub statistics: Option<crate::context::StatsSummary>,
}

impl State {
    /// Hands an event to a partition and routes the effects: batches to the dispatcher,
    /// librdkafka calls to the poll thread. Returns false when the partition is not held.
    pub fn handle(&mut self, tp: &Tp, event: Event<Msg>) -> bool {
        let mut effects = Vec::new();
        let Some(slot) = self.partitions.get_mut(tp) else {
            return false;
        };
        slot.part.handle(event, &mut effects);
        self.route(tp, effects);
        true
    }

    fn route(&mut self, tp: &Tp, effects: Vec<Effect<Msg>>) {
        let Some(slot) = self.partitions.get_mut(tp) else {
            return;
        };
        for effect in effects {
            match effect {
                Effect::Deliver(messages) => {
                    // The state machine delivers only to a partition with a worker.
                    if let Some(pid) = slot.worker {
                        self.outbox.push(Outgoing {
                            pid,
                            topic: tp.0.clone(),
                            partition: tp.1,
                            generation: slot.part.generation(),
                            attempt: {
                                let (number, last) = slot.part.attempt();
                                (number, last, slot.part.high_watermark())
                            },
                            messages,
                        });
                    }
                }
                Effect::Skipped(_) | Effect::DeadLetter(_) => self.verdicts.push(effect),
                Effect::Wait(backoff) => {
                    let at = Instant::now() + jitter(backoff);
                    slot.retry_at = Some(at);
                    self.retries.push((at, tp.clone()));
                }
                other => self.ops.push((tp.clone(), other)),
            }
        }
    }

    /// Hands an event from a partition's worker to it, routes the effects and returns the
    /// verdicts on a failed last attempt, for that worker.
    pub fn handle_verdicts(&mut self, tp: &Tp, event: Event<Msg>) -> Vec<Effect<Msg>> {
        self.verdicts.clear();
        self.handle(tp, event);
        std::mem::take(&mut self.verdicts)
    }

    /// Hands a partition the messages taken from its queue, with one lookup; false when the
    /// partition is not held (it was revoked meanwhile: its new owner fetches them).
    pub fn fetched(&mut self, tp: &Tp, messages: Vec<Msg>) -> bool {
        let Some(slot) = self.partitions.get_mut(tp) else {
            return false;
        };
        let mut effects = Vec::new();
        for msg in messages {
            slot.part.handle(Event::Fetched(msg), &mut effects);
        }
        if effects.is_empty() {
            return true;
        }
        // Fetching alone may ask for a pause or a seek: route those as `handle` does.
        self.route(tp, effects);
        true
    }

    /// Gives each assigned partition an equal share of the backlogs' part of the budget
    /// (an eighth of it). Work proportional to the partitions, at rebalances only.
    pub fn share_budget(&mut self, budget: usize) {
        let share = budget / 8 / self.partitions.len().max(1);
        let keys: Vec<Tp> = self.partitions.keys().cloned().collect();
        for tp in keys {
            let mut effects = Vec::new();
            if let Some(slot) = self.partitions.get_mut(&tp) {
                slot.part.set_max_bytes(share, &mut effects);
            }
            self.route(&tp, effects);
        }
    }

    /// The bytes the partitions hold (backlogs and kept delivered messages).
    pub fn buffered_bytes(&self) -> usize {
        self.partitions.values().map(|s| s.part.held_bytes()).sum()
    }

    /// Ends the backoffs that are over; returns how long until the next one ends.
    pub fn due_retries(&mut self) -> Option<Duration> {
        if self.retries.is_empty() {
            return None;
        }
        let now = Instant::now();
        let partitions = &self.partitions;
        // Keep the entries that still stand for their slot's running backoff.
        self.retries
            .retain(|(at, tp)| partitions.get(tp).is_some_and(|s| s.retry_at == Some(*at)));
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.retries = later;
        for (_, tp) in &due {
            if let Some(slot) = self.partitions.get_mut(tp) {
                slot.retry_at = None;
            }
            self.handle(tp, Event::RetryDue);
        }
        self.retries
            .iter()
            .map(|(at, _)| at.saturating_duration_since(now))
            .min()
    }
}

/// Counters of dropped acks, shown in the stats.
#[derive(Default)]
pub struct AckCounters {
    pub stale: AtomicU64,
    pub unheld: AtomicU64,
    pub undelivered: AtomicU64,
    /// When a dropped ack was last logged (ms): at most one warning a second.
    last_warning_ms: AtomicI64,
}

impl AckCounters {
    /// Logs a dropped ack, at most once a second (the counters count them all).
    pub fn warn(&self, text: impl FnOnce() -> String) {
        let now = now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now - last >= 1_000
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log(atoms::warning(), "ACK", &text());
        }
    }
}

pub struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    /// The cells of the assigned partitions; written only on assignment and revocation.
    pub cells: RwLock<HashMap<Tp, Arc<AckCell>>>,
    pub acks: AckCounters,
    /// Wakes the dispatcher: a partition may have a batch to send. Not tied to the state
    /// lock, so a NIF can wake it without waiting for that lock.
    pub work: queues::Wake,
    /// The partitions whose cells got an ack or a demand since the dispatcher last looked:
    /// it visits these, not every partition (each is listed once, see `AckCell::mark_dirty`).
    pub dirty: Mutex<Vec<Tp>>,
    /// Wakes the poll thread's bounded waits (revoke replies, drains).
    pub progress: Condvar,
    /// Wakes the poll thread's idle wait: messages arrived, or the dispatcher freed room.
    pub wake: queues::Wake,
    pub stop: AtomicBool,
    /// Test-only: the poll thread panics at its next turn (`consumer_test_panic`), so tests
    /// can show that a panic there loses nothing.
    pub test_panic: AtomicBool,
    /// The group's metadata (member, generation) as of the last rebalance, which an
    /// exactly-once consumer's transactions send with their offsets (KIP-447): the group
    /// coordinator refuses the offsets of a member whose generation has passed.
    pub group_metadata: Mutex<Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>>>,
    /// An exactly-once consumer's transactions: committed, and aborted (or refused).
    pub transactions: TransactionCounters,
}

#[derive(Default)]
pub struct TransactionCounters {
    pub committed: AtomicU64,
    pub aborted: AtomicU64,
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

    /// Adds partitions under a new generation; returns it.
    pub fn insert_partitions(&self, list: &[Tp]) -> i32 {
        let generation = next_generation();
        let mut st = self.lock();
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        for tp in list {
            let cell = Arc::new(AckCell::new(generation, !self.settings.group));
            let mut part = Partition::new(
                cell.clone(),
                self.settings.max_backlog,
                self.settings.max_batch,
            )
            .with_retry(self.settings.retry);
            if self.settings.start_from_worker {
                part = part.awaiting_start();
            }
            let slot = Slot {
                part,
                worker: None,
                worker_alive: false,
                announced: false,
                retry_at: None,
            };
            st.partitions.insert(tp.clone(), slot);
            cells.insert(tp.clone(), cell);
        }
        drop(cells);
        st.share_budget(self.settings.max_buffered_bytes);
        st.last_rebalance_ms = Some(now_ms());
        generation
    }

    /// Forgets revoked partitions.
    pub fn remove_partitions(&self, list: &[Tp]) {
        let mut st = self.lock();
        let mut cells = self.cells.write().unwrap_or_else(|e| e.into_inner());
        for tp in list {
            st.partitions.remove(tp);
            cells.remove(tp);
        }
        st.ops.retain(|(tp, _)| !list.contains(tp));
        st.share_budget(self.settings.max_buffered_bytes);
        st.last_rebalance_ms = Some(now_ms());
    }

    /// Lists a partition whose cell got news (an ack, or a demand) for the dispatcher's next
    /// visit; with `wake`, wakes it too. Takes only the list's lock, and only the first time.
    pub fn poke(&self, tp: &Tp, cell: &AckCell, wake: bool) {
        if cell.mark_dirty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tp.clone());
        }
        if wake {
            self.work.notify();
        }
    }

    /// Takes the list of partitions to visit.
    pub fn take_dirty(&self) -> Vec<Tp> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.work.notify();
        self.progress.notify_all();
        self.wake.notify();
    }
}

/// Erlang's monotonic clock (`System.monotonic_time(:millisecond)`) for the consumer's own
/// threads: `enif_monotonic_time` answers only on scheduler threads (on others it returns
/// `ERL_NIF_TIME_ERROR`), so the NIF that creates the consumer reads it once, beside an
/// `Instant`, and the threads convert from there.
#[derive(Clone, Copy)]
pub struct ErlangClock {
    at: Instant,
    erlang_ms: i64,
}

impl ErlangClock {
    /// Reads both clocks; only on a scheduler thread (a NIF call).
    pub fn read() -> Self {
        // SAFETY: a plain clock read, on the scheduler thread running the NIF.
        let erlang_ms = unsafe {
            rustler::sys::enif_monotonic_time(rustler::sys::ErlNifTimeUnit::ERL_NIF_MSEC)
        };
        ErlangClock {
            at: Instant::now(),
            erlang_ms,
        }
    }

    /// `t` in Erlang's monotonic milliseconds.
    pub fn ms(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.at) {
            Some(after) => self.erlang_ms + after.as_millis() as i64,
            None => self.erlang_ms - self.at.duration_since(t).as_millis() as i64,
        }
    }
}

/// Between half the backoff and the whole of it ("equal jitter"), so that partitions that
/// failed together do not retry together.
fn jitter(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos() ^ (now_ms() as u128));
    let half = backoff / 2;
    let span = half.as_nanos().max(1) as u64;
    half + Duration::from_nanos(h.finish() % span)
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
                shared.signal_stop();
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

impl ConsumerResource {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Whether an exactly-once consumer's batch of `tp` (delivered at `generation`, offsets
/// `first` to `next - 1`) may commit with its transaction: the partition is still held at that generation
/// and nothing of the batch is acked (a worker killed after an earlier transaction committed
/// it hands the batch to a successor, which must not commit it again). Answers the group's
/// metadata to send with the offsets.
pub(crate) fn transaction_check(
    shared: &Shared,
    tp: &Tp,
    generation: i32,
    first: i64,
    next: i64,
) -> std::result::Result<Arc<rdkafka::consumer::ConsumerGroupMetadata>, crate::error::Error> {
    let not_held = || {
        crate::error::Error::new(
            "not_assigned",
            format!(
                "{}/{} is no longer held at generation {generation}: its batch is not committed",
                tp.0, tp.1
            ),
        )
    };
    let cell = shared.cell(tp).ok_or_else(not_held)?;
    if cell.generation() != generation {
        return Err(not_held());
    }
    match cell.acked() {
        // The whole batch: its worker goes on after it.
        Some(acked) if acked >= next - 1 => {
            return Err(crate::error::Error::new(
                "already_committed",
                format!(
                    "{}/{} offsets {first}..{} were committed by an earlier transaction",
                    tp.0,
                    tp.1,
                    next - 1
                ),
            ))
        }
        // Part of it (an earlier, shorter delivery of the same offsets committed): the rest
        // must come again, so the batch fails and is delivered from its first unacked offset.
        Some(acked) if acked >= first => {
            return Err(crate::error::Error::new(
                "partly_committed",
                format!(
                    "{}/{} offsets {first}..{acked} were committed by an earlier transaction; \
                     the rest of the batch comes again",
                    tp.0, tp.1
                ),
            ))
        }
        _ => {}
    }
    shared
        .group_metadata
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| {
            crate::error::Error::new("not_assigned", "the consumer has not joined its group")
        })
}

/// An exactly-once consumer's batch did not commit: its transaction aborted.
pub(crate) fn transaction_aborted(shared: &Shared) {
    shared.transactions.aborted.fetch_add(1, Ordering::Relaxed);
}

/// An exactly-once consumer's transaction committed `tp`'s offsets up to `next`: the batch
/// is acked and its commit confirmed here, before its worker hears of it, so that a worker
/// killed meanwhile leaves nothing for its successor to commit again.
pub(crate) fn transaction_committed(shared: &Shared, tp: &Tp, generation: i32, next: i64) {
    shared
        .transactions
        .committed
        .fetch_add(1, Ordering::Relaxed);
    nif::ack_cell(shared, tp, Some(generation), next - 1);
    poll::apply_commits(
        shared,
        vec![commit::Outcome {
            tp: tp.clone(),
            offset: next,
            ok: true,
            error: None,
        }],
    );
}

#[rustler::resource_impl]
impl rustler::Resource for ConsumerResource {
    /// A worker process the resource monitors died (`consumer_start` monitors each).
    fn down<'a>(&'a self, _env: rustler::Env<'a>, pid: LocalPid, _monitor: rustler::Monitor) {
        let mut st = self.shared.lock();
        for slot in st.partitions.values_mut() {
            if slot.worker == Some(pid) {
                slot.worker_alive = false;
            }
        }
        drop(st);
        self.shared.progress.notify_all();
    }
}

impl Drop for ConsumerResource {
    fn drop(&mut self) {
        // Garbage-collected without consumer_close: the threads close the consumer on their
        // own; joining here would block a scheduler.
        self.shared.signal_stop();
    }
}
