//! The poll thread and the consumer context: the only code that calls librdkafka's consumer.
//! librdkafka's rebalance callbacks run here, inside `poll`. It feeds fetched messages to the
//! partitions' state machines and applies the pause, resume and seek effects they return.

use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ottla_core::partition::{Effect, Event};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use rustler::Encoder;

use super::commit::{Commits, Outcome};
use super::queues::Queues;
use super::{now_ms, Msg, Shared, State, Tp};
use crate::atoms;
use crate::context::{log, send_reliably, OttlaContext};
use crate::error::Error;

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// Messages taken from librdkafka per lock of the state.
const INTAKE_BATCH: usize = 500;
const WATERMARK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a revocation waits for the manager's reply past the drain timeout: the manager
/// has the whole drain timeout to stop the workers, this only covers its reply's trip.
const REPLY_MARGIN: Duration = Duration::from_millis(300);
/// How long a revocation waits, past the reply margin, for workers the revoker was told to
/// kill to be seen dead.
const STRAGGLER_WAIT: Duration = Duration::from_secs(2);
/// How long a revocation waits for its commit.
const REVOKE_COMMIT_WAIT: Duration = Duration::from_millis(500);
/// How long shutdown waits for its final commit.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown serves librdkafka between attempts at a refused final commit.
const FINAL_COMMIT_RETRY: Duration = Duration::from_millis(200);
/// How often a bounded wait re-reads the ack cells.
const RECHECK: Duration = Duration::from_millis(5);

pub struct GroupCtx {
    base: OttlaContext,
    shared: Arc<Shared>,
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

