//! Seeded, model-based test of [`Partition`] and its [`AckCell`].
//!
//! Each case simulates librdkafka (a log with optional compaction gaps, a fetcher with a
//! prefetch queue, delayed pause/resume/seek), a worker (acks, partial acks + redelivery,
//! stray acks, death, re-attach), tasks that outlive their worker, out-of-order commits,
//! watermarks, revokes and reassigns around one partition, and checks the invariants of the
//! state machine after every step against a small reference model. Every case ends with a
//! drain (the worker acks everything, the fetcher runs to the end of the log) after which
//! every log offset must have been delivered and acked.
//!
//! Checked after every step:
//! - commits (`committed()`, `committing()`, each `commit_due()`) never beyond the highest
//!   valid ack + 1 nor the last delivered + 1; `commit_due()` is exactly that ack + 1;
//!   `committed()` is the highest successful commit and never moves backwards;
//! - delivery order: every delivered message is the first log offset at or after
//!   max(next expected, highest ack + 1), where "next expected" follows the last delivered
//!   message and is moved back by `WorkerDown` (to ack + 1, or the first offset) and by
//!   `Redeliver { from }` (to max(from, ack + 1), as the worker asked; not forward: after a
//!   handler's seek, what lies ahead comes again anyway); so batches are
//!   strictly increasing, first deliveries skip no log offset, a redelivery never skips an
//!   unacked delivered offset and never hands back an acked one;
//! - every ack's outcome (Advanced / Behind / StaleGeneration / Undelivered) is the model's,
//!   and an ack never covers an offset that was not delivered;
//! - memory: `held()` and `backlog_len()` at most 2 x max_backlog; not paused means a backlog
//!   below max_backlog; `Resume` only at half of it;
//! - one batch per attach or demand, none after a revoke, none without a worker;
//! - fetched messages are Discarded exactly while a seek is unanswered (librdkafka answers in
//!   order) or after a revoke; a failed seek is asked again unless a later one superseded it;
//! - offsets kept elsewhere (some cases): librdkafka starts at `auto.offset.reset` (the log
//!   start or end), the partition discards everything until the worker's `Start { from }`,
//!   which seeks to the stored offset and nothing else; the first message taken is then the
//!   first of the log from there (so the cell's low mark, and every ack, is the stored
//!   offset's); other cases start with `Start { from: None }` or `WorkerAttached`.
//!
//! Failures and handler seeks (each case has a random [`RetryPolicy`]):
//! - the worker sometimes fails its batch (`Failed { from }`, maybe after acking part of it),
//!   fails a last attempt again, which the case's `on_failure` decides: retried (a `Wait`),
//!   skipped (`Skipped`, acked by the partition) or handed over to be dead-lettered
//!   (`DeadLetter`, then `DeadLettered`: acked when confirmed, retried when not); and sometimes
//!   seeks (`SeekTo`: back, forward, beyond the log, `OFFSET_BEGINNING`, `OFFSET_END`); the
//!   harness answers `Wait` with `RetryDue` after a random delay, like the glue (one timer
//!   per partition, which a seek does not cancel: a stale `RetryDue` must be harmless);
//! - a `Failed` that leaves something unacked in the batch (delivered last, and not dropped by
//!   a seek since) emits exactly one `Wait(backoff_after(failures))`, any other emits
//!   nothing; nothing is delivered between `Wait` and `RetryDue` (or a seek); `backoff()`,
//!   `failures()` and `drained()` follow the model;
//! - after a failure, deliveries from the failed offset up to the end of the failed batch
//!   are single messages; a redelivery below the failed batch stops before it; attempt
//!   numbers follow the rule (failures + 1 at the failing message, 2 for the rest of the
//!   failed batch, 1 otherwise), `last_attempt` is exactly "one message and attempt >=
//!   max_attempts", and a message delivered as a last attempt failed at least
//!   max_attempts - 1 times (counted independently, per offset);
//! - after `SeekTo(o)` nothing is held, the next delivery is the first log offset >= o (the
//!   first of the log for `OFFSET_BEGINNING`, nothing old for `OFFSET_END`), offsets from o
//!   up to the ack of that time are replayed (a later ack only makes the offsets above them
//!   that it covers be skipped), a redelivery inside the replay starts where the worker asked,
//!   a dead worker's successor goes on with the replay, `last_seek()` is o; acks and commits
//!   never move backwards; offsets a forward seek jumped over count as handled;
//! - the drain delivers every log offset from the last seek target (or the assignment's
//!   start after a later reassignment) since that seek, except what an ack made after the
//!   seek covered before it came again; it ends with nothing held.
//!
//! Environment:
//! - `OTTLA_MODEL_SEED`: the run's seed (decimal or 0x-hex), default [`DEFAULT_SEED`].
//! - `OTTLA_MODEL_CASES`: how many cases (default [`DEFAULT_CASES`]).
//! - `OTTLA_MODEL_CASE`: run only this case (to replay a failure).
//!
//! On failure the seed, the case and every step of the case are printed.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ottla_core::cell::{AckCell, AckOutcome};
use ottla_core::partition::{
    Effect, Event, Intake, Offset, OnFailure, Partition, RetryPolicy, OFFSET_BEGINNING, OFFSET_END,
};

const DEFAULT_SEED: u64 = 0x0771_a5ee_d5ee_d001;
const DEFAULT_CASES: u64 = 3000;
const MAX_STEPS: i64 = 300;
const MAX_LOG: i64 = 400;
/// Where the fetcher stands after a seek to `OFFSET_END` (the log does not grow).
const END_POS: i64 = MAX_LOG + 1_000;

type R<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg(i64);

/// The largest `Msg::size`.
const MAX_MSG_SIZE: usize = 70;

impl Offset for Msg {
    fn offset(&self) -> i64 {
        self.0
    }

    /// 10 to 70 bytes, by offset: the byte bound sees messages of different sizes.
    fn size(&self) -> usize {
        (self.0 % 7 + 1) as usize * 10
    }
}

/// splitmix64: tiny, fast, good enough to drive a simulation.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

fn case_seed(seed: u64, case: u64) -> u64 {
    let mut r = Rng(seed ^ case.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64()
}

/// The partition's log: the offsets present (sorted), the others were compacted away.
struct Log {
    offs: Vec<i64>,
}

impl Log {
    /// The first offset present at or after `o`.
    fn ceil(&self, o: i64) -> Option<i64> {
        let i = self.offs.partition_point(|&x| x < o);
        self.offs.get(i).copied()
    }

    fn contains(&self, o: i64) -> bool {
        self.offs.binary_search(&o).is_ok()
    }

    fn range(&self, lo: i64, hi: i64) -> &[i64] {
        let a = self.offs.partition_point(|&x| x < lo);
        let b = self.offs.partition_point(|&x| x <= hi);
        &self.offs[a..b.max(a)]
    }
}

/// A command the glue gave librdkafka, applied after a random delay, in order.
#[derive(Debug, Clone, Copy)]
enum Ctrl {
    Pause,
    Resume,
    Seek(i64),
}

/// librdkafka's side: a position, a queue of prefetched messages, and pending commands.
struct Fetcher {
    pos: i64,
    /// The position of the last seek (or the start): a resume never goes back before it.
    floor: i64,
    queue: VecDeque<i64>,
    paused: bool,
    ctrl: VecDeque<Ctrl>,
}

impl Fetcher {
    fn new(pos: i64) -> Self {
        Fetcher {
            pos,
            floor: pos,
            queue: VecDeque::new(),
            paused: false,
            ctrl: VecDeque::new(),
        }
    }
}

/// A batch as the worker got it: offsets and the partition's `attempt()`.
#[derive(Debug, Clone)]
struct Batch {
    offs: Vec<i64>,
    attempt: u32,
    last: bool,
}

struct Worker {
    gen: i32,
    /// The last batch delivered, not handled yet.
    current: Option<Batch>,
    /// Offsets delivered to this worker and not handed back (by a redelivery).
    held: Vec<i64>,
}

/// The model's failure being worked through (see `Partition`'s rule).
#[derive(Debug, Clone, Copy)]
struct MFailure {
    /// The first offset of the first failed batch (that was not acked).
    start: i64,
    /// Where the failure stands, and how often that message failed.
    head: i64,
    attempts: u32,
    /// The end of the first failed batch.
    until: i64,
}

/// One assignment of the partition (one generation) and its reference model.
struct Assignment {
    gen: i32,
    accepts_none: bool,
    /// Where Kafka told this owner to start (the committed offset).
    start: i64,
    cell: Arc<AckCell>,
    p: Partition<Msg>,
    /// The first offset the partition took in (the cell's `low`).
    first: Option<i64>,
    /// The highest ack that counted.
    acked: Option<i64>,
    max_delivered: Option<i64>,
    max_added: Option<i64>,
    /// Where the next delivered message must start (before skipping acked offsets).
    next_exp: i64,
    /// The worker is owed one batch (after an attach or a demand).
    credit: bool,
    /// Whether the last Pause/Resume effect was a Pause.
    paused: bool,
    /// The last Seek emitted, until its SeekDone.
    seek_pending: Option<i64>,
    /// Seeks emitted and not answered yet (librdkafka answers them in order).
    seeks: u32,
    revoked: bool,
    /// The highest commit reported ok.
    committed: Option<i64>,
    seen_committed: Option<i64>,
    pending_commits: Vec<i64>,
    failure: Option<MFailure>,
    /// A backoff is running (`Wait` emitted, no `RetryDue` or seek since).
    waiting: Option<Duration>,
    /// The `Wait` the event being handled must emit.
    expect_wait: Option<Duration>,
    /// The offset a `Skipped` or `DeadLetter` of the event being handled must name.
    expect_verdict: Option<i64>,
    /// After a seek back: the ack at the time; offsets from the target up to it are delivered
    /// again (a later ack does not change that, it only covers offsets above it).
    replay: Option<i64>,
    /// The handler sought in this assignment (seeks may then go below `start`).
    handler_seeks: bool,
    last_seek: Option<i64>,
    /// A handler's seek dropped what was delivered, nothing was delivered since: `drained()`.
    sought: bool,
    skipped: u64,
    dead_lettered: u64,
    /// Offsets kept elsewhere: the partition awaits its start position from the worker
    /// (`Event::Start`) and must take nothing in before it.
    awaiting: bool,
}

impl Assignment {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gen: i32,
        accepts_none: bool,
        start: i64,
        max_backlog: usize,
        max_batch: usize,
        policy: RetryPolicy,
        elsewhere: bool,
        max_bytes: Option<usize>,
    ) -> Self {
        let cell = Arc::new(AckCell::new(gen, accepts_none));
        let mut p = Partition::new(Arc::clone(&cell), max_backlog, max_batch).with_retry(policy);
        if elsewhere {
            p = p.awaiting_start();
        }
        if let Some(max) = max_bytes {
            let mut effects = Vec::new();
            p.set_max_bytes(max, &mut effects);
            assert!(
                effects.is_empty(),
                "a new partition's byte share asked for {effects:?}"
            );
        }
        Assignment {
            gen,
            accepts_none,
            start,
            cell,
            p,
            first: None,
            acked: None,
            max_delivered: None,
            max_added: None,
            next_exp: start,
            credit: false,
            // Offsets elsewhere: paused from the start, by the glue at the assignment.
            paused: elsewhere,
            seek_pending: None,
            seeks: 0,
            revoked: false,
            committed: None,
            seen_committed: None,
            pending_commits: Vec::new(),
            failure: None,
            waiting: None,
            expect_wait: None,
            expect_verdict: None,
            replay: None,
            handler_seeks: false,
            last_seek: None,
            sought: false,
            skipped: 0,
            dead_lettered: 0,
            awaiting: elsewhere,
        }
    }
}

