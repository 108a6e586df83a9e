//! [`Partition`]: the state machine of one assigned partition, the single source of truth
//! for its backlog, the worker's demand, what was delivered, acked and committed, and whether
//! librdkafka should pause, resume or seek it.
//!
//! It takes [`Event`]s and returns [`Effect`]s; the NIF's glue applies the effects (sends a
//! batch, calls librdkafka) and reports back what happened (a seek or commit done). Acks and
//! demand arrive through the partition's [`AckCell`] (lock-free, see its module), which the
//! partition reads back at every event: nothing else keeps a copy of them.
//!
//! Memory: a partition holds at most `2 × max_backlog` messages. The backlog (fetched, not
//! delivered) is paused at `max_backlog` and resumed at half of it; delivered messages are
//! kept until acked (at most `max_backlog` of them) so that a partial ack or a worker's
//! death redelivers from memory instead of fetching again. Only when a redelivery needs
//! messages that are no longer kept does the partition seek back.
//!
//! Failures: a batch the handler failed is retried after a backoff (doubling up to a bound)
//! while other partitions go on; retries go one message at a time until the failing message
//! is isolated, so a poison message does not take its neighbours down with it. A message's
//! attempt `max_attempts` (the failed batch counts as its first) is delivered alone as its
//! *last attempt*: when that fails too, [`OnFailure`] decides: retried again, skipped (acked
//! here, [`Effect::Skipped`]), or handed to the worker to dead-letter ([`Effect::DeadLetter`],
//! acked once it reports the produce confirmed). The worker keeps no policy of its own.
//!
//! Seeks: the handler may move the partition (`Event::SeekTo`); after a seek back, the offsets
//! at or below the ack of that time are delivered again (a *replay*), although acks of them
//! cannot count (the ack never moves backwards) and they are not kept in memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::cell::AckCell;

/// `Event::SeekTo` to the log start or end instead of an offset (librdkafka's logical offsets).
pub const OFFSET_BEGINNING: i64 = -2;
pub const OFFSET_END: i64 = -1;

/// What becomes of a message whose last attempt failed (`:on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Retried again, with the backoff, for as long as it fails.
    #[default]
    Retry,
    /// Acked and counted as skipped ([`Effect::Skipped`] says so).
    Skip,
    /// Handed to the worker to produce to the dead-letter topic ([`Effect::DeadLetter`]); acked
    /// once it reports the produce confirmed ([`Event::DeadLettered`]), retried otherwise.
    DeadLetter,
}

/// How failed batches are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The attempt number (the failed batch being the first) from which a message delivered
    /// alone is marked as its last attempt; `None`: never.
    pub max_attempts: Option<u32>,
    /// The first backoff; it doubles with each further attempt.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// What becomes of a message whose last attempt failed.
    pub on_failure: OnFailure,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: None,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            on_failure: OnFailure::Retry,
        }
    }
}

impl RetryPolicy {
    /// The backoff before attempt `attempt + 1`, after `attempt` failures.
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// The failure being worked through: where it happened and how often the message at `head`
/// failed. Messages from `start` up to `until` (the first failed batch, less what was acked)
/// go one at a time.
#[derive(Debug, Clone, Copy)]
struct Failure {
    start: i64,
    head: i64,
    attempts: u32,
    until: i64,
}

/// A message only needs its offset for the bookkeeping, and its size for the byte bound.
pub trait Offset {
    fn offset(&self) -> i64;

    /// The bytes it holds (key, value, headers and bookkeeping), for the byte bound.
    fn size(&self) -> usize {
        0
    }
}

#[derive(Debug)]
pub enum Event<M> {
    /// A message read from Kafka.
    Fetched(M),
    /// A worker process took the partition over and wants its first batch.
    WorkerAttached,
    /// A worker process took the partition over, going on from `from` (an offset, or
    /// [`OFFSET_BEGINNING`] / [`OFFSET_END`]; `None`: where librdkafka starts). A partition
    /// that [awaits its start](Partition::awaiting_start) takes nothing in before this, and
    /// nothing after it until librdkafka confirms the seek: what it fetched before is never
    /// delivered and never sets the low mark of the acks. On a partition already started, a
    /// `from` is a seek like [`Event::SeekTo`].
    Start { from: Option<i64> },
    /// The worker is gone: what it did not ack goes to the next worker.
    WorkerDown,
    /// The worker acked part of its batch and wants the rest again, from `from`.
    Redeliver { from: i64 },
    /// The partition is being revoked: nothing more is delivered or kept.
    Revoke,
    /// The handler failed the batch delivered last, from `from` on (what it acked before stays
    /// acked). Ignored when nothing of it is left unacked, or a `SeekTo` dropped it.
    Failed { from: i64 },
    /// The backoff asked for by [`Effect::Wait`] is over.
    RetryDue,
    /// The handler wants the partition to go on from `offset` (forwards or backwards, or
    /// [`OFFSET_BEGINNING`] / [`OFFSET_END`]): what was fetched before is dropped.
    SeekTo { offset: i64 },
    /// The worker produced the message at `offset` to the dead-letter topic, as an
    /// [`Effect::DeadLetter`] asked: `ok` when the produce was confirmed (the message is then
    /// acked), otherwise it is retried like a failure.
    DeadLettered { offset: i64, ok: bool },
    /// librdkafka sought to `offset`.
    SeekDone { offset: i64 },
    /// The seek to `offset` failed: it is asked for again.
    SeekFailed { offset: i64 },
    /// A commit of `offset` (the next offset to read) ended.
    Committed { offset: i64, ok: bool },
    /// The partition's high watermark as librdkafka last saw it.
    Watermark(i64),
    /// librdkafka's position: the next offset it will hand over, past records it hands to
    /// no one (transaction markers, aborted transactions' messages). Read after everything it
    /// handed over was taken in.
    Position(i64),
    /// Acks or demand may have arrived through the cell.
    Tick,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Effect<M> {
    /// Send this batch to the worker.
    Deliver(Vec<M>),
    /// Stop fetching this partition.
    Pause,
    /// Fetch it again.
    Resume,
    /// Fetch from this offset next; what librdkafka fetched before is dropped until
    /// [`Event::SeekDone`].
    Seek(i64),
    /// Deliver nothing until [`Event::RetryDue`], which the glue sends after about this long
    /// (it adds jitter).
    Wait(Duration),
    /// The message at this offset failed its last attempt and was skipped (acked) as the
    /// policy says: for the worker to log.
    Skipped(i64),
    /// The message at this offset failed its last attempt: the worker is to produce it to the
    /// dead-letter topic and report [`Event::DeadLettered`].
    DeadLetter(i64),
}

/// What became of a fetched message (for counters and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Added,
    /// Below the next expected offset (fetched again after a seek or a pause), or already
    /// acked.
    Duplicate,
    /// Fetched before a pending seek, or while revoking: dropped.
    Discarded,
    /// The backlog was full: dropped, and a seek back to it was asked for.
    Overflow,
}

#[derive(Debug)]
pub struct Partition<M> {
    cell: Arc<AckCell>,
    max_backlog: usize,
    max_batch: usize,
    /// Fetched, not delivered yet, in offset order.
    backlog: VecDeque<M>,
    /// Delivered, not acked yet, in offset order; the oldest are dropped past `max_backlog`.
    in_flight: VecDeque<M>,
    /// Every unacked delivered message from this offset on is in `in_flight`.
    kept_from: Option<i64>,
    acked: Option<i64>,
    /// The first offset seen in this assignment: acks below it are not ours to commit.
    first: Option<i64>,
    /// The next offset expected from librdkafka; lower ones are duplicates.
    next_fetch: Option<i64>,
    last_delivered: Option<i64>,
    /// The last offset of the batch delivered last: the batch a `Failed` is about.
    batch_end: Option<i64>,
    worker: bool,
    demand: bool,
    revoking: bool,
    /// Whether a `Pause` is in effect (emitted and not followed by a `Resume`).
    paused: bool,
    /// The last `Seek` emitted, while some is not answered yet.
    seeking: Option<i64>,
    /// `Seek`s emitted and not answered yet (they are answered in order): two seeks to the
    /// same offset with another between must not end the wait at the first answer.
    seeks: u32,
    committed: Option<i64>,
    committing: Option<i64>,
    high_watermark: Option<i64>,
    overflows: u64,
    policy: RetryPolicy,
    failure: Option<Failure>,
    /// A backoff is running: nothing is delivered until `RetryDue`.
    waiting: Option<Duration>,
    /// The attempt number of the batch last delivered, and whether it is the last attempt.
    attempt: u32,
    last_attempt: bool,
    skipped: u64,
    dead_lettered: u64,
    last_seek: Option<i64>,
    /// After a seek back, offsets up to here are delivered again although acked.
    replay_until: Option<i64>,
    /// A handler's seek dropped what was delivered, and nothing was delivered since: no ack is
    /// awaited (what was dropped may never be acked, e.g. after a seek to the end).
    sought: bool,
    /// The position to start from is not known yet (offsets kept elsewhere): nothing is taken
    /// in until [`Event::Start`].
    awaiting_start: bool,
    /// The offset handed to the worker to dead-letter, until it reports.
    dead_letter: Option<i64>,
    /// librdkafka's position when it had gone past the last acked message over records that
    /// are never delivered (a transaction's marker, aborted messages), with nothing else to
    /// process before it: the next offset to commit, and where the lag counts from.
    passed: Option<i64>,
    /// The bytes of the backlog's messages, and of the delivered ones kept.
    backlog_bytes: usize,
    kept_bytes: usize,
    /// This partition's share of its consumer's byte budget: it is paused while its backlog
    /// holds that much (as at `max_backlog` messages), and keeps at most that much of what
    /// it delivered.
    max_bytes: usize,
}

impl<M: Offset + Clone> Partition<M> {
    pub fn new(cell: Arc<AckCell>, max_backlog: usize, max_batch: usize) -> Self {
        Partition {
            cell,
            max_backlog: max_backlog.max(1),
            max_batch: max_batch.max(1),
            backlog: VecDeque::new(),
            in_flight: VecDeque::new(),
            kept_from: None,
            acked: None,
            first: None,
            next_fetch: None,
            last_delivered: None,
            batch_end: None,
            worker: false,
            demand: false,
            revoking: false,
            paused: false,
            seeking: None,
            seeks: 0,
            committed: None,
            committing: None,
            high_watermark: None,
            overflows: 0,
            policy: RetryPolicy::default(),
            failure: None,
            waiting: None,
            attempt: 0,
            last_attempt: false,
            skipped: 0,
            dead_lettered: 0,
            last_seek: None,
            replay_until: None,
            sought: false,
            awaiting_start: false,
            dead_letter: None,
            passed: None,
            backlog_bytes: 0,
            kept_bytes: 0,
            max_bytes: usize::MAX,
        }
    }

