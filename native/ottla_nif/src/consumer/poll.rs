//! The poll thread and the consumer context: librdkafka's callbacks (rebalance, commit)
//! run here, inside `poll`.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ottla_core::partition::Pushed;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use rustler::Encoder;

use super::{Msg, Shared, Tp};
use crate::atoms;
use crate::context::{log, send_reliably, OttlaContext};

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// Messages taken from librdkafka per lock of the state.
const INTAKE_BATCH: usize = 500;
const WATERMARK_INTERVAL: Duration = Duration::from_millis(500);
/// Beyond the drain timeout, how long a revocation waits for the manager's reply.
const REPLY_MARGIN: Duration = Duration::from_secs(5);
/// How often a bounded wait re-reads the ack cells.
const RECHECK: Duration = Duration::from_millis(5);

pub struct GroupCtx {
    base: OttlaContext,
    shared: Arc<Shared>,
}

impl GroupCtx {
    pub fn new(shared: Arc<Shared>) -> Self {
        GroupCtx {
            base: OttlaContext,
            shared,
        }
    }
}

impl ClientContext for GroupCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.base.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.base.error(error, reason)
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn notify_manager(
    shared: &Shared,
    kind: rustler::Atom,
    id: u64,
    generation: Option<i32>,
    list: Vec<Tp>,
) {
    send_reliably(
        &shared.settings.manager,
        Box::new(move |env| (kind, id, generation, list).encode(env)),
    );
}

/// Records newly assigned partitions under a new generation and tells the manager.
pub fn assigned(shared: &Shared, tpl: &TopicPartitionList) {
    let list = tps(tpl);
    if list.is_empty() {
        // Cooperative rebalances often assign nothing new: no new generation then.
        shared.lock().last_rebalance_ms = Some(super::now_ms());
        return;
    }
    let epoch = shared.insert_partitions(&list);
    let generation = shared.settings.group.then_some(epoch);
    notify_manager(shared, atoms::ottla_assigned(), 0, generation, list);
}

/// Waits until `done` holds for the state or `timeout` passes, re-reading the ack cells.
fn wait_for(shared: &Shared, timeout: Duration, done: impl Fn(&mut super::State) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut st = shared.lock();
    loop {
        for slot in st.partitions.values_mut() {
            slot.sync();
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

/// Stops delivery to the revoked partitions, waits (bounded) for their in-flight batches to
/// be acked, commits, has the manager stop their workers (bounded), and forgets them.
fn revoking(shared: &Shared, consumer: &BaseConsumer<GroupCtx>, tpl: &TopicPartitionList) {
    let list = tps(tpl);
    if list.is_empty() {
        return;
    }
    let lost = consumer.assignment_lost();
    let drain = shared.settings.drain_timeout;
    let closing = {
        let mut st = shared.lock();
        for tp in &list {
            if let Some(slot) = st.partitions.get_mut(tp) {
                slot.state.revoking = true;
            }
        }
        st.closing
    };

    if !lost && !closing {
        wait_for(shared, drain, |st| {
            list.iter()
                .all(|tp| st.partitions.get(tp).is_none_or(|s| s.state.drained()))
        });
    }

    if !lost && shared.settings.group {
        commit(shared, consumer, Some(&list));
    }

    if !closing {
        let id = {
            let mut st = shared.lock();
            st.revoke_seq += 1;
            st.revoke_seq
        };
        notify_manager(shared, atoms::ottla_revoked(), id, None, list.clone());
        // The manager gives stopping workers a short grace, then runs the user's handler.
        wait_for(shared, drain + REPLY_MARGIN, |st| st.revoke_done >= id);
        // Workers that finished a batch while stopping acked it after the first commit.
        if !lost && shared.settings.group {
            commit(shared, consumer, Some(&list));
        }
    }

    shared.remove_partitions(&list);
}

impl ConsumerContext for GroupCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => revoking(&self.shared, consumer, tpl),
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
            }
            assigned(&self.shared, tpl);
        }
    }
}

