//! The dispatch thread: sends each partition's next batch to its worker process when the
//! worker asked for one. One batch is one Erlang message (encoded by `message.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustler::{Encoder, Env, OwnedEnv, Term};

use ottla_core::partition::Event;

use super::{Outgoing, Shared};
use crate::atoms;

/// Demand, attachments and fetched messages wake this thread (`Shared::work`); this only
/// bounds an idle wait, as a safety net.
const IDLE_WAIT: Duration = Duration::from_secs(1);

pub fn run(shared: Arc<Shared>) {
    let mut env = OwnedEnv::new();
    let group = shared.settings.group;
    loop {
        let outgoing = loop {
            let wait = {
                let mut st = shared.lock();
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                // Demand and acks arrive through the cells: the partitions that got some look
                // (each cell is unmarked first, so news arriving meanwhile lists it again).
                for tp in shared.take_dirty() {
                    let Some(slot) = st.partitions.get(&tp) else {
                        continue;
                    };
                    slot.part.cell().clear_dirty();
                    st.handle(&tp, Event::Tick);
                }
                let next_retry = st.due_retries();
                if !st.outbox.is_empty() {
                    break std::mem::take(&mut st.outbox);
                }
                next_retry.map_or(IDLE_WAIT, |d| d.min(IDLE_WAIT))
            };
            // A wake-up given since the state was looked at is kept by `work`: none is lost.
            shared.work.wait(wait);
        };
        for o in outgoing {
            let pid = o.pid;
            let _ = env.send_and_clear(&pid, |env| encode_batch(env, o, group));
        }
        // Backlogs have room again: the poll thread may take more.
        shared.wake.notify();
    }
}

/// `{:ottla_messages, topic, partition, generation, {attempt, last_attempt?, high_watermark},
/// [%Ottla.Message{}]}`
fn encode_batch<'a>(env: Env<'a>, o: Outgoing, group: bool) -> Term<'a> {
    let topic = o.topic.encode(env);
    let generation = group.then_some(o.generation);
    let list = crate::message::encode_list(env, topic, o.partition, generation, &o.messages);
    (
        atoms::ottla_messages(),
        topic,
        o.partition,
        o.generation,
        o.attempt,
        list,
    )
        .encode(env)
}