    /// Sets the partition's share of the consumer's byte budget (the glue divides the budget
    /// among the assigned partitions at every assignment): pauses or resumes as it now must.
    pub fn set_max_bytes(&mut self, max_bytes: usize, effects: &mut Vec<Effect<M>>) {
        self.max_bytes = max_bytes.max(1);
        if self.full() && !self.revoking {
            self.pause(effects);
        } else {
            self.maybe_resume(effects);
        }
    }

    /// The backlog reached `max_backlog` messages or `max_bytes`.
    fn full(&self) -> bool {
        self.backlog.len() >= self.max_backlog || self.backlog_bytes >= self.max_bytes
    }

    fn recount(&mut self) {
        self.backlog_bytes = self.backlog.iter().map(M::size).sum();
        self.kept_bytes = self.in_flight.iter().map(M::size).sum();
    }

    fn clear_held(&mut self) {
        self.backlog.clear();
        self.in_flight.clear();
        self.backlog_bytes = 0;
        self.kept_bytes = 0;
    }

    /// The partition starts where its worker says ([`Event::Start`]), not where librdkafka
    /// starts: offsets kept elsewhere. It starts paused (the glue pauses it in librdkafka at
    /// the assignment, before anything is fetched: see the glue's `hold_for_start` for why),
    /// and fetching resumes only once librdkafka has confirmed the seek to the start position.
    pub fn awaiting_start(mut self) -> Self {
        self.awaiting_start = true;
        self.paused = true;
        self
    }

    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Handles one event, appending what must be done to `effects`. Returns what became of a
    /// fetched message (`Intake::Added` for other events).
    ///
    /// A fetched message is only queued: messages come in runs, and the batch goes out on the
    /// next other event (the glue sends a [`Event::Tick`] after each run).
    pub fn handle(&mut self, event: Event<M>, effects: &mut Vec<Effect<M>>) -> Intake {
        if let Event::Fetched(message) = event {
            return self.fetched(message, effects);
        }
        self.absorb();
        match event {
            Event::Fetched(_) => {}
            Event::WorkerAttached => {
                self.worker = true;
                self.demand = true;
                self.cell.clear_demand();
            }
            Event::Start { from } => {
                self.worker = true;
                self.demand = true;
                self.cell.clear_demand();
                match from {
                    Some(offset) if std::mem::take(&mut self.awaiting_start) => {
                        self.start_at(offset, effects)
                    }
                    Some(offset) => self.seek_to(offset, effects),
                    None => self.awaiting_start = false,
                }
            }
            Event::WorkerDown => {
                self.dead_letter = None;
                self.worker = false;
                self.demand = false;
                self.cell.clear_demand();
                if let Some(from) = self.acked.map(|a| a + 1).or(self.first) {
                    self.redeliver_from(from, effects);
                }
            }
            Event::Redeliver { from } => {
                let from = self.unacked_from(from);
                self.redeliver_from(from, effects);
            }
            Event::Revoke => {
                self.dead_letter = None;
                self.revoking = true;
                self.clear_held();
            }
            Event::SeekDone { .. } => self.seek_answered(),
            Event::SeekFailed { offset } => {
                if self.seeks == 1 && self.seeking == Some(offset) && !self.revoking {
                    // The last seek failed: asked for again (so still one pending).
                    effects.push(Effect::Seek(offset));
                } else {
                    self.seek_answered();
                }
            }
            Event::Committed { offset, ok } => {
                if ok && self.committed.is_none_or(|c| offset > c) {
                    self.committed = Some(offset);
                }
                if self.committing == Some(offset) {
                    self.committing = None;
                }
            }
            Event::Failed { from } => self.failed(from, effects),
            Event::RetryDue => self.waiting = None,
            Event::SeekTo { offset } => self.seek_to(offset, effects),
            Event::DeadLettered { offset, ok } => {
                if self.dead_letter == Some(offset) && !self.revoking {
                    self.dead_letter = None;
                    if ok {
                        self.give_up(offset);
                        self.dead_lettered += 1;
                    } else if let Some(until) = self.batch_end.filter(|&end| offset <= end) {
                        self.retry_failed(offset, until, effects);
                    }
                }
            }
            Event::Watermark(high) => self.high_watermark = Some(high),
            Event::Position(next) => self.position(next),
            Event::Tick => {}
        }
        self.deliver(effects);
        self.maybe_resume(effects);
        Intake::Added
    }