/// Per-case biases, so that some cases have a sloppy worker, others flaky seeks, etc.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    down: u64,
    stray: u64,
    full_ack: u64,
    seek_fail: u64,
    commit_fail: u64,
    poll_max: i64,
    ctrl: u64,
    /// Percent of handled batches the worker fails.
    fail: u64,
    /// Percent of last attempts the worker gives up on (of the others, half fail again).
    give_up: u64,
    /// Percent of handled batches on which the worker seeks (and weight of a seek between
    /// batches).
    seek: u64,
    /// Weight of the backoff's end among the actions (the lower, the longer backoffs last).
    retry: u64,
}

#[derive(Debug, Default)]
struct Stats {
    cases: u64,
    steps: u64,
    events: u64,
    batches: u64,
    delivered: u64,
    redelivered: u64,
    overflows: u64,
    discarded: u64,
    duplicates: u64,
    seeks: u64,
    seek_failures: u64,
    worker_downs: u64,
    redeliver_requests: u64,
    acks_advanced: u64,
    acks_behind: u64,
    acks_stale: u64,
    acks_undelivered: u64,
    orphan_acks: u64,
    commits_ok: u64,
    commits_failed: u64,
    revokes: u64,
    reassigns: u64,
    max_held: usize,
    failures: u64,
    failures_all_acked: u64,
    failures_after_seek: u64,
    waits: u64,
    retry_dues: u64,
    stale_retry_dues: u64,
    single_retries: u64,
    below_failure_batches: u64,
    last_attempts: u64,
    gave_up: u64,
    handler_seeks: u64,
    seeks_back: u64,
    seeks_logical: u64,
    replayed: u64,
    acked_before_redelivery: u64,
    started_from_worker: u64,
}

struct Sim<'l> {
    rng: Rng,
    /// The partition's byte share in this case, if bounded.
    max_bytes: Option<usize>,
    /// Offsets kept elsewhere in this case: each assignment awaits its start.
    elsewhere: bool,
    log: Log,
    max_backlog: usize,
    max_batch: usize,
    /// The offset the first owner started at: everything from there on must be processed.
    s0: i64,
    a: Assignment,
    fetch: Fetcher,
    worker: Option<Worker>,
    /// Batches of workers that died (or of earlier assignments): their tasks may still ack.
    orphans: Vec<(i32, Vec<i64>)>,
    /// How many times each offset was delivered, over all assignments.
    delivered: Vec<u32>,
    /// What Kafka holds as committed (the highest successful commit).
    kafka_committed: i64,
    knobs: Knobs,
    lines: &'l mut Vec<String>,
    stats: &'l mut Stats,
    /// Seek effects of the last event.
    last_seeks: Vec<i64>,
    policy: RetryPolicy,
    /// How often each offset failed (the unacked part of a failed batch), over all
    /// assignments.
    fails: Vec<u32>,
    /// Offsets a forward seek jumped over before they were ever delivered.
    seek_skipped: Vec<bool>,
    /// Deliveries since the last handler seek (or the reassignment after one).
    since: Vec<u32>,
    /// From where every log offset must be delivered since then (`None`: no seek yet).
    since_from: Option<i64>,
    /// Offsets that need not be: an ack covered them before they came again.
    since_exempt: Vec<bool>,
    /// A `RetryDue` is scheduled (the glue's one timer per partition).
    retry_timer: bool,
}

fn fmt_gen(g: Option<i32>) -> String {
    g.map_or_else(|| "none".to_string(), |g| g.to_string())
}

fn fmt_outcome(o: AckOutcome) -> &'static str {
    match o {
        AckOutcome::Advanced => "Advanced",
        AckOutcome::Behind => "Behind",
        AckOutcome::StaleGeneration { .. } => "Stale",
        AckOutcome::Undelivered { .. } => "Undelivered",
    }
}

fn fmt_offsets(offs: &[i64]) -> String {
    let mut s = String::from("[");
    for (i, o) in offs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{o}");
    }
    s.push(']');
    s
}

