//! The poll thread and the consumer context: the only code that calls librdkafka's consumer.
//! librdkafka's rebalance callbacks run inside `poll`, on this thread (they live in
//! `rebalance.rs`). It feeds fetched messages to the partitions' state machines, applies the
//! pause, resume and seek effects they return, commits, reads watermarks and notices fatal
//! errors.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ottla_core::partition::{Effect, Event};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use rustler::Encoder;

use super::commit::{Commits, Outcome};
use super::queues::Queues;
use super::{Msg, Shared, Tp};
use crate::atoms;
use crate::context::{log, send_reliably, OttlaContext};
use crate::error::Error;

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// Messages taken from librdkafka per lock of the state.
const INTAKE_BATCH: usize = 500;
const WATERMARK_INTERVAL: Duration = Duration::from_millis(500);
/// How long shutdown waits for its final commit.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown serves librdkafka between attempts at a refused final commit.
const FINAL_COMMIT_RETRY: Duration = Duration::from_millis(200);
/// How often a bounded wait re-reads the ack cells.
pub(super) const RECHECK: Duration = Duration::from_millis(5);

pub struct GroupCtx {
    base: OttlaContext,
    pub(super) shared: Arc<Shared>,
    commits: Mutex<Commits>,
    queues: Mutex<Queues>,
    /// The seek thread's requests (`seek.rs`), while it runs.
    seeks: Mutex<Option<super::seek::Requests>>,
}

impl GroupCtx {
    pub fn new(shared: Arc<Shared>) -> Self {
        GroupCtx {
            base: OttlaContext::default(),
            shared,
            commits: Mutex::new(Commits::default()),
            queues: Mutex::new(Queues::default()),
            seeks: Mutex::new(None),
        }
    }

    pub(super) fn commits(&self) -> MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn queues(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Wakes the poll thread when the consumer's main queue gets an event, and opens the intake
/// queue every partition's messages go to.
pub fn watch_main(consumer: &BaseConsumer<GroupCtx>, shared: &Shared) {
    let rk = consumer.client().native_ptr();
    let mut queues = consumer.context().queues();
    queues.watch_main(rk, &shared.wake);
    queues.open_intake(rk, &shared.wake);
}

impl ClientContext for GroupCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.base.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.base.error(error, reason)
    }

    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        let summary = crate::context::StatsSummary::from(&statistics);
        crate::context::report_statistics(&summary);
        self.shared.lock().statistics = Some(summary);
    }
}

/// Sends a commit of what was acked beyond the committed offsets (of `only`, or of every
/// partition). Returns the outcomes of a commit that failed at once.
pub(super) fn start_commit(
    shared: &Shared,
    consumer: &BaseConsumer<GroupCtx>,
    commits: &mut Commits,
    only: Option<&[Tp]>,
) -> Vec<Outcome> {
    let due: Vec<(Tp, i64)> = {
        let mut st = shared.lock();
        st.partitions
            .iter_mut()
            .filter(|(tp, _)| only.is_none_or(|list| list.contains(tp)))
            .filter_map(|(tp, slot)| slot.part.commit_due().map(|o| (tp.clone(), o)))
            .collect()
    };
    commits.start(consumer, due)
}

/// Hands commit results to their partitions, tells the manager (for telemetry); logs
/// failures.
pub(super) fn apply_commits(shared: &Shared, outcomes: Vec<Outcome>) {
    if outcomes.is_empty() {
        return;
    }
    let report: Vec<(String, i32, i64, bool)> = outcomes
        .iter()
        .map(|o| (o.tp.0.clone(), o.tp.1, o.offset, o.ok))
        .collect();
    crate::context::send_to(
        &shared.settings.manager,
        Box::new(move |env| (atoms::ottla_committed(), report).encode(env)),
    );
    let mut failures = Vec::new();
    let mut st = shared.lock();
    for o in outcomes {
        if let Some(error) = &o.error {
            failures.push(format!("{}/{} at {}: {error}", o.tp.0, o.tp.1, o.offset));
        }
        st.handle(
            &o.tp,
            Event::Committed {
                offset: o.offset,
                ok: o.ok,
            },
        );
    }
    drop(st);
    if !failures.is_empty() {
        log(
            atoms::warning(),
            "COMMIT",
            &format!("commit failed (retried later): {}", failures.join(", ")),
        );
    }
}