    /// The offset to commit now (the next offset to read, Kafka's convention), when acks went
    /// beyond what is committed or being committed. Marks it as being committed.
    pub fn commit_due(&mut self) -> Option<i64> {
        self.absorb();
        let next = self.next_to_process()?;
        let ahead = |o: Option<i64>| o.is_none_or(|o| next > o);
        if ahead(self.committed) && ahead(self.committing) {
            self.committing = Some(next);
            Some(next)
        } else {
            None
        }
    }

    /// The next offset to process: after the last ack, or past the records librdkafka skipped
    /// after it (see [`Event::Position`]).
    fn next_to_process(&self) -> Option<i64> {
        let next = self.acked? + 1;
        Some(self.passed.map_or(next, |p| p.max(next)))
    }

    /// librdkafka is at `next`: when every message it handed over was delivered and acked and
    /// `next` is beyond the ack, what lies between is records it delivers to no one, and
    /// `next` is the offset to commit. Anything that moves the partition's position (a seek,
    /// a backoff, a replay, an overflow's seek back) makes it wait for a later reading.
    fn position(&mut self, next: i64) {
        let caught_up = self.backlog.is_empty()
            && self.seeking.is_none()
            && self.replay_until.is_none()
            && self.waiting.is_none()
            && self.dead_letter.is_none()
            && !self.sought
            && !self.awaiting_start
            && !self.revoking
            && self.next_fetch.is_none_or(|f| next >= f)
            && matches!((self.last_delivered, self.acked), (Some(d), Some(a)) if a >= d);
        if caught_up && self.acked.is_some_and(|a| next > a + 1) {
            self.passed = Some(self.passed.map_or(next, |p| p.max(next)));
        }
    }

    /// Where a worker's "again from `from`" starts: after the ack (acked messages are done),
    /// unless `from` is in what a seek back replays (acks there are not seen: they are behind
    /// the cell's ack).
    fn unacked_from(&self, from: i64) -> i64 {
        match self.acked {
            Some(a) if self.replay_until.is_none_or(|r| from > r) => from.max(a + 1),
            _ => from,
        }
    }

    /// Reads acks and demand from the cell. Acked messages are forgotten.
    fn absorb(&mut self) {
        if let Some(acked) = self.cell.acked() {
            if self.acked.is_none_or(|a| acked > a) {
                self.acked = Some(acked);
                while self.in_flight.front().is_some_and(|m| m.offset() <= acked) {
                    if let Some(m) = self.in_flight.pop_front() {
                        self.kept_bytes -= m.size();
                    }
                }
                // Acked by a process that outlived its worker, after a redelivery: done; but
                // what a seek back replays stays (an ack after the seek does not undo it).
                let replay = self.replay_until;
                let mut dropped = 0;
                self.backlog.retain(|m| {
                    let keep = m.offset() > acked || replay.is_some_and(|r| m.offset() <= r);
                    if !keep {
                        dropped += m.size();
                    }
                    keep
                });
                self.backlog_bytes -= dropped;
                // (`kept_from` stays: a redelivery starts after the ack, or in a replay, where
                // what was not delivered again yet is still to come.)
            }
        }
        if self.cell.take_demand() && self.worker {
            self.demand = true;
        }
    }

    fn fetched(&mut self, message: M, effects: &mut Vec<Effect<M>>) -> Intake {
        let offset = message.offset();
        if self.awaiting_start && !self.revoking {
            // Fetched from where librdkafka started: not where this partition starts. It is
            // paused until its worker says where (fetching on would only be discarded).
            self.pause(effects);
            return Intake::Discarded;
        }
        if self.revoking || self.seeking.is_some() {
            return Intake::Discarded;
        }
        // Already acked (by a task that outlived its worker while a seek back was pending):
        // done, like the ones `absorb` drops from the backlog; unless the handler sought back.
        let replayed = self.replay_until.is_some_and(|r| offset <= r);
        if self.next_fetch.is_some_and(|next| offset < next)
            || (self.acked.is_some_and(|acked| offset <= acked) && !replayed)
        {
            return Intake::Duplicate;
        }
        if self.full() {
            // Polled before the pause took effect: hand it back to librdkafka.
            self.overflows += 1;
            self.next_fetch = Some(offset);
            self.seek(offset, effects);
            self.pause(effects);
            return Intake::Overflow;
        }
        if self.first.is_none() {
            self.first = Some(offset);
            self.kept_from = Some(offset);
            self.cell.set_low(offset);
        }
        self.next_fetch = Some(offset + 1);
        self.backlog_bytes += message.size();
        self.backlog.push_back(message);
        if self.full() {
            self.pause(effects);
        }
        Intake::Added
    }

    fn deliver(&mut self, effects: &mut Vec<Effect<M>>) {
        if !(self.worker && self.demand && !self.revoking)
            || self.waiting.is_some()
            || self.backlog.is_empty()
        {
            return;
        }
        let head = self.backlog[0].offset();
        // A failure is worked through one message at a time up to the end of its batch.
        let (size, attempt) = match self.failure {
            // Below the failed batch (a dead worker's unacked messages): first attempts, in a
            // batch that stops before it.
            Some(f) if head < f.start => {
                let below = self.backlog.partition_point(|m| m.offset() < f.start);
                (below.min(self.max_batch), 1)
            }
            Some(f) if head <= f.until => (1, if head == f.head { f.attempts + 1 } else { 2 }),
            _ => {
                self.failure = None;
                (self.max_batch, 1)
            }
        };
        let n = size.min(self.backlog.len());
        self.attempt = attempt;
        // A batch of one message, whatever made it one (a retry, or a short backlog).
        self.last_attempt = n == 1 && self.policy.max_attempts.is_some_and(|max| attempt >= max);
        let batch: Vec<M> = self.backlog.drain(..n).collect();
        self.backlog_bytes -= batch.iter().map(M::size).sum::<usize>();
        let last = batch[batch.len() - 1].offset();
        for m in &batch {
            if self.acked.is_some_and(|a| m.offset() <= a) {
                // Replayed after a seek back: already acked (acks of it are behind the cell's
                // and would never release it), so not kept; a redelivery of it seeks back.
                self.kept_from = Some(
                    self.kept_from
                        .map_or(m.offset() + 1, |k| k.max(m.offset() + 1)),
                );
            } else {
                self.kept_bytes += m.size();
                self.in_flight.push_back(m.clone());
            }
        }
        // What is kept for redelivery is bounded like the backlog (by count and bytes): past
        // it, a redelivery seeks back.
        while self.in_flight.len() > self.max_backlog || self.kept_bytes > self.max_bytes {
            if let Some(dropped) = self.in_flight.pop_front() {
                self.kept_from = Some(dropped.offset() + 1);
                self.kept_bytes -= dropped.size();
            } else {
                break;
            }
        }
        self.last_delivered = Some(self.last_delivered.map_or(last, |l| l.max(last)));
        self.batch_end = Some(last);
        self.sought = false;
        self.cell.raise_high(last);
        self.demand = false;
        effects.push(Effect::Deliver(batch));
    }

    /// The last batch failed from `from` on: count the attempt, put the unacked messages back,
    /// and wait before delivering again.
    fn failed(&mut self, from: i64, effects: &mut Vec<Effect<M>>) {
        if self.revoking {
            return;
        }
        let from = self.unacked_from(from);
        // Everything of the batch was acked: nothing failed, nothing to retry.
        let Some(until) = self.batch_end.filter(|&end| from <= end) else {
            return;
        };
        // The message's last attempt failed (it was delivered alone): the policy decides.
        if self.last_attempt && until == from {
            match self.policy.on_failure {
                OnFailure::Retry => {}
                OnFailure::Skip => {
                    self.give_up(from);
                    self.skipped += 1;
                    effects.push(Effect::Skipped(from));
                    return;
                }
                OnFailure::DeadLetter => {
                    self.dead_letter = Some(from);
                    effects.push(Effect::DeadLetter(from));
                    return;
                }
            }
        }
        self.retry_failed(from, until, effects);
    }

