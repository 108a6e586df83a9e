//! The state of one assigned partition: its bounded backlog, the worker's demand, the
//! generation it was assigned in, and the delivered / acked / committed offsets.
//!
//! Everything here is plain bookkeeping; the NIF holds these behind one mutex and acts on
//! what the methods return (pause, resume, seek, commit, send a batch).

use std::collections::VecDeque;

/// A message in a backlog only needs its offset for the bookkeeping.
pub trait Offset {
    fn offset(&self) -> i64;
}

/// What became of a message pushed into the backlog.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Added; `pause` is true when the backlog just reached its bound.
    Added { pause: bool },
    /// Already seen (librdkafka re-fetched it after a pause): dropped.
    Duplicate,
    /// A rewind is pending or the partition is being revoked: dropped, it will be fetched again.
    Discarded,
    /// The backlog is full: dropped, and a seek back to `seek` is pending so it is fetched
    /// again once the partition resumes. The backlog never exceeds its bound.
    Overflow { seek: i64 },
}

/// What an ack did.
#[derive(Debug, PartialEq, Eq)]
pub enum Acked {
    /// The acked offset moved forward to this offset.
    Advanced(i64),
    /// Not beyond the current ack: nothing changes (acks are cumulative).
    Behind,
    /// Acked under another generation than the one this partition was assigned in: dropped.
    StaleGeneration { current: i32 },
}

#[derive(Debug)]
pub struct PartitionState<M> {
    pub generation: i32,
    max_backlog: usize,
    backlog: VecDeque<M>,
    /// Offset of the next message expected from librdkafka (duplicates are below it).
    next_fetch: Option<i64>,
    /// Offset of the first message seen in this generation: where delivery resumes when
    /// nothing was acked yet.
    first_seen: Option<i64>,
    /// Whether this partition should be paused (applied to librdkafka by the poll thread).
    pub want_paused: bool,
    /// Whether librdkafka has it paused right now.
    pub paused: bool,
    /// A seek to this offset is waiting for the poll thread.
    pub rewind_to: Option<i64>,
    /// The worker asked for a batch and has none outstanding.
    pub demand: bool,
    pub has_worker: bool,
    /// Stop delivering: the partition is being revoked.
    pub revoking: bool,
    pub last_delivered: Option<i64>,
    pub acked: Option<i64>,
    /// The last offset committed to Kafka (the *next* offset to read, Kafka's convention).
    pub committed: Option<i64>,
    pub high_watermark: Option<i64>,
}

impl<M: Offset> PartitionState<M> {
    pub fn new(generation: i32, max_backlog: usize) -> Self {
        PartitionState {
            generation,
            max_backlog: max_backlog.max(1),
            backlog: VecDeque::new(),
            next_fetch: None,
            first_seen: None,
            want_paused: false,
            paused: false,
            rewind_to: None,
            demand: false,
            has_worker: false,
            revoking: false,
            last_delivered: None,
            acked: None,
            committed: None,
            high_watermark: None,
        }
    }

    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Adds a message read from Kafka.
    pub fn push(&mut self, message: M) -> Pushed {
        let offset = message.offset();
        if self.rewind_to.is_some() || self.revoking {
            return Pushed::Discarded;
        }
        if let Some(next) = self.next_fetch {
            if offset < next {
                return Pushed::Duplicate;
            }
        }
        if self.backlog.len() >= self.max_backlog {
            // Polled before the pause took effect: hand it back to librdkafka.
            self.want_paused = true;
            self.next_fetch = Some(offset);
            self.rewind_to = Some(offset);
            return Pushed::Overflow { seek: offset };
        }
        self.first_seen.get_or_insert(offset);
        self.next_fetch = Some(offset + 1);
        self.backlog.push_back(message);
        let pause = !self.want_paused && self.backlog.len() >= self.max_backlog;
        if pause {
            self.want_paused = true;
        }
        Pushed::Added { pause }
    }

    /// Whether a batch can go to the worker now.
    pub fn ready(&self) -> bool {
        self.demand && self.has_worker && !self.revoking && !self.backlog.is_empty()
    }

    /// Takes up to `max` messages for the worker, if it asked for them. Sets `want_paused`
    /// to false when the backlog has drained to half its bound (hysteresis).
    pub fn take_batch(&mut self, max: usize) -> Option<Vec<M>> {
        if !self.ready() {
            return None;
        }
        let n = max.max(1).min(self.backlog.len());
        let batch: Vec<M> = self.backlog.drain(..n).collect();
        self.demand = false;
        self.last_delivered = batch.last().map(Offset::offset);
        if self.want_paused && self.backlog.len() <= self.max_backlog / 2 {
            self.want_paused = false;
        }
        Some(batch)
    }