impl Sim<'_> {
    fn begin(&mut self, s: String) {
        self.lines.push(s);
        self.stats.steps += 1;
    }

    fn note(&mut self, s: &str) {
        if let Some(l) = self.lines.last_mut() {
            l.push_str(s);
        }
    }

    // ----- events and effects -----

    fn ev(&mut self, event: Event<Msg>) -> R<Intake> {
        self.stats.events += 1;
        let fetched = match &event {
            Event::Fetched(m) => Some(m.0),
            _ => None,
        };
        let desc = match &event {
            Event::Fetched(m) => format!(" F{}", m.0),
            Event::Tick => " Tick".to_string(),
            other => format!(" {other:?}"),
        };
        self.note(&desc);
        let acked_before = self.a.cell.acked();
        let backlog_before = self.a.p.backlog_len();
        let bytes_before = self.a.p.held_bytes();
        let overflows_before = self.a.p.overflows();
        let expect_discard = self.a.revoked || self.a.seeks > 0 || self.a.awaiting;
        let mut effects = Vec::new();
        let intake = self.a.p.handle(event, &mut effects);
        if fetched.is_some() {
            let s = match intake {
                Intake::Added => "",
                Intake::Duplicate => "=dup",
                Intake::Discarded => "=disc",
                Intake::Overflow => "=OVERFLOW",
            };
            self.note(s);
        }
        for e in &effects {
            let s = match e {
                Effect::Deliver(b) => {
                    let offs: Vec<i64> = b.iter().map(|m| m.0).collect();
                    format!(" ->Deliver{}", fmt_offsets(&offs))
                }
                Effect::Pause => " ->Pause".to_string(),
                Effect::Resume => " ->Resume".to_string(),
                Effect::Seek(o) => format!(" ->Seek({o})"),
                Effect::Wait(d) => format!(" ->Wait({d:?})"),
                Effect::Skipped(o) => format!(" ->Skipped({o})"),
                Effect::DeadLetter(o) => format!(" ->DeadLetter({o})"),
            };
            self.note(&s);
        }
        if let Some(o) = fetched {
            self.check_intake(
                o,
                intake,
                (backlog_before, bytes_before),
                overflows_before,
                expect_discard,
                &effects,
            )?;
        } else {
            ensure!(
                self.a.p.acked() == self.a.cell.acked(),
                "after an event the partition's ack {:?} differs from the cell's {:?}",
                self.a.p.acked(),
                self.a.cell.acked()
            );
        }
        self.apply_effects(effects, acked_before)?;
        self.check()?;
        Ok(intake)
    }

    fn check_intake(
        &mut self,
        o: i64,
        intake: Intake,
        (backlog_before, bytes_before): (usize, usize),
        overflows_before: u64,
        expect_discard: bool,
        effects: &[Effect<Msg>],
    ) -> R {
        let p = &self.a.p;
        if expect_discard {
            ensure!(
                intake == Intake::Discarded,
                "fetched {o} while a seek is pending ({:?}) or revoked ({}): {intake:?}, not Discarded",
                self.a.seek_pending,
                self.a.revoked
            );
        } else {
            ensure!(
                intake != Intake::Discarded,
                "fetched {o} discarded with no seek pending and no revoke"
            );
        }
        match intake {
            Intake::Added => {
                ensure!(
                    p.backlog_len() == backlog_before + 1,
                    "fetched {o} Added but the backlog went {backlog_before} -> {}",
                    p.backlog_len()
                );
                if self.a.first.is_none() {
                    let from = if self.a.handler_seeks {
                        self.a.next_exp
                    } else {
                        self.a.start
                    };
                    ensure!(
                        self.log.ceil(from) == Some(o),
                        "the first message taken is {o}, not the first of the log from {from}"
                    );
                    self.a.first = Some(o);
                }
                self.a.max_added = Some(self.a.max_added.map_or(o, |m| m.max(o)));
            }
            Intake::Duplicate => {
                self.stats.duplicates += 1;
                ensure!(
                    p.backlog_len() == backlog_before,
                    "a duplicate changed the backlog"
                );
                ensure!(
                    self.a.max_added.is_some_and(|m| o <= m)
                        || self.a.acked.is_some_and(|a| o <= a),
                    "fetched {o} called a duplicate but never taken before (max taken {:?})",
                    self.a.max_added
                );
            }
            Intake::Discarded => {
                self.stats.discarded += 1;
                ensure!(
                    p.backlog_len() == backlog_before,
                    "a discarded message changed the backlog"
                );
            }
            Intake::Overflow => {
                self.stats.overflows += 1;
                ensure!(
                    backlog_before >= self.max_backlog
                        || self.max_bytes.is_some_and(|m| bytes_before >= m),
                    "overflow of {o} with a backlog of {backlog_before} < {} and {bytes_before} bytes held (at most {:?})",
                    self.max_backlog,
                    self.max_bytes
                );
                ensure!(
                    p.backlog_len() == backlog_before,
                    "an overflow changed the backlog"
                );
                ensure!(
                    effects.contains(&Effect::Seek(o)),
                    "overflow of {o} without a seek back to it"
                );
                ensure!(
                    p.overflows() == overflows_before + 1,
                    "overflow not counted"
                );
            }
        }
        Ok(())
    }

    fn apply_effects(&mut self, effects: Vec<Effect<Msg>>, acked_before: Option<i64>) -> R {
        self.last_seeks.clear();
        for e in effects {
            match e {
                Effect::Deliver(batch) => {
                    let offs: Vec<i64> = batch.iter().map(|m| m.0).collect();
                    self.on_deliver(offs, acked_before)?;
                }
                Effect::Pause => {
                    ensure!(!self.a.paused, "Pause while already paused");
                    self.a.paused = true;
                    self.fetch.ctrl.push_back(Ctrl::Pause);
                }
                Effect::Resume => {
                    ensure!(self.a.paused, "Resume while not paused");
                    ensure!(!self.a.revoked, "Resume after revoke");
                    ensure!(
                        self.a.p.backlog_len() <= self.max_backlog / 2,
                        "Resume with a backlog of {} > max_backlog / 2 = {}",
                        self.a.p.backlog_len(),
                        self.max_backlog / 2
                    );
                    self.a.paused = false;
                    self.fetch.ctrl.push_back(Ctrl::Resume);
                }
                Effect::Seek(o) => {
                    ensure!(!self.a.revoked, "Seek({o}) after revoke");
                    ensure!(
                        o >= self.a.start
                            || (self.a.handler_seeks
                                && (o >= 0 || o == OFFSET_BEGINNING || o == OFFSET_END)),
                        "Seek({o}) before the assignment's start {}",
                        self.a.start
                    );
                    self.stats.seeks += 1;
                    self.a.seek_pending = Some(o);
                    self.a.seeks += 1;
                    self.last_seeks.push(o);
                    self.fetch.ctrl.push_back(Ctrl::Seek(o));
                }
                Effect::Skipped(o) | Effect::DeadLetter(o) => {
                    let want = self.a.expect_verdict.take();
                    ensure!(
                        want == Some(o),
                        "{e:?}, the model expects a verdict on {want:?} (policy {:?})",
                        self.policy.on_failure
                    );
                }
                Effect::Wait(d) => {
                    let want = self.a.expect_wait.take();
                    ensure!(
                        want == Some(d),
                        "Wait({d:?}), the model expects {want:?} (failure {:?})",
                        self.a.failure
                    );
                    self.stats.waits += 1;
                    // The glue keeps one timer per partition: a new backoff replaces it.
                    self.retry_timer = true;
                }
            }
        }
        Ok(())
    }

    fn on_deliver(&mut self, batch: Vec<i64>, acked_before: Option<i64>) -> R {
        ensure!(!self.a.revoked, "delivered {batch:?} after revoke");
        ensure!(
            self.worker.is_some(),
            "delivered {batch:?} without a worker"
        );
        ensure!(
            self.a.credit,
            "delivered {batch:?} without an attach or demand since the last batch"
        );
        self.a.credit = false;
        ensure!(!batch.is_empty(), "empty batch");
        ensure!(
            batch.len() <= self.max_batch,
            "batch of {} > max_batch {}",
            batch.len(),
            self.max_batch
        );
        ensure!(
            self.a.waiting.is_none(),
            "delivered {batch:?} during a backoff ({:?}) before RetryDue",
            self.a.waiting
        );
        self.stats.batches += 1;
        let (attempt, last) = self.check_attempt(&batch)?;
        for &m in &batch {
            ensure!(self.log.contains(m), "delivered {m}, not in the log");
            // During a replay (after a seek back) acked offsets up to the replay's end are
            // delivered again.
            let next = self.log.ceil(self.a.next_exp);
            let replaying = self.a.replay.is_some_and(|r| next.is_some_and(|n| n <= r));
            let from = match acked_before {
                Some(a) if !replaying => self.a.next_exp.max(a + 1),
                _ => self.a.next_exp,
            };
            let want = self.log.ceil(from);
            if want != Some(m) {
                if acked_before.is_some_and(|a| m <= a) && !replaying {
                    return Err(format!(
                        "delivered {m}, already acked (ack {acked_before:?}); expected {want:?}"
                    ));
                }
                if want.is_some_and(|w| m > w) {
                    return Err(format!(
                        "delivered {m} skipping unacked {want:?} (next expected from {}, ack {acked_before:?})",
                        self.a.next_exp
                    ));
                }
                return Err(format!(
                    "delivered {m} out of order: expected {want:?} (next from {}, ack {acked_before:?})",
                    self.a.next_exp
                ));
            }
            if self.a.max_delivered.is_none_or(|d| m > d) {
                // First deliveries skip nothing, but what a handler's seek jumped over.
                let lo = self.a.max_delivered.map_or(self.a.start, |d| d + 1);
                if let Some(&o) = self
                    .log
                    .range(lo, m - 1)
                    .iter()
                    .find(|&&o| !self.seek_skipped[o as usize])
                {
                    return Err(format!("first delivery of {m} skips {o}"));
                }
                self.a.max_delivered = Some(m);
            } else {
                self.stats.redelivered += 1;
            }
            if replaying && acked_before.is_some_and(|a| m <= a) {
                self.stats.replayed += 1;
            }
            self.a.next_exp = m + 1;
            self.a.sought = false;
            self.delivered[m as usize] += 1;
            self.since[m as usize] += 1;
            self.stats.delivered += 1;
        }
        let w = self.worker.as_mut().expect("checked above");
        w.held.extend_from_slice(&batch);
        w.current = Some(Batch {
            offs: batch,
            attempt,
            last,
        });
        Ok(())
    }

    /// The batch's size and `attempt()` against the model's failure: returns the attempt.
    fn check_attempt(&mut self, batch: &[i64]) -> R<(u32, bool)> {
        let (attempt, last) = self.a.p.attempt();
        let head = batch[0];
        let tail = batch[batch.len() - 1];
        let want = match self.a.failure {
            Some(f) if head < f.start => {
                // Redelivered below the failed batch (a dead worker's unacked messages):
                // a first attempt, and it must stop before the failed batch.
                ensure!(
                    tail < f.start,
                    "batch {} runs into the failed batch from {} ({f:?})",
                    fmt_offsets(batch),
                    f.start
                );
                self.stats.below_failure_batches += 1;
                1
            }
            Some(f) if head <= f.until => {
                ensure!(
                    batch.len() == 1,
                    "after a failure ({f:?}) delivered {} instead of one message",
                    fmt_offsets(batch)
                );
                self.stats.single_retries += 1;
                if head == f.head {
                    f.attempts + 1
                } else {
                    2
                }
            }
            _ => {
                self.a.failure = None;
                1
            }
        };
        ensure!(
            attempt == want,
            "delivered {} as attempt {attempt}, the model expects {want} (failure {:?})",
            fmt_offsets(batch),
            self.a.failure
        );
        let max = self.policy.max_attempts;
        let want_last = batch.len() == 1 && max.is_some_and(|m| attempt >= m);
        ensure!(
            last == want_last,
            "delivered {} with last_attempt {last} (attempt {attempt}, max_attempts {max:?})",
            fmt_offsets(batch)
        );
        if last {
            self.stats.last_attempts += 1;
            let failed = self.fails[head as usize];
            ensure!(
                max.is_some_and(|m| failed + 1 >= m),
                "{head} delivered as its last attempt after failing {failed} times (max_attempts {max:?})"
            );
        }
        Ok((attempt, last))
    }

    /// The invariants that hold after every step.
    fn check(&mut self) -> R {
        let mb2 = 2 * self.max_backlog;
        let a = &mut self.a;
        let p = &a.p;
        self.stats.max_held = self.stats.max_held.max(p.held());
        ensure!(
            p.held() <= mb2,
            "holds {} messages > 2 x max_backlog = {mb2}",
            p.held()
        );
        ensure!(
            p.backlog_len() <= mb2,
            "backlog of {} > 2 x max_backlog = {mb2}",
            p.backlog_len()
        );
        ensure!(
            a.cell.acked() == a.acked,
            "cell ack {:?}, model {:?}",
            a.cell.acked(),
            a.acked
        );
        ensure!(
            p.last_delivered() == a.max_delivered,
            "last_delivered {:?}, model {:?}",
            p.last_delivered(),
            a.max_delivered
        );
        ensure!(
            p.paused() == a.paused,
            "paused() {} but the effects say {}",
            p.paused(),
            a.paused
        );
        ensure!(
            p.has_worker() == self.worker.is_some(),
            "has_worker() {}",
            p.has_worker()
        );
        let c = p.committed();
        ensure!(
            c == a.committed,
            "committed() {c:?}, but the highest successful commit is {:?}",
            a.committed
        );
        ensure!(
            c >= a.seen_committed,
            "committed() went backwards: {:?} -> {c:?}",
            a.seen_committed
        );
        a.seen_committed = c;
        for (what, v) in [("committed", c), ("committing", p.committing())] {
            if let Some(v) = v {
                ensure!(
                    a.acked.is_some_and(|x| v <= x + 1),
                    "{what} {v} beyond the highest valid ack {:?} + 1",
                    a.acked
                );
                ensure!(
                    a.max_delivered.is_some_and(|d| v <= d + 1),
                    "{what} {v} beyond the last delivered {:?} + 1",
                    a.max_delivered
                );
            }
        }
        if let (Some(x), Some(d)) = (a.acked, a.max_delivered) {
            ensure!(x <= d, "ack {x} beyond the last delivered {d}");
        }
        ensure!(
            a.paused || p.backlog_len() < self.max_backlog,
            "not paused with a backlog of {} >= max_backlog {}",
            p.backlog_len(),
            self.max_backlog
        );
        ensure!(
            p.held_bytes() == p.held_bytes_counted(),
            "held bytes {} but the messages held make {}",
            p.held_bytes(),
            p.held_bytes_counted()
        );
        if let Some(max) = self.max_bytes {
            ensure!(
                a.paused || p.backlog_bytes() < max,
                "not paused with a backlog of {} bytes >= its share {max}",
                p.backlog_bytes()
            );
            // The backlog goes at most one message past the share (a message is taken in
            // only below it, and redeliveries requeue kept messages, at most the share);
            // what is kept of the delivered ones stays within it.
            ensure!(
                p.backlog_bytes() < 2 * max + MAX_MSG_SIZE
                    && p.held_bytes() - p.backlog_bytes() <= max,
                "holds {} bytes ({} in the backlog), beyond its share {max}",
                p.held_bytes(),
                p.backlog_bytes()
            );
        }
        // Against the partition's own ack: it reads the cell only when it handles an event.
        let drained = match (a.max_delivered, p.acked()) {
            (None, _) => true,
            _ if a.waiting.is_some() || a.sought => true,
            (Some(d), x) => x.is_some_and(|x| x >= d),
        };
        ensure!(p.drained() == drained, "drained() is {}", p.drained());
        ensure!(
            p.backoff() == a.waiting,
            "backoff() {:?}, model {:?}",
            p.backoff(),
            a.waiting
        );
        let failures = a.failure.map_or(0, |f| f.attempts);
        ensure!(
            p.failures() == failures,
            "failures() {}, model {failures} ({:?})",
            p.failures(),
            a.failure
        );
        ensure!(
            p.last_seek() == a.last_seek,
            "last_seek() {:?}, model {:?}",
            p.last_seek(),
            a.last_seek
        );
        ensure!(
            (p.skipped(), p.dead_lettered()) == (a.skipped, a.dead_lettered),
            "skipped/dead_lettered ({}, {}), model ({}, {})",
            p.skipped(),
            p.dead_lettered(),
            a.skipped,
            a.dead_lettered
        );
        if a.revoked {
            ensure!(p.held() == 0, "holds {} messages after revoke", p.held());
        }
        Ok(())
    }

    // ----- acks -----

    fn expect_ack(&self, gen: Option<i32>, off: i64) -> AckOutcome {
        let a = &self.a;
        let matches = match gen {
            Some(g) => g == a.gen,
            None => a.accepts_none,
        };
        if !matches {
            return AckOutcome::StaleGeneration { current: a.gen };
        }
        match a.max_delivered {
            None => {
                return AckOutcome::Undelivered {
                    last_delivered: None,
                }
            }
            Some(d) if off > d => {
                return AckOutcome::Undelivered {
                    last_delivered: Some(d),
                }
            }
            _ => {}
        }
        if a.first.is_none_or(|f| off < f) || a.acked.is_some_and(|x| off <= x) {
            AckOutcome::Behind
        } else {
            AckOutcome::Advanced
        }
    }

    fn ack(&mut self, who: &str, gen: Option<i32>, off: i64) -> R<AckOutcome> {
        let want = self.expect_ack(gen, off);
        let got = self.a.cell.ack(gen, off);
        self.note(&format!(
            " {who}:ack({},{off})={}",
            fmt_gen(gen),
            fmt_outcome(got)
        ));
        ensure!(
            got == want,
            "ack({gen:?}, {off}) gave {got:?}, the model expects {want:?}"
        );
        match got {
            AckOutcome::Advanced => {
                for &o in self.log.range(self.a.start, off) {
                    ensure!(
                        self.delivered[o as usize] > 0 || self.seek_skipped[o as usize],
                        "ack of {off} covers {o}, never delivered"
                    );
                }
                self.advanced_to(off);
            }
            AckOutcome::Behind => self.stats.acks_behind += 1,
            AckOutcome::StaleGeneration { .. } => self.stats.acks_stale += 1,
            AckOutcome::Undelivered { .. } => self.stats.acks_undelivered += 1,
        }
        self.check()?;
        Ok(got)
    }

    // ----- the fetcher -----

    fn fetch_one(&mut self) -> Option<i64> {
        if let Some(o) = self.fetch.queue.pop_front() {
            return Some(o);
        }
        if self.fetch.paused {
            return None;
        }
        let o = self.log.ceil(self.fetch.pos)?;
        self.fetch.pos = o + 1;
        Some(o)
    }

    fn poll(&mut self, n: i64) -> R {
        self.begin(format!("poll {n}:"));
        for _ in 0..n {
            let Some(o) = self.fetch_one() else { break };
            self.ev(Event::Fetched(Msg(o)))?;
        }
        self.ev(Event::Tick)?;
        Ok(())
    }

    fn prefetch(&mut self) {
        let n = self.rng.int(1, 12);
        self.begin(format!("prefetch {n}"));
        if self.fetch.paused {
            self.note(" (paused)");
            return;
        }
        for _ in 0..n {
            if self.fetch.queue.len() >= 48 {
                break;
            }
            let Some(o) = self.log.ceil(self.fetch.pos) else {
                break;
            };
            self.fetch.pos = o + 1;
            self.fetch.queue.push_back(o);
        }
    }

    /// librdkafka acts on the oldest pending command.
    fn apply_ctrl(&mut self, always_ok: bool) -> R {
        let Some(c) = self.fetch.ctrl.pop_front() else {
            return Ok(());
        };
        self.begin(format!("librdkafka {c:?}:"));
        match c {
            Ctrl::Pause => {
                self.fetch.paused = true;
                // librdkafka may purge what it prefetched and fetch it again on resume.
                if self.rng.pct(40) {
                    if let Some(&o) = self.fetch.queue.front() {
                        self.fetch.pos = o;
                        self.fetch.queue.clear();
                        self.note(&format!(" purged back to {o}"));
                    }
                }
            }
            Ctrl::Resume => {
                self.fetch.paused = false;
                // Or resume from an older position: what comes again must be dropped.
                if self.rng.pct(25) {
                    let at = self.fetch.queue.front().copied().unwrap_or(self.fetch.pos);
                    let o = (at - self.rng.int(1, 12)).max(self.fetch.floor);
                    self.fetch.pos = o;
                    self.fetch.queue.clear();
                    self.note(&format!(" rewound to {o}"));
                }
            }
            Ctrl::Seek(o) => {
                // Messages prefetched (or fetched) from the old position still arrive.
                let stale = self.rng.int(0, 3);
                for _ in 0..stale {
                    let Some(s) = self.fetch_one() else { break };
                    self.ev(Event::Fetched(Msg(s)))?;
                }
                if always_ok || !self.rng.pct(self.knobs.seek_fail) {
                    self.fetch.queue.clear();
                    self.fetch.pos = match o {
                        OFFSET_BEGINNING => 0,
                        OFFSET_END => END_POS,
                        o => o,
                    };
                    self.fetch.floor = self.fetch.pos;
                    self.seek_answered();
                    self.ev(Event::SeekDone { offset: o })?;
                } else {
                    self.stats.seek_failures += 1;
                    // Only the last seek is asked again (an older one was superseded).
                    let retry =
                        self.a.seeks == 1 && self.a.seek_pending == Some(o) && !self.a.revoked;
                    self.seek_answered();
                    self.ev(Event::SeekFailed { offset: o })?;
                    ensure!(
                        self.last_seeks.contains(&o) == retry,
                        "after SeekFailed({o}) the seek was asked again: {}, expected {retry}",
                        !retry
                    );
                }
            }
        }
        Ok(())
    }

    /// librdkafka answered the oldest pending seek.
    fn seek_answered(&mut self) {
        self.a.seeks = self.a.seeks.saturating_sub(1);
        if self.a.seeks == 0 {
            self.a.seek_pending = None;
        }
    }

    // ----- the worker -----

    fn attach(&mut self) -> R {
        self.begin("attach:".to_string());
        self.worker = Some(Worker {
            gen: self.a.gen,
            current: None,
            held: Vec::new(),
        });
        self.a.credit = true;
        if std::mem::take(&mut self.a.awaiting) {
            // The worker read the app's stored offset (here: what Kafka has committed) and
            // starts there; librdkafka started elsewhere (`auto.offset.reset`).
            let from = self.a.start;
            self.ev(Event::Start { from: Some(from) })?;
            let want = if self.a.revoked { vec![] } else { vec![from] };
            ensure!(
                self.last_seeks == want,
                "Start from {from} gave the seeks {:?}, not {want:?}",
                self.last_seeks
            );
            self.stats.started_from_worker += 1;
        } else if self.rng.pct(30) {
            self.ev(Event::Start { from: None })?;
        } else {
            self.ev(Event::WorkerAttached)?;
        }
        Ok(())
    }

    fn demand(&mut self) -> R {
        let gen = self.worker.as_ref().map_or(self.a.gen, |w| w.gen);
        let ok = self.a.cell.demand(gen);
        self.note(&format!(" demand({gen})={ok}"));
        ensure!(ok, "demand of the current generation {gen} refused");
        self.a.credit = true;
        self.ev(Event::Tick)?;
        Ok(())
    }

    fn worker_down(&mut self) -> R {
        self.begin("worker down:".to_string());
        self.stats.worker_downs += 1;
        let w = self.worker.take().expect("a worker");
        if !w.held.is_empty() {
            self.orphans.push((w.gen, w.held));
        }
        self.a.credit = false;
        if !self.a.revoked {
            // What is not acked goes to the next worker. During a replay the replayed offsets
            // are acked: the replay goes on from where it stands.
            let from = self.a.acked.map(|x| x + 1).or(self.a.first);
            if let (Some(f), Some(d)) = (from, self.a.max_delivered) {
                if f <= d {
                    self.a.next_exp = self.a.next_exp.min(f);
                }
            }
        }
        self.ev(Event::WorkerDown)?;
        Ok(())
    }

    /// Where a worker's `from` puts the partition back: after the ack, unless replaying.
    fn unacked_from(&self, from: i64) -> i64 {
        match self.a.acked {
            Some(x) if self.a.replay.is_none_or(|r| from > r) => from.max(x + 1),
            _ => from,
        }
    }

    fn redeliver(&mut self, from: i64) -> R {
        self.stats.redeliver_requests += 1;
        if !self.a.revoked {
            // Back to `f`; unless a seek put the delivery before it (a batch from before the
            // seek): `f` then comes again in order.
            let f = self.unacked_from(from);
            if self.a.max_delivered.is_some_and(|d| f <= d) {
                self.a.next_exp = self.a.next_exp.min(f);
            }
        }
        if let Some(w) = self.worker.as_mut() {
            w.held.retain(|&o| o < from);
        }
        self.ev(Event::Redeliver { from })?;
        Ok(())
    }

    /// The handler failed `batch` from `from` on (its first offset, or the first one it did
    /// not process).
    fn failed(&mut self, batch: &[i64], from: i64) -> R {
        self.expect_failure(batch, from);
        self.ev(Event::Failed { from })?;
        ensure!(
            self.a.expect_wait.is_none(),
            "Failed({from}) emitted no Wait({:?})",
            self.a.expect_wait
        );
        Ok(())
    }

    /// The reference's side of a failure of `batch` from `from`.
    fn expect_failure(&mut self, batch: &[i64], from: i64) {
        self.stats.failures += 1;
        let end = batch[batch.len() - 1];
        if !self.a.revoked {
            let f = self.unacked_from(from);
            if self.a.sought {
                // A batch from before a seek, which dropped it: nothing to retry.
                self.stats.failures_after_seek += 1;
            } else if f <= end {
                for &o in batch.iter().filter(|&&o| o >= f) {
                    self.fails[o as usize] += 1;
                }
                let failure = match self.a.failure {
                    Some(x) if x.head == f => MFailure {
                        attempts: x.attempts + 1,
                        ..x
                    },
                    Some(x) if x.start <= f && f <= x.until => MFailure {
                        head: f,
                        attempts: 2,
                        ..x
                    },
                    _ => MFailure {
                        start: f,
                        head: f,
                        attempts: 1,
                        until: end,
                    },
                };
                self.a.failure = Some(failure);
                let backoff = self.policy.backoff_after(failure.attempts);
                self.a.waiting = Some(backoff);
                self.a.expect_wait = Some(backoff);
                self.a.next_exp = self.a.next_exp.min(f);
                if let Some(w) = self.worker.as_mut() {
                    w.held.retain(|&o| o < f);
                }
            } else {
                // Everything was acked: nothing to retry, nothing failed.
                self.stats.failures_all_acked += 1;
            }
        }
    }

    /// The handler gave up on its last attempt at `o`: acks it, then tells the partition.
    /// The worker fails the last attempt of `[o]`; the case's `on_failure` decides.
    fn fail_last(&mut self, o: i64) -> R {
        self.begin(format!(
            "worker fails its last attempt [{o}] ({:?}):",
            self.policy.on_failure
        ));
        self.stats.gave_up += 1;
        // Revoked, dropped by a seek, or acked meanwhile: no verdict to give.
        if self.a.revoked || self.a.sought || self.unacked_from(o) != o {
            return self.failed(&[o], o);
        }
        match self.policy.on_failure {
            OnFailure::Retry => self.failed(&[o], o),
            OnFailure::Skip => {
                // The partition acks it itself.
                self.a.expect_verdict = Some(o);
                self.acked_to(o)?;
                self.a.skipped += 1;
                self.ev(Event::Failed { from: o })?;
                ensure!(
                    self.a.expect_verdict.is_none(),
                    "Failed({o}) on a last attempt did not skip it"
                );
                Ok(())
            }
            OnFailure::DeadLetter => {
                self.a.expect_verdict = Some(o);
                self.ev(Event::Failed { from: o })?;
                ensure!(
                    self.a.expect_verdict.is_none(),
                    "Failed({o}) on a last attempt did not hand it over to be dead-lettered"
                );
                if self.rng.pct(70) {
                    self.begin(format!("worker dead-lettered [{o}]:"));
                    self.acked_to(o)?;
                    self.a.dead_lettered += 1;
                    self.ev(Event::DeadLettered {
                        offset: o,
                        ok: true,
                    })
                    .map(|_| ())
                } else {
                    // The produce failed: a failure like any other (the reference is the
                    // one `failed` keeps), reported as such.
                    self.begin(format!("worker could not dead-letter [{o}]:"));
                    self.expect_failure(&[o], o);
                    self.ev(Event::DeadLettered {
                        offset: o,
                        ok: false,
                    })?;
                    ensure!(
                        self.a.expect_wait.is_none(),
                        "DeadLettered({o}, false) emitted no Wait({:?})",
                        self.a.expect_wait
                    );
                    Ok(())
                }
            }
        }
    }

    /// The reference's side of an ack of `off` that the partition makes itself.
    fn acked_to(&mut self, off: i64) -> R {
        let want = self.expect_ack(Some(self.a.gen), off);
        // (In a replay after a seek back, the message is acked already: nothing changes.)
        if want != AckOutcome::Advanced {
            ensure!(
                want == AckOutcome::Behind,
                "the partition's own ack of {off} would be {want:?}"
            );
            return Ok(());
        }
        self.advanced_to(off);
        Ok(())
    }

    /// The reference's ack moves to `off`. After a seek, what a later ack covers before it
    /// came again is done (the replayed offsets, at or below the ack of the seek's time, are
    /// not covered).
    fn advanced_to(&mut self, off: i64) {
        self.stats.acks_advanced += 1;
        let before = self.a.acked.replace(off);
        if let Some(t) = self.since_from {
            let lo = before.map_or(t, |b| t.max(b + 1));
            for &o in self.log.range(lo, off) {
                if self.since[o as usize] == 0 && !self.since_exempt[o as usize] {
                    self.since_exempt[o as usize] = true;
                    self.stats.acked_before_redelivery += 1;
                }
            }
        }
    }

    /// A random seek target: back, forward, beyond the log, or logical.
    fn seek_target(&mut self) -> i64 {
        let len = self.delivered.len() as i64 - 1;
        let cur = self.a.max_delivered.unwrap_or(self.a.start);
        match self.rng.below(20) {
            0 | 1 => OFFSET_BEGINNING,
            2 => OFFSET_END,
            3..=10 => (cur - self.rng.int(0, 80)).max(0),
            11..=16 => cur + self.rng.int(0, 60),
            _ => self.rng.int(0, len + 10),
        }
    }

    /// The handler wants the partition to go on from `offset`.
    fn seek_to(&mut self, offset: i64) -> R {
        self.stats.handler_seeks += 1;
        let revoked = self.a.revoked;
        if !revoked {
            let t = match offset {
                OFFSET_BEGINNING => 0,
                OFFSET_END => END_POS,
                o => o,
            };
            if offset < 0 {
                self.stats.seeks_logical += 1;
            }
            // Offsets never delivered that the seek jumps over are the handler's to skip.
            let lo = self.a.max_delivered.map_or(self.a.start, |d| d + 1);
            for &o in self.log.range(lo, t - 1) {
                self.seek_skipped[o as usize] = true;
            }
            let a = &mut self.a;
            a.failure = None;
            a.waiting = None;
            a.replay = a.acked.filter(|&r| t <= r);
            if a.replay.is_some() {
                self.stats.seeks_back += 1;
            }
            a.next_exp = t;
            a.last_seek = Some(offset);
            a.sought = true;
            a.handler_seeks = true;
            self.since.fill(0);
            self.since_from = Some(t);
            self.since_exempt.fill(false);
        }
        self.ev(Event::SeekTo { offset })?;
        ensure!(
            self.last_seeks.contains(&offset) != revoked,
            "SeekTo({offset}) (revoked: {revoked}) gave the seeks {:?}",
            self.last_seeks
        );
        if !revoked {
            ensure!(
                self.a.p.held() == 0,
                "holds {} messages after SeekTo({offset})",
                self.a.p.held()
            );
        }
        Ok(())
    }

    fn retry_due(&mut self) -> R {
        self.begin("backoff over:".to_string());
        self.retry_timer = false;
        self.stats.retry_dues += 1;
        if self.a.waiting.is_none() {
            self.stats.stale_retry_dues += 1;
        }
        self.a.waiting = None;
        self.ev(Event::RetryDue)?;
        Ok(())
    }

    fn maybe_demand(&mut self, p: u64) -> R {
        if !self.a.credit && self.rng.pct(p) {
            self.demand()?;
        }
        Ok(())
    }

    /// The worker handles the batch it was given last.
    fn handle_batch(&mut self) -> R {
        let (gen, cur) = {
            let w = self.worker.as_mut().expect("a worker");
            (w.gen, w.current.take().expect("a batch"))
        };
        let batch = cur.offs.clone();
        let last = *batch.last().expect("non-empty");
        if self.rng.pct(self.knobs.seek) {
            let t = self.seek_target();
            self.begin(format!(
                "worker seeks to {t} on {} (attempt {}):",
                fmt_offsets(&batch),
                cur.attempt
            ));
            self.seek_to(t)?;
            return self.maybe_demand(80);
        }
        if cur.last && self.rng.pct(self.knobs.give_up) {
            self.fail_last(batch[0])?;
            return self.maybe_demand(80);
        }
        if cur.last && self.rng.pct(self.knobs.fail) {
            // A last attempt that fails: the policy's.
            self.fail_last(batch[0])?;
            return self.maybe_demand(80);
        }
        if !cur.last && self.rng.pct(self.knobs.fail) {
            // Maybe after acking part of it (rarely all of it).
            let k = if self.rng.pct(8) {
                batch.len()
            } else {
                self.rng.below(batch.len() as u64) as usize
            };
            self.begin(format!(
                "worker fails {} (attempt {}) after acking {k}:",
                fmt_offsets(&batch),
                cur.attempt
            ));
            if k > 0 {
                self.ack("worker", Some(gen), batch[k - 1])?;
            }
            // From the batch's start, or from the first offset it did not process.
            let from = if k < batch.len() && self.rng.pct(25) {
                batch[k]
            } else {
                batch[0]
            };
            self.failed(&batch, from)?;
            return self.maybe_demand(80);
        }
        let roll = self.rng.below(100);
        let full = self.knobs.full_ack;
        let rest = 100 - full;
        if roll < full {
            self.begin(format!("worker acks all of {}:", fmt_offsets(&batch)));
            self.ack("worker", Some(gen), last)?;
            self.maybe_demand(85)?;
        } else if roll < full + rest * 35 / 100 {
            // Acks the first k messages (maybe none) and wants the rest again.
            let k = self.rng.below(batch.len() as u64) as usize;
            self.begin(format!(
                "worker acks {k} of {} and redelivers:",
                fmt_offsets(&batch)
            ));
            let from = if k > 0 {
                self.ack("worker", Some(gen), batch[k - 1])?;
                batch[k - 1] + 1
            } else {
                batch[0]
            };
            self.redeliver(from)?;
            self.maybe_demand(85)?;
        } else if roll < full + rest * 60 / 100 {
            self.begin(format!("worker keeps {} unacked:", fmt_offsets(&batch)));
            self.maybe_demand(70)?;
        } else if roll < full + rest * 85 / 100 {
            let o = batch[self.rng.below(batch.len() as u64) as usize];
            self.begin(format!("worker acks up to {o} of {}:", fmt_offsets(&batch)));
            self.ack("worker", Some(gen), o)?;
            self.maybe_demand(70)?;
        } else {
            self.begin(format!("worker strays on {}:", fmt_offsets(&batch)));
            self.worker.as_mut().expect("a worker").current = Some(cur);
            self.stray_acks()?;
        }
        Ok(())
    }

    /// Acks that must not count.
    fn stray_acks(&mut self) -> R {
        let gen = self.a.gen;
        let n = self.rng.int(1, 3);
        for _ in 0..n {
            let any = self.rng.int(0, MAX_LOG + 5);
            match self.rng.below(6) {
                0 => {
                    let g = if self.rng.pct(50) {
                        gen + self.rng.int(1, 3) as i32
                    } else {
                        gen - self.rng.int(1, 3) as i32
                    };
                    let got = self.ack("stray", Some(g), any)?;
                    ensure!(
                        matches!(got, AckOutcome::StaleGeneration { .. }),
                        "ack of generation {g} (not {gen}) counted: {got:?}"
                    );
                }
                1 => {
                    let off = self.worker_offset().unwrap_or(any);
                    self.ack("stray", None, off)?;
                }
                2 => {
                    let off = self.a.max_delivered.map_or(0, |d| d + 1) + self.rng.int(0, 5);
                    let got = self.ack("stray", Some(gen), off)?;
                    ensure!(
                        matches!(got, AckOutcome::Undelivered { .. }),
                        "ack of {off} beyond the last delivered {:?} counted: {got:?}",
                        self.a.max_delivered
                    );
                }
                3 => {
                    let first = self.a.first.filter(|&f| f > 0);
                    if let Some(first) = first.filter(|_| self.a.max_delivered.is_some()) {
                        let off = self.rng.int(0, first - 1);
                        let got = self.ack("stray", Some(gen), off)?;
                        ensure!(
                            got == AckOutcome::Behind,
                            "ack of {off} below the first offset {first}: {got:?}"
                        );
                    }
                }
                4 => {
                    if let Some(x) = self.a.acked {
                        let off = self.rng.int(self.a.first.unwrap_or(0), x);
                        let got = self.ack("stray", Some(gen), off)?;
                        ensure!(
                            got == AckOutcome::Behind,
                            "ack of {off} at or below the ack {x}: {got:?}"
                        );
                    }
                }
                _ => {
                    let g = gen - self.rng.int(1, 3) as i32;
                    let ok = self.a.cell.demand(g);
                    self.note(&format!(" stray:demand({g})={ok}"));
                    ensure!(!ok, "demand of generation {g} accepted by generation {gen}");
                    self.ev(Event::Tick)?;
                }
            }
        }
        Ok(())
    }

    fn worker_offset(&mut self) -> Option<i64> {
        let w = self.worker.as_ref()?;
        if w.held.is_empty() {
            return None;
        }
        let i = self.rng.below(w.held.len() as u64) as usize;
        Some(w.held[i])
    }

    /// A task of a dead worker (or of an earlier assignment) acks what it was given.
    fn orphan_ack(&mut self) -> R {
        let i = self.rng.below(self.orphans.len() as u64) as usize;
        let (gen, ref offs) = self.orphans[i];
        let off = offs[self.rng.below(offs.len() as u64) as usize];
        self.begin("outlived task:".to_string());
        self.stats.orphan_acks += 1;
        let got = self.ack("task", Some(gen), off)?;
        if gen != self.a.gen {
            ensure!(
                matches!(got, AckOutcome::StaleGeneration { .. }),
                "ack of generation {gen} counted in generation {}",
                self.a.gen
            );
        }
        if self.rng.pct(30) {
            self.orphans.swap_remove(i);
        }
        Ok(())
    }

    // ----- commits -----

    fn commit_due(&mut self) -> R {
        let due = self.a.p.commit_due();
        self.begin(format!("commit_due: {due:?}"));
        if let Some(o) = due {
            ensure!(
                self.a.acked.is_some_and(|x| o == x + 1),
                "commit_due {o} is not the highest valid ack {:?} + 1",
                self.a.acked
            );
            ensure!(
                self.a.max_delivered.is_some_and(|d| o <= d + 1),
                "commit_due {o} beyond the last delivered {:?} + 1",
                self.a.max_delivered
            );
            ensure!(
                self.a.committed.is_none_or(|c| o > c),
                "commit_due {o} not beyond the committed {:?}",
                self.a.committed
            );
            self.a.pending_commits.push(o);
        }
        self.check()
    }

    fn complete_commit(&mut self, i: usize, ok: bool) -> R {
        let o = self.a.pending_commits.swap_remove(i);
        if ok {
            self.stats.commits_ok += 1;
            self.a.committed = Some(self.a.committed.map_or(o, |c| c.max(o)));
            self.kafka_committed = self.kafka_committed.max(o);
        } else {
            self.stats.commits_failed += 1;
        }
        self.ev(Event::Committed { offset: o, ok })?;
        Ok(())
    }

    // ----- revoke and reassign -----

    fn revoke(&mut self) -> R {
        self.begin("revoke:".to_string());
        self.stats.revokes += 1;
        self.a.revoked = true;
        self.a.credit = false;
        self.ev(Event::Revoke)?;
        Ok(())
    }

    /// Kafka hands the partition to its next owner (a new generation) at the committed offset.
    fn reassign(&mut self) -> R {
        self.begin("reassign: old commits end:".to_string());
        while !self.a.pending_commits.is_empty() {
            let i = self.rng.below(self.a.pending_commits.len() as u64) as usize;
            let ok = !self.rng.pct(self.knobs.commit_fail);
            self.complete_commit(i, ok)?;
        }
        self.stats.reassigns += 1;
        if let Some(w) = self.worker.take() {
            if !w.held.is_empty() {
                self.orphans.push((w.gen, w.held));
            }
        }
        let gen = self.a.gen + self.rng.int(1, 2) as i32;
        let accepts_none = self.rng.pct(20);
        let start = self.kafka_committed;
        self.note(&format!(
            " new generation {gen} (no-generation acks: {accepts_none}) from {start}"
        ));
        self.a = Assignment::new(
            gen,
            accepts_none,
            start,
            self.max_backlog,
            self.max_batch,
            self.policy,
            self.elsewhere,
            self.max_bytes,
        );
        // With offsets elsewhere librdkafka starts at `auto.offset.reset` (the log start or
        // its end) until the worker's start seek.
        self.fetch = Fetcher::new(if self.elsewhere {
            self.reset_position()
        } else {
            start
        });
        // ... paused there by the glue at the assignment, until the start seek is confirmed.
        self.fetch.paused = self.elsewhere;
        // The partition's slot, and its backoff timer, went with the old assignment.
        self.retry_timer = false;
        // A seek is not kept over a rebalance: the new owner starts at the commit.
        if self.since_from.is_some() {
            self.since.fill(0);
            self.since_from = Some(start);
            self.since_exempt.fill(false);
        }
        self.check()
    }

    fn reset_position(&mut self) -> i64 {
        if self.rng.pct(50) {
            0
        } else {
            END_POS
        }
    }

    // ----- the random phase -----

    fn step(&mut self, step: i64, steps: i64) -> R {
        if !self.a.revoked {
            let late = step * 4 >= steps * 3;
            if (late && self.rng.pct(2)) || self.rng.below(1000) < 2 {
                return self.revoke();
            }
        }
        #[derive(Clone, Copy)]
        enum A {
            Poll,
            Prefetch,
            Ctrl,
            Handle,
            Demand,
            Down,
            Attach,
            Orphan,
            Stray,
            CommitDue,
            Complete,
            Watermark,
            Tick,
            Reassign,
            RetryDue,
            Seek,
        }
        let has_worker = self.worker.is_some();
        let has_batch = self.worker.as_ref().is_some_and(|w| w.current.is_some());
        let k = self.knobs;
        let table = [
            (30, A::Poll),
            (6, A::Prefetch),
            (
                if self.fetch.ctrl.is_empty() {
                    0
                } else {
                    k.ctrl
                },
                A::Ctrl,
            ),
            (if has_batch { 16 } else { 0 }, A::Handle),
            (if has_worker && !self.a.credit { 8 } else { 0 }, A::Demand),
            (if has_worker { k.down } else { 0 }, A::Down),
            (if has_worker { 0 } else { 8 }, A::Attach),
            (if self.orphans.is_empty() { 0 } else { 3 }, A::Orphan),
            (k.stray, A::Stray),
            (6, A::CommitDue),
            (
                if self.a.pending_commits.is_empty() {
                    0
                } else {
                    5
                },
                A::Complete,
            ),
            (2, A::Watermark),
            (2, A::Tick),
            (if self.a.revoked { 12 } else { 0 }, A::Reassign),
            (if self.retry_timer { k.retry } else { 0 }, A::RetryDue),
            (if has_worker { k.seek / 2 } else { 0 }, A::Seek),
        ];
        let total: u64 = table.iter().map(|(w, _)| *w).sum();
        let mut r = self.rng.below(total);
        let mut action = A::Tick;
        for (w, a) in table {
            if r < w {
                action = a;
                break;
            }
            r -= w;
        }
        match action {
            A::Poll => {
                let n = self.rng.int(1, k.poll_max);
                self.poll(n)
            }
            A::Prefetch => {
                self.prefetch();
                Ok(())
            }
            A::Ctrl => {
                let n = self.rng.int(1, 3);
                for _ in 0..n {
                    self.apply_ctrl(false)?;
                }
                Ok(())
            }
            A::Handle => self.handle_batch(),
            A::Demand => {
                self.begin("worker:".to_string());
                self.demand()
            }
            A::Down => self.worker_down(),
            A::Attach => self.attach(),
            A::Orphan => self.orphan_ack(),
            A::Stray => {
                self.begin("strays:".to_string());
                self.stray_acks()
            }
            A::CommitDue => self.commit_due(),
            A::Complete => {
                let i = self.rng.below(self.a.pending_commits.len() as u64) as usize;
                let ok = !self.rng.pct(k.commit_fail);
                self.begin("commit ends:".to_string());
                self.complete_commit(i, ok)
            }
            A::Watermark => {
                let h = self.rng.int(0, MAX_LOG + 10);
                self.begin("watermark:".to_string());
                self.ev(Event::Watermark(h))?;
                ensure!(
                    self.a.p.high_watermark() == Some(h),
                    "high_watermark not {h}"
                );
                if let Some(lag) = self.a.p.lag() {
                    ensure!(lag >= 0, "negative lag {lag}");
                }
                Ok(())
            }
            A::Tick => {
                self.begin("tick:".to_string());
                self.ev(Event::Tick).map(|_| ())
            }
            A::Reassign => self.reassign(),
            A::RetryDue => self.retry_due(),
            A::Seek => {
                // Between batches (a backoff may be running).
                let t = self.seek_target();
                self.begin(format!("worker seeks to {t}:"));
                self.seek_to(t)
            }
        }
    }

    // ----- the drain -----

    /// The worker acks every batch, librdkafka does everything asked, the fetcher runs to the
    /// end of the log: everything must end up delivered, acked and committed.
    fn drain(&mut self) -> R {
        if self.a.revoked {
            self.reassign()?;
        }
        self.begin("== drain ==".to_string());
        let mut rounds = 0;
        loop {
            rounds += 1;
            ensure!(
                rounds < 20_000,
                "the drain does not end: backlog {}, held {}, acked {:?}, last delivered {:?}, paused {}, fetcher at {} (paused {}), worker holds {:?}",
                self.a.p.backlog_len(),
                self.a.p.held(),
                self.a.acked,
                self.a.max_delivered,
                self.a.paused,
                self.fetch.pos,
                self.fetch.paused,
                self.worker.as_ref().map(|w| w.held.len())
            );
            while !self.fetch.ctrl.is_empty() {
                self.apply_ctrl(true)?;
            }
            if self.retry_timer {
                self.retry_due()?;
            }
            if self.worker.is_none() {
                self.attach()?;
            }
            let (gen, top) = {
                let w = self.worker.as_mut().expect("attached");
                w.current = None;
                let top = w.held.iter().copied().max();
                w.held.clear();
                (w.gen, top)
            };
            self.begin("drain worker:".to_string());
            // (After a seek to the beginning, offsets below the assignment's first one are
            // replayed: acks of them are behind.)
            if let Some(top) = top.filter(|&t| self.a.first.is_some_and(|f| t >= f)) {
                if self.a.acked.is_none_or(|x| top > x) {
                    let got = self.ack("worker", Some(gen), top)?;
                    ensure!(got == AckOutcome::Advanced, "drain ack of {top}: {got:?}");
                }
            }
            if !self.a.credit {
                self.demand()?;
            }
            self.poll(32)?;
            self.commit_due()?;
            while !self.a.pending_commits.is_empty() {
                self.begin("commit ends:".to_string());
                self.complete_commit(0, true)?;
            }
            let done = self.fetch.ctrl.is_empty()
                && self.fetch.queue.is_empty()
                && self.log.ceil(self.fetch.pos).is_none()
                && self.a.p.backlog_len() == 0
                && self.a.p.drained()
                && self.a.p.backoff().is_none()
                && self.a.credit
                && self.worker.as_ref().is_some_and(|w| w.held.is_empty());
            if done {
                break;
            }
        }
        self.final_checks()
    }

    fn final_checks(&mut self) -> R {
        for &o in self.log.range(self.s0, i64::MAX) {
            ensure!(
                self.delivered[o as usize] > 0 || self.seek_skipped[o as usize],
                "offset {o} was never delivered"
            );
        }
        if let Some(t) = self.since_from {
            for &o in self.log.range(t, i64::MAX) {
                ensure!(
                    self.since[o as usize] > 0 || self.since_exempt[o as usize],
                    "offset {o} was not delivered since the seek to {t} (or the reassignment after it)"
                );
            }
        }
        let last = self.log.offs.last().copied();
        // Everything from the start (or the last seek target) on was delivered and acked.
        // After a seek beyond the log, what was dropped may stay unacked (nobody holds it).
        let required_from = self.since_from.unwrap_or(self.a.start);
        let expect = match last {
            Some(l) if l >= required_from && l >= self.a.start => Some(l),
            _ if self.a.sought => self.a.p.acked(),
            _ => self.a.max_delivered,
        };
        ensure!(
            self.a.p.acked() == expect,
            "after the drain the ack is {:?}, not the last offset {expect:?}",
            self.a.p.acked()
        );
        ensure!(
            self.a.p.committed() == expect.map(|l| l + 1),
            "after the drain committed is {:?}, not {:?}",
            self.a.p.committed(),
            expect.map(|l| l + 1)
        );
        ensure!(
            self.a.p.held() == 0,
            "still holds {} messages",
            self.a.p.held()
        );
        ensure!(self.a.p.drained(), "not drained");
        Ok(())
    }
}