    /// Acks the message of a last attempt the policy gave up on (through the cell, as any ack:
    /// it was delivered, so the cell takes it).
    fn give_up(&mut self, offset: i64) {
        self.cell.ack(Some(self.cell.generation()), offset);
        self.absorb();
    }

    /// Counts the failure of the batch from `from` (up to `until`), puts its unacked messages
    /// back and waits before delivering again.
    fn retry_failed(&mut self, from: i64, until: i64, effects: &mut Vec<Effect<M>>) {
        let failure = match self.failure {
            Some(f) if f.head == from => Failure {
                attempts: f.attempts + 1,
                ..f
            },
            // A message of the batch that failed first failed again: its second attempt.
            Some(f) if f.start <= from && from <= f.until => Failure {
                head: from,
                attempts: 2,
                ..f
            },
            _ => Failure {
                start: from,
                head: from,
                attempts: 1,
                until,
            },
        };
        self.failure = Some(failure);
        self.redeliver_from(from, effects);
        let backoff = self.policy.backoff_after(failure.attempts);
        self.waiting = Some(backoff);
        effects.push(Effect::Wait(backoff));
    }

    /// Goes on from `offset`: drops what was fetched, seeks, and forgets the failure.
    fn seek_to(&mut self, offset: i64, effects: &mut Vec<Effect<M>>) {
        if self.revoking {
            return;
        }
        self.clear_held();
        self.dead_letter = None;
        self.failure = None;
        self.waiting = None;
        // The batch in hand is dropped too: a `Failed` about it has nothing left to retry.
        self.batch_end = None;
        self.last_seek = Some(offset);
        self.sought = true;
        self.passed = None;
        // Back at or below the ack: what was acked is delivered again, up to that ack.
        let back = |a: i64| offset == OFFSET_BEGINNING || (offset >= 0 && offset <= a);
        self.replay_until = self.acked.filter(|&a| back(a));
        // Everything from the target on comes again from librdkafka (nothing after a seek to
        // the end): a redelivery from there on needs no seek back.
        self.kept_from = match offset {
            OFFSET_BEGINNING => Some(0),
            o => (o >= 0).then_some(o),
        };
        self.next_fetch = (offset >= 0).then_some(offset);
        self.seek(offset, effects);
    }

    /// The first position of this assignment, from the worker: nothing was taken in yet.
    fn start_at(&mut self, offset: i64, effects: &mut Vec<Effect<M>>) {
        if self.revoking {
            return;
        }
        self.backlog.clear();
        self.recount();
        self.passed = None;
        self.kept_from = match offset {
            OFFSET_BEGINNING => Some(0),
            o => (o >= 0).then_some(o),
        };
        self.next_fetch = (offset >= 0).then_some(offset);
        self.seek(offset, effects);
    }

    /// Puts every unacked message from `from` on back in front of the backlog, from memory
    /// when it still holds them, otherwise by seeking back.
    fn redeliver_from(&mut self, from: i64, effects: &mut Vec<Effect<M>>) {
        if self.revoking || self.last_delivered.is_none_or(|l| from > l) {
            return;
        }
        if self.kept_from.is_some_and(|k| from >= k) {
            let below = self.in_flight.partition_point(|m| m.offset() < from);
            // Unacked messages below `from` (a worker that skipped them) are dropped: a later
            // redelivery of them must seek back. (Only past those: after a handler's seek,
            // `from` may lie ahead of what was fetched again, which comes again anyway.)
            // In range: `below` is a partition point, at most `in_flight.len()`.
            if let Some(dropped) = below.checked_sub(1).map(|i| self.in_flight[i].offset()) {
                self.kept_from = Some(self.kept_from.map_or(dropped + 1, |k| k.max(dropped + 1)));
            }
            let mut requeued = self.in_flight.split_off(below);
            self.in_flight.clear();
            requeued.append(&mut self.backlog);
            self.backlog = requeued;
            self.recount();
            if self.full() {
                self.pause(effects);
            }
        } else {
            self.clear_held();
            self.kept_from = Some(from);
            self.next_fetch = Some(from);
            self.seek(from, effects);
        }
    }

    fn seek(&mut self, offset: i64, effects: &mut Vec<Effect<M>>) {
        self.seeking = Some(offset);
        self.seeks += 1;
        effects.push(Effect::Seek(offset));
    }

    fn seek_answered(&mut self) {
        self.seeks = self.seeks.saturating_sub(1);
        if self.seeks == 0 {
            self.seeking = None;
        }
    }

    fn pause(&mut self, effects: &mut Vec<Effect<M>>) {
        if !self.paused {
            self.paused = true;
            effects.push(Effect::Pause);
        }
    }

    fn maybe_resume(&mut self, effects: &mut Vec<Effect<M>>) {
        if self.paused
            && !self.revoking
            && !self.awaiting_start
            && self.seeking.is_none()
            && self.backlog.len() <= self.max_backlog / 2
            && self.backlog_bytes <= self.max_bytes / 2
        {
            self.paused = false;
            effects.push(Effect::Resume);
        }
    }

    // Read-only views, for stats, commits and the revoke wait.

    pub fn cell(&self) -> &Arc<AckCell> {
        &self.cell
    }

    pub fn generation(&self) -> i32 {
        self.cell.generation()
    }

    /// Whether the partition awaits its start position from its worker.
    pub fn is_awaiting_start(&self) -> bool {
        self.awaiting_start
    }