/// `topic()` cannot panic here (the rdkafka crate's `expect` on a non-UTF-8 name): librdkafka
/// names a fetched message's topic with the name this consumer subscribed to or was assigned,
/// which Elixir checked is UTF-8 without NUL.
fn to_msg(m: &BorrowedMessage<'_>) -> (Tp, Msg) {
    (
        (m.topic().to_string(), m.partition()),
        Msg::from_borrowed(m),
    )
}

/// Feeds polled messages to their partitions, under one lock, then lets each deliver.
/// `from_main` are messages of the main queue (partitions without a queue of their own);
/// `taken` holds, per partition, the messages taken from its own queue.
fn intake(shared: &Shared, from_main: &mut Vec<(Tp, Msg)>, taken: &mut Vec<(Tp, Vec<Msg>)>) {
    let mut st = shared.lock();
    let mut touched: Vec<Tp> = Vec::new();
    for (tp, msg) in from_main.drain(..) {
        // A partition no longer held was revoked meanwhile: its new owner fetches it.
        if st.handle(&tp, Event::Fetched(msg)) && !touched.contains(&tp) {
            touched.push(tp);
        }
    }
    for (tp, msgs) in taken.drain(..) {
        if st.fetched(&tp, msgs) && !touched.contains(&tp) {
            touched.push(tp);
        }
    }
    for tp in &touched {
        st.handle(tp, Event::Tick);
    }
    if !st.outbox.is_empty() {
        shared.work.notify();
    }
}

/// Applies the pause, resume and seek effects, in the order the partitions asked for them.
/// A pause stops librdkafka fetching the partition and drops what it prefetched for it; a
/// resume fetches again from after the last message taken (or from a seek's position).
fn apply_ops(shared: &Shared, consumer: &BaseConsumer<GroupCtx>) {
    let ops = std::mem::take(&mut shared.lock().ops);
    for ((topic, partition), effect) in ops {
        let mut one = TopicPartitionList::new();
        one.add_partition(&topic, partition);
        let result = match effect {
            Effect::Pause => {
                notify(shared, atoms::ottla_paused(), &topic, partition);
                consumer.pause(&one).map_err(|e| ("pause", e))
            }
            Effect::Resume => {
                notify(shared, atoms::ottla_resumed(), &topic, partition);
                consumer.resume(&one).map_err(|e| ("resume", e))
            }
            Effect::Seek(offset) => {
                // Done by the seek thread, which reports librdkafka's answer (`seek.rs`).
                let tp = (topic.clone(), partition);
                let generation = shared
                    .lock()
                    .partitions
                    .get(&tp)
                    .map(|s| s.part.generation());
                let sent = generation.is_some_and(|generation| {
                    consumer
                        .context()
                        .seeks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .is_some_and(|tx| {
                            let request = super::seek::Request {
                                tp: tp.clone(),
                                generation,
                                offset,
                            };
                            tx.send(request).is_ok()
                        })
                });
                if !sent {
                    // Stopping: the partition is going away with the consumer.
                    shared.lock().handle(&tp, Event::SeekFailed { offset });
                }
                Ok(())
            }
            Effect::Deliver(_) | Effect::Wait(_) | Effect::Skipped(_) | Effect::DeadLetter(_) => {
                Ok(())
            }
        };
        if let Err((what, err)) = result {
            log(
                atoms::debug(),
                "CONSUMER",
                &format!("{what} of {topic}/{partition} failed (tried again): {err}"),
            );
        }
    }
}

/// Tells the manager of a pause or resume (for telemetry); dropped if its queue is full.
fn notify(shared: &Shared, kind: rustler::Atom, topic: &str, partition: i32) {
    let topic = topic.to_string();
    crate::context::send_to(
        &shared.settings.manager,
        Box::new(move |env| (kind, topic, partition).encode(env)),
    );
}