fn run_case(seed: u64, case: u64, lines: &mut Vec<String>, stats: &mut Stats) -> R {
    let mut rng = Rng(case_seed(seed, case));
    let len = rng.int(0, MAX_LOG);
    let gap = rng.pick(&[0, 0, 0, 0, 0, 0, 10, 30, 60, 90]);
    let offs: Vec<i64> = (0..len).filter(|_| !rng.pct(gap)).collect();
    let max_backlog = rng.int(1, 50) as usize;
    let max_batch = rng.int(1, 60) as usize;
    let s0 = if rng.pct(70) { 0 } else { rng.int(0, len) };
    let gen = rng.int(1, 5) as i32;
    let accepts_none = rng.pct(20);
    let steps = rng.int(1, MAX_STEPS);
    let elsewhere = rng.pct(30);
    let max_bytes = rng.pct(40).then(|| rng.int(1, 600) as usize);
    let reset = if rng.pct(50) { 0 } else { END_POS };
    let knobs = Knobs {
        down: rng.pick(&[0, 1, 2, 4, 8]),
        stray: rng.pick(&[0, 2, 5]),
        full_ack: rng.pick(&[30, 50, 70, 90]),
        seek_fail: rng.pick(&[0, 10, 30]),
        commit_fail: rng.pick(&[0, 20, 50]),
        poll_max: rng.pick(&[4, 24, 64]),
        ctrl: rng.pick(&[4, 12, 30]),
        fail: rng.pick(&[0, 5, 15, 30]),
        give_up: rng.pick(&[20, 50, 80]),
        seek: rng.pick(&[0, 0, 2, 6]),
        retry: rng.pick(&[3, 10, 30]),
    };
    let backoff = Duration::from_millis(rng.int(1, 40) as u64);
    let policy = RetryPolicy {
        max_attempts: if rng.pct(25) {
            None
        } else {
            Some(rng.int(1, 4) as u32)
        },
        backoff,
        max_backoff: backoff * rng.int(1, 10) as u32,
        on_failure: rng.pick(&[OnFailure::Retry, OnFailure::Skip, OnFailure::DeadLetter]),
    };
    lines.push(format!(
        "case {case}: log 0..{len} ({} offsets, gaps {gap}%), start {s0}, max_backlog {max_backlog}, max_batch {max_batch}, generation {gen} (no-generation acks: {accepts_none}), {steps} steps, {knobs:?}, {policy:?}",
        offs.len()
    ));
    stats.cases += 1;
    let mut sim = Sim {
        rng,
        max_bytes,
        elsewhere,
        log: Log { offs },
        max_backlog,
        max_batch,
        s0,
        a: Assignment::new(
            gen,
            accepts_none,
            s0,
            max_backlog,
            max_batch,
            policy,
            elsewhere,
            max_bytes,
        ),
        fetch: Fetcher {
            paused: elsewhere,
            ..Fetcher::new(if elsewhere { reset } else { s0 })
        },
        worker: None,
        orphans: Vec::new(),
        delivered: vec![0; (len + 1) as usize],
        kafka_committed: s0,
        knobs,
        lines,
        stats,
        last_seeks: Vec::new(),
        policy,
        fails: vec![0; (len + 1) as usize],
        seek_skipped: vec![false; (len + 1) as usize],
        since: vec![0; (len + 1) as usize],
        since_from: None,
        since_exempt: vec![false; (len + 1) as usize],
        retry_timer: false,
    };
    for step in 0..steps {
        sim.step(step, steps)?;
    }
    sim.drain()
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".to_string()
    }
}

#[test]
fn partition_model() {
    let seed = env_u64("OTTLA_MODEL_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_u64("OTTLA_MODEL_CASES").unwrap_or(DEFAULT_CASES);
    let only = env_u64("OTTLA_MODEL_CASE");
    println!("partition_model: OTTLA_MODEL_SEED={seed:#x}");
    let started = Instant::now();
    let mut stats = Stats::default();
    let range = match only {
        Some(c) => c..c + 1,
        None => 0..cases,
    };
    for case in range {
        let mut lines = Vec::new();
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            run_case(seed, case, &mut lines, &mut stats)
        }));
        let failure = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(p) => panic_message(p),
        };
        eprintln!("partition_model FAILED: seed {seed:#x}, case {case}: {failure}");
        eprintln!("steps ({}):", lines.len());
        for (i, l) in lines.iter().enumerate() {
            eprintln!("{i:5} {l}");
        }
        eprintln!("failure: {failure}");
        panic!(
            "partition model: {failure}\nreplay: OTTLA_MODEL_SEED={seed:#x} OTTLA_MODEL_CASE={case}"
        );
    }
    println!(
        "partition_model: {} cases in {:.2?}: {stats:#?}",
        stats.cases,
        started.elapsed()
    );
}