    fn commits(&self) -> MutexGuard<'_, Commits> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queues(&self) -> MutexGuard<'_, Queues> {
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

/// Gives each newly assigned partition a queue of its own (see `queues.rs`).
pub fn split_queues(consumer: &BaseConsumer<GroupCtx>, tpl: &TopicPartitionList) {
    let ctx = consumer.context();
    let rk = consumer.client().native_ptr();
    let mut queues = ctx.queues();
    for tp in tps(tpl) {
        queues.split(rk, &tp, &ctx.shared.wake);
    }
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

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// Records newly assigned partitions under a new generation and tells the manager:
/// `{:ottla_assigned, generation, [{topic, partition}]}`.
pub fn assigned(shared: &Shared, tpl: &TopicPartitionList) {
    let list = tps(tpl);
    if list.is_empty() {
        // Cooperative rebalances often assign nothing new: no new generation then.
        shared.lock().last_rebalance_ms = Some(now_ms());
        return;
    }
    let generation = shared.insert_partitions(&list);
    send_reliably(
        &shared.settings.manager,
        Box::new(move |env| (atoms::ottla_assigned(), generation, list).encode(env)),
    );
}

/// Waits until `done` holds or `deadline` passes, re-reading the ack cells.
fn wait_until(shared: &Shared, deadline: Instant, done: impl Fn(&mut State) -> bool) {
    let mut st = shared.lock();
    loop {
        let keys: Vec<Tp> = st.partitions.keys().cloned().collect();
        for tp in &keys {
            st.handle(tp, Event::Tick);
        }
        if done(&mut st) || shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        st = shared
            .progress
            .wait_timeout(st, left.min(RECHECK))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

/// Revocation, all within the drain timeout: stop delivering; give in-flight batches the
/// drain timeout (less a share for stopping) to be acked; have the manager stop the workers
/// (killing those still busy) and run the user's handler within what is left; commit the
/// acks; forget the partitions. Only then does librdkafka go on.
fn revoking(ctx: &GroupCtx, consumer: &BaseConsumer<GroupCtx>, tpl: &TopicPartitionList) {
    let shared = &ctx.shared;
    let started = Instant::now();
    let list = tps(tpl);
    if list.is_empty() {
        return;
    }
    let lost = consumer.assignment_lost();
    let drain = shared.settings.drain_timeout;
    let deadline = started + drain;
    {
        // What is still queued for a revoked partition is its next owner's to fetch.
        let mut queues = ctx.queues();
        for tp in &list {
            queues.remove(tp);
        }
    }
    let (closing, released) = {
        let mut st = shared.lock();
        for tp in &list {
            st.handle(tp, Event::Revoke);
        }
        (st.closing, st.released)
    };

    if !closing {
        if !lost {
            let grace = (drain / 5).min(Duration::from_millis(500));
            wait_until(shared, deadline - grace, |st| {
                list.iter()
                    .all(|tp| st.partitions.get(tp).is_none_or(|s| s.part.drained()))
            });
        }
        // The revoker (a process that runs no user code) stops the revoked partitions'
        // workers by the deadline, killing those still busy, and runs the user's
        // `assignments_revoked_handler`; the deadline is absolute (Erlang's monotonic clock),
        // so a late reader cannot stretch it.
        let (id, workers) = {
            let mut st = shared.lock();
            st.revoke_seq += 1;
            let workers: Vec<(Tp, rustler::LocalPid)> = list
                .iter()
                .filter_map(|tp| {
                    let slot = st.partitions.get(tp)?;
                    slot.worker
                        .filter(|_| slot.worker_alive)
                        .map(|pid| (tp.clone(), pid))
                })
                .collect();
            (st.revoke_seq, workers)
        };
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i64;
        let deadline_ms = super::erlang_monotonic_ms() + left_ms;
        send_reliably(
            &shared.settings.revoker,
            Box::new(move |env| (atoms::ottla_revoke(), id, deadline_ms, workers).encode(env)),
        );
        let gone = |st: &mut State| {
            list.iter()
                .all(|tp| st.partitions.get(tp).is_none_or(|s| !s.worker_alive))
        };
        wait_until(shared, deadline + REPLY_MARGIN, |st| {
            st.revoke_done >= id && gone(st)
        });
        // librdkafka goes on only once the old workers are dead: their monitors confirm it.
        wait_until(shared, deadline + REPLY_MARGIN + STRAGGLER_WAIT, |st| {
            gone(st)
        });
        if !gone(&mut shared.lock()) && !shared.stop.load(Ordering::SeqCst) {
            log(
                atoms::error(),
                "REVOKE",
                &format!(
                    "revoked partitions' workers still alive {} ms past the drain deadline: \
                     {list:?}",
                    (REPLY_MARGIN + STRAGGLER_WAIT).as_millis()
                ),
            );
        }
    }

    // While closing, the manager is not asked, but acks are still committed (a revocation
    // served by the final commit's retries), unless the queues are gone (the client's close).
    if !lost && !released && shared.settings.commit {
        let outcomes = {
            let mut commits = ctx.commits();
            let mut outcomes = start_commit(shared, consumer, &mut commits, Some(&list));
            // The commit may use what is left of the drain timeout (at least
            // REVOKE_COMMIT_WAIT): an ack whose commit is not confirmed before the partition
            // goes is handled again by its next owner.
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .max(REVOKE_COMMIT_WAIT);
            outcomes.extend(commits.collect(wait));
            let unconfirmed = commits.unconfirmed(&list);
            if !unconfirmed.is_empty() {
                log(
                    atoms::warning(),
                    "COMMIT",
                    &format!(
                        "revoked partitions' commit not confirmed in time, their next owner \
                         may handle acked messages again: {unconfirmed:?}"
                    ),
                );
            }
            outcomes
        };
        apply_commits(shared, outcomes);
    }

    shared.remove_partitions(&list);
    let took = started.elapsed().as_millis() as i64;
    shared.lock().last_revoke_ms = Some(took);
    if !closing {
        send_reliably(
            &shared.settings.manager,
            Box::new(move |env| (atoms::ottla_revoke_done(), list, took).encode(env)),
        );
    }
}

/// A graceful stop's drain: nothing more is delivered, and what was delivered gets until
/// `deadline` to be acked (from any process). Returns when everything delivered is acked, or
/// at the deadline.
pub fn drain(shared: &Shared, deadline: Instant) {
    {
        let mut st = shared.lock();
        let keys: Vec<Tp> = st.partitions.keys().cloned().collect();
        for tp in &keys {
            st.handle(tp, Event::Revoke);
        }
    }
    wait_until(shared, deadline, |st| {
        st.partitions.values().all(|s| s.part.drained())
    });
}

impl ConsumerContext for GroupCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => revoking(self, consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => log(atoms::error(), "REBALANCE", &err.to_string()),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps a partition's pause flag across unassign/assign; a new
            // assignment starts with an empty backlog, so it must flow.
            if tpl.count() > 0 {
                if let Err(err) = consumer.resume(tpl) {
                    log(
                        atoms::warning(),
                        "RESUME",
                        &format!("resume after assign failed: {err}"),
                    );
                }
                // Split before the first fetch: nothing of these partitions is queued yet.
                split_queues(consumer, tpl);
            }
            assigned(&self.shared, tpl);
        }
    }
}

/// Sends a commit of what was acked beyond the committed offsets (of `only`, or of every
/// partition). Returns the outcomes of a commit that failed at once.
fn start_commit(
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
fn apply_commits(shared: &Shared, outcomes: Vec<Outcome>) {
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
            Effect::Deliver(_) | Effect::Wait(_) => Ok(()),
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

/// Reads each partition's high watermark from librdkafka's cache (no request).
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
    let mut st = shared.lock();
    for (tp, high) in marks {
        st.handle(&tp, Event::Watermark(high));
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