/// Reads each partition's high watermark and position from librdkafka (no request).
fn refresh_watermarks(shared: &Shared, consumer: &BaseConsumer<GroupCtx>) {
    let list: Vec<Tp> = shared.lock().partitions.keys().cloned().collect();
    let mut marks: Vec<(Tp, i64)> = Vec::new();
    for tp in list {
        let Ok(topic) = CString::new(tp.0.as_str()) else {
            continue;
        };
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer is valid while `consumer` lives; the call only reads
        // librdkafka's cached offsets into the two out-parameters.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                tp.1,
                &mut low,
                &mut high,
            )
        };
        if err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0 {
            marks.push((tp, high));
        }
    }
    // librdkafka's positions, past the records it hands to no one (transaction markers,
    // aborted messages). On this thread, after the intake: every message they count was
    // taken in.
    let positions: Vec<(Tp, i64)> = consumer
        .position()
        .map(|list| {
            list.elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(n) => Some(((e.topic().to_string(), e.partition()), n)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut st = shared.lock();
    for (tp, high) in marks {
        st.handle(&tp, Event::Watermark(high));
    }
    for (tp, next) in positions {
        if st.partitions.contains_key(&tp) {
            st.handle(&tp, Event::Position(next));
        }
    }
}

/// librdkafka's consumer failed for good (e.g. fenced: another member joined under the same
/// `group.instance.id`): the group has given its partitions to others. Forget them all, so
/// nothing more is delivered, acked or committed here, and tell the manager:
/// `{:ottla_consumer_fatal, reason, [{topic, partition}]}`. The consumer is not restarted:
/// a restarted static member would fence the other one in turn.
fn failed_for_good(shared: &Shared, code: rdkafka::types::RDKafkaErrorCode) {
    let list: Vec<Tp> = shared.lock().partitions.keys().cloned().collect();
    shared.remove_partitions(&list);
    let reason = format!("{code} ({})", crate::error::code_name(code));
    send_reliably(
        &shared.settings.manager,
        Box::new(move |env| (atoms::ottla_consumer_fatal(), reason, list).encode(env)),
    );
}

/// Commits every ack before the consumer closes, within `FINAL_COMMIT_WAIT`. A commit sent
/// while a rebalance is under way is refused (`ILLEGAL_GENERATION`, `REBALANCE_IN_PROGRESS`),
/// and so is one while the coordinator moves: then librdkafka is polled so it can finish the
/// rebalance (its callbacks run in poll; what it revokes is committed there), and the
/// commit is tried again. Without this, a member stopped during a rebalance left its last
/// acks uncommitted and their messages were handled again by the next owner.
fn final_commit(shared: &Shared, consumer: &BaseConsumer<GroupCtx>) {
    let ctx = consumer.context();
    let deadline = Instant::now() + FINAL_COMMIT_WAIT;
    loop {
        let outcomes = {
            let mut commits = ctx.commits();
            let mut outcomes = start_commit(shared, consumer, &mut commits, None);
            outcomes.extend(commits.collect(deadline.saturating_duration_since(Instant::now())));
            outcomes
        };
        let refused = outcomes.iter().any(|o| !o.ok);
        apply_commits(shared, outcomes);
        if !refused || Instant::now() >= deadline {
            return;
        }
        let pause_until = (Instant::now() + FINAL_COMMIT_RETRY).min(deadline);
        while Instant::now() < pause_until {
            // Rebalance events are served here; a message polled now is dropped unacked,
            // so its next owner gets it.
            let _ = consumer.poll(RECHECK * 4);
        }
    }
}

/// An error after which this consumer can never consume (a group the broker refuses as
/// configured: e.g. a `session.timeout.ms` outside the broker's bounds, a group id it
/// rejects, or a fatal librdkafka error), as the error to report; `None` for the others,
/// which librdkafka retries on its own.
fn fatal_group_error(err: &KafkaError) -> Option<Error> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let code = err.rdkafka_error_code()?;
    matches!(
        code,
        Code::InvalidSessionTimeout
            | Code::InvalidGroupId
            | Code::InconsistentGroupProtocol
            | Code::GroupAuthorizationFailed
            | Code::Fatal
    )
    .then(|| Error::from(err.clone()))
}

/// Stops the consumer and tells the manager why (`{:ottla_consumer_failed, error}`), so that
/// a consumer that cannot consume fails loudly instead of running idle.
fn fail(shared: &Shared, error: Error) {
    shared.signal_stop();
    send_reliably(
        &shared.settings.manager,
        Box::new(move |env| (atoms::ottla_consumer_failed(), error).encode(env)),
    );
}

/// Releases the queue handles (commit replies, partitions' queues) before the consumer they
/// belong to, also when the thread unwinds from a panic: librdkafka must not be destroyed
/// with queues outstanding.
struct ReleaseQueues<'a>(&'a BaseConsumer<GroupCtx>);

