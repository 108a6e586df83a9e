//! The poll thread and the consumer context: librdkafka's callbacks (rebalance, commit)
//! run here, inside `poll`.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ottla_core::partition::{PartitionState, Pushed};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use rustler::Encoder;

use super::{now_ms, Msg, Shared, Tp};
use crate::atoms;
use crate::context::{log, send_to, OttlaContext};

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
const WATERMARK_INTERVAL: Duration = Duration::from_millis(500);

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

fn notify_manager(shared: &Shared, kind: rustler::Atom, id: u64, list: Vec<Tp>) {
    let generation = if shared.settings.group {
        Some(shared.lock().epoch)
    } else {
        None
    };
    send_to(
        &shared.settings.manager,
        Box::new(move |env| (kind, id, generation, list).encode(env)),
    );
}

/// Records newly assigned partitions under a new generation and tells the manager.
pub fn assigned(shared: &Shared, tpl: &TopicPartitionList) {
    let list = tps(tpl);
    if list.is_empty() {
        // Cooperative rebalances often assign nothing new: no new generation then.
        shared.lock().last_rebalance_ms = Some(now_ms());
        return;
    }
    {
        let mut st = shared.lock();
        st.epoch += 1;
        let epoch = st.epoch;
        for tp in &list {
            st.partitions
                .entry(tp.clone())
                .or_insert_with(|| PartitionState::new(epoch, shared.settings.max_backlog));
        }
        st.last_rebalance_ms = Some(now_ms());
    }
    notify_manager(shared, atoms::ottla_assigned(), 0, list);
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
            if let Some(p) = st.partitions.get_mut(tp) {
                p.revoking = true;
            }
        }
        st.closing
    };

    if !lost && !closing {
        let deadline = Instant::now() + drain;
        let mut st = shared.lock();
        while !list
            .iter()
            .all(|tp| st.partitions.get(tp).is_none_or(|p| p.drained()))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || shared.stop.load(Ordering::SeqCst) {
                break;
            }
            st = shared
                .progress
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    if !lost && shared.settings.group {
        commit(shared, consumer, Some(&list), CommitMode::Sync);
    }

    if !closing {
        let id = {
            let mut st = shared.lock();
            st.revoke_seq += 1;
            st.revoke_seq
        };
        notify_manager(shared, atoms::ottla_revoked(), id, list.clone());
        let deadline = Instant::now() + drain;
        let mut st = shared.lock();
        while st.revoke_done < id && !shared.stop.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = shared
                .progress
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    let mut st = shared.lock();
    for tp in &list {
        st.partitions.remove(tp);
        st.workers.remove(tp);
    }
    st.last_rebalance_ms = Some(now_ms());
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
                    log(atoms::warning(), "RESUME", &format!("resume after assign failed: {err}"));
                }
            }
            assigned(&self.shared, tpl);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                let mut st = self.shared.lock();
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        if let Some(p) = st
                            .partitions
                            .get_mut(&(e.topic().to_string(), e.partition()))
                        {
                            p.mark_committed(o);
                        }
                    }
                }
            }
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => log(atoms::warning(), "COMMIT", &format!("commit failed: {err}")),
        }
    }
}

/// Commits acked offsets (of `only`, or of every partition) that are ahead of the committed
/// ones. Sync commits also update the state here (the callback covers async ones).
fn commit(shared: &Shared, consumer: &BaseConsumer<GroupCtx>, only: Option<&[Tp]>, mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    {
        let st = shared.lock();
        let mut add = |tp: &Tp, p: &PartitionState<Msg>| {
            if let Some(next) = p.commit_candidate() {
                let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(next));
            }
        };
        match only {
            Some(list) => {
                for tp in list {
                    if let Some(p) = st.partitions.get(tp) {
                        add(tp, p);
                    }
                }
            }
            None => {
                for (tp, p) in st.partitions.iter() {
                    add(tp, p);
                }
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) if matches!(mode, CommitMode::Sync) => {
            let mut st = shared.lock();
            for e in tpl.elements() {
                if let (Offset::Offset(o), Some(p)) = (
                    e.offset(),
                    st.partitions
                        .get_mut(&(e.topic().to_string(), e.partition())),
                ) {
                    p.mark_committed(o);
                }
            }
        }
        Ok(()) => {}
        Err(err) => log(atoms::warning(), "COMMIT", &format!("commit failed: {err}")),
    }
}

fn to_msg(m: &BorrowedMessage<'_>) -> Msg {
    let headers = match m.headers() {
        Some(hs) => hs
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect(),
        None => Vec::new(),
    };
    Msg {
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// Adds a polled message to its partition's backlog.
fn intake(shared: &Shared, m: &BorrowedMessage<'_>) {
    let tp = (m.topic().to_string(), m.partition());
    let mut st = shared.lock();
    let Some(p) = st.partitions.get_mut(&tp) else {
        return; // revoked meanwhile: it will be fetched by whoever owns it now
    };
    match p.push(to_msg(m)) {
        Pushed::Added { pause } => {
            let ready = p.ready();
            if pause {
                st.dirty = true;
            }
            if ready {
                shared.work.notify_one();
            }
        }
        Pushed::Duplicate | Pushed::Discarded => {}
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
        for (tp, p) in st.partitions.iter_mut() {
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
                if let Some(p) = st.partitions.get_mut(&(topic, partition)) {
                    if p.rewind_to == Some(offset) {
                        p.rewound();
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
        if let Some(p) = st.partitions.get_mut(&tp) {
            p.high_watermark = Some(high);
        }
    }
}

pub fn run(consumer: BaseConsumer<GroupCtx>, shared: Arc<Shared>) {
    let mut last_commit = Instant::now();
    let mut last_marks = Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(m)) => intake(&shared, &m),
            Some(Err(err)) => log(atoms::warning(), "CONSUME", &err.to_string()),
            None => {}
        }
        apply_pending(&shared, &consumer);
        // Sync: a round trip a second on this thread, and the committed offsets in the
        // stats are known rather than assumed.
        if shared.settings.group && last_commit.elapsed() >= shared.settings.commit_interval {
            commit(&shared, &consumer, None, CommitMode::Sync);
            last_commit = Instant::now();
        }
        if last_marks.elapsed() >= WATERMARK_INTERVAL {
            refresh_watermarks(&shared, &consumer);
            last_marks = Instant::now();
        }
    }
    // Shutdown: commit every ack, then close (leave the group, so others rebalance at once).
    if shared.settings.group {
        commit(&shared, &consumer, None, CommitMode::Sync);
    }
    shared.lock().closing = true;
    drop(consumer);
    shared.work.notify_all();
}
