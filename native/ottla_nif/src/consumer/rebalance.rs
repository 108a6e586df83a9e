//! Rebalances: librdkafka's assign and revoke callbacks (they run inside `poll`, on the poll
//! thread), and a graceful stop's drain, which is a revocation of everything. An assignment
//! creates the partitions' state machines under a new generation and tells the manager; a
//! revocation stops delivery, gives in-flight batches the drain timeout to be acked, has the
//! revoker stop the workers by an absolute deadline (and waits until their monitors confirm
//! they are dead), commits the acks and forgets the partitions. Only then does librdkafka go
//! on, so no partition is handled by two members at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ottla_core::partition::Event;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::TopicPartitionList;
use rustler::Encoder;

use super::poll::{apply_commits, start_commit, GroupCtx, RECHECK};
use super::{now_ms, Shared, State, Tp};
use crate::atoms;
use crate::context::{log, send_reliably};

/// How long a revocation waits for the manager's reply past the drain timeout: the manager
/// has the whole drain timeout to stop the workers, this only covers its reply's trip.
const REPLY_MARGIN: Duration = Duration::from_millis(300);
/// How long a revocation waits, past the reply margin, for workers the revoker was told to
/// kill to be seen dead.
const STRAGGLER_WAIT: Duration = Duration::from_secs(2);
/// How long a revocation waits for its commit.
const REVOKE_COMMIT_WAIT: Duration = Duration::from_millis(500);
/// Gives each newly assigned partition a queue of its own (see `queues.rs`).
pub fn split_queues(consumer: &BaseConsumer<GroupCtx>, tpl: &TopicPartitionList) {
    let ctx = consumer.context();
    let rk = consumer.client().native_ptr();
    let mut queues = ctx.queues();
    for tp in tps(tpl) {
        queues.split(rk, &tp, &ctx.shared.wake);
    }
}

pub(super) fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

/// Offsets kept elsewhere: newly assigned partitions are paused before anything is fetched,
/// and each resumes once librdkafka confirms the seek to where its worker starts it (the
/// state machines start paused and ask for the resume). A partition that fetched on from
/// librdkafka's own start (`auto.offset.reset`, nothing being committed) up to the log end,
/// and was sought back meanwhile, was seen never to fetch again: its messages after the
/// stored offset were never delivered.
pub fn hold_for_start(consumer: &BaseConsumer<GroupCtx>, tpl: &TopicPartitionList) {
    if let Err(err) = consumer.pause(tpl) {
        log(
            atoms::warning(),
            "PAUSE",
            &format!("pause after assign failed: {err}"),
        );
    }
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
        let deadline_ms = shared.settings.clock.ms(deadline);
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

impl GroupCtx {
    /// Keeps the group's metadata for exactly-once transactions (see `Shared::group_metadata`).
    pub(super) fn keep_group_metadata(&self, consumer: &BaseConsumer<Self>) {
        if self.shared.settings.exactly_once {
            let metadata = consumer.group_metadata().map(Arc::new);
            *self
                .shared
                .group_metadata
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = metadata;
        }
    }
}

impl ConsumerContext for GroupCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.keep_group_metadata(consumer);
        match rebalance {
            Rebalance::Revoke(tpl) => revoking(self, consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => log(atoms::error(), "REBALANCE", &err.to_string()),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.keep_group_metadata(consumer);
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps a partition's pause flag across unassign/assign; a new
            // assignment starts with an empty backlog, so it must flow, unless it waits for
            // its worker's start position (offsets elsewhere).
            if tpl.count() > 0 {
                if self.shared.settings.start_from_worker {
                    hold_for_start(consumer, tpl);
                } else if let Err(err) = consumer.resume(tpl) {
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