impl Drop for ReleaseQueues<'_> {
    fn drop(&mut self) {
        self.0.context().shared.lock().released = true;
        *self.0.context().commits() = Commits::default();
        self.0.context().queues().clear();
    }
}

pub fn run(consumer: BaseConsumer<GroupCtx>, shared: Arc<Shared>) {
    let seeker = {
        let (tx, rx) = std::sync::mpsc::channel();
        let client = super::seek::Client(consumer.client().native_ptr());
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ottla-seek".into())
            .spawn(move || super::seek::run(client, for_thread, rx));
        match thread {
            Ok(thread) => {
                *consumer
                    .context()
                    .seeks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(tx);
                Some(thread)
            }
            Err(err) => {
                fail(&shared, Error::new("thread_spawn", err.to_string()));
                None
            }
        }
    };
    let release = ReleaseQueues(&consumer);
    let mut last_commit = Instant::now();
    let mut last_marks = Instant::now();
    let mut polled: Vec<(Tp, Msg)> = Vec::with_capacity(INTAKE_BATCH);
    // Per partition taken from, its messages; and scratch space for librdkafka's pointers.
    let mut taken: Vec<(Tp, Vec<Msg>)> = Vec::new();
    let mut scratch: Vec<*mut rdkafka::bindings::rd_kafka_message_t> = Vec::new();
    let commit = shared.settings.commit;
    let mut fatal = false;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.test_panic.swap(false, Ordering::SeqCst) {
            panic!("test-only panic of the poll thread (consumer_test_panic)");
        }
        // The main queue: rebalances and errors, and messages of partitions without a queue
        // of their own. Never waits: the wait is on `shared.wake`, below.
        while polled.len() < INTAKE_BATCH {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => polled.push(to_msg(&m)),
                Some(Err(KafkaError::MessageConsumptionFatal(code))) => {
                    if !fatal {
                        fatal = true;
                        failed_for_good(&shared, code);
                    }
                    break;
                }
                Some(Err(err)) => {
                    log(atoms::warning(), "CONSUME", &err.to_string());
                    if let Some(error) = fatal_group_error(&err) {
                        fail(&shared, error);
                    }
                    break;
                }
                None => break,
            }
        }
        // The intake queue: every partition's messages, in one batch. A partition whose
        // backlog is full is paused in librdkafka; what it still gets here is handed back
        // (an overflow: sought back to).
        let mut took = polled.len();
        took += consumer
            .context()
            .queues()
            .take(INTAKE_BATCH, &mut scratch, &mut taken);
        if took > 0 {
            intake(&shared, &mut polled, &mut taken);
        }
        apply_ops(&shared, &consumer);
        if commit {
            let ctx = consumer.context();
            let mut outcomes = ctx.commits().collect(Duration::ZERO);
            if last_commit.elapsed() >= shared.settings.commit_interval {
                outcomes.extend(start_commit(&shared, &consumer, &mut ctx.commits(), None));
                last_commit = Instant::now();
            }
            apply_commits(&shared, outcomes);
        }
        if last_marks.elapsed() >= WATERMARK_INTERVAL {
            refresh_watermarks(&shared, &consumer);
            // The group's generation can move on without a rebalance callback here: the
            // metadata exactly-once transactions send is kept at most this old.
            consumer.context().keep_group_metadata(&consumer);
            last_marks = Instant::now();
        }
        // Seeks, commits and watermarks may have given a partition a batch to send.
        if !shared.lock().outbox.is_empty() {
            shared.work.notify();
        }
        if took == 0 {
            // Nothing to take: sleep until librdkafka queues something, the dispatcher frees
            // room, or periodic work (commits, watermarks) is due.
            shared.wake.wait(POLL_TIMEOUT);
        }
    }
    // Shutdown: commit every ack (bounded), then close: leave the group, so the others
    // rebalance at once. From here on a revocation commits without asking the manager, which
    // is stopping.
    shared.lock().closing = true;
    if commit && !fatal {
        final_commit(&shared, &consumer);
    }
    // The seek thread uses the client: it ends (it sees the stop flag) before the client goes.
    consumer
        .context()
        .seeks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(seeker) = seeker {
        let _ = seeker.join();
    }
    // Queue handles must go before the client they belong to.
    drop(release);
    drop(consumer);
    shared.work.notify();
}