    /// Records an ack of every offset up to and including `offset`.
    pub fn ack(&mut self, generation: i32, offset: i64) -> Acked {
        if generation != self.generation {
            return Acked::StaleGeneration {
                current: self.generation,
            };
        }
        match self.acked {
            Some(acked) if offset <= acked => Acked::Behind,
            // Before the first message of this assignment: committing it would move the
            // group's offset backwards.
            _ if self.first_seen.is_none_or(|first| offset < first) => Acked::Behind,
            _ => {
                self.acked = Some(offset);
                Acked::Advanced(offset)
            }
        }
    }

    /// `acked + 1`, Elsa's "latest offset", or `None` when nothing was acked.
    pub fn latest_offset(&self) -> Option<i64> {
        self.acked.map(|a| a.saturating_add(1))
    }

    /// The offset to commit, when acks went beyond what is committed.
    pub fn commit_candidate(&self) -> Option<i64> {
        let next = self.latest_offset()?;
        match self.committed {
            Some(committed) if next <= committed => None,
            _ => Some(next),
        }
    }

    /// Records a successful commit; a committed offset never moves backwards.
    pub fn mark_committed(&mut self, offset: i64) {
        if self.committed.is_none_or(|c| offset > c) {
            self.committed = Some(offset);
        }
    }

    /// Every delivered message has been acked.
    pub fn drained(&self) -> bool {
        match (self.last_delivered, self.acked) {
            (None, _) => true,
            (Some(delivered), Some(acked)) => acked >= delivered,
            (Some(_), None) => false,
        }
    }

    /// The worker is gone (or asked to redeliver): forget what was fetched but not acked and
    /// return the offset to seek to, so unacked messages are delivered again. `None` when no
    /// message was seen in this generation (nothing to redeliver).
    pub fn rewind(&mut self) -> Option<i64> {
        self.demand = false;
        let resume = self.latest_offset().or(self.first_seen)?;
        self.rewind_from(resume)
    }

    /// Redeliver from `offset` (e.g. a handler acked only part of its batch).
    pub fn rewind_from(&mut self, offset: i64) -> Option<i64> {
        self.backlog.clear();
        self.want_paused = false;
        self.last_delivered = self.acked;
        self.next_fetch = Some(offset);
        self.rewind_to = Some(offset);
        Some(offset)
    }

    /// The poll thread sought to `rewind_to`: messages flow again.
    pub fn rewound(&mut self) {
        self.rewind_to = None;
    }