/// Synchronously commits acked offsets (of `only`, or of every partition) that are ahead of
/// the committed ones, and records them as committed.
fn commit(shared: &Shared, consumer: &BaseConsumer<GroupCtx>, only: Option<&[Tp]>) {
    let mut tpl = TopicPartitionList::new();
    {
        let mut st = shared.lock();
        for (tp, slot) in st.partitions.iter_mut() {
            if only.is_some_and(|list| !list.contains(tp)) {
                continue;
            }
            slot.sync();
            if let Some(next) = slot.state.commit_candidate() {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            let mut st = shared.lock();
            for e in tpl.elements() {
                if let (Offset::Offset(o), Some(slot)) = (
                    e.offset(),
                    st.partitions
                        .get_mut(&(e.topic().to_string(), e.partition())),
                ) {
                    slot.state.mark_committed(o);
                }
            }
        }
        Err(err) => log(atoms::warning(), "COMMIT", &format!("commit failed: {err}")),
    }
}

fn to_msg(m: &BorrowedMessage<'_>) -> (Tp, Msg) {
    let headers = crate::message::headers(m);
    let msg = Msg {
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    };
    ((m.topic().to_string(), m.partition()), msg)
}

/// Adds polled messages to their partitions' backlogs, under one lock.
fn intake(shared: &Shared, messages: Vec<(Tp, Msg)>) {
    let mut st = shared.lock();
    let mut wake = false;
    let mut dirty = false;
    for (tp, msg) in messages {
        let Some(slot) = st.partitions.get_mut(&tp) else {
            continue; // revoked meanwhile: it will be fetched by whoever owns it now
        };
        let offset = msg.offset;
        let pushed = slot.state.push(msg);
        if matches!(pushed, Pushed::Added { .. }) {
            let _ = slot
                .cell
                .low
                .compare_exchange(-1, offset, Ordering::AcqRel, Ordering::Relaxed);
        }
        match pushed {
            Pushed::Added { pause } => {
                dirty |= pause;
                slot.sync();
                wake |= slot.state.ready();
            }
            Pushed::Overflow { .. } => dirty = true,
            Pushed::Duplicate | Pushed::Discarded => {}
        }
    }
    st.dirty |= dirty;
    if wake {
        shared.work.notify_one();
    }
}

/// Applies what the bookkeeping asked for: pause, resume and seeks.
fn apply_pending(shared: &Shared, consumer: &BaseConsumer<GroupCtx>) {
    let (pause, resume, seeks) = {
        let mut st = shared.lock();
        if !st.dirty {
            return;
        }
        st.dirty = false;
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let mut seeks: Vec<(Tp, i64)> = Vec::new();
        for (tp, slot) in st.partitions.iter_mut() {
            let p = &mut slot.state;
            if let Some(offset) = p.rewind_to {
                seeks.push((tp.clone(), offset));
            }
            if p.want_paused && !p.paused {
                pause.add_partition(&tp.0, tp.1);
                p.paused = true;
            } else if !p.want_paused && p.paused {
                resume.add_partition(&tp.0, tp.1);
                p.paused = false;
            }
        }
        (pause, resume, seeks)
    };
    if pause.count() > 0 {
        if let Err(err) = consumer.pause(&pause) {
            log(atoms::warning(), "PAUSE", &format!("pause failed: {err}"));
        }
    }
    for ((topic, partition), offset) in seeks {
        // Timeout 0: asynchronous; librdkafka discards what it fetched before the seek.
        match consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO) {
            Ok(()) => {
                let mut st = shared.lock();
                if let Some(slot) = st.partitions.get_mut(&(topic, partition)) {
                    if slot.state.rewind_to == Some(offset) {
                        slot.state.rewound();
                    }
                }
            }
            Err(err) => {
                log(
                    atoms::warning(),
                    "SEEK",
                    &format!("seek of {topic}/{partition} to {offset} failed, retrying: {err}"),
                );
                shared.lock().dirty = true;
            }
        }
    }
    if resume.count() > 0 {
        if let Err(err) = consumer.resume(&resume) {
            log(atoms::warning(), "RESUME", &format!("resume failed: {err}"));
        }
    }
}

/// Refreshes each partition's high watermark from librdkafka's cache (no request).
fn refresh_watermarks(shared: &Shared, consumer: &BaseConsumer<GroupCtx>) {
    let list: Vec<Tp> = shared.lock().partitions.keys().cloned().collect();
    let mut marks: HashMap<Tp, i64> = HashMap::new();
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
            marks.insert(tp, high);
        }
    }
    let mut st = shared.lock();
    for (tp, high) in marks {
        if let Some(slot) = st.partitions.get_mut(&tp) {
            slot.state.high_watermark = Some(high);
        }
    }
}

pub fn run(consumer: BaseConsumer<GroupCtx>, shared: Arc<Shared>) {
    let mut last_commit = Instant::now();
    let mut last_marks = Instant::now();
    let mut polled: Vec<(Tp, Msg)> = Vec::with_capacity(INTAKE_BATCH);
    while !shared.stop.load(Ordering::SeqCst) {
        // Wait for one message, then take what is already there without waiting.
        let mut timeout = POLL_TIMEOUT;
        while polled.len() < INTAKE_BATCH {
            match consumer.poll(timeout) {
                Some(Ok(m)) => polled.push(to_msg(&m)),
                Some(Err(err)) => {
                    log(atoms::warning(), "CONSUME", &err.to_string());
                    break;
                }
                None => break,
            }
            timeout = Duration::ZERO;
        }
        if !polled.is_empty() {
            intake(&shared, std::mem::take(&mut polled));
        }
        apply_pending(&shared, &consumer);
        // Sync: a round trip a second on this thread, and the committed offsets in the
        // stats are known rather than assumed.
        if shared.settings.group && last_commit.elapsed() >= shared.settings.commit_interval {
            commit(&shared, &consumer, None);
            last_commit = Instant::now();
        }
        if last_marks.elapsed() >= WATERMARK_INTERVAL {
            refresh_watermarks(&shared, &consumer);
            last_marks = Instant::now();
        }
    }
    // Shutdown: commit every ack, then close (leave the group, so others rebalance at once).
    if shared.settings.group {
        commit(&shared, &consumer, None);
    }
    shared.lock().closing = true;
    drop(consumer);
    shared.work.notify_all();
}