    pub fn revoking(&self) -> bool {
        self.revoking
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Messages held in memory: the backlog and the delivered ones kept until acked.
    pub fn held(&self) -> usize {
        self.backlog.len() + self.in_flight.len()
    }

    /// The bytes of the messages held (see [`Offset::size`]): the backlog's and the kept
    /// delivered ones'.
    pub fn held_bytes(&self) -> usize {
        self.backlog_bytes + self.kept_bytes
    }

    pub fn backlog_bytes(&self) -> usize {
        self.backlog_bytes
    }

    /// The same, counted anew from the messages (for tests of the bookkeeping).
    pub fn held_bytes_counted(&self) -> usize {
        self.backlog
            .iter()
            .chain(&self.in_flight)
            .map(M::size)
            .sum()
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn has_worker(&self) -> bool {
        self.worker
    }

    pub fn last_delivered(&self) -> Option<i64> {
        self.last_delivered
    }

    pub fn acked(&self) -> Option<i64> {
        self.acked
    }

    /// The last offset Kafka confirmed as committed (the next offset to read).
    pub fn committed(&self) -> Option<i64> {
        self.committed
    }

    pub fn committing(&self) -> Option<i64> {
        self.committing
    }

    pub fn high_watermark(&self) -> Option<i64> {
        self.high_watermark
    }

    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// The attempt number of the batch last delivered (1 for a first delivery), and whether it
    /// is the message's last attempt.
    pub fn attempt(&self) -> (u32, bool) {
        (self.attempt, self.last_attempt)
    }

    /// How often the message where the current failure stands failed (0: no failure).
    pub fn failures(&self) -> u32 {
        self.failure.map_or(0, |f| f.attempts)
    }

    /// The backoff running now, if any.
    pub fn backoff(&self) -> Option<Duration> {
        self.waiting
    }

    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered
    }

    pub fn last_seek(&self) -> Option<i64> {
        self.last_seek
    }

    /// Nothing delivered is waiting for an ack: every delivered message has been acked, or the
    /// partition is in a backoff (its unacked messages were taken back), or a handler's seek
    /// dropped them and nothing was delivered since.
    pub fn drained(&self) -> bool {
        match (self.last_delivered, self.acked) {
            (None, _) => true,
            _ if self.waiting.is_some() || self.sought => true,
            (Some(delivered), Some(acked)) => acked >= delivered,
            (Some(_), None) => false,
        }
    }

    /// Messages between the next offset to process and the high watermark.
    pub fn lag(&self) -> Option<i64> {
        let hw = self.high_watermark?;
        let next = self.next_to_process().or(self.committed).or(self.first)?;
        Some((hw - next).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::AckOutcome;

    #[derive(Debug, Clone, PartialEq)]
    struct M(i64);
    impl Offset for M {
        fn offset(&self) -> i64 {
            self.0
        }
    }

    struct Rig {
        p: Partition<M>,
        effects: Vec<Effect<M>>,
    }

    impl Rig {
        fn new(max_backlog: usize, max_batch: usize) -> Self {
            Rig::with_retry(max_backlog, max_batch, RetryPolicy::default())
        }

        fn with_retry(max_backlog: usize, max_batch: usize, policy: RetryPolicy) -> Self {
            let cell = Arc::new(AckCell::new(1, false));
            Rig {
                p: Partition::new(cell, max_backlog, max_batch).with_retry(policy),
                effects: Vec::new(),
            }
        }

        fn on(&mut self, event: Event<M>) -> Intake {
            self.p.handle(event, &mut self.effects)
        }

        fn fetch(&mut self, offsets: impl IntoIterator<Item = i64>) {
            for o in offsets {
                self.on(Event::Fetched(M(o)));
            }
            self.on(Event::Tick);
        }

        fn take(&mut self) -> Vec<Effect<M>> {
            std::mem::take(&mut self.effects)
        }

        /// Offsets of the batches delivered since the last call.
        fn delivered(&mut self) -> Vec<Vec<i64>> {
            self.take()
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Deliver(b) => Some(b.into_iter().map(|m| m.0).collect()),
                    _ => None,
                })
                .collect()
        }

        fn demand(&mut self) {
            assert!(self.p.cell().demand(1));
            self.on(Event::Tick);
        }

        fn ack(&mut self, offset: i64) {
            self.p.cell().ack(Some(1), offset);
            self.on(Event::Tick);
        }

        /// The handler fails the last batch from `from`: the backoff asked for, if any.
        fn fail(&mut self, from: i64) -> Option<Duration> {
            self.on(Event::Failed { from });
            let mut wait = None;
            for e in self.take() {
                match e {
                    Effect::Wait(d) => wait = Some(d),
                    Effect::Deliver(b) => panic!("delivered {b:?} right after a failure"),
                    _ => {}
                }
            }
            wait
        }

        /// The worker asks for its next batch: the one message delivered and its attempt.
        fn next_one(&mut self) -> (i64, (u32, bool)) {
            self.demand();
            match self.delivered().as_slice() {
                [b] if b.len() == 1 => (b[0], self.p.attempt()),
                other => panic!("expected one message, got {other:?}"),
            }
        }
    }

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            on_failure: OnFailure::Retry,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_partition_awaiting_its_start_takes_nothing_in_until_its_seek_is_confirmed() {
        let cell = Arc::new(AckCell::new(1, false));
        let mut r = Rig {
            p: Partition::new(cell, 100, 10).awaiting_start(),
            effects: Vec::new(),
        };
        assert!(r.p.is_awaiting_start());
        // Paused from the start (the glue pauses it at the assignment); what librdkafka still
        // fetched from where it started (auto.offset.reset) is never delivered.
        assert!(r.p.paused());
        assert_eq!(r.on(Event::Fetched(M(0))), Intake::Discarded);
        assert!(r.take().is_empty(), "paused already");
        r.on(Event::Start { from: Some(4) });
        assert_eq!(
            r.take(),
            vec![Effect::Seek(4)],
            "no resume before the seek is done"
        );
        assert!(!r.p.is_awaiting_start());
        assert_eq!(
            r.on(Event::Fetched(M(1))),
            Intake::Discarded,
            "before the seek"
        );
        // librdkafka refused the seek (its fetcher had not started): asked again.
        r.on(Event::SeekFailed { offset: 4 });
        assert_eq!(r.take(), vec![Effect::Seek(4)]);
        assert!(r.p.paused());
        r.on(Event::SeekDone { offset: 4 });
        assert_eq!(
            r.take(),
            vec![Effect::Resume],
            "fetching from the start position"
        );
        r.fetch(4..7);
        assert_eq!(r.delivered(), vec![vec![4, 5, 6]]);
        assert_eq!(
            r.p.cell().ack(Some(1), 3),
            AckOutcome::Behind,
            "3 is not ours"
        );
        assert_eq!(r.p.cell().ack(Some(1), 6), AckOutcome::Advanced);
        r.on(Event::Tick);
        assert!(r.p.drained());
    }

    #[test]
    fn a_start_without_a_position_takes_in_from_where_librdkafka_starts() {
        let cell = Arc::new(AckCell::new(1, false));
        let mut r = Rig {
            p: Partition::new(cell, 100, 10).awaiting_start(),
            effects: Vec::new(),
        };
        r.on(Event::Start { from: None });
        r.fetch(0..2);
        assert_eq!(r.delivered(), vec![vec![0, 1]]);
    }

    fn poison_rig(on_failure: OnFailure) -> Rig {
        let policy = RetryPolicy {
            on_failure,
            ..policy(Some(2))
        };
        let mut r = Rig::with_retry(100, 10, policy);
        r.fetch(0..4);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2, 3]]);
        // 1 is poison: the batch fails from 0 (its first attempt), 0 then passes alone.
        assert!(r.fail(0).is_some());
        r.on(Event::RetryDue);
        assert_eq!(r.next_one(), (0, (2, true)));
        r.ack(0);
        assert_eq!(r.next_one(), (1, (2, true)), "its last attempt");
        r
    }

    #[test]
    fn skip_acks_a_failed_last_attempt_and_goes_on() {
        let mut r = poison_rig(OnFailure::Skip);
        r.on(Event::Failed { from: 1 });
        assert_eq!(r.take(), vec![Effect::Skipped(1)], "no backoff");
        assert_eq!(r.p.acked(), Some(1));
        assert_eq!(r.p.skipped(), 1);
        assert_eq!(r.next_one().0, 2);
    }

    #[test]
    fn dead_letter_is_handed_to_the_worker_and_acked_once_confirmed() {
        let mut r = poison_rig(OnFailure::DeadLetter);
        r.on(Event::Failed { from: 1 });
        assert_eq!(r.take(), vec![Effect::DeadLetter(1)]);
        // The produce failed: retried after a backoff, and handed over again.
        r.on(Event::DeadLettered {
            offset: 1,
            ok: false,
        });
        assert!(matches!(r.take().as_slice(), [Effect::Wait(_)]));
        r.on(Event::RetryDue);
        assert_eq!(r.next_one().0, 1);
        r.on(Event::Failed { from: 1 });
        assert_eq!(r.take(), vec![Effect::DeadLetter(1)]);
        r.on(Event::DeadLettered {
            offset: 1,
            ok: true,
        });
        assert_eq!(r.p.acked(), Some(1));
        assert_eq!(r.p.dead_lettered(), 1);
        assert_eq!(r.next_one().0, 2);
    }

    #[test]
    fn pauses_at_the_bound_and_resumes_at_half() {
        let mut r = Rig::new(4, 1);
        r.fetch(0..4);
        assert_eq!(r.take(), vec![Effect::Pause]);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0]]);
        r.ack(0);
        r.demand();
        assert_eq!(r.take(), vec![Effect::Deliver(vec![M(1)]), Effect::Resume]);
    }

    #[test]
    fn overflow_past_the_bound_is_sought_back_not_kept() {
        let mut r = Rig::new(2, 10);
        r.fetch(0..2);
        assert_eq!(r.take(), vec![Effect::Pause]);
        assert_eq!(r.on(Event::Fetched(M(2))), Intake::Overflow);
        assert_eq!(r.take(), vec![Effect::Seek(2)]);
        assert_eq!(r.on(Event::Fetched(M(3))), Intake::Discarded);
        assert_eq!(r.p.backlog_len(), 2);
        r.on(Event::SeekDone { offset: 2 });
        r.on(Event::WorkerAttached);
        assert_eq!(
            r.take(),
            vec![Effect::Deliver(vec![M(0), M(1)]), Effect::Resume]
        );
        assert_eq!(r.on(Event::Fetched(M(2))), Intake::Added);
    }

    #[test]
    fn delivers_only_on_demand_in_offset_order() {
        let mut r = Rig::new(100, 3);
        r.fetch(10..15);
        assert!(r.delivered().is_empty(), "no worker yet");
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![10, 11, 12]]);
        r.on(Event::Tick);
        assert!(r.delivered().is_empty(), "one batch per demand");
        r.demand();
        assert_eq!(r.delivered(), vec![vec![13, 14]]);
        assert_eq!(r.p.last_delivered(), Some(14));
    }

    #[test]
    fn refetched_duplicates_are_dropped() {
        let mut r = Rig::new(100, 10);
        r.fetch(0..2);
        assert_eq!(r.on(Event::Fetched(M(1))), Intake::Duplicate);
        assert_eq!(r.on(Event::Fetched(M(0))), Intake::Duplicate);
        assert_eq!(r.p.backlog_len(), 2);
    }

    #[test]
    fn a_partial_ack_redelivers_the_rest_from_memory() {
        let mut r = Rig::new(100, 5);
        r.fetch(0..8);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2, 3, 4]]);
        r.p.cell().ack(Some(1), 1);
        r.on(Event::Redeliver { from: 2 });
        r.demand();
        assert_eq!(
            r.delivered(),
            vec![vec![2, 3, 4, 5, 6]],
            "no seek, from memory"
        );
    }

    #[test]
    fn a_dead_worker_rewinds_to_after_the_last_ack() {
        let mut r = Rig::new(100, 3);
        r.fetch(20..25);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![20, 21, 22]]);
        r.ack(20);
        r.on(Event::WorkerDown);
        assert!(r.take().is_empty(), "no seek: the messages are still held");
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![21, 22, 23]]);
    }

    #[test]
    fn redelivery_beyond_what_is_kept_seeks_back() {
        // max_backlog 2: at most two delivered messages are kept.
        let mut r = Rig::new(2, 2);
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        r.take();
        r.demand();
        r.fetch(2..4);
        assert_eq!(r.delivered(), vec![vec![2, 3]]);
        r.on(Event::WorkerDown);
        assert_eq!(r.take(), vec![Effect::Seek(0)]);
        assert_eq!(r.on(Event::Fetched(M(4))), Intake::Discarded);
        r.on(Event::SeekDone { offset: 0 });
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1]]);
    }

    #[test]
    fn messages_acked_during_a_seek_back_are_not_delivered_again() {
        // max_backlog 2: the first batch is no longer held when the worker dies.
        let mut r = Rig::new(2, 2);
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        r.take();
        r.demand();
        r.fetch(2..4);
        assert_eq!(r.delivered(), vec![vec![2, 3]]);
        r.on(Event::WorkerDown);
        assert_eq!(r.take(), vec![Effect::Seek(0)]);
        // A task that outlived the worker acks its batch while the seek is pending.
        r.ack(3);
        r.on(Event::SeekDone { offset: 0 });
        for o in 0..4 {
            assert_eq!(
                r.on(Event::Fetched(M(o))),
                Intake::Duplicate,
                "{o} is acked"
            );
        }
        r.fetch(4..5);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![4]]);
    }

    #[test]
    fn what_a_redelivery_skipped_goes_to_the_next_worker() {
        let mut r = Rig::new(100, 2);
        r.fetch(0..6);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1]]);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![2, 3]]);
        // 0 and 1 are not acked, yet the worker wants only 2.. again.
        r.on(Event::Redeliver { from: 2 });
        r.demand();
        assert_eq!(r.delivered(), vec![vec![2, 3]]);
        r.on(Event::WorkerDown);
        assert_eq!(
            r.take(),
            vec![Effect::Seek(0)],
            "0 and 1 are no longer held"
        );
        r.on(Event::SeekDone { offset: 0 });
        r.fetch(0..6);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1]]);
    }

    #[test]
    fn acks_are_cumulative_and_commits_only_move_forward() {
        let mut r = Rig::new(10, 10);
        r.fetch(0..10);
        r.on(Event::WorkerAttached);
        r.take();
        r.ack(9);
        r.ack(3);
        assert_eq!(r.p.cell().latest_offset(), Some(10));
        assert_eq!(r.p.commit_due(), Some(10));
        assert_eq!(r.p.commit_due(), None, "already being committed");
        r.on(Event::Committed {
            offset: 10,
            ok: true,
        });
        r.on(Event::Committed {
            offset: 4,
            ok: true,
        });
        assert_eq!(r.p.committed(), Some(10), "a commit never moves backwards");
        assert_eq!(r.p.commit_due(), None);
    }

    #[test]
    fn records_librdkafka_skipped_after_the_last_ack_are_committed_past_and_not_lag() {
        // A transaction's messages at 0..=1, its commit marker at 2: librdkafka hands over
        // 0 and 1 and is then at 3.
        let mut r = Rig::new(10, 10);
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        r.take();
        r.on(Event::Watermark(3));
        r.on(Event::Position(3));
        assert_eq!(
            r.p.commit_due(),
            None,
            "nothing acked: the position says nothing"
        );
        r.ack(0);
        r.on(Event::Position(3));
        assert_eq!(r.p.lag(), Some(2), "message 1 is delivered and not acked");
        r.ack(1);
        assert_eq!(r.p.lag(), Some(1), "no position read since the ack");
        r.on(Event::Position(3));
        assert_eq!(r.p.lag(), Some(0));
        assert_eq!(r.p.commit_due(), Some(3));

        // Messages taken in and not delivered yet: a position beyond them says nothing.
        r.fetch(5..7);
        r.on(Event::Position(8));
        r.on(Event::Watermark(8));
        assert_eq!(
            r.p.lag(),
            Some(5),
            "from the last reading (3) to the watermark"
        );
        // A seek back forgets the position: what comes again is processed again, and
        // the commit does not move back.
        r.on(Event::SeekTo { offset: 0 });
        assert_eq!(r.p.lag(), Some(6), "next after the ack (1): 2");
        r.on(Event::Committed {
            offset: 3,
            ok: true,
        });
        assert_eq!(r.p.commit_due(), None);
    }

    #[test]
    fn a_failed_commit_is_tried_again() {
        let mut r = Rig::new(10, 10);
        r.fetch(0..3);
        r.on(Event::WorkerAttached);
        r.ack(2);
        assert_eq!(r.p.commit_due(), Some(3));
        r.on(Event::Committed {
            offset: 3,
            ok: false,
        });
        assert_eq!(r.p.committed(), None);
        assert_eq!(r.p.commit_due(), Some(3));
    }

    #[test]
    fn drained_when_every_delivered_offset_is_acked() {
        let mut r = Rig::new(10, 10);
        assert!(r.p.drained());
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        assert!(!r.p.drained());
        r.ack(0);
        assert!(!r.p.drained());
        r.ack(1);
        assert!(r.p.drained());
    }

    #[test]
    fn revoking_stops_delivery_and_intake() {
        let mut r = Rig::new(10, 10);
        r.fetch(0..1);
        r.on(Event::Revoke);
        r.on(Event::WorkerAttached);
        assert!(r.delivered().is_empty());
        assert_eq!(r.on(Event::Fetched(M(1))), Intake::Discarded);
    }

    #[test]
    fn lag_counts_from_the_next_offset_to_process() {
        let mut r = Rig::new(100, 100);
        r.on(Event::Watermark(100));
        assert_eq!(r.p.lag(), None);
        r.fetch(50..90);
        assert_eq!(r.p.lag(), Some(50));
        r.on(Event::WorkerAttached);
        r.ack(89);
        assert_eq!(r.p.lag(), Some(10));
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let p = policy(None);
        let after: Vec<u128> = [0, 1, 2, 3, 4, 5, 6, 40, u32::MAX]
            .iter()
            .map(|&n| p.backoff_after(n).as_millis())
            .collect();
        assert_eq!(after, [100, 100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        let huge = RetryPolicy {
            max_attempts: None,
            backoff: Duration::from_secs(u64::MAX / 4),
            max_backoff: Duration::MAX,
            on_failure: OnFailure::Retry,
        };
        assert_eq!(huge.backoff_after(64), Duration::MAX, "saturates");

        // Through the partition: one message failing again and again.
        let mut r = Rig::with_retry(10, 10, policy(None));
        r.fetch(0..1);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0]]);
        let mut waits = Vec::new();
        for n in 1..=6 {
            waits.push(r.fail(0).expect("a backoff"));
            assert_eq!(r.p.failures(), n);
            assert_eq!(r.p.backoff(), waits.last().copied());
            r.demand();
            assert!(r.delivered().is_empty(), "nothing before RetryDue");
            r.on(Event::RetryDue);
            assert_eq!(r.delivered(), vec![vec![0]]);
            assert_eq!(r.p.attempt(), (n + 1, false));
        }
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000].map(ms));
    }

    #[test]
    fn a_poison_message_is_isolated_one_at_a_time() {
        let mut r = Rig::with_retry(100, 10, policy(Some(3)));
        r.fetch(0..15);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![(0..10).collect::<Vec<_>>()]);
        assert_eq!(r.p.attempt(), (1, false));
        // 4 is poison: the batch fails as a whole.
        assert_eq!(r.fail(0), Some(ms(100)));
        r.on(Event::RetryDue);
        for o in 0..4 {
            assert_eq!(r.next_one(), (o, (2, false)), "a neighbour, alone");
            r.ack(o);
        }
        assert_eq!(r.next_one(), (4, (2, false)));
        assert_eq!(r.fail(4), Some(ms(200)), "4 failed twice");
        assert_eq!(r.p.failures(), 2);
        r.on(Event::RetryDue);
        assert_eq!(r.next_one(), (4, (3, true)), "isolated: its last attempt");
        r.ack(4);
        for o in 5..10 {
            assert_eq!(
                r.next_one(),
                (o, (2, false)),
                "never a neighbour's last attempt"
            );
            r.ack(o);
        }
        r.demand();
        assert_eq!(r.delivered(), vec![(10..15).collect::<Vec<_>>()]);
        assert_eq!(
            r.p.attempt(),
            (1, false),
            "past the failed batch: batches again"
        );
        assert_eq!(r.p.failures(), 0);
    }

    #[test]
    fn given_up_last_attempts_are_counted_and_acked() {
        let skip = RetryPolicy {
            on_failure: OnFailure::Skip,
            ..policy(Some(1))
        };
        let mut r = Rig::with_retry(100, 10, skip);
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1]]);
        assert_eq!(
            r.p.attempt(),
            (1, false),
            "two messages: not a last attempt"
        );
        r.fail(0);
        r.on(Event::RetryDue);
        assert_eq!(r.next_one(), (0, (2, true)));
        r.on(Event::Failed { from: 0 });
        assert_eq!(r.take(), vec![Effect::Skipped(0)]);
        assert_eq!(r.next_one(), (1, (2, true)));
        r.on(Event::Failed { from: 1 });
        assert_eq!(r.take(), vec![Effect::Skipped(1)]);
        assert_eq!((r.p.skipped(), r.p.dead_lettered()), (2, 0));
        assert_eq!(r.p.commit_due(), Some(2), "given-up messages are acked");
        // Alone from the start (a short backlog): with max_attempts 1, its last attempt.
        r.fetch(2..3);
        assert_eq!(r.next_one(), (2, (1, true)));
    }

    #[test]
    fn a_seek_back_redelivers_acked_offsets() {
        let mut r = Rig::new(100, 4);
        r.fetch(0..8);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2, 3]]);
        r.ack(3);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![4, 5, 6, 7]]);
        r.ack(5);
        assert_eq!(r.p.commit_due(), Some(6));
        r.on(Event::Committed {
            offset: 6,
            ok: true,
        });
        r.on(Event::SeekTo { offset: 2 });
        assert_eq!(r.take(), vec![Effect::Seek(2)]);
        assert_eq!(r.p.held(), 0, "what was fetched before is dropped");
        assert_eq!(r.p.last_seek(), Some(2));
        assert_eq!(r.on(Event::Fetched(M(8))), Intake::Discarded);
        r.on(Event::SeekDone { offset: 2 });
        for o in 2..8 {
            assert_eq!(r.on(Event::Fetched(M(o))), Intake::Added, "{o} again");
        }
        r.demand();
        assert_eq!(
            r.delivered(),
            vec![vec![2, 3, 4, 5]],
            "acked, delivered again"
        );
        assert_eq!(r.p.held(), 2, "replayed messages are not kept");
        assert_eq!(r.p.cell().ack(Some(1), 4), crate::cell::AckOutcome::Behind);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![6, 7]]);
        assert_eq!(r.p.acked(), Some(5), "acks never move backwards");
        assert_eq!(r.p.committed(), Some(6), "nor commits");
        assert_eq!(r.p.commit_due(), None);
        r.ack(7);
        assert_eq!(r.p.commit_due(), Some(8));
        assert_eq!(r.p.held(), 0);
    }

    #[test]
    fn drained_during_a_backoff() {
        let mut r = Rig::with_retry(100, 10, policy(None));
        r.fetch(0..3);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        assert!(!r.p.drained());
        r.fail(0);
        assert!(r.p.drained(), "the unacked messages were taken back");
        assert_eq!(r.p.backoff(), Some(ms(100)));
        r.demand();
        assert!(r.delivered().is_empty());
        assert!(r.p.drained());
        r.on(Event::RetryDue);
        assert_eq!(r.p.backoff(), None);
        assert_eq!(r.delivered(), vec![vec![0]]);
        assert!(!r.p.drained());
        // A seek ends a backoff too.
        r.fail(0);
        r.on(Event::SeekTo { offset: 0 });
        assert_eq!(r.p.backoff(), None);
        assert_eq!(r.p.failures(), 0, "and forgets the failure");
    }

    // Regressions found by the model test (tests/partition_model.rs).

    #[test]
    fn a_failure_with_nothing_left_unacked_is_ignored() {
        let mut r = Rig::with_retry(100, 10, policy(Some(2)));
        r.fetch(0..1);
        r.on(Event::WorkerAttached);
        r.take();
        r.p.cell().ack(Some(1), 0);
        assert_eq!(r.fail(0), None, "0 was acked: nothing failed");
        assert_eq!(r.p.failures(), 0);
        r.fetch(1..2);
        assert_eq!(r.next_one(), (1, (1, false)), "1 never failed");
    }

    #[test]
    fn the_failure_window_is_the_failed_batch() {
        let mut r = Rig::with_retry(100, 3, policy(Some(2)));
        r.fetch(0..9);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]]);
        // A worker dies with 0..5 unacked; its successor fails 0..2.
        r.on(Event::WorkerDown);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        r.fail(0);
        r.on(Event::RetryDue);
        for o in 0..3 {
            assert_eq!(r.next_one(), (o, (2, true)));
            r.ack(o);
        }
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]], "3..5 never failed");
        assert_eq!(r.p.attempt(), (1, false));
    }

    #[test]
    fn below_the_failed_batch_batches_are_first_attempts() {
        let mut r = Rig::with_retry(100, 3, policy(Some(2)));
        r.fetch(0..9);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]]);
        r.fail(3);
        // The worker dies with 0..2 unacked: they come back first.
        r.on(Event::WorkerDown);
        assert_eq!(r.take(), vec![Effect::Seek(0)]);
        r.on(Event::SeekDone { offset: 0 });
        r.fetch(0..9);
        r.on(Event::WorkerAttached);
        r.on(Event::RetryDue);
        assert_eq!(
            r.delivered(),
            vec![vec![0, 1, 2]],
            "a batch, up to the failed one"
        );
        assert_eq!(r.p.attempt(), (1, false));
        r.ack(2);
        assert_eq!(r.next_one(), (3, (2, true)));
    }

    #[test]
    fn a_redelivery_in_a_replay_starts_where_asked() {
        let mut r = Rig::new(100, 10);
        r.fetch(0..6);
        r.on(Event::WorkerAttached);
        r.take();
        r.ack(5);
        r.on(Event::SeekTo { offset: 0 });
        r.on(Event::SeekDone { offset: 0 });
        r.fetch(0..6);
        r.demand();
        assert_eq!(r.delivered(), vec![(0..6).collect::<Vec<_>>()]);
        // The worker did 0..2 (acks behind the cell's) and wants 3.. again.
        r.on(Event::Redeliver { from: 3 });
        assert_eq!(
            r.take(),
            vec![Effect::Seek(3)],
            "replayed messages are not kept"
        );
        r.on(Event::SeekDone { offset: 3 });
        r.fetch(3..6);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]]);
    }

    #[test]
    fn an_ack_after_a_seek_back_does_not_cut_the_replay() {
        let mut r = Rig::new(100, 4);
        r.fetch(0..10);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2, 3]]);
        r.ack(3);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![4, 5, 6, 7]]);
        r.on(Event::SeekTo { offset: 1 });
        r.on(Event::SeekDone { offset: 1 });
        r.fetch(1..10);
        // The batch from before the seek is acked late: 4..7 are done, 1..3 still replay.
        r.ack(7);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![1, 2, 3, 8]]);
    }

    #[test]
    fn a_redelivery_ahead_of_a_replay_does_not_cut_it() {
        let mut r = Rig::new(100, 3);
        r.fetch(0..6);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        r.ack(2);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]]);
        r.on(Event::SeekTo {
            offset: OFFSET_BEGINNING,
        });
        r.ack(5);
        r.on(Event::SeekDone {
            offset: OFFSET_BEGINNING,
        });
        r.fetch(0..6);
        assert_eq!(r.take(), vec![Effect::Seek(OFFSET_BEGINNING)]);
        // From a batch of before the seek, ahead of the replay: it comes in order anyway.
        r.on(Event::Redeliver { from: 1 });
        r.on(Event::WorkerDown);
        assert!(r.take().is_empty(), "no seek: the replay goes on");
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn replayed_messages_are_not_held() {
        let mut r = Rig::new(100, 10);
        r.fetch(0..3);
        r.on(Event::WorkerAttached);
        r.take();
        r.ack(2);
        r.on(Event::SeekTo {
            offset: OFFSET_BEGINNING,
        });
        assert_eq!(r.take(), vec![Effect::Seek(OFFSET_BEGINNING)]);
        r.on(Event::SeekDone {
            offset: OFFSET_BEGINNING,
        });
        r.fetch(0..3);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        assert_eq!(
            r.p.held(),
            0,
            "acks of them are behind: they would stay forever"
        );
        assert!(r.p.drained());
    }

    #[test]
    fn a_seek_away_from_unacked_messages_drains() {
        let mut r = Rig::new(100, 10);
        r.fetch(0..2);
        r.on(Event::WorkerAttached);
        r.take();
        assert!(!r.p.drained());
        r.on(Event::SeekTo { offset: OFFSET_END });
        assert!(r.p.drained(), "no ack of the dropped messages is awaited");
        assert_eq!(
            r.fail(0),
            None,
            "a failure of the dropped batch retries nothing"
        );
    }

    #[test]
    fn a_seek_waits_for_the_last_of_several_seeks_to_the_same_offset() {
        let mut r = Rig::new(100, 10);
        r.on(Event::SeekTo {
            offset: OFFSET_BEGINNING,
        });
        r.on(Event::SeekTo { offset: 5 });
        r.on(Event::SeekTo {
            offset: OFFSET_BEGINNING,
        });
        assert_eq!(r.take().len(), 3);
        r.on(Event::SeekDone {
            offset: OFFSET_BEGINNING,
        });
        assert_eq!(
            r.on(Event::Fetched(M(0))),
            Intake::Discarded,
            "two seeks pending"
        );
        r.on(Event::SeekFailed { offset: 5 });
        assert!(r.take().is_empty(), "a superseded seek is not asked again");
        assert_eq!(r.on(Event::Fetched(M(5))), Intake::Discarded);
        r.on(Event::SeekDone {
            offset: OFFSET_BEGINNING,
        });
        assert_eq!(r.on(Event::Fetched(M(0))), Intake::Added);
    }

    #[test]
    fn a_redelivery_of_a_batch_from_before_a_seek_does_not_cut_the_replay() {
        let mut r = Rig::new(100, 3);
        r.fetch(0..6);
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
        r.ack(2);
        r.demand();
        assert_eq!(r.delivered(), vec![vec![3, 4, 5]]);
        r.on(Event::SeekTo { offset: 0 });
        r.on(Event::SeekDone { offset: 0 });
        r.fetch(0..6);
        assert_eq!(r.take(), vec![Effect::Seek(0)]);
        // The worker wants 4.. of its batch again: ahead of the replay, which brings it.
        r.on(Event::Redeliver { from: 4 });
        r.on(Event::WorkerDown);
        assert!(r.take().is_empty(), "no seek: 3.. comes in the replay too");
        r.on(Event::WorkerAttached);
        assert_eq!(r.delivered(), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn a_forward_seek_replays_nothing() {
        let mut r = Rig::new(100, 10);
        r.fetch(0..10);
        r.on(Event::WorkerAttached);
        r.take();
        r.ack(5);
        r.on(Event::SeekTo { offset: 2 });
        r.on(Event::SeekTo { offset: 8 });
        r.on(Event::SeekDone { offset: 2 });
        r.on(Event::SeekDone { offset: 8 });
        r.fetch(8..10);
        r.take();
        // A late redelivery from the first seek's replay: 0..5 are acked, no replay now.
        r.on(Event::Redeliver { from: 3 });
        assert_eq!(r.take(), vec![Effect::Seek(6)], "only the unacked 6 and 7");
    }
}
