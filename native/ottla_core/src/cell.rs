//! [`AckCell`]: the part of a partition's state that the hot-path NIFs (ack, demand, latest
//! offset) touch without taking any lock.
//!
//! Why atomics: those NIFs run on normal BEAM schedulers and may be called by many processes
//! at once; a mutex held by the poll thread can be preempted by the OS for milliseconds on a
//! busy machine. So the cell is the *only* place an ack or a demand is written. The cell is
//! owned by its [`Partition`](crate::partition::Partition): the partition publishes `low` and
//! `high` (the range an ack may fall in) and reads `acked` and `demand` back whenever it
//! handles an event. Nothing else mirrors these values.
//!
//! The rule that guards commits lives in [`AckCell::ack`]: an ack counts only when its
//! generation is the partition's and its offset lies between the first offset seen in this
//! assignment and the last offset delivered.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Offsets are never negative in Kafka: -1 stands for "none yet".
const NONE: i64 = -1;

/// What became of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The acked offset moved forward.
    Advanced,
    /// At or below the current ack, or before the first offset of this assignment: already
    /// done, nothing changes (acks are cumulative).
    Behind,
    /// Made under another generation than the partition's: dropped.
    StaleGeneration { current: i32 },
    /// Beyond the last delivered offset: it would commit messages nobody processed. Dropped.
    Undelivered { last_delivered: Option<i64> },
}

#[derive(Debug)]
pub struct AckCell {
    generation: i32,
    /// Outside a group there are no generations: an ack without one is accepted.
    accepts_no_generation: bool,
    acked: AtomicI64,
    low: AtomicI64,
    high: AtomicI64,
    demand: AtomicBool,
    /// An ack or a demand arrived that the partition has not looked at: the cell is on its
    /// consumer's list of partitions to visit (see [`AckCell::mark_dirty`]).
    dirty: AtomicBool,
}

fn some(v: i64) -> Option<i64> {
    (v >= 0).then_some(v)
}

impl AckCell {
    pub fn new(generation: i32, accepts_no_generation: bool) -> Self {
        AckCell {
            generation,
            accepts_no_generation,
            acked: AtomicI64::new(NONE),
            low: AtomicI64::new(NONE),
            high: AtomicI64::new(NONE),
            demand: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn generation(&self) -> i32 {
        self.generation
    }

    /// Records an ack of every offset up to and including `offset`.
    pub fn ack(&self, generation: Option<i32>, offset: i64) -> AckOutcome {
        let matches = match generation {
            Some(g) => g == self.generation,
            None => self.accepts_no_generation,
        };
        if !matches {
            return AckOutcome::StaleGeneration {
                current: self.generation,
            };
        }
        let high = self.high.load(Ordering::Acquire);
        if offset > high {
            return AckOutcome::Undelivered {
                last_delivered: some(high),
            };
        }
        let low = self.low.load(Ordering::Acquire);
        if low < 0 || offset < low {
            return AckOutcome::Behind;
        }
        if self.acked.fetch_max(offset, Ordering::AcqRel) < offset {
            AckOutcome::Advanced
        } else {
            AckOutcome::Behind
        }
    }

    /// The worker of `generation` asks for its next batch. False when the generation is not
    /// this partition's (a worker of an older assignment).
    pub fn demand(&self, generation: i32) -> bool {
        if generation != self.generation {
            return false;
        }
        self.demand.store(true, Ordering::Release);
        true
    }

    /// Elsa's "latest offset": the last acked offset + 1, `None` before any ack.
    pub fn latest_offset(&self) -> Option<i64> {
        self.acked().map(|a| a.saturating_add(1))
    }

    pub fn acked(&self) -> Option<i64> {
        some(self.acked.load(Ordering::Acquire))
    }

    // The partition's side: publishes the ack range, reads acks and demand back.

    pub(crate) fn set_low(&self, offset: i64) {
        let _ = self
            .low
            .compare_exchange(NONE, offset, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn raise_high(&self, offset: i64) {
        self.high.fetch_max(offset, Ordering::AcqRel);
    }

    /// Marks the cell as having news for its partition; true when it was not marked yet
    /// (the caller then puts the partition on the list of those to visit, once).
    pub fn mark_dirty(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// The partition is about to look at the cell: news after this marks it again.
    pub fn clear_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    pub(crate) fn take_demand(&self) -> bool {
        self.demand.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn clear_demand(&self) {
        self.demand.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_only_within_the_delivered_range_of_the_generation() {
        let cell = AckCell::new(7, false);
        assert_eq!(
            cell.ack(Some(7), 0),
            AckOutcome::Undelivered {
                last_delivered: None
            }
        );
        cell.set_low(10);
        cell.raise_high(14);
        assert_eq!(
            cell.ack(Some(6), 12),
            AckOutcome::StaleGeneration { current: 7 }
        );
        assert_eq!(
            cell.ack(None, 12),
            AckOutcome::StaleGeneration { current: 7 }
        );
        assert_eq!(
            cell.ack(Some(7), 15),
            AckOutcome::Undelivered {
                last_delivered: Some(14)
            }
        );
        assert_eq!(cell.ack(Some(7), 9), AckOutcome::Behind);
        assert_eq!(cell.ack(Some(7), 12), AckOutcome::Advanced);
        assert_eq!(cell.ack(Some(7), 11), AckOutcome::Behind);
        assert_eq!(cell.latest_offset(), Some(13));
    }

    #[test]
    fn outside_a_group_an_ack_without_generation_counts() {
        let cell = AckCell::new(3, true);
        cell.set_low(0);
        cell.raise_high(5);
        assert_eq!(cell.ack(None, 5), AckOutcome::Advanced);
    }

    #[test]
    fn a_cell_is_listed_once_until_it_is_looked_at() {
        let cell = AckCell::new(1, false);
        assert!(cell.mark_dirty());
        assert!(!cell.mark_dirty(), "already listed");
        cell.clear_dirty();
        assert!(cell.mark_dirty(), "news after the look lists it again");
    }

    #[test]
    fn demand_from_another_generation_is_ignored() {
        let cell = AckCell::new(2, false);
        assert!(!cell.demand(1));
        assert!(!cell.take_demand());
        assert!(cell.demand(2));
        assert!(cell.take_demand());
        assert!(!cell.take_demand());
    }
}