    /// Messages between the next offset to process and the high watermark.
    pub fn lag(&self) -> Option<i64> {
        let hw = self.high_watermark?;
        let next = self
            .latest_offset()
            .or(self.committed)
            .or(self.first_seen)?;
        Some((hw - next).max(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct M(i64);
    impl Offset for M {
        fn offset(&self) -> i64 {
            self.0
        }
    }

    fn ready(max_backlog: usize) -> PartitionState<M> {
        let mut p = PartitionState::new(1, max_backlog);
        p.has_worker = true;
        p
    }

    fn offsets(batch: Option<Vec<M>>) -> Vec<i64> {
        batch.unwrap_or_default().into_iter().map(|m| m.0).collect()
    }

    #[test]
    fn pauses_at_the_bound_and_resumes_at_half() {
        let mut p = ready(4);
        assert_eq!(p.push(M(0)), Pushed::Added { pause: false });
        assert_eq!(p.push(M(1)), Pushed::Added { pause: false });
        assert_eq!(p.push(M(2)), Pushed::Added { pause: false });
        assert_eq!(p.push(M(3)), Pushed::Added { pause: true });
        assert!(p.want_paused);
        p.demand = true;
        assert_eq!(offsets(p.take_batch(1)), vec![0]);
        assert!(p.want_paused, "3 left of a bound of 4: still above half");
        p.demand = true;
        assert_eq!(offsets(p.take_batch(1)), vec![1]);
        assert!(!p.want_paused, "2 left of a bound of 4: resume");
    }

    #[test]
    fn overflow_past_the_bound_is_sought_back_not_kept() {
        let mut p = ready(2);
        p.push(M(0));
        assert_eq!(p.push(M(1)), Pushed::Added { pause: true });
        assert_eq!(p.push(M(2)), Pushed::Overflow { seek: 2 });
        assert_eq!(p.push(M(3)), Pushed::Discarded);
        assert_eq!(p.backlog_len(), 2);
        assert_eq!(p.rewind_to, Some(2));
        p.rewound();
        p.demand = true;
        assert_eq!(offsets(p.take_batch(10)), vec![0, 1]);
        assert_eq!(p.push(M(2)), Pushed::Added { pause: false });
    }

    #[test]
    fn delivers_only_on_demand_in_offset_order() {
        let mut p = ready(100);
        for o in 10..15 {
            p.push(M(o));
        }
        assert!(p.take_batch(10).is_none(), "no demand yet");
        p.demand = true;
        assert_eq!(offsets(p.take_batch(3)), vec![10, 11, 12]);
        assert!(p.take_batch(3).is_none(), "one batch per demand");
        p.demand = true;
        assert_eq!(offsets(p.take_batch(3)), vec![13, 14]);
        assert_eq!(p.last_delivered, Some(14));
    }

    #[test]
    fn refetched_duplicates_are_dropped() {
        let mut p = ready(100);
        p.push(M(0));
        p.push(M(1));
        assert_eq!(p.push(M(1)), Pushed::Duplicate);
        assert_eq!(p.push(M(0)), Pushed::Duplicate);
        assert_eq!(p.backlog_len(), 2);
    }

    #[test]
    fn acks_are_cumulative_and_never_go_back() {
        let mut p = ready(10);
        p.push(M(0));
        assert_eq!(p.latest_offset(), None);
        assert_eq!(p.ack(1, 5), Acked::Advanced(5));
        assert_eq!(p.ack(1, 3), Acked::Behind);
        assert_eq!(p.ack(1, 5), Acked::Behind);
        assert_eq!(p.latest_offset(), Some(6));
    }

    #[test]
    fn acks_from_another_generation_are_dropped() {
        let mut p: PartitionState<M> = PartitionState::new(7, 10);
        assert_eq!(p.ack(6, 100), Acked::StaleGeneration { current: 7 });
        assert_eq!(p.acked, None);
        assert_eq!(p.commit_candidate(), None);
    }

    #[test]
    fn commits_only_forward() {
        let mut p = ready(10);
        p.push(M(0));
        p.ack(1, 9);
        assert_eq!(p.commit_candidate(), Some(10));
        p.mark_committed(10);
        assert_eq!(p.commit_candidate(), None);
        p.mark_committed(4);
        assert_eq!(p.committed, Some(10), "a commit never moves backwards");
        p.ack(1, 12);
        assert_eq!(p.commit_candidate(), Some(13));
    }

    #[test]
    fn drained_when_every_delivered_offset_is_acked() {
        let mut p = ready(10);
        assert!(p.drained());
        p.push(M(0));
        p.push(M(1));
        p.demand = true;
        p.take_batch(10);
        assert!(!p.drained());
        p.ack(1, 0);
        assert!(!p.drained());
        p.ack(1, 1);
        assert!(p.drained());
    }

    #[test]
    fn rewind_resumes_after_the_last_ack_and_discards_until_sought() {
        let mut p = ready(10);
        for o in 20..25 {
            p.push(M(o));
        }
        p.demand = true;
        p.take_batch(3); // 20, 21, 22 delivered
        p.ack(1, 20);
        assert_eq!(p.rewind(), Some(21));
        assert_eq!(p.backlog_len(), 0);
        assert_eq!(
            p.push(M(25)),
            Pushed::Discarded,
            "prefetched before the seek"
        );
        p.rewound();
        assert_eq!(p.push(M(20)), Pushed::Duplicate);
        assert_eq!(p.push(M(21)), Pushed::Added { pause: false });
        p.demand = true;
        assert_eq!(offsets(p.take_batch(10)), vec![21]);
    }

    #[test]
    fn rewind_without_acks_goes_back_to_the_first_message_seen() {
        let mut p = ready(10);
        assert_eq!(p.rewind(), None, "nothing seen: nothing to redeliver");
        p.push(M(40));
        p.push(M(41));
        p.demand = true;
        p.take_batch(10);
        assert_eq!(p.rewind(), Some(40));
    }

    #[test]
    fn revoking_stops_delivery_and_intake() {
        let mut p = ready(10);
        p.push(M(0));
        p.demand = true;
        p.revoking = true;
        assert!(p.take_batch(10).is_none());
        assert_eq!(p.push(M(1)), Pushed::Discarded);
    }

    #[test]
    fn acks_before_the_first_message_of_the_assignment_are_ignored() {
        let mut p = ready(10);
        assert_eq!(p.ack(1, 3), Acked::Behind, "nothing seen yet");
        p.push(M(50));
        assert_eq!(p.ack(1, 49), Acked::Behind);
        assert_eq!(p.commit_candidate(), None);
        assert_eq!(p.ack(1, 50), Acked::Advanced(50));
        assert_eq!(p.commit_candidate(), Some(51));
    }

    #[test]
    fn lag_counts_from_the_next_offset_to_process() {
        let mut p = ready(10);
        p.high_watermark = Some(100);
        assert_eq!(p.lag(), None);
        p.push(M(50));
        assert_eq!(p.lag(), Some(50));
        p.ack(1, 89);
        assert_eq!(p.lag(), Some(10));
    }
}
