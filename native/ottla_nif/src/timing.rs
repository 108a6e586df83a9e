//! How long NIFs that run on normal schedulers take: each records its duration, and
//! `nif_max_micros/0` reports (and resets) the longest seen. A NIF on a normal scheduler must
//! stay well under 1 ms; the test suite checks it while consuming.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static MAX_NANOS: AtomicU64 = AtomicU64::new(0);

/// Records the time from its creation to its drop.
pub struct Timed(Instant);

impl Timed {
    pub fn start() -> Self {
        Timed(Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        let nanos = self.0.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        MAX_NANOS.fetch_max(nanos, Ordering::Relaxed);
    }
}

#[rustler::nif]
fn nif_max_micros() -> u64 {
    MAX_NANOS.swap(0, Ordering::Relaxed) / 1_000
}
